"""Training data selection at fair budgets: issue 20's experiment, redone.

For each domain pool (medical_pool, financial_pool, legal_pool; a uniform sample of
``data.limit`` records, the pool's validation split giving the utility direction) this runs,
through the packaged comparison ``src/forgetless/configs/select_budgets.yaml``:

* full: the whole pool, one epoch;
* random, LESS, exact orthogonal and OGS at each budget (a share of the pool's training
  tokens, ``select.budget_tokens``), every selection trained on exactly the budget's tokens,
  once; with two selection seeds (warm-up, projection, Navigator) and three training seeds.

Every model is evaluated on the domain's held-out perplexity and the general tasks. Each
method's change against the base pools its seeds (intervals resample the items, paired, and
the seeds); its difference from random at the same budget likewise. Tokens, epochs, training
and selection seconds are reported per arm. The verdict per domain: does OGS at 10 % lose less
general ability than random and LESS at 10 % (interval of the difference below zero on the
retention task) at a domain gain not worse than theirs? Writes ``<output>.md`` and
``<output>.json``; every stage is cached, so an interrupted run resumes::

    python scripts/select_budgets.py --data-dir ../shared/data --domains medical
    python scripts/select_budgets.py --quick     # tiny-llama, a few records: every step
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from forgetless.config import load_raw, set_dotted, validate_config
from forgetless.errors import ForgetlessError
from forgetless.evaluate.seeded import TaskItems, format_change, seeded_changes
from forgetless.evaluate.stats import read_evaluation
from forgetless.recipes.adapt import ADAPTED_EVAL, BASE_EVAL, check_inputs
from forgetless.recipes.compare import compare, expand_arms, plan_comparison
from forgetless.report.experiment import (
    add_dry_run_flag,
    add_quick_flag,
    default_paths,
    exit_with_error,
    experiment_overrides,
    experiment_parser,
    parse_experiment_args,
    print_event,
    print_plan_counts,
    write_results,
)

PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "src/forgetless/configs/select_budgets.yaml"
DOMAINS = ("medical", "financial", "legal")
METHODS = ("random", "less", "orthogonal", "ogs")
DEFAULTS = {
    "domains": ["medical", "financial"],
    "methods": list(METHODS),
    "budgets": [0.05, 0.1, 0.25],
    "select_seeds": [0, 1],
    "train_seeds": [0, 1, 2],
}
QUICK_FLAGS = {
    "domains": ["financial"],
    "methods": ["random", "less", "ogs"],
    "budgets": [0.25],
    "select_seeds": [0],
    "train_seeds": [0, 1],
}
QUICK_SETTINGS = {
    "model.name": "tiny-llama",
    "data.limit": 40,
    "train.batch_size": 2,
    "train.max_length": 64,
    "train.warmup_steps": 0,
    "select.anchor.samples": 8,
    "select.validation.samples": 6,
    "select.featured_samples": 20,
    "select.gradient.projection_dim": 16,
    "select.gradient.warmup_steps": 1,
    "select.gradient.max_length": 128,
    "select.navigator.iterations": 5,
    "select.navigator.candidates": 8,
    "select.navigator.inputs.head_sketch_rows": 8,
    "select.navigator.inputs.head_sketch_columns": 4,
    "evaluate.limit": 4,
    "evaluate.task_limits": {},
}
VERDICT_BUDGET = 0.1


def parse_args(argv: list[str] | None):
    parser = experiment_parser(__doc__, PACKAGED_CONFIG, None, None)
    parser.add_argument("--domains", nargs="+", choices=DOMAINS)
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, help="Shares of the pool's tokens.")
    parser.add_argument("--select-seeds", nargs="+", type=int)
    parser.add_argument("--train-seeds", nargs="+", type=int)
    add_quick_flag(parser)
    add_dry_run_flag(parser)
    args = parse_experiment_args(parser, argv)
    for name, default in (QUICK_FLAGS if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if "random" not in args.methods:
        exit_with_error("--methods must include random: every contrast is against it")
    if any(not 0 < budget < 1 for budget in args.budgets):
        exit_with_error("--budgets are shares of the pool's tokens, between 0 and 1")
    default_paths(args, "select_budgets")
    return args


def domain_raw(args, domain: str) -> dict[str, Any]:
    """The packaged config with the domain's pool, validation and held-out task."""
    pool = f"{domain}_pool"
    task = f"ppl:{pool}@test"
    overrides = {
        **experiment_overrides(args, QUICK_SETTINGS),
        "data.source": pool,
        "select.validation.source": pool,
        "evaluate.domain_tasks": [task],
        "compare.x_task": task,
    }
    overrides["run_dir"] = str(Path(args.run_dir) / domain)
    raw = load_raw(args.config, overrides)
    if not args.quick:
        raw["evaluate"].setdefault("task_limits", {})[task] = 60
    return raw


def pool_tokens(config) -> int:
    """Training tokens of the candidates every method chooses from."""
    from forgetless.select.stages import Selection, candidate_tokens

    selection = Selection(config.model, config.data, config.select, data_dir=config.data_dir)
    return int(candidate_tokens(selection, selection.data({}).candidates).sum())


def label(method: str, budget: float | None = None, select_seed: int | None = None) -> str:
    """The arm of a method, budget and selection seed (its models add `` seed=<training>``)."""
    if method == "full":
        return "full"
    return f"{method}-{budget:g}-s{select_seed}"


def model_labels(arm: str, args) -> list[str]:
    """The arm's models, one per training seed (``compare.seeds``)."""
    return [f"{arm} seed={seed}" for seed in args.train_seeds]


def with_arms(raw: dict, args, tokens: int, tokens_per_step: int) -> dict:
    """Every arm of the domain: its method, budget, selection seed and steps; every arm trains
    once per training seed (``compare.seeds``)."""
    raw = copy.deepcopy(raw)
    arms: dict[str, dict] = {
        label("full"): {
            "select": {"method": "all"},
            "train": {"max_steps": max(1, tokens // tokens_per_step)},
            "description": "the whole pool, one epoch",
        }
    }
    for budget in args.budgets:
        budget_tokens = round(budget * tokens)
        # The selection holds at least the budget's tokens, so this is at most one pass.
        steps = budget_tokens // tokens_per_step
        if steps < 1:
            raise ForgetlessError(
                f"a {budget:g} budget holds {budget_tokens} tokens, less than one training "
                "step; raise data.limit"
            )
        for method in args.methods:
            for select_seed in args.select_seeds:
                arms[label(method, budget, select_seed)] = {
                    "select": {
                        "method": method,
                        "budget": budget,
                        "budget_tokens": budget_tokens,
                        "seed": select_seed,
                    },
                    "train": {"max_steps": steps},
                    "description": f"{method}, {budget:.0%} of the tokens, selection "
                    f"seed {select_seed}",
                }
    set_dotted(raw, "compare.arms", arms)
    set_dotted(raw, "compare.seeds", list(args.train_seeds))
    return raw


def domain_arms(args, domain: str) -> tuple[Any, list, int]:
    """One domain's config, its comparison's arms and the pool's training tokens."""
    raw = domain_raw(args, domain)
    config = validate_config(raw, args.config)
    check_inputs(config)
    tokens = pool_tokens(config)
    train = config.train
    per_step = train.batch_size * train.max_length * train.gradient_accumulation_steps
    return config, expand_arms(with_arms(raw, args, tokens, per_step), args.config), tokens


def run_domain(args, domain: str) -> dict[str, Any]:
    config, arms, tokens = domain_arms(args, domain)
    run = compare(arms, config.run_dir, on_event=print_event, title=f"Selection on {domain}")
    return summarise(config, args, arms, run, tokens)


def _groups(args) -> dict[str, dict[str, list[str]]]:
    """Per budget, each method's model labels over its selection and training seeds."""
    return {
        f"{budget:g}": {
            method: [
                model
                for select_seed in args.select_seeds
                for model in model_labels(label(method, budget, select_seed), args)
            ]
            for method in args.methods
        }
        for budget in args.budgets
    }


def summarise(config, args, arms, run, tokens: int) -> dict[str, Any]:
    evaluate = config.evaluate
    tasks = list(dict.fromkeys([*evaluate.domain_tasks, *evaluate.general_tasks]))
    results = {arm.label: run.of(arm.label) for arm in arms}
    base = read_evaluation(next(iter(results.values()))[1][BASE_EVAL].directory)
    evaluations = {
        name: read_evaluation(res[ADAPTED_EVAL].directory) for name, (_, res) in results.items()
    }
    full = {"full": model_labels(label("full"), args)}
    budgets: dict[str, Any] = {}
    for budget, groups in _groups(args).items():
        contrasts = [(method, "random") for method in groups if method != "random"]
        if {"ogs", "less"} <= set(groups):
            contrasts.append(("ogs", "less"))
        budgets[budget] = {
            task: seeded_changes(
                TaskItems.read(task, base, evaluations),
                {**full, **groups},
                contrasts,
                seed=config.select.seed,
            )  # fmt: skip
            for task in tasks
        }
    compute = {}
    for name, (plan, res) in results.items():
        trained = res["train"].summary
        selection = [stage for stage in plan.training if stage != "train"]
        compute[name] = {
            "tokens": trained["input_tokens_seen"],
            "epochs": trained["epochs"],
            "train_seconds": res["train"].seconds,
            "selection_seconds": sum(res[stage].seconds or 0.0 for stage in selection),
            "sources": selected_sources(res, selection),
        }
    return {
        "model": config.model.name,
        "pool": config.data.source,
        "pool_tokens": tokens,
        "domain_task": evaluate.domain_tasks[0],
        "retention_task": config.compare.y_task,
        "train": config.train.model_dump(mode="json"),
        "select": config.select.model_dump(mode="json"),
        "budgets": budgets,
        "compute": compute,
        "verdict": verdict(budgets, evaluate.domain_tasks[0], config.compare.y_task),
        "frontier": str(Path(config.run_dir) / "frontier" / "frontier.html"),
    }


def selected_sources(res: dict, selection: list[str]) -> dict[str, int]:
    """How many selected records come from each member of the pool: what a selection favours.
    Empty when the selection's files were not kept."""
    stage = next((res[name] for name in selection if name.startswith("selection")), None)
    if stage is None or not stage.artefacts:
        return {}
    from forgetless.data.pools import pool_member

    counts: dict[str, int] = {}
    with open(stage.directory / stage.summary["records_file"]) as handle:
        for line in handle:
            member = pool_member(str(json.loads(line).get("id", "")))
            if member is not None:
                counts[member] = counts.get(member, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def verdict(budgets: dict, domain_task: str, retention_task: str) -> dict[str, Any] | None:
    """OGS at 10 %: less forgetting than random and than LESS, beyond the intervals, at a
    domain gain not worse than theirs (losses: below zero is better)."""
    changes = budgets.get(f"{VERDICT_BUDGET:g}")
    if changes is None or "ogs" not in changes[domain_task]["arms"]:
        return None
    result = {}
    for other in ("random", "less"):
        if other not in changes[domain_task]["arms"]:
            continue
        retention, domain = (
            changes[task]["contrasts"][f"ogs-{other}"] for task in (retention_task, domain_task)
        )
        result[f"ogs_vs_{other}"] = {
            "forgets_less": retention["ci95"][1] < 0,
            "domain_not_worse": domain["ci95"][0] <= 0,
        }
    return result


def verdict_text(result: dict[str, Any]) -> str:
    """The verdict in words: per contrast, whether OGS forgets less and gains no less."""
    names = {"ogs_vs_random": "random", "ogs_vs_less": "LESS"}

    def said(value: bool) -> str:
        return "yes" if value else "no"

    parts = [
        f"OGS vs {names[key]}: forgets less (interval below 0) {said(entry['forgets_less'])}, "
        f"domain gain not worse (interval reaches 0) {said(entry['domain_not_worse'])}"
        for key, entry in result.items()
    ]
    return "; ".join(parts) + "."


def render(summaries: dict[str, dict], args) -> str:
    lines = [
        "# Training data selection at fair budgets",
        "",
        "Changes against the base model, pooled over selection and training seeds, with 95 % "
        "intervals that resample the evaluation items (paired) and the seeds: perplexity in % "
        "(negative is better), accuracy in points. `vs random` is the difference from random "
        "at the same budget.",
    ]
    for domain, summary in summaries.items():
        domain_task, retention = summary["domain_task"], summary["retention_task"]
        lines += [
            "",
            f"## {domain}: {summary['pool']}, {summary['pool_tokens']:,} tokens",
        ]
        for budget, changes in summary["budgets"].items():
            units = {task: changes[task]["unit"] for task in changes}
            lines += [
                "",
                f"### Budget {float(budget):.0%} of the tokens",
                "",
                f"| arm | {domain_task} | {retention} | {domain_task} vs random | "
                f"{retention} vs random | other tasks |",
                "|---|---|---|---|---|---|",
            ]
            for arm in changes[domain_task]["arms"]:
                cells = [
                    format_change(changes[task]["arms"][arm], units[task])
                    for task in (domain_task, retention)
                ]
                for task in (domain_task, retention):
                    contrast = changes[task]["contrasts"].get(f"{arm}-random")
                    cells.append(format_change(contrast, units[task]) if contrast else "–")
                others = [
                    f"{task} {format_change(changes[task]['arms'][arm], units[task])}"
                    for task in changes
                    if task not in (domain_task, retention)
                ]
                lines.append(f"| {arm} | {' | '.join(cells)} | {'; '.join(others)} |")
        lines += [
            "",
            "| model | tokens | epochs | training s | selection s | records by source |",
            "|---|---|---|---|---|---|",
        ]
        for name, compute in summary["compute"].items():
            sources = ", ".join(f"{k} {v}" for k, v in compute.get("sources", {}).items())
            lines.append(
                f"| {name} | {compute['tokens']:,} | {compute['epochs']:.2f} | "
                f"{compute['train_seconds'] or 0:.0f} | {compute['selection_seconds']:.0f} | "
                f"{sources or '–'} |"
            )
        if summary["verdict"]:
            lines += ["", f"Verdict at {VERDICT_BUDGET:.0%}: " + verdict_text(summary["verdict"])]
    lines += ["", f"Command: `python scripts/select_budgets.py {' '.join(args.argv)}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.dry_run:
            for domain in args.domains:
                config, arms, _ = domain_arms(args, domain)
                print_plan_counts(domain, plan_comparison(arms, config.run_dir))
            return
        summaries = {domain: run_domain(args, domain) for domain in args.domains}
    except ForgetlessError as error:
        exit_with_error(str(error))
    write_results(args.output, {"domains": summaries}, render(summaries, args))


if __name__ == "__main__":
    main()
