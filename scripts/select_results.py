"""Training data selection: domain gain vs general retention at an equal step budget.

For each domain (medical: PubMedQA abstracts; financial: NWGI news sentences, scored on the
Financial PhraseBank) this selects ``budget`` (10 %) of the pool with random, LESS,
orthogonal and OGS selection (``forgetless select``; the methods share one run directory, so
the gradients are computed once), fine-tunes SmolLM2-135M-Instruct in full on each selection
and on the whole pool with the same number of steps, and evaluates every model on the
domain's held-out perplexity and on the general tasks (C4 and GSM8K perplexity, ARC-easy,
PIQA). Changes against the base are paired. Every stage is cached in the run directory, so
an interrupted run resumes. Writes ``<output>.md`` and ``<output>.json``::

    python scripts/select_results.py --data-dir ../shared/data
    python scripts/select_results.py --domains medical --methods random ogs

Target (OGS): at least 90 % of the full-data domain gain with at most a third of the
full-data general drop (C4 perplexity), and not dominated by random or LESS on the
gain-vs-drop frontier.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetless.config import ForgetlessConfig, load_config
from forgetless.errors import ForgetlessError
from forgetless.evaluate.stats import paired_task_change, read_evaluation
from forgetless.pipeline import (
    DataFileTrainStage,
    EvaluateStage,
    RunDirectory,
    Stage,
    write_text_atomic,
)
from forgetless.report.experiment import (
    experiment_parser,
    parse_experiment_args,
    print_event,
    shared_overrides,
    write_results,
)
from forgetless.select.selection import SelectionData, record_row, run_selection

PACKAGED_CONFIG = (
    Path(__file__).resolve().parents[1] / "src/forgetless/configs/select_experiment.yaml"
)


@dataclass(frozen=True)
class Domain:
    source: str
    split: str
    task: str  # held-out evaluation of the domain


DOMAINS = {
    "medical": Domain("pubmedqa", "train", "ppl:pubmedqa@test"),
    "financial": Domain("nwgi", "test", "ppl:financial_phrasebank"),
}
METHODS = ("random", "less", "orthogonal", "ogs")
RETENTION_TASK = "c4"
GAIN_TARGET, DROP_TARGET = 0.9, 1 / 3
# Selection stages whose work each method needs (shared ones count for every method that
# needs them: each would pay them on its own).
SELECTION_WORK = {
    "random": (),
    "less": ("warmup", "gradients_anchor", "gradients_validation", "gradients_pool"),
    "orthogonal": ("warmup", "gradients_anchor", "gradients_validation", "gradients_pool"),
    "ogs": (
        "warmup",
        "gradients_anchor",
        "gradients_validation",
        "gradients_featured",
        "gradients_pool",
        "navigator_inputs",
        "navigator",
    ),
}


def domain_config(args, shared: dict, domain: Domain, **more) -> ForgetlessConfig:
    overrides = {
        **shared,
        "data.source": domain.source,
        "data.split": domain.split,
        "data.kind": "text",
        **more,
    }
    return load_config(args.config, overrides)


def select_for_domain(args, shared, name: str, methods: list[str]) -> dict[str, Any]:
    """Run every selection of one domain; returns the stage results and the data files."""
    domain = DOMAINS[name]
    config = domain_config(args, shared, domain)
    select_dir = Path(config.run_dir) / f"select_{name}"
    selections, files, work = {}, {}, {}
    for method in methods:
        method_config = domain_config(args, shared, domain, **{"select.method": method})
        results = run_selection(method_config, select_dir, on_event=print_event)
        selections[method] = results[f"selection_{method}"]
        files[method] = selections[method].directory / "selected.jsonl"
        work[method] = {
            stage: results[stage].summary.get("seconds", 0.0)
            for stage in SELECTION_WORK[method]
            if stage in results
        }
    # The full-data baseline trains on exactly the pool the methods choose from.
    pool = SelectionData.load(config).candidates
    full = select_dir / "candidates.jsonl"
    lines = [json.dumps(record_row(record), ensure_ascii=False) for record in pool]
    write_text_atomic(full, "\n".join(lines) + "\n")
    return {"selections": selections, "files": {"full": full, **files}, "work": work}


def summarise_domain(config, name, results, selected) -> dict[str, Any]:
    base = read_evaluation(results["eval_base"].directory)
    tasks = [*config.evaluate.domain_tasks, *config.evaluate.general_tasks]
    domain_task = DOMAINS[name].task
    rows: dict[str, dict[str, Any]] = {}
    for label in selected["files"]:
        evaluation = read_evaluation(results[f"eval_{name}_{label}"].directory)
        row: dict[str, Any] = {
            "scores": {task: evaluation[0][task]["value"] for task in tasks},
            "changes": {task: paired_task_change(task, base, evaluation) for task in tasks},
            "training": results[f"train_{name}_{label}"].summary,
        }
        row["domain_gain"] = -row["changes"][domain_task]["change"]
        row["general_drop"] = row["changes"][RETENTION_TASK]["change"]
        if label in selected["selections"]:
            summary = selected["selections"][label].summary
            row["selected"] = summary["selected"]
            row["gradient_metrics"] = summary.get("gradient_metrics")
            row["selection_seconds"] = sum(selected["work"][label].values())
        rows[label] = row
    full = rows["full"]
    for label, row in rows.items():
        if label == "full":
            continue
        row["gain_share"] = (
            row["domain_gain"] / full["domain_gain"] if full["domain_gain"] > 0 else None
        )
        row["drop_share"] = (
            row["general_drop"] / full["general_drop"] if full["general_drop"] > 0 else None
        )
        row["dominated_by"] = [
            other
            for other, peer in rows.items()
            if other not in (label, "full")
            and peer["domain_gain"] >= row["domain_gain"]
            and peer["general_drop"] <= row["general_drop"]
            and (
                peer["domain_gain"] > row["domain_gain"]
                or peer["general_drop"] < row["general_drop"]
            )
        ]
    verdict = None
    if "ogs" in rows:
        ogs = rows["ogs"]
        verdict = {
            "gain_share_ok": ogs["gain_share"] is not None and ogs["gain_share"] >= GAIN_TARGET,
            "drop_share_ok": ogs["drop_share"] is not None and ogs["drop_share"] <= DROP_TARGET,
            "not_dominated_by_random_or_less": not ({"random", "less"} & set(ogs["dominated_by"])),
        }
        navigator = selected["selections"]["ogs"]
        verdict["navigator"] = json.loads(
            (navigator.directory.parent / "navigator" / "stage.json").read_text()
        )["summary"]
    return {
        "domain": vars(DOMAINS[name]),
        "base_scores": {task: base[0][task]["value"] for task in tasks},
        "rows": rows,
        "ogs_target": verdict,
    }


def _change(change: dict) -> str:
    low, high = change["ci95"]
    return f"{change['change']:+.1f} [{low:+.1f}, {high:+.1f}]"


def _share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def render(summary: dict, args) -> str:
    train = summary["train"]
    tasks = [*summary["evaluate"]["domain_tasks"], *summary["evaluate"]["general_tasks"]]
    lines = [
        f"# Training data selection: {summary['model']}",
        "",
        f"Every model: full fine-tuning, {train['max_steps']} steps of {train['batch_size']} x "
        f"{train['max_length']} packed tokens, lr {train['learning_rate']:g} "
        f"({train['lr_scheduler']}), on {100 * summary['budget']:.0f} % of the domain pool "
        "chosen by each method, or on the whole pool (full). Changes are paired against the "
        "base (95 % interval): perplexity in % (negative = better), accuracy in points. Gain "
        "share and drop share: the domain-perplexity gain and the C4-perplexity rise as shares "
        f"of full-data training's. OGS target: gain share ≥ {GAIN_TARGET:.0%}, drop share ≤ "
        f"{DROP_TARGET:.0%}, not dominated by random or LESS.",
    ]
    for name, domain in summary["domains"].items():
        lines += [
            "",
            f"## {name} ({domain['domain']['source']} → {domain['domain']['task']})",
            "",
            "| model | " + " | ".join(tasks) + " | gain share | drop share | dominated by |",
            "|---" * (len(tasks) + 4) + "|",
            "| base | "
            + " | ".join(f"{domain['base_scores'][task]:.4g}" for task in tasks)
            + " | | | |",
        ]
        for label, row in domain["rows"].items():
            cells = [_change(row["changes"][task]) for task in tasks]
            share = "" if label == "full" else _share(row["gain_share"])
            drop = "" if label == "full" else _share(row["drop_share"])
            dominated = ", ".join(row.get("dominated_by", [])) or ("" if label == "full" else "–")
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | {share} | {drop} | {dominated} |"
            )
        lines += [
            "",
            "| method | selected | epochs trained | orthogonality (sel. / pool) | "
            "utility (sel. / pool) | selection minutes |",
            "|---|---|---|---|---|---|",
        ]
        for label, row in domain["rows"].items():
            if "selected" not in row:
                continue
            metrics = row["gradient_metrics"] or {}

            def pair(key, metrics=metrics):
                if key not in metrics or metrics[key]["selected_mean"] is None:
                    return "–"
                return f"{metrics[key]['selected_mean']:.3f} / {metrics[key]['pool_mean']:.3f}"

            lines.append(
                f"| {label} | {row['selected']} | "
                f"{row['training']['epochs']:.1f} | "
                f"{pair('orthogonality')} | {pair('utility')} | "
                f"{row['selection_seconds'] / 60:.1f} |"
            )
        target = domain["ogs_target"]
        if target:
            held = target["navigator"].get("held_out", {})
            lines += [
                "",
                f"OGS target — gain share met: {target['gain_share_ok']}; drop share met: "
                f"{target['drop_share_ok']}; not dominated by random or LESS: "
                f"{target['not_dominated_by_random_or_less']}.",
            ]
            if held:
                lines.append(
                    f"Navigator on {held['samples']} held-out featured samples: Spearman "
                    f"{held['spearman_vs_lagrangian']:.2f} with the exact Lagrangian score; its "
                    f"top pick has utility {held['navigator_top']['utility']:.3f} and cost "
                    f"{held['navigator_top']['cost']:.3f} (exact choice "
                    f"{held['exact_top']['utility']:.3f} / {held['exact_top']['cost']:.3f}, "
                    f"held-out mean {held['pool_mean']['utility']:.3f} / "
                    f"{held['pool_mean']['cost']:.3f})."
                )
    lines += ["", f"Command: `python scripts/select_results.py {' '.join(args.argv)}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser(
        __doc__, PACKAGED_CONFIG, "runs/select_experiment", "docs/results/select"
    )
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parse_experiment_args(parser, argv)
    try:
        shared = shared_overrides(args)
        config = load_config(args.config, shared)
        missing = [n for n in args.domains if DOMAINS[n].task not in config.evaluate.domain_tasks]
        if missing or RETENTION_TASK not in config.evaluate.general_tasks:
            raise ForgetlessError(
                "evaluate must include the domain tasks of "
                f"{missing or args.domains} and {RETENTION_TASK!r} among the general tasks"
            )
        runs = RunDirectory(Path(config.run_dir), on_event=print_event)
        results = {"eval_base": runs.run(EvaluateStage("eval_base", config), {})}
        selected = {}
        for name in args.domains:
            selected[name] = select_for_domain(args, shared, name, args.methods)
            for label, data_file in selected[name]["files"].items():
                stages: list[Stage] = [
                    DataFileTrainStage(config, f"train_{name}_{label}", data_file)
                ]
                stages.append(
                    EvaluateStage(f"eval_{name}_{label}", config, model_from=stages[0].name)
                )
                for stage in stages:
                    results[stage.name] = runs.run(stage, results)
    except ForgetlessError as error:
        sys.exit(f"error: {error}")
    summary = {
        "model": config.model.name,
        "budget": config.select.budget,
        "train": config.train.model_dump(mode="json"),
        "select": config.select.model_dump(mode="json"),
        "evaluate": config.evaluate.model_dump(mode="json"),
        "domains": {
            name: summarise_domain(config, name, results, selected[name]) for name in args.domains
        },
    }
    write_results(args.output, summary, render(summary, args))


if __name__ == "__main__":
    main()
