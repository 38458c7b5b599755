"""Check that forgetless's multiple-choice scorer agrees with lm-evaluation-harness.

Both tools score the same ARC-easy items with the same in-memory model: lm-eval through the
task config ``forgetless lm-eval export`` writes (``forgetless.evaluate.lm_eval``, in a
temporary directory, run offline) and HFLM wrapping the loaded model, forgetless through
``score_multiple_choice``. The script prints both accuracies, their difference in points, the
per-item agreement of the predictions, the largest log-likelihood difference, and both wall
times.

    python scripts/compare_lm_eval.py --limit 200
    python scripts/compare_lm_eval.py --model smollm2-135m --output /tmp/compare.json

Needs the ``lmeval`` extra (``pip install -e '.[lmeval]'``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from forgetless.errors import ForgetlessError
from forgetless.evaluate import score_multiple_choice
from forgetless.evaluate.config import EvalConfig
from forgetless.evaluate.lm_eval import (
    export_tasks,
    hub_offline,
    lm_eval_task_name,
    task_manager_for,
)
from forgetless.evaluate.tasks import load_tasks
from forgetless.io import write_json_atomic
from forgetless.models import load_model
from forgetless.report.experiment import exit_with_error

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = "arc_easy"
LM_EVAL_TASK = lm_eval_task_name(TASK)


def default_data_dir() -> Path:
    configured = os.environ.get("FORGETLESS_DATA_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, local path or hub id")
    parser.add_argument("--data-dir", type=Path, default=None, help="holds general/arc_easy.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="first N items (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval HFLM batch size")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="forgetless token budget")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=None, help="also write a JSON summary")
    return parser.parse_args(argv)


def run_lm_eval(model, tokenizer, task_dir: Path, batch_size: int) -> tuple[dict, float, float]:
    """lm-eval's results, its total wall time, and the part spent scoring log-likelihoods."""
    start = time.perf_counter()
    task_manager = task_manager_for([LM_EVAL_TASK], task_dir)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # Time the model work alone too: the total also holds task and dataset set-up.
    scoring_seconds = 0.0
    loglikelihood = lm.loglikelihood

    def timed_loglikelihood(*args, **kwargs):
        nonlocal scoring_seconds
        began = time.perf_counter()
        try:
            return loglikelihood(*args, **kwargs)
        finally:
            scoring_seconds += time.perf_counter() - began

    lm.loglikelihood = timed_loglikelihood
    output = simple_evaluate(
        model=lm,
        tasks=[LM_EVAL_TASK],
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    return output, time.perf_counter() - start, scoring_seconds


def lm_eval_loglikelihoods(samples: list[dict]) -> dict[int, list[float]]:
    """doc_id -> per-choice log-likelihoods from lm-eval's logged samples."""
    by_doc = {}
    for sample in samples:
        responses = sample["filtered_resps"]
        by_doc[int(sample["doc_id"])] = [float(_first(response)) for response in responses]
    return by_doc


def _first(response):
    # A response is (loglikelihood, is_greedy), sometimes wrapped in one more list.
    while isinstance(response, (list, tuple)):
        response = response[0]
    return response


def compare(args: argparse.Namespace) -> dict:
    """Score the items with both tools; the summary the script prints and writes."""
    data_dir = args.data_dir or default_data_dir()
    evaluate = EvalConfig(domain_tasks=[], general_tasks=[TASK], limit=args.limit)
    _, records = load_tasks([TASK], evaluate, data_dir=data_dir)[TASK]
    print(f"model {args.model}, {len(records)} ARC-easy items from {data_dir}", flush=True)
    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer

    start = time.perf_counter()
    ours = score_multiple_choice(model, tokenizer, records, batch_tokens=args.batch_tokens)
    ours_seconds = time.perf_counter() - start
    print(
        f"forgetless: acc {ours.accuracy:.4f} acc_norm {ours.accuracy_norm:.4f} "
        f"in {ours_seconds:.1f} s",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="forgetless-lm-eval-") as tmp:
        # The exported task holds the exact items scored above (same --limit).
        export_tasks([TASK], evaluate, tmp, data_dir=data_dir)
        output, theirs_seconds, theirs_scoring = run_lm_eval(
            model, tokenizer, Path(tmp), args.batch_size
        )
    if output is None:
        raise ForgetlessError("lm-eval returned no results")
    metrics = output["results"][LM_EVAL_TASK]
    theirs_acc, theirs_norm = float(metrics["acc,none"]), float(metrics["acc_norm,none"])
    theirs_lls = lm_eval_loglikelihoods(output["samples"][LM_EVAL_TASK])
    return {
        "model": args.model,
        "items": len(records),
        "forgetless": {
            "acc": ours.accuracy,
            "acc_norm": ours.accuracy_norm,
            "seconds": ours_seconds,
        },
        "lm_eval": {
            "acc": theirs_acc,
            "acc_norm": theirs_norm,
            "seconds": theirs_seconds,
            "scoring_seconds": theirs_scoring,
        },
        "difference_points": {
            "acc": 100 * abs(ours.accuracy - theirs_acc),
            "acc_norm": 100 * abs(ours.accuracy_norm - theirs_norm),
        },
        **agreement(records, ours.items, theirs_lls),
        "speedup": theirs_seconds / ours_seconds,
        "speedup_scoring_only": theirs_scoring / ours_seconds,
    }


def agreement(records, our_items, their_lls: dict[int, list[float]]) -> dict:
    """How often both tools predict the same choice, and their largest log-likelihood gap."""
    agree = agree_norm = 0
    max_ll_difference = 0.0
    for index, (record, item) in enumerate(zip(records, our_items, strict=True)):
        lls = np.asarray(their_lls[index])
        lengths = np.asarray([float(len(choice)) for choice in record.choices])
        agree += int(np.argmax(lls)) == item.prediction
        agree_norm += int(np.argmax(lls / lengths)) == item.prediction_norm
        difference = np.max(np.abs(lls - np.asarray(item.loglikelihoods)))
        max_ll_difference = max(max_ll_difference, float(difference))
    n = len(records)
    return {
        "agreement": {"prediction": agree / n, "prediction_norm": agree_norm / n},
        "max_abs_loglikelihood_difference": max_ll_difference,
    }


def print_summary(summary: dict) -> None:
    ours, theirs = summary["forgetless"], summary["lm_eval"]
    difference, agree = summary["difference_points"], summary["agreement"]
    print()
    print(f"{'':12}{'acc':>9}{'acc_norm':>10}{'seconds':>10}")
    for label, row in (("forgetless", ours), ("lm-eval", theirs)):
        print(f"{label:12}{row['acc']:9.4f}{row['acc_norm']:10.4f}{row['seconds']:10.1f}")
    print(
        f"|difference| {difference['acc']:.2f} points acc, "
        f"{difference['acc_norm']:.2f} points acc_norm"
    )
    print(
        f"per-item agreement: {100 * agree['prediction']:.2f} % (acc), "
        f"{100 * agree['prediction_norm']:.2f} % (acc_norm); max |log-likelihood difference| "
        f"{summary['max_abs_loglikelihood_difference']:.2e}"
    )
    print(
        f"speed: forgetless is {summary['speedup']:.1f}x faster than lm-eval end to end, "
        f"{summary['speedup_scoring_only']:.1f}x counting only lm-eval's scoring "
        f"({theirs['scoring_seconds']:.1f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Everything is local: the model, the data and lm-eval's task; never touch a hub.
        with hub_offline():
            summary = compare(args)
    except ForgetlessError as err:
        exit_with_error(str(err))
    print_summary(summary)
    if args.output:
        write_json_atomic(args.output, summary)
        print(f"summary written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
