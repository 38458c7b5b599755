"""Does the OGS criterion predict forgetting? The test of issue 20, before anything else.

On a sample of a domain pool large enough that no arm repeats a record (medical_pool, 3000
records), this computes every record's gradient features with ``forgetless select``'s stages
(in the packaged config, of every matrix full fine-tuning trains; the default anchor, 256
GSM8K training problems; utility towards the pool's validation split) and from them its cost
under ``select.cost`` and its utility. Then it
trains the model in full, every run on the same number of tokens in at most one pass, on

* low, high, random: the lowest-cost, the highest-cost and a random tenth of the pool, each
  taking a tenth of the tokens of every utility stratum (matched on utility), three
  training seeds each;
* ten random subsets of the same size, one seed each;

and measures the change of the anchor's held-out loss (GSM8K test) and of general retention
(C4, ARC-easy, PIQA, BoolQ) against the base. Writes ``<output>.md`` and ``<output>.json``:
each arm's mean and sd over seeds, paired 95 % intervals of low vs high and of each vs random,
and the regression of the random subsets' anchor-loss change on their predicted cost::

    python scripts/ogs_criterion.py --data-dir ../shared/data
    python scripts/ogs_criterion.py --quick    # tiny-llama, tiny sizes: the whole pipeline

The experiment is the packaged config ``src/forgetless/configs/ogs_criterion.yaml``; this
script adds the arms, whose records it writes under ``<run-dir>/subsets/`` (named by their
content). Every stage is cached in the run directory, so an interrupted run resumes; with an
archive (``--set archive_dir=...``) a run on another machine resumes from it without a single
gradient, since what the arms need of the gradients is a stage of a few hundred kilobytes
(``criterion_arms``) that the archive keeps whole. Default
run directory and output: runs/ogs_criterion and docs/results/ogs_criterion, or
runs/ogs_criterion_quick and runs/ogs_criterion_quick/ogs_criterion with --quick.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.config import load_raw, set_dotted, validate_config
from forgetless.data.config import DataConfig
from forgetless.data.records import Record, record_row
from forgetless.errors import ForgetlessError
from forgetless.evaluate.seeded import LOSS_UNIT, TaskItems, format_change, seeded_changes
from forgetless.evaluate.stats import read_evaluation
from forgetless.io import write_text_atomic
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
from forgetless.runs import FINISHED, run_directory
from forgetless.select.criterion import ARMS, fit_line

PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "src/forgetless/configs/ogs_criterion.yaml"
CONTRASTS = (("low", "high"), ("low", "random"), ("high", "random"))
# The prediction the verdict's regression rests on: the subset's mean cost, what OGS's
# constraint bounds; its exact value where --exact computed it (the same quantity without the
# sketch's noise), else the sketched one.
PRIMARY, EXACT_PRIMARY = "mean_cost", "exact_mean_cost"
DESCRIPTIONS = {
    "low": "the lowest-cost {share} of every utility stratum's tokens",
    "high": "the highest-cost {share} of every utility stratum's tokens",
    "random": "a random {share} of every utility stratum's tokens",
}
# Flags as the experiment runs them, and as --quick does: tiny-llama on a few records of the
# financial pool (whose files load in a second), only to exercise every step (the test runs it).
DEFAULTS = {"fraction": 0.1, "strata": 20, "seeds": [0, 1, 2], "subsets": 10}
QUICK_FLAGS = {"fraction": 0.2, "strata": 4, "seeds": [0, 1], "subsets": 3}
QUICK_SETTINGS = {
    "model.name": "tiny-llama",
    "data.source": "financial_pool",
    "data.limit": 80,
    "train.batch_size": 4,
    "train.max_length": 128,
    "train.warmup_steps": 0,
    "select.anchor.samples": 8,
    "select.validation.source": "financial_pool",
    "select.validation.samples": 6,
    "select.gradient.projection_dim": 1024,
    "select.gradient.warmup_steps": 1,
    "select.gradient.max_length": 400,
    "evaluate.domain_tasks": ["ppl:financial_pool@test"],
    "evaluate.limit": 4,
    "evaluate.task_limits": {},
    "compare.x_task": "ppl:financial_pool@test",
}


@dataclass
class ScoredPool:
    """The candidates and what the arms are built from, per candidate."""

    records: list[Record]
    usable: np.ndarray  # candidates with a gradient (something to learn)
    utility: np.ndarray  # NaN where not usable
    criterion: np.ndarray  # the per-sample cost under test; NaN where not usable
    tokens: np.ndarray  # tokens each record adds to the packed training stream
    subsets: dict[str, np.ndarray]  # the arms and random subsets, as candidate indices
    predicted: dict[str, dict[str, float]]  # each subset's predictions (criterion.predict)
    gradient_seconds: float  # the warm-up and gradient stages' compute
    # --exact: the cost and utility without a sketch (forgetless.select.exact), and their
    # stages' compute
    exact_cost: np.ndarray | None = None
    exact_utility: np.ndarray | None = None
    exact_seconds: float = 0.0


def parse_args(argv: list[str] | None):
    parser = experiment_parser(__doc__, PACKAGED_CONFIG, None, None)
    parser.add_argument(
        "--fraction", type=float, help=f"Each arm's share of the pool ({DEFAULTS['fraction']})."
    )
    parser.add_argument(
        "--strata",
        type=int,
        help=f"Utility strata the arms are matched over ({DEFAULTS['strata']}).",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help=f"Training seeds of each arm ({DEFAULTS['seeds']})."
    )
    parser.add_argument(
        "--subsets",
        type=int,
        help=f"Random subsets for the regression ({DEFAULTS['subsets']}).",
    )
    parser.add_argument(
        "--items",
        action="append",
        metavar="TASK=N",
        help="Evaluate N items of TASK (repeatable); the packaged config sets each task's count.",
    )
    parser.add_argument(
        "--retest",
        type=int,
        nargs="+",
        metavar="D",
        help="Instead of the experiment: how well the per-sample cost and utility agree with "
        "themselves across two projection seeds (select.seed and the next), at each "
        "projection dimension D. Featurises the pool in <run-dir>/d<D>/seed<k> (default "
        "runs/ogs_criterion_retest), trains nothing, writes <output>.md/.json (default "
        "docs/results/ogs_criterion_retest).",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="Also compute every record's cost and utility exactly, without a sketch (cost "
        "conflict, parameters blocks or last_blocks; about one more gradient pass, and two "
        "copies of the featured weights in memory). The report adds the sketch's agreement "
        "with them and each subset's exact mean cost as a predictor; with --retest, the "
        "agreement at each D.",
    )
    parser.add_argument(
        "--trajectory",
        type=int,
        nargs="+",
        metavar="STEP",
        help="Also train low, high and random at every seed once more, scoring the "
        "perplexity tasks among evaluate.general_tasks (the anchor's held-out loss, C4) after "
        "each of these optimizer steps (0: before the first); the report adds their changes "
        "by step, which tell an early, first-order effect of the arms' gradients from drift.",
    )
    add_quick_flag(parser)
    add_dry_run_flag(parser)
    args = parse_experiment_args(parser, argv)
    if args.trajectory and (min(args.trajectory) != 0 or len(args.trajectory) < 2):
        exit_with_error(
            "--trajectory: give step 0, which the changes are measured from, and later steps"
        )
    if any(dim < 1 for dim in args.retest or ()):
        exit_with_error("--retest: projection dimensions must be positive")
    if args.retest and args.trajectory:
        exit_with_error("--retest trains nothing: leave out --trajectory")
    if args.retest and args.dry_run:
        exit_with_error("--retest trains nothing and has no plan: leave out --dry-run")
    flags = QUICK_FLAGS if args.quick else DEFAULTS
    for name, default in flags.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    default_paths(args, "ogs_criterion_retest" if args.retest else "ogs_criterion")
    if args.subsets < 3:
        exit_with_error("--subsets must be at least 3: a line through fewer has no interval")
    return args


def experiment_raw(args) -> dict[str, Any]:
    """The packaged config with --quick's settings, then --set, --run-dir, --data-dir and
    --items applied."""
    overrides = experiment_overrides(args, QUICK_SETTINGS)
    raw = load_raw(args.config, overrides)
    for item in args.items or []:
        task, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise ForgetlessError(f"--items {item}: give TASK=N with N a positive number")
        raw.setdefault("evaluate", {}).setdefault("task_limits", {})[task] = int(count)
    return raw


def anchor_task(config) -> str:
    """The anchor's held-out loss: the perplexity of its data set's test split."""
    task = f"ppl:{config.select.anchor.source}@test"
    if task not in config.evaluate.general_tasks:
        raise ForgetlessError(
            f"the anchor's held-out loss {task!r} must be among evaluate.general_tasks"
        )
    return task


def gradient_plan(config) -> tuple[Any, list]:
    """The gradient stages of ``forgetless select`` for the pool: (selection, stages)."""
    from forgetless.select.stages import Selection, gradient_stages

    selection = Selection(config.model, config.data, config.select, data_dir=config.data_dir)
    return selection, gradient_stages(selection)


def arms_plan(config, args) -> tuple[Any, list]:
    """The gradient stages and the stage that draws the arms from them (whose small output
    an archive keeps, so that the gradients are not needed again): (selection, stages)."""
    from forgetless.select.criterion_stage import ArmsSettings, CriterionArmsStage

    selection, stages = gradient_plan(config)
    settings = ArmsSettings(
        tokenizer=config.model,
        max_length=config.train.max_length,
        fraction=args.fraction,
        strata=args.strata,
        # Random subsets are drawn one after another, so fewer are the first of more: drawing
        # at least the full run's lets an interim --subsets 3 read the same archived stage.
        subsets=max(args.subsets, DEFAULTS["subsets"]),
        seed=config.select.seed,
    )
    return selection, [*stages, CriterionArmsStage(selection, settings)]


def pool_geometry(config, args, run_dir: Path, on_event=print_event) -> ScoredPool:
    """Every candidate's utility, cost and packed tokens, and the subsets drawn from them
    (cached stages: ``forgetless select``'s gradients, then the arms)."""
    from forgetless.select.criterion_stage import ARMS_FILE

    selection, stages = arms_plan(config, args)
    results = run_directory(run_dir, config, on_event).run_all(stages)
    arms = json.loads((results[stages[-1].name].directory / ARMS_FILE).read_text())
    records = selection.data({}).candidates
    if arms["candidates"] != len(records):
        raise ForgetlessError(
            f"{results[stages[-1].name].directory}: drawn from {arms['candidates']} records, "
            f"but the pool holds {len(records)}"
        )
    usable = np.asarray(arms["usable"], dtype=np.int64)
    names = [*ARMS, *(f"subset{i:02d}" for i in range(args.subsets))]

    def per_candidate(values: list[float]) -> np.ndarray:
        full = np.full(len(records), np.nan)
        full[usable] = values
        return full

    return ScoredPool(
        records=records,
        usable=usable,
        utility=per_candidate(arms["utility"]),
        criterion=per_candidate(arms["cost"]),
        tokens=np.asarray(arms["tokens"], dtype=np.int64),
        subsets={name: np.asarray(arms["subsets"][name]["indices"]) for name in names},
        predicted={name: arms["subsets"][name]["predicted"] for name in names},
        gradient_seconds=arms["gradient_seconds"],
    )


def check_exact(config) -> None:
    """--exact's mistakes, before any gradient is computed."""
    from forgetless.select.exact import exact_settings

    if config.select.cost != "conflict":
        raise ForgetlessError(
            f"--exact: the cost {config.select.cost!r} needs the anchor subspace, which only a "
            "sketch gives; exact costs exist for select.cost=conflict"
        )
    exact_settings(config.select.gradient)


def exact_config(config):
    """``config`` with exact gradient products instead of its sketch."""
    exact = config.model_copy(deep=True)
    exact.select.gradient.projector = "exact"
    return exact


def with_exact(config, run_dir: Path, pool: ScoredPool, on_event=print_event) -> ScoredPool:
    """``pool`` with its exact cost and utility (cached stages in ``run_dir``): the stages of
    ``select.gradient.projector=exact``, which share nothing with the sketched ones."""
    from forgetless.select.stages import pool_scores

    exact = exact_config(config)
    _, stages = gradient_plan(exact)
    # Only the pool's products are read here (the directions' norms are in their record), so
    # an archive that keeps the 0.8 GB of directions as a record only needs no rerun.
    results = run_directory(run_dir, config, on_event).run_all(stages)
    scores, valid, _ = pool_scores(exact.select, results, stages[-1].name)
    if not np.array_equal(np.flatnonzero(valid), pool.usable):
        raise ForgetlessError("the exact and the sketched gradients disagree on usable records")
    pool.exact_cost, pool.exact_utility = -scores.alignment, scores.utility
    pool.exact_seconds = sum(result.seconds or 0.0 for result in results.values())
    return pool


def sketch_agreement(pool: ScoredPool, seed: int) -> dict[str, Any]:
    """Spearman's rho of the sketched cost and utility with the exact ones, over the usable
    records, with bootstrap intervals: how much of the exact ranking the sketch keeps."""
    usable = pool.usable
    return {
        "records": int(len(usable)),
        "cost": _agreement(fit_line(pool.criterion[usable], pool.exact_cost[usable], seed=seed)),
        "utility": _agreement(
            fit_line(pool.utility[usable], pool.exact_utility[usable], seed=seed)
        ),
        "exact_cost_range": [
            float(pool.exact_cost[usable].min()),
            float(pool.exact_cost[usable].max()),
        ],
        "exact_seconds": pool.exact_seconds,
    }


def _agreement(fit: dict) -> dict[str, Any]:
    return {"spearman": fit["spearman"], "ci95": fit["spearman_ci95"]}


def write_subset(folder: Path, name: str, records: list[Record], write: bool = True) -> Path:
    """The records as a data file named by its content, so that a changed subset can never
    reuse another's cached training (``write=False``: only its path)."""
    text = "".join(json.dumps(record_row(record), ensure_ascii=False) + "\n" for record in records)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = (folder / f"{name}-{digest}.jsonl").resolve()
    if write and not path.is_file():
        write_text_atomic(path, text)
    return path


def arm_labels(seeds: list[int]) -> dict[str, list[str]]:
    return {name: [f"{name}-s{seed}" for seed in seeds] for name in ARMS}


def with_arms(
    raw: dict, files: dict[str, Path], seeds: list[int], steps: int, fraction: float
) -> dict:
    """The comparison: every subset trained with the shared settings, on its file and seed."""
    raw = copy.deepcopy(raw)
    set_dotted(raw, "train.max_steps", steps)

    def arm(name: str, seed: int, description: str) -> dict:
        # The whole data section is replaced: the pool's split and limit mean nothing here.
        data = {field: None for field in DataConfig.model_fields}
        data.update(source=str(files[name]), kind="text")
        return {"data": data, "train": {"seed": seed}, "description": description}

    # Seed by seed, each seed's arms followed by its share of the random subsets, so that a
    # run stopped early has low, high and random at the same seeds and already a few subsets
    # (an interim report needs three).
    subsets = [name for name in files if name not in ARMS]
    shares = np.array_split(np.arange(len(subsets)), len(seeds))
    arms = {}
    for seed, share in zip(seeds, shares, strict=True):
        for name in ARMS:
            description = DESCRIPTIONS[name].format(share=f"{fraction:.0%}")
            arms[f"{name}-s{seed}"] = arm(name, seed, f"{description}, seed {seed}")
        for index in share.tolist():
            arms[subsets[index]] = arm(
                subsets[index], seeds[0], f"a random {fraction:.0%} of the pool's tokens"
            )
    raw.setdefault("compare", {})["arms"] = arms
    return raw


def describe_subset(pool: ScoredPool, name: str, file: Path) -> dict[str, Any]:
    """What a trained subset is: its records file, size, make-up and predicted cost."""
    indices = pool.subsets[name]
    # A record's source is its id less the record number (a pool's member, e.g. medquad).
    sources = Counter(pool.records[i].id.rpartition("/")[0] for i in indices.tolist())
    return {
        "file": str(file),
        "records": len(indices),
        "tokens": int(pool.tokens[indices].sum()),
        "mean_utility": float(pool.utility[indices].mean()),
        # What training sees: each record weighted by its tokens (the arms are matched so).
        "token_mean_utility": float(
            np.average(pool.utility[indices], weights=pool.tokens[indices])
        ),
        "sources": dict(sorted(sources.items())),
        "predicted": {
            **pool.predicted[name],
            **(
                {}
                if pool.exact_cost is None
                else {"exact_mean_cost": float(pool.exact_cost[indices].mean())}
            ),
        },
    }


def by_source(pool: ScoredPool) -> dict[str, dict[str, float]]:
    """The usable records of each pool member: how many, their mean tokens and mean cost
    (what a cost that goes with a member's format or length selects with it)."""
    members = np.array([pool.records[i].id.rpartition("/")[0] for i in pool.usable.tolist()])
    tokens, costs = pool.tokens[pool.usable], pool.criterion[pool.usable]
    return {
        member: {
            "records": int((members == member).sum()),
            "mean_tokens": float(tokens[members == member].mean()),
            "mean_cost": float(costs[members == member].mean()),
        }
        for member in sorted(set(members.tolist()))
    }


def matching(pool: ScoredPool, subsets: dict[str, dict]) -> dict[str, Any]:
    """How well the arms are matched: the largest difference between two arms' token-weighted
    mean utilities in pool standard deviations (a standardised mean difference; below 0.1 is
    the usual bar), and the spread of the subsets' token counts."""
    spread = float(pool.utility[pool.usable].std())
    means = [subsets[name]["token_mean_utility"] for name in ARMS]
    tokens = [subset["tokens"] for subset in subsets.values()]
    return {
        "utility_smd_max": (max(means) - min(means)) / spread if spread > 0 else 0.0,
        "tokens_min": min(tokens),
        "tokens_max": max(tokens),
    }


def summarise(config, args, pool: ScoredPool, subsets: dict, run, arms) -> dict:
    anchor = anchor_task(config)
    evaluate = config.evaluate
    tasks = list(dict.fromkeys([*evaluate.domain_tasks, *evaluate.general_tasks]))
    base = read_evaluation(run.of(arms[0].label)[1][BASE_EVAL].directory)
    evaluations = {
        arm.label: read_evaluation(run.of(arm.label)[1][ADAPTED_EVAL].directory) for arm in arms
    }
    random_names = [name for name in subsets if name not in ARMS]
    # Every trained model and its subset: the arms at each seed, then the random subsets.
    # The random subsets' mean costs concentrate near the pool's (means of ~300 records), so
    # alone they span little of the cost; with the arms the points span its whole range.
    trained = {label: name for name, labels in arm_labels(args.seeds).items() for label in labels}
    trained.update({name: name for name in random_names})
    changes, model_changes = {}, {}
    for task in tasks:
        items = TaskItems.read(task, base, evaluations)
        changes[task] = seeded_changes(
            items, arm_labels(args.seeds), CONTRASTS, seed=config.select.seed
        )
        model_changes[task] = {label: items.change(label) for label in trained}
    subset_changes = {
        task: {name: model_changes[task][name] for name in random_names} for task in tasks
    }

    def regress(labels: list[str]) -> dict:
        return {
            task: {
                predictor: fit_line(
                    [subsets[trained[label]]["predicted"][predictor] for label in labels],
                    [model_changes[task][label] for label in labels],
                    seed=config.select.seed,
                )
                for predictor in subsets[random_names[0]]["predicted"]
            }
            for task in tasks
        }

    regression = regress(random_names)
    # What any prediction from a subset's records could explain at most: the anchor-loss
    # change's spread between random subsets, against one subset's spread between training
    # seeds (which change only the order of its records).
    seed_sd = {name: changes[anchor]["arms"][name]["sd"] for name in ARMS}
    spread = {
        "between_subsets_sd": float(np.std(list(subset_changes[anchor].values()), ddof=1)),
        "between_seeds_sd": seed_sd if len(args.seeds) > 1 else None,
    }
    points = {point["label"]: point for point in run.frontier["arms"]}
    models = {
        arm.label: {
            "paired_vs_base": points[arm.label]["changes"],
            "training": {
                key: run.of(arm.label)[1]["train"].summary[key]
                for key in ("steps", "input_tokens_seen", "epochs", "train_loss", "seconds")
            },
        }
        for arm in arms
    }
    primary = EXACT_PRIMARY if pool.exact_cost is not None else PRIMARY
    arms_change, slope = changes[anchor]["contrasts"]["low-high"], regression[anchor][primary]
    verdict = {
        "low_forgets_less_than_high": arms_change["ci95"][1] < 0,
        "slope_above_zero": slope["slope_ci95"] is not None and slope["slope_ci95"][0] > 0,
    }
    verdict["cost_predicts_forgetting"] = all(verdict.values())
    return {
        "model": config.model.name,
        "pool": {
            **config.data.model_dump(mode="json"),
            "candidates": len(pool.records),
            "usable": len(pool.usable),
            "tokens": int(pool.tokens.sum()),
            "mean_utility": float(pool.utility[pool.usable].mean()),
            "mean_cost": float(pool.criterion[pool.usable].mean()),
            "sources": by_source(pool),
        },
        "cost": config.select.cost,
        "anchor": config.select.anchor.model_dump(mode="json"),
        "anchor_task": anchor,
        "fraction": args.fraction,
        "strata": args.strata,
        "seeds": args.seeds,
        "train": config.train.model_dump(mode="json"),
        "select": config.select.model_dump(mode="json"),
        "evaluate": evaluate.model_dump(mode="json"),
        "subsets": subsets,
        "matching": matching(pool, subsets),
        "changes": changes,
        "subset_changes": subset_changes,
        "anchor_change_spread": spread,
        "regression": regression,
        # Descriptive, not part of the verdict (added once seed 0 showed how little the
        # random subsets' costs vary).
        "regression_all_models": regress(list(trained)),
        "verdict": verdict,
        "primary_predictor": primary,
        "models": models,
        "sketch_vs_exact": (
            None if pool.exact_cost is None else sketch_agreement(pool, config.select.seed)
        ),
        "compute_seconds": {
            "gradients": pool.gradient_seconds,
            "exact": pool.exact_seconds,
            "training": sum(model["training"]["seconds"] for model in models.values()),
        },
        "frontier": str(run.directory / "frontier.html"),
    }


def trajectory_stages(config, args, arms) -> dict[str, Any]:
    """--trajectory: low, high and random at every seed, trained as their arms are (by the
    arm's label)."""
    from forgetless.evaluate.tasks import parse_task
    from forgetless.train.trajectory import TrajectoryStage

    tasks = [
        task
        for task in config.evaluate.general_tasks
        if parse_task(task, config.evaluate.tasks).kind == "perplexity"
    ]
    by_label = {arm.label: arm.config for arm in arms}
    # Seed by seed, so that a run stopped early has every arm at the same seeds.
    labels = [f"{name}-s{seed}" for seed in args.seeds for name in ARMS]
    return {
        label: TrajectoryStage(
            f"trajectory-{label}",
            by_label[label].model,
            by_label[label].train,
            by_label[label].data,
            tasks,
            args.trajectory,
            by_label[label].evaluate,
            data_dir=by_label[label].data_dir,
        )
        for label in labels
    }


def trajectories(config, args, stages: dict[str, Any], run, run_dir: Path) -> dict:
    """Each arm's change of every scored task against step 0, by step (mean over seeds), and
    the contrasts' differences, with intervals that resample the documents (paired) and each
    arm's seeds, as the arms' own."""
    from forgetless.train.trajectory import TRAJECTORY_FILE

    results = run_directory(run_dir, config, print_event).run_all(list(stages.values()))
    measured = {
        label: json.loads((results[stage.name].directory / TRAJECTORY_FILE).read_text())
        for label, stage in stages.items()
    }
    settings = next(iter(stages.values())).settings()
    tasks, steps = settings.tasks, settings.steps
    by_task = {}
    for task in tasks:
        start = [measured[label][str(steps[0])][task] for label in stages]
        if any(other["document_nll"] != start[0]["document_nll"] for other in start):
            raise ForgetlessError(f"{task}: the arms' runs differ before their first update")
        by_step = {}
        for step in steps[1:]:
            items = TaskItems(
                LOSS_UNIT,
                np.asarray(start[0]["document_nll"]),
                {
                    label: np.asarray(measured[label][str(step)][task]["document_nll"])
                    for label in stages
                },
                np.asarray(start[0]["document_tokens"], dtype=np.float64),
            )
            by_step[str(step)] = seeded_changes(
                items, arm_labels(args.seeds), CONTRASTS, seed=config.select.seed
            )
        by_task[task] = by_step
    # Scored at the run's last step, an arm is its arm's trained model: the check that
    # scoring on the way left the updates as they were.
    final = None
    if steps[-1] == settings.run.train.max_steps:
        final = {}
        for label in stages:
            metrics, _ = read_evaluation(run.of(label)[1][ADAPTED_EVAL].directory)
            last = measured[label][str(steps[-1])]
            final[label] = {
                task: last[task]["mean_nll"] - metrics[task]["details"]["mean_nll"]
                for task in tasks
            }
    return {
        "seeds": args.seeds,
        "steps": steps,
        "changes": by_task,
        "train_seconds": {
            label: results[stage.name].summary["train_seconds"] for label, stage in stages.items()
        },
        "last_step_minus_evaluation": final,
    }


def trajectory_lines(trajectory: dict, steps_run: int) -> list[str]:
    """One table per task: each arm's change against step 0 by step, and the contrasts."""
    contrasts = [f"{a}-{b}" for a, b in CONTRASTS]
    seeds = ", ".join(str(seed) for seed in trajectory["seeds"])
    lines = [
        f"## Held-out losses during training (seeds {seeds})",
        "",
        "Low, high and random trained once more as their arms are, each task scored after "
        f"the given optimizer steps (of {steps_run}); % perplexity against the model before "
        "its first update, mean ± sd over seeds, with 95 % intervals that resample the "
        "documents (paired) and each arm's seeds. The warm-up's first step has a learning "
        "rate of 0 (the Trainer's linear warm-up starts there), so step 1 is the base model.",
    ]
    for task, by_step in trajectory["changes"].items():
        lines += [
            "",
            f"`{task}`:",
            "",
            "| step | "
            + " | ".join(ARMS)
            + " | "
            + " | ".join(c.replace("-", " − ") for c in contrasts)
            + " |",
            "|---" * (1 + len(ARMS) + len(contrasts)) + "|",
        ]
        for step, changes in by_step.items():
            cells = [
                format_change(changes["arms"][name], changes["unit"], spread=True) for name in ARMS
            ]
            cells += [format_change(changes["contrasts"][c], changes["unit"]) for c in contrasts]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    final = trajectory["last_step_minus_evaluation"]
    if final is not None:
        worst = max(abs(v) for per_task in final.values() for v in per_task.values())
        lines += [
            "",
            f"Scored at the last step, the arms' losses are at most {worst:.1e} nats/token "
            "from their own evaluations: scoring on the way left the updates as they were.",
        ]
    return lines


def gradient_text(gradient: dict) -> str:
    """Whose gradients the costs come from, and how they are projected."""
    if gradient["parameters"] == "lora":
        whose = (
            f"a LoRA (r = {gradient['lora_r']} on {_modules(gradient['lora_target_modules'])}) "
            f"after {gradient['warmup_steps']} warm-up steps, {gradient['preconditioner']} "
            "preconditioning"
        )
    elif gradient["parameters"] == "last_blocks":
        whose = f"every linear weight of the last {gradient['last_blocks']} blocks"
    else:
        whose = "every linear weight of every block (what full fine-tuning trains)"
    return (
        f"{whose}; {gradient['projector']} projection to d = {gradient['projection_dim']}, "
        f"at most {gradient['max_length']} tokens per record"
    )


def _modules(targets: list[str] | str) -> str:
    return targets if isinstance(targets, str) else ", ".join(targets)


def _interval_text(interval, digits: int) -> str:
    if interval is None:
        return "–"
    return f"[{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def render(summary: dict, args) -> str:
    train, pool, anchor = summary["train"], summary["pool"], summary["anchor_task"]
    tasks = list(summary["changes"])
    subsets, matched = summary["subsets"], summary["matching"]
    random_names = [name for name in subsets if name not in ARMS]
    training = next(iter(summary["models"].values()))["training"]
    steps, trained = training["steps"], training["input_tokens_seen"]
    exact = summary.get("sketch_vs_exact")
    lines = [
        f"# Does the selection cost predict forgetting? {summary['model']}, cost "
        f"`{summary['cost']}`",
        "",
        f"Pool: {pool['candidates']} records of {pool['source']} ({pool['split']}), "
        f"{pool['tokens']:,} tokens. Anchor: {summary['anchor']['samples']} "
        f"{summary['anchor']['source']} {summary['anchor']['split']} problems; its held-out "
        f"loss is `{anchor}`. Gradients: {gradient_text(summary['select']['gradient'])}. "
        f"Arms: from each of {summary['strata']} utility strata, "
        f"{100 * summary['fraction']:.0f} % of its tokens: the lowest-cost records (low), the "
        "highest-cost (high), records in a random order (random). Random subsets: "
        f"{100 * summary['fraction']:.0f} % of the pool's tokens in a random order. Every "
        f"subset trained in full for {steps} steps of {train['batch_size']} x "
        f"{train['max_length']} tokens ({trained:,} tokens, at most one pass), lr "
        f"{train['learning_rate']:g} ({train['lr_scheduler']}, {train['warmup_steps']} "
        "warm-up steps). Changes against the base: perplexity in %, accuracy in points; arm "
        "intervals resample the items (paired) and the seeds.",
        "",
        "## The trained subsets",
        "",
        "| subset | records | tokens | mean utility (per token) | mean cost | "
        + ("exact mean cost | " if exact else "")
        + "first-order | anchor-subspace energy | sources |",
        "|---" * (8 + bool(exact)) + "|",
    ]
    for name, subset in subsets.items():
        predicted = subset["predicted"]
        sources = ", ".join(
            f"{source.rpartition('/')[2]} {n}" for source, n in subset["sources"].items()
        )
        lines.append(
            f"| {name} | {subset['records']} | {subset['tokens']:,} | "
            f"{subset['mean_utility']:.3f} ({subset['token_mean_utility']:.3f}) | "
            f"{predicted['mean_cost']:+.4f} | "
            + (f"{predicted['exact_mean_cost']:+.4f} | " if exact else "")
            + f"{predicted['first_order']:+.3g} | {predicted['subset_energy']:.4f} | {sources} |"
        )
    lines += [
        "",
        f"Matching: the arms' token-weighted mean utilities differ by at most "
        f"{matched['utility_smd_max']:.3f} pool standard deviations; every subset holds "
        f"{matched['tokens_min']:,}–{matched['tokens_max']:,} tokens and trains on "
        f"{trained:,} of them. The pool's usable records by member: "
        + "; ".join(
            f"{member.rpartition('/')[2]} {row['records']} records, "
            f"{row['mean_tokens']:.0f} tokens each, mean cost {row['mean_cost']:+.4f}"
            for member, row in pool["sources"].items()
        )
        + ".",
        *([] if not exact else ["", *exact_lines(exact)]),
        "",
        "## Arms: mean ± sd over seeds [95 % interval]",
        "",
        "| arm | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for name in ARMS:
        cells = [
            format_change(
                summary["changes"][task]["arms"][name],
                summary["changes"][task]["unit"],
                spread=True,
            )
            for task in tasks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Contrasts [95 % interval]", "", "| contrast | " + " | ".join(tasks) + " |"]
    lines.append("|---" * (len(tasks) + 1) + "|")
    for first, second in CONTRASTS:
        key = f"{first}-{second}"
        cells = [
            format_change(
                summary["changes"][task]["contrasts"][key], summary["changes"][task]["unit"]
            )
            for task in tasks
        ]
        lines.append(f"| {first} − {second} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Perplexity contrasts are the first arm's perplexity against the second's, in %.",
        "",
        f"## Regression over {len(random_names)} random subsets: anchor-loss change "
        "(nats/token) on the predicted cost",
        "",
        *regression_table(summary["regression"][anchor]),
    ]
    primary = summary["primary_predictor"]
    lines += [
        "",
        f"| random subset | {primary.replace('_', ' ')} | anchor loss change (nats/token) | "
        + " | ".join(f"{task} vs base [95 %]" for task in tasks)
        + " |",
        "|---" * (len(tasks) + 3) + "|",
    ]
    for name in random_names:
        paired = summary["models"][name]["paired_vs_base"]
        cells = [
            f"{paired[task]['change']:+.1f} {_interval_text(paired[task]['ci95'], 1)}"
            for task in tasks
        ]
        lines.append(
            f"| {name} | {subsets[name]['predicted'][primary]:+.4f} | "
            f"{summary['subset_changes'][anchor][name]:+.4f} | " + " | ".join(cells) + " |"
        )
    costs = [subsets[name]["predicted"][primary] for name in random_names]
    named = primary.replace("_", " ")
    lines += [
        "",
        f"The random subsets' {named} spans {min(costs):+.4f} to {max(costs):+.4f}; the "
        f"low and high arms sit at {subsets['low']['predicted'][primary]:+.4f} and "
        f"{subsets['high']['predicted'][primary]:+.4f}. Spearman of the {named} with each "
        "task's change over the random subsets: "
        + "; ".join(f"{task} {_rho(summary['regression'][task][primary])}" for task in tasks)
        + ".",
        "",
        *spread_lines(summary["anchor_change_spread"]),
        f"## Across every trained model ({len(summary['models'])}: the arms at each seed and "
        "the random subsets)",
        "",
        "Descriptive, not part of the verdict: the same regression over points that span the "
        "cost's range. The arms' models share their subset, so the points are not independent "
        "and the intervals are too narrow.",
        "",
        *regression_table(summary["regression_all_models"][anchor]),
        "",
        f"Spearman of the {named} with each task's change over every model: "
        + "; ".join(
            f"{task} {_rho(summary['regression_all_models'][task][primary])}" for task in tasks
        )
        + ".",
        "",
    ]
    if "trajectory" in summary:
        lines += [*trajectory_lines(summary["trajectory"], steps), ""]
    lines += [
        "## Verdict",
        "",
    ]
    verdict = summary["verdict"]
    lines += [
        f"- Low-cost arm forgets the anchor less than the high-cost arm (interval below 0): "
        f"{_yes(verdict['low_forgets_less_than_high'])}.",
        f"- Over random subsets the anchor-loss change rises with the {named} (slope interval "
        f"above 0): {_yes(verdict['slope_above_zero'])}.",
        f"- The cost (`{summary['cost']}`) predicts forgetting on this run: "
        f"**{_yes(verdict['cost_predicts_forgetting'])}**.",
        "",
        f"Compute: gradients {summary['compute_seconds']['gradients'] / 60:.0f} min, training "
        f"{summary['compute_seconds']['training'] / 60:.0f} min in all.",
        "",
        f"Command: `python scripts/ogs_criterion.py {' '.join(args.argv)}`",
    ]
    return "\n".join(lines)


def spread_lines(spread: dict) -> list[str]:
    """The anchor-loss change's spread between subsets and between seeds, where both exist."""
    if spread["between_seeds_sd"] is None:
        return []
    seeds = ", ".join(f"{sd:.4f} ({name})" for name, sd in spread["between_seeds_sd"].items())
    return [
        "Spread of the anchor-loss change: sd "
        f"{spread['between_subsets_sd']:.4f} nats/token between the random subsets; between "
        f"one arm's training seeds, which change only the order of its records, {seeds}. "
        "Where the two are alike, which records a subset holds explains little of its change "
        "beyond the order's noise.",
        "",
    ]


def regression_table(fits: dict[str, dict]) -> list[str]:
    """A task's line fits, one row per prediction."""
    lines = ["| prediction | slope [95 %] | Pearson r | Spearman [95 %] |", "|---|---|---|---|"]
    for predictor, fit in fits.items():
        slope = "–" if fit["slope"] is None else f"{fit['slope']:+.3g}"
        interval = (
            "–" if fit["slope_ci95"] is None
            else f"[{fit['slope_ci95'][0]:+.3g}, {fit['slope_ci95'][1]:+.3g}]"
        )  # fmt: skip
        r = "–" if fit["pearson_r"] is None else f"{fit['pearson_r']:+.2f}"
        rho = "–" if fit["spearman"] is None else f"{fit['spearman']:+.2f}"
        lines.append(
            f"| {predictor} | {slope} {interval} | {r} | "
            f"{rho} {_interval_text(fit['spearman_ci95'], 2)} |"
        )
    return lines


def exact_lines(exact: dict) -> list[str]:
    """The sketch's agreement with the exact cost and utility (--exact)."""
    low, high = exact["exact_cost_range"]
    return [
        f"Sketched against exact (`--exact`, {exact['exact_seconds'] / 60:.0f} min): over "
        f"the {exact['records']} usable records, Spearman's rho of the sketched cost with the "
        f"exact cost is {_rho_value(exact['cost'])} and of the sketched utility with the exact "
        f"utility {_rho_value(exact['utility'])}. The exact costs span {low:+.4f} to "
        f"{high:+.4f}; the column exact mean cost is each subset's mean of them.",
    ]


def _rho(fit: dict) -> str:
    if fit["spearman"] is None:
        return "–"
    return f"{fit['spearman']:+.2f} {_interval_text(fit['spearman_ci95'], 2)}"


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def comparison_arms(raw: dict, config, args, pool: ScoredPool, write: bool = True):
    """(the subsets as candidate indices, their records files under ``<run_dir>/subsets``,
    the arms of the comparison, which read those files; ``write=False``: the files' paths
    only, and no arms unless every file is there)."""
    chosen = pool.subsets
    # Every subset trains the same steps: as many as the arms' common share of the tokens
    # fills, which each subset reaches (its last record crosses the share), so nothing
    # repeats and all train the same tokens. The budget depends on the share alone, not on
    # which subsets exist, so fewer --seeds or --subsets (an interim report) reuse the
    # same trainings.
    share = int(args.fraction * pool.tokens[pool.usable].sum())
    train = config.train
    steps = share // (train.batch_size * train.max_length * train.gradient_accumulation_steps)
    if steps < 1:
        raise ForgetlessError(
            f"a subset holds {share} tokens, less than one training step; "
            "raise data.limit or --fraction"
        )
    folder = Path(config.run_dir) / "subsets"
    files = {
        name: write_subset(folder, name, [pool.records[i] for i in indices], write)
        for name, indices in chosen.items()
    }
    if not all(path.is_file() for path in files.values()):
        return chosen, files, None
    arms = expand_arms(with_arms(raw, files, args.seeds, steps, args.fraction), args.config)
    return chosen, files, arms


def retest(raw: dict, args) -> tuple[dict, str]:
    """--retest: the per-sample cost's and utility's Spearman agreement between two projection
    seeds at each dimension, on the usable records of both. Only the projection differs
    between the seeds where the features need no warm-up (parameters other than lora), so the
    agreement is the projection's reliability, the ceiling of any ranking by the cost."""
    base = validate_config(raw, args.config)
    seeds = [base.select.seed, base.select.seed + 1]
    rows = []
    for dim in args.retest:
        pools = []
        for seed in seeds:
            seeded = copy.deepcopy(raw)
            set_dotted(seeded, "select.gradient.projection_dim", dim)
            set_dotted(seeded, "select.seed", seed)
            config = validate_config(seeded, args.config)
            run_dir = Path(base.run_dir) / f"d{dim}" / f"seed{seed}"
            pools.append(pool_geometry(config, args, run_dir))
        first, second = pools
        exact = {}
        if args.exact:
            with_exact(base, Path(base.run_dir) / "exact", first)
            exact = {"first_seed_vs_exact": sketch_agreement(first, base.select.seed)}
        usable = np.intersect1d(first.usable, second.usable)
        costs = first.criterion[usable]
        agreement = {
            name: fit_line(ours[usable], theirs[usable], seed=base.select.seed)
            for name, ours, theirs in (
                ("cost", costs, second.criterion),
                ("utility", first.utility, second.utility),
            )
        }
        rows.append(
            {
                "projection_dim": dim,
                "records": int(len(usable)),
                **{name: _agreement(fit) for name, fit in agreement.items()},
                "cost_range": [float(costs.min()), float(costs.max())],
                "gradient_seconds": [pool.gradient_seconds for pool in pools],
                **exact,
            }
        )
    gradient = base.select.gradient.model_dump(mode="json")
    summary = {
        "model": base.model.name,
        "pool": {**base.data.model_dump(mode="json"), "candidates": len(first.records)},
        "cost": base.select.cost,
        "select": base.select.model_dump(mode="json"),
        "seeds": seeds,
        "rows": rows,
    }
    lines = [
        f"# How reliable is the cost? {base.model.name}, cost `{base.select.cost}`",
        "",
        f"Pool: {len(first.records)} records of {base.data.source} ({base.data.split}); "
        f"anchor: {base.select.anchor.samples} {base.select.anchor.source} problems; "
        f"gradients: {gradient_text({**gradient, 'projection_dim': 'D'})}. Spearman's rho "
        f"between projection seeds {summary['seeds'][0]} and {summary['seeds'][1]}, with a 95 % "
        "bootstrap interval over the records."
        + (
            " With --exact, also the first seed's sketch against the exact cost and utility "
            "(no projection; forgetless.select.exact)."
            if args.exact
            else ""
        ),
        "",
        "| D | records | cost, seed vs seed | utility, seed vs seed | "
        + ("cost, sketch vs exact | utility, sketch vs exact | " if args.exact else "")
        + "cost range (first seed) |",
        "|---" * (5 + 2 * args.exact) + "|",
    ]
    for row in rows:
        low, high = row["cost_range"]
        versus = row.get("first_seed_vs_exact")
        lines.append(
            f"| {row['projection_dim']} | {row['records']} | {_rho_value(row['cost'])} | "
            f"{_rho_value(row['utility'])} | "
            + (
                f"{_rho_value(versus['cost'])} | {_rho_value(versus['utility'])} | "
                if versus
                else ""
            )
            + f"{low:.3f} to {high:.3f} |"
        )
    if args.exact:
        low, high = rows[0]["first_seed_vs_exact"]["exact_cost_range"]
        lines += ["", f"The exact costs span {low:.3f} to {high:.3f}."]
    return summary, "\n".join(lines)


def _rho_value(agreement: dict) -> str:
    if agreement["spearman"] is None:
        return "undefined"
    low, high = agreement["ci95"]
    return f"{agreement['spearman']:.2f} [{low:.2f}, {high:.2f}]"


def print_plan(raw: dict, config, args) -> None:
    """--dry-run: the gradient stages' states and, once they are all in the run directory
    with the subsets' records files, the arms'. Writes nothing."""
    run_dir = Path(config.run_dir)
    _, stages = arms_plan(config, args)
    planned = run_directory(run_dir, config).plan({"gradients": stages})
    print_plan_counts("gradients", planned)
    if args.exact:
        _, exact_stages = gradient_plan(exact_config(config))
        exact = run_directory(run_dir, config).plan({"exact": exact_stages})
        print_plan_counts("exact", exact)
    if planned[-1].state != FINISHED:
        # The arms come from criterion_arms's file, which a dry run does not restore.
        print(f"arms: planned once {planned[-1].stage} is in the run directory", flush=True)
        return
    pool = pool_geometry(config, args, run_dir, on_event=None)
    _, _, arms = comparison_arms(raw, config, args, pool, write=False)
    if arms is None:
        print("arms: planned once the subsets' records are written", flush=True)
        return
    print_plan_counts("arms", plan_comparison(arms, run_dir))
    if args.trajectory:
        stages = list(trajectory_stages(config, args, arms).values())
        print_plan_counts("trajectory", run_directory(run_dir, config).plan({"trajectory": stages}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        raw = experiment_raw(args)
        config = validate_config(raw, args.config)
        if config.data.kind != "text":
            raise ForgetlessError(
                "the criterion test matches the arms on packed text tokens: set data.kind=text"
            )
        anchor_task(config)
        if config.select.gradient.projector == "exact":
            raise ForgetlessError(
                "the criterion test's arms and predictions need sketched features: keep a "
                "projector other than exact and add --exact for the exact costs beside them"
            )
        # Every data and task-name mistake before the gradients' hours are spent.
        check_inputs(config)
        if args.exact:
            check_exact(config)
        if args.retest:
            summary, table = retest(raw, args)
            return write_results(args.output, summary, table)
        if args.dry_run:
            return print_plan(raw, config, args)
        run_dir = Path(config.run_dir)
        pool = pool_geometry(config, args, run_dir)
        if args.exact:
            with_exact(config, run_dir, pool)
        chosen, files, arms = comparison_arms(raw, config, args, pool)
        follow_up = trajectory_stages(config, args, arms) if args.trajectory else {}
        run = compare(
            arms, run_dir, on_event=print_event, title="Does the selection cost predict forgetting?"
        )
        subsets = {name: describe_subset(pool, name, files[name]) for name in chosen}
        summary = summarise(config, args, pool, subsets, run, arms)
        if args.trajectory:
            summary["trajectory"] = trajectories(config, args, follow_up, run, run_dir)
    except ForgetlessError as error:
        exit_with_error(str(error))
    write_results(args.output, summary, render(summary, args))


if __name__ == "__main__":
    main()
