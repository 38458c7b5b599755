"""Check that forgetless's multiple-choice scorer agrees with lm-evaluation-harness.

Both tools score the same ARC-easy items with the same in-memory model: lm-eval through a
local task YAML (written to a temporary directory, run offline) and HFLM wrapping the loaded
model, forgetless through ``score_multiple_choice``. The script prints both accuracies, their
difference in points, the per-item agreement of the predictions, the largest log-likelihood
difference, and both wall times.

    python scripts/compare_lm_eval.py --limit 200
    python scripts/compare_lm_eval.py --model smollm2-135m --output /tmp/compare.json

Needs the ``lmeval`` extra (``pip install -e '.[lmeval]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# lm-eval loads the task data through `datasets`; everything is local, so never touch the hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from forgetless.data.records import MultipleChoiceRecord  # noqa: E402
from forgetless.evaluate import score_multiple_choice  # noqa: E402
from forgetless.models import load_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ARC_EASY = Path("general") / "arc_easy.jsonl"
TASK_NAME = "forgetless_arc_easy_check"


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


def load_rows(path: Path, limit: int | None) -> list[dict]:
    if not path.is_file():
        sys.exit(f"error: ARC-easy file not found: {path} (set --data-dir or FORGETLESS_DATA_DIR)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        sys.exit(f"error: no rows in {path}")
    return rows


def write_task(directory: Path, data_file: Path) -> None:
    """A local lm-eval task equivalent to ARC-easy's: "<query>\\nAnswer:" + " <choice>"."""
    task = {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    (directory / f"{TASK_NAME}.yaml").write_text(yaml.safe_dump(task), encoding="utf-8")


def run_lm_eval(model, tokenizer, task_dir: Path, batch_size: int) -> tuple[dict, float, float]:
    """lm-eval's results, its total wall time, and the part spent scoring log-likelihoods."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        sys.exit("error: lm-eval is not installed; pip install -e '.[lmeval]'")
    start = time.perf_counter()
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
        tasks=[TASK_NAME],
        task_manager=TaskManager(include_path=str(task_dir)),
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    rows = load_rows(data_dir / ARC_EASY, args.limit)
    print(f"model {args.model}, {len(rows)} ARC-easy items from {data_dir / ARC_EASY}", flush=True)
    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer

    records = [
        MultipleChoiceRecord(
            query=row["query"] + "\nAnswer:", choices=tuple(row["choices"]), gold=int(row["gold"])
        )
        for row in rows
    ]
    start = time.perf_counter()
    ours = score_multiple_choice(model, tokenizer, records, batch_tokens=args.batch_tokens)
    ours_seconds = time.perf_counter() - start
    print(
        f"forgetless: acc {ours.accuracy:.4f} acc_norm {ours.accuracy_norm:.4f} "
        f"in {ours_seconds:.1f} s",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="forgetless-lm-eval-") as tmp:
        task_dir = Path(tmp)
        # The exact items scored above, so --limit selects the same subset for both tools.
        data_file = task_dir / "arc_easy_subset.jsonl"
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        write_task(task_dir, data_file)
        output, theirs_seconds, theirs_scoring = run_lm_eval(
            model, tokenizer, task_dir, args.batch_size
        )
    if output is None:
        sys.exit("error: lm-eval returned no results")
    metrics = output["results"][TASK_NAME]
    theirs_acc, theirs_norm = float(metrics["acc,none"]), float(metrics["acc_norm,none"])
    theirs_lls = lm_eval_loglikelihoods(output["samples"][TASK_NAME])

    agree = agree_norm = 0
    max_ll_difference = 0.0
    for index, (record, item) in enumerate(zip(records, ours.items, strict=True)):
        lls = np.asarray(theirs_lls[index])
        lengths = np.asarray([float(len(choice)) for choice in record.choices])
        agree += int(np.argmax(lls)) == item.prediction
        agree_norm += int(np.argmax(lls / lengths)) == item.prediction_norm
        difference = np.max(np.abs(lls - np.asarray(item.loglikelihoods)))
        max_ll_difference = max(max_ll_difference, float(difference))

    n = len(records)
    summary = {
        "model": args.model,
        "items": n,
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
        "agreement": {"prediction": agree / n, "prediction_norm": agree_norm / n},
        "max_abs_loglikelihood_difference": max_ll_difference,
        "speedup": theirs_seconds / ours_seconds,
        "speedup_scoring_only": theirs_scoring / ours_seconds,
    }
    print()
    print(f"{'':12}{'acc':>9}{'acc_norm':>10}{'seconds':>10}")
    print(f"{'forgetless':12}{ours.accuracy:9.4f}{ours.accuracy_norm:10.4f}{ours_seconds:10.1f}")
    print(f"{'lm-eval':12}{theirs_acc:9.4f}{theirs_norm:10.4f}{theirs_seconds:10.1f}")
    print(
        f"|difference| {summary['difference_points']['acc']:.2f} points acc, "
        f"{summary['difference_points']['acc_norm']:.2f} points acc_norm"
    )
    print(
        f"per-item agreement: {100 * agree / n:.2f} % (acc), {100 * agree_norm / n:.2f} % "
        f"(acc_norm); max |log-likelihood difference| {max_ll_difference:.2e}"
    )
    print(
        f"speed: forgetless is {summary['speedup']:.1f}x faster than lm-eval end to end, "
        f"{summary['speedup_scoring_only']:.1f}x counting only lm-eval's scoring "
        f"({theirs_scoring:.1f} s)"
    )
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"summary written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
