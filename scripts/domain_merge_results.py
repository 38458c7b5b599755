r"""Domain experts merged into one model: the merging results table.

Fine-tunes SmolLM2-135M-Instruct in full once per domain (medical: PubMedQA abstracts;
financial: NWGI news sentences; legal: EUR-Lex acts), merges the experts with each method of
``forgetless merge`` at several keep fractions, and evaluates the base, every expert and every
merge on each domain's held-out perplexity and on the general tasks. Changes against the base
are paired (same items, same documents), so their intervals are far tighter than those of the
scores themselves. Every stage is cached in the run directory: an interrupted run resumes, and
adding a merge reuses the experts. Writes ``<output>.md`` (tables) and ``<output>.json``::

    python scripts/domain_merge_results.py --data-dir ../shared/data
    python scripts/domain_merge_results.py --merges sotu:0.33 dare:0.33:norescale \\
        --set evaluate.limit=50 --output /tmp/domain_merge_pilot

A merge is ``method[:keep][:rescale|:norescale][:key=value]``, the key being any setting of
the config's ``merge`` section, e.g. ``task_arithmetic:scale=0.33``;
``dare:0.33:normalize=true`` (DARE divided by the number of experts: their average in
expectation, the scale the other rows work at); ``sotu:0.33:masks=disjoint`` (each entry
kept by one expert at most); ``ties:0.2:weights=[1,2,1]`` (one weight per expert, no spaces).

Merges that differ only in their mask seed (``sotu:0.33:seed=1``; no seed is seed 0) are also
pooled: each one's change against the base over its seeds, and the differences that say
whether exact orthogonality beats random masks and SoTU beats the fair baselines (``--contrast
A B``, default those of ``DEFAULT_CONTRASTS`` present), with intervals that resample the items
(paired) and each merge's seeds (``forgetless.evaluate.seeded``)::

    python scripts/domain_merge_results.py --data-dir ../shared/data --merges sotu:0.33 \
        sotu:0.33:seed=1 sotu:0.33:seed=2 sotu:0.33:masks=disjoint \
        sotu:0.33:masks=disjoint:seed=1 sotu:0.33:masks=disjoint:seed=2
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetless.config import load_raw, parse_assignment, set_dotted
from forgetless.errors import ForgetlessError
from forgetless.evaluate.seeded import arm_cells, contrast_cells, pooled_changes
from forgetless.evaluate.stats import paired_task_change, read_evaluation
from forgetless.recipes.adapt import ADAPTED_EVAL, BASE_EVAL
from forgetless.recipes.compare import compare, expand_arms, plan_comparison
from forgetless.report.experiment import (
    add_dry_run_flag,
    exit_with_error,
    experiment_parser,
    parse_experiment_args,
    print_event,
    print_plan_counts,
    shared_overrides,
    write_results,
)

PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "src/forgetless/configs/domain_merge.yaml"

# Each domain's held-out evaluation: never the training text itself.
DOMAIN_TASKS = {
    "medical": "ppl:pubmedqa@test",
    "financial": "ppl:financial_phrasebank",
    "legal": "ppl:eurlex@test",
}
# Masks depend only on the seed, the expert and the tensor, so dare:K is sotu:K:rescale, and
# task_arithmetic:scale=0.33 (the experts' average) is what sotu:0.33 equals in expectation.
DEFAULT_MERGES = (
    "task_arithmetic",
    "task_arithmetic:scale=0.33",
    "ties:0.2",
    "dare:0.33",
    "sotu:0.1",
    "sotu:0.33",
    "sotu:0.5",
)
GAIN_KEPT_TARGET = 0.8
# Issue 22's questions, each asked where both merges are compared: does exact orthogonality
# (disjoint masks) beat random masks at equal sparsity, and does SoTU beat the fair baselines
# (DARE at the others' 1/N scale, TIES at its default λ = 1 and at λ = 1/3, the scale that
# configs/domain_merge_validation.yaml chose on validation text, the experts' plain average)?
DEFAULT_CONTRASTS = (
    ("sotu:0.33:masks=disjoint", "sotu:0.33"),
    ("sotu:0.33", "dare:0.33:normalize=true"),
    ("sotu:0.33", "ties:0.2"),
    ("sotu:0.33", "ties:0.2:scale=0.33"),
    ("sotu:0.33", "task_arithmetic:scale=0.33"),
)
SEED_SETTING = re.compile(r":seed=[^:]*")


@dataclass(frozen=True)
class MergeSpec:
    label: str
    overrides: dict[str, Any]
    group: str  # the spec without its mask seed: merges pooled over seeds share it


def parse_merge(text: str) -> MergeSpec:
    method, *rest = text.split(":")
    overrides: dict[str, Any] = {"merge.method": method}
    for part in rest:
        if "=" in part:
            key, value = parse_assignment(f"merge.{part}")
            overrides[key] = value
        elif part in ("rescale", "norescale"):
            overrides["merge.rescale"] = part == "rescale"
        else:
            try:
                overrides["merge.keep"] = float(part)
            except ValueError:
                raise ForgetlessError(
                    f"merge {text!r}: expected method[:keep][:rescale|:norescale][:key=value]"
                ) from None
    return MergeSpec(text.replace(":", "_"), overrides, SEED_SETTING.sub("", text))


def seed_groups(merges: list[MergeSpec]) -> dict[str, list[str]]:
    """Each merge spec without its seed, with the labels of the merges that share it."""
    groups: dict[str, list[str]] = {}
    for merge in merges:
        groups.setdefault(merge.group, []).append(merge.label)
    return groups


def chosen_contrasts(requested, merges: list[MergeSpec]) -> list[tuple[str, str]]:
    """The contrasts asked for (each merge named by its spec without a seed), or the default
    ones whose two merges are both compared."""
    groups = seed_groups(merges)
    if requested is None:
        return [pair for pair in DEFAULT_CONTRASTS if all(name in groups for name in pair)]
    for pair in requested:
        unknown = [name for name in pair if name not in groups]
        if unknown:
            raise ForgetlessError(
                f"--contrast: {unknown[0]!r} is not among --merges (without its seed)"
            )
    return [tuple(pair) for pair in requested]


def comparison_config(args: argparse.Namespace, merges: list[MergeSpec]) -> dict[str, Any]:
    """The packaged config with one arm per domain expert and one per merge of them."""
    raw = load_raw(args.config, shared_overrides(args))
    experts = raw.setdefault("recipe", {}).setdefault("experts", {})
    missing = [name for name in args.domains if name not in experts]
    if missing:
        raise ForgetlessError(f"recipe.experts has no {missing}")
    raw["recipe"]["experts"] = {name: experts[name] for name in args.domains}
    tasks = (raw.get("evaluate") or {}).get("domain_tasks") or []
    unscored = [DOMAIN_TASKS[name] for name in args.domains if DOMAIN_TASKS[name] not in tasks]
    if unscored:
        raise ForgetlessError(f"evaluate.domain_tasks must include {unscored}")
    arms: dict[str, Any] = {}
    for name in args.domains:
        arms[f"expert {name}"] = {"recipe": {"steps": ["train"]}, "data": experts[name]}
    for merge in merges:
        arm: dict[str, Any] = {}
        for key, value in merge.overrides.items():
            set_dotted(arm, key, value)
        arms[merge.label] = arm
    raw.setdefault("compare", {})["arms"] = arms
    return raw


# --- the tables -------------------------------------------------------------------------------


def load_evaluation(result) -> tuple[dict, dict]:
    return read_evaluation(result.directory)


def paired_change(task: str, base: tuple[dict, dict], other: tuple[dict, dict]) -> dict:
    try:
        return paired_task_change(task, base, other)
    except ValueError as error:
        raise ForgetlessError(str(error)) from None


def summarise(config, domains, merges, contrasts, run) -> dict[str, Any]:
    results = {arm.label: run.of(arm.label)[1] for arm in run.arms}
    base = load_evaluation(results[f"expert {domains[0]}"][BASE_EVAL])
    models = {"base": None}
    models.update({f"expert {name}": f"expert {name}" for name in domains})
    models.update({merge.label: merge.label for merge in merges})
    tasks = [*config.evaluate.domain_tasks, *config.evaluate.general_tasks]
    rows, evaluations = [], {}
    for label, arm in models.items():
        evaluation = base if arm is None else load_evaluation(results[arm][ADAPTED_EVAL])
        evaluations[label] = evaluation
        row: dict[str, Any] = {"model": label, "scores": {}, "changes": {}}
        for task in tasks:
            task_metrics = evaluation[0][task]
            row["scores"][task] = {
                "value": task_metrics["value"],
                "ci95": task_metrics["ci95"],
                "metric": task_metrics["metric"],
                "n": task_metrics["n"],
            }
            if arm is not None:
                row["changes"][task] = paired_change(task, base, evaluation)
        rows.append(row)

    by_label = {row["model"]: row for row in rows}
    base_scores = by_label["base"]["scores"]

    def gain(label: str, task: str) -> float:
        """Improvement over the base in the task's own units; positive = better."""
        delta = by_label[label]["scores"][task]["value"] - base_scores[task]["value"]
        return delta if base[0][task]["higher_is_better"] else -delta

    def drop(label: str, task: str) -> float:
        """Loss of general ability against the base; an improvement is no drop."""
        return max(0.0, -gain(label, task))

    best_expert_drop = {
        task: min(drop(f"expert {name}", task) for name in domains)
        for task in config.evaluate.general_tasks
    }
    for merge in merges:
        row = by_label[merge.label]
        kept = {}
        for name in domains:
            task = DOMAIN_TASKS[name]
            expert_gain = gain(f"expert {name}", task)
            kept[name] = gain(merge.label, task) / expert_gain if expert_gain > 0 else None
        general_ok = {
            task: drop(merge.label, task) <= best_expert_drop[task]
            for task in config.evaluate.general_tasks
        }
        row["gain_kept"] = kept
        row["general_no_worse_than_best_expert"] = general_ok
        row["meets_target"] = all(
            value is not None and value >= GAIN_KEPT_TARGET for value in kept.values()
        ) and all(general_ok.values())
        merge_summary = results[merge.label]["merge"].summary
        row["merge"] = {
            key: merge_summary.get(key)
            for key in ("collision_rate", "mean_abs_cosine_masked", "seconds")
        }
    training = {name: results[f"expert {name}"]["train"].summary for name in domains}
    pooled = None
    # The contrasts answer the questions even before a second mask seed has run
    # (their intervals then resample the items only).
    if contrasts or any(len(labels) > 1 for labels in seed_groups(merges).values()):
        merged = {merge.label: evaluations[merge.label] for merge in merges}
        pooled = pooled_changes(tasks, base, merged, seed_groups(merges), contrasts)
    return {
        "model": config.model.name,
        "train": config.train.model_dump(mode="json"),
        "evaluate": config.evaluate.model_dump(mode="json"),
        "domains": {
            name: {
                **config.recipe.experts[name].model_dump(mode="json"),
                "task": DOMAIN_TASKS[name],
            }
            for name in domains
        },
        "frontier": str(run.directory / "frontier.html"),
        "training": training,
        "best_expert_general_drop": best_expert_drop,
        "rows": rows,
        "pooled_over_seeds": pooled,
    }


def _score(score: dict) -> str:
    if score["metric"] == "perplexity":
        return f"{score['value']:.2f}"
    return f"{100 * score['value']:.1f}"


def _change(change: dict) -> str:
    low, high = change["ci95"]
    return f"{change['change']:+.1f} [{low:+.1f}, {high:+.1f}]"


def render(summary: dict, domains: list[str], args: argparse.Namespace) -> str:
    tasks = [*summary["evaluate"]["domain_tasks"], *summary["evaluate"]["general_tasks"]]
    domain_of = {task: name for name, task in DOMAIN_TASKS.items()}
    headers = [f"{domain_of[task]} ({task})" if task in domain_of else task for task in tasks]
    train = summary["train"]
    limits = summary["evaluate"]["task_limits"]
    train_seconds = sum(t["train_runtime_s"] for t in summary["training"].values())
    lines = [
        f"# Domain experts merged into one model: {summary['model']}",
        "",
        f"Experts: full fine-tuning, {train['max_steps']} steps of {train['batch_size']} x "
        f"{train['max_length']} packed tokens, lr {train['learning_rate']:g} "
        f"({train['lr_scheduler']}, {train['warmup_steps']} warm-up steps), AdamW, seed "
        f"{train['seed']}; training data: "
        + ", ".join(
            f"{name} = {summary['domains'][name]['source']}@{summary['domains'][name]['split']}"
            for name in domains
        )
        + f". Training took {train_seconds / 60:.0f} min for the {len(domains)} experts "
        "together; a merge takes seconds.",
        "",
        "Items per task: "
        + ", ".join(f"{task} {limits.get(task, 'all')}" for task in tasks)
        + ". Perplexity: lower is better; accuracy in %.",
        "",
        "## Scores",
        "",
        "| model | " + " | ".join(headers) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for row in summary["rows"]:
        cells = [_score(row["scores"][task]) for task in tasks]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Change against the base (paired, 95 % interval)",
        "",
        "Perplexity: % change (negative = better); accuracy: points. Gain kept: the merge's "
        "perplexity gain on a domain as a share of that domain's expert's gain "
        f"(target ≥ {GAIN_KEPT_TARGET:.0%}); general: on each general task the merge must "
        "lose no more against the base than the best single expert did (a gain is no loss).",
        "",
        "| model | " + " | ".join(headers) + " | gain kept | target met |",
        "|---" * (len(tasks) + 3) + "|",
    ]
    for row in summary["rows"][1:]:
        cells = [_change(row["changes"][task]) for task in tasks]
        if "gain_kept" in row:
            kept = " / ".join(
                "n/a" if value is None else f"{100 * value:.0f} %"
                for value in row["gain_kept"].values()
            )
            verdict = "yes" if row["meets_target"] else "no"
        else:
            kept, verdict = "", ""
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {kept} | {verdict} |")
    merge_rows = [row for row in summary["rows"] if "merge" in row]
    if merge_rows:
        lines += [
            "",
            "## Overlap of the merged deltas",
            "",
            "| merge | collision rate | mean abs cosine (masked) | seconds |",
            "|---|---|---|---|",
        ]
        for row in merge_rows:
            merge = row["merge"]
            collision = merge["collision_rate"]
            cosine = merge["mean_abs_cosine_masked"]
            lines.append(
                f"| {row['model']} | "
                + ("–" if collision is None else f"{collision:.4f}")
                + " | "
                + ("–" if cosine is None else f"{cosine:.4f}")
                + f" | {merge['seconds']:.0f} |"
            )
    if summary["pooled_over_seeds"]:
        lines += render_pooled(summary["pooled_over_seeds"], tasks, headers)
    lines += ["", f"Command: `python scripts/domain_merge_results.py {' '.join(args.argv)}`"]
    return "\n".join(lines)


def render_pooled(pooled: dict, tasks: list[str], headers: list[str]) -> list[str]:
    lines = [
        "",
        "## Merges pooled over mask seeds",
        "",
        "Change against the base: mean ± sd over the mask seeds [95 % interval resampling the "
        "items, paired, and the seeds]; perplexity in %, accuracy in points.",
        "",
        "| merge | seeds | " + " | ".join(headers) + " |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for name, arm in pooled["tasks"][tasks[0]]["arms"].items():
        cells = arm_cells(pooled, name, tasks)
        lines.append(f"| {name} | {len(arm['per_seed'])} | " + " | ".join(cells) + " |")
    if pooled["contrasts"]:
        lines += [
            "",
            "Differences (first − second; perplexity as the ratio of the two perplexities, "
            "in %; negative = the first is better on perplexity) [95 % interval]:",
            "",
            "| contrast | " + " | ".join(headers) + " |",
            "|---" * (len(tasks) + 1) + "|",
        ]
        for first, second in pooled["contrasts"]:
            cells = contrast_cells(pooled, first, second, tasks)
            lines.append(f"| {first} − {second} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser(
        __doc__, PACKAGED_CONFIG, "runs/domain_merge", "docs/results/domain_merge"
    )
    parser.add_argument(
        "--domains", nargs="+", default=list(DOMAIN_TASKS), choices=list(DOMAIN_TASKS)
    )
    parser.add_argument(
        "--merges",
        nargs="*",
        default=list(DEFAULT_MERGES),
        help="merges to compare, each method[:keep][:rescale|:norescale][:key=value], e.g. "
        "dare:0.33:normalize=true sotu:0.33:masks=disjoint (default: %(default)s)",
    )
    parser.add_argument(
        "--contrast",
        nargs=2,
        action="append",
        metavar=("A", "B"),
        help="difference A − B of two merges pooled over their mask seeds, each named by its "
        "spec without ':seed=N'; repeatable (default: those of DEFAULT_CONTRASTS present)",
    )
    add_dry_run_flag(parser)
    args = parse_experiment_args(parser, argv)
    try:
        merges = [parse_merge(text) for text in args.merges]
        contrasts = chosen_contrasts(args.contrast, merges)
        arms = expand_arms(comparison_config(args, merges), args.config)
        # Settings that must fit the number of experts (weights, disjoint keeps) fail now, not
        # after the experts have trained.
        for arm in arms:
            arm.config.merge.expert_keeps(len(args.domains))
        config = arms[0].config
        if args.dry_run:
            print_plan_counts("domain merge", plan_comparison(arms, config.run_dir))
            return
        run = compare(arms, config.run_dir, on_event=print_event, title="Domain experts merged")
    except ForgetlessError as error:
        exit_with_error(str(error))
    summary = summarise(config, args.domains, merges, contrasts, run)
    write_results(args.output, summary, render(summary, args.domains, args))


if __name__ == "__main__":
    main()
