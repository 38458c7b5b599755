"""The iterative mixture search: Dirichlet proposals, proxy runs, a LightGBM predictor.

Round 1 proposes mixtures with a RegMix-style Dirichlet sampler around the prior (each
super-cluster's token share ** 0.5). Every later round fits the predictor on all (mixture,
objective) pairs so far, ranks ``candidates`` fresh draws, keeps the best max(N^2, 128) and
samples its N proposals from them. The final mixture is the mean of the predictor's best
``top_k`` fresh draws (RegMix), checked against the best run observed: both are run under
``verify_runs`` fresh proxy seeds and the measured better one is kept.

The reference mixture (the natural one: each super-cluster's token share) is run under
``noise_runs`` proxy seeds, which measures the objective's seed-to-seed noise, and is what
retention ``constraints`` are relative to: with constraints, a predictor per constrained task
ranks feasible draws (predicted to keep every constrained perplexity within its bound) before
any other, by objective.

Four plain files keep the sampler, the runner and the predictor apart, so proxy runs can be
done elsewhere and fed back: ``mixtures.csv`` (id, round, one weight column per
super-cluster), ``reference.csv`` (id, proxy seed, weights of the reference runs),
``metrics.csv`` (id, objective, per-task losses) and ``search.json`` (the predictor's accuracy
per round, the reference runs and the final mixture); ``verify.csv`` (id, proxy seed, weights)
holds the verification runs.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from forgetless.errors import ForgetlessError
from forgetless.evaluate.stats import rank_correlation, significant_rank_correlation
from forgetless.mix.config import SearchConfig

logger = logging.getLogger(__name__)
MIXTURES_FILE = "mixtures.csv"
REFERENCE_FILE = "reference.csv"
VERIFY_FILE = "verify.csv"
MIXTURE_ID = re.compile(r"[0-9a-f]{12}")
METRICS_FILE = "metrics.csv"
PROXIES_DIR = "proxies"


def mixture_id(weights: np.ndarray, seed_offset: int = 0) -> str:
    """The hash naming a proxy run; a run under another proxy seed than the search's gets
    its own."""
    rounded = ",".join(f"{value:.6f}" for value in np.asarray(weights, dtype=np.float64))
    if seed_offset:
        rounded += f"@seed+{seed_offset}"
    return hashlib.sha256(rounded.encode()).hexdigest()[:12]


def prior_from_tokens(cluster_tokens: np.ndarray) -> np.ndarray:
    share = cluster_tokens / cluster_tokens.sum()
    prior = share**0.5
    return prior / prior.sum()


def dirichlet_draws(
    prior: np.ndarray, count: int, rng: np.random.Generator, config: SearchConfig
) -> np.ndarray:
    """``count`` distinct mixtures (rows) around ``prior``, capped and floored, rounded to 1e-4."""
    low, high, steps = config.dirichlet_strengths
    strengths = np.logspace(np.log10(low), np.log10(high), int(steps))
    cap = config.weight_cap * prior
    rows: list[np.ndarray] = []
    seen: set[bytes] = set()
    attempts = 0
    while len(rows) < count and attempts < 100:
        attempts += 1
        batch = max(count - len(rows), 16)
        concentration = rng.choice(strengths, size=batch)[:, None] * prior[None, :]
        draws = rng.gamma(np.maximum(concentration, 1e-12))
        draws /= np.maximum(draws.sum(1, keepdims=True), 1e-300)
        draws[draws < config.min_weight] = 0.0
        for _ in range(20):  # clip and renormalise until every weight is within its cap
            draws = np.minimum(draws, cap[None, :])
            totals = draws.sum(1, keepdims=True)
            draws = np.where(totals > 0, draws / np.maximum(totals, 1e-300), prior[None, :])
            if (draws <= cap[None, :] + 1e-12).all():
                break
        # A draw whose non-zero weights cannot reach 1 within their caps is rejected.
        draws = draws[(draws <= cap[None, :] + 1e-9).all(1)]
        for row in np.round(draws, 4):
            key = row.tobytes()
            if key not in seen and row.sum() > 0:
                seen.add(key)
                rows.append(row / row.sum())
            if len(rows) == count:
                break
    return np.array(rows)


def fit_predictor(features: np.ndarray, targets: np.ndarray, config: SearchConfig, seed: int):
    """A LightGBM regressor of the objective from the mixture weights."""
    import lightgbm

    # Subsampling a handful of runs can leave a tree none (LightGBM keeps int(n * fraction)).
    bagging = config.predictor_bagging_fraction if len(targets) >= 10 else 1.0
    params = {
        "objective": "regression",
        "learning_rate": config.predictor_learning_rate,
        "max_depth": config.predictor_max_depth,
        "num_leaves": 2**config.predictor_max_depth - 1,
        # Few proxy runs: let leaves hold few samples, or no split is ever made.
        "min_data_in_leaf": max(1, min(20, len(targets) // 8)),
        "min_data_in_bin": 1,
        # A few dozen noisy runs over ~20 weights: shrunken leaves and trees that each see a
        # subset of the runs and of the weights keep it from fitting the proxies' noise.
        "lambda_l2": config.predictor_l2,
        "feature_fraction": config.predictor_feature_fraction,
        "bagging_fraction": bagging,
        "bagging_freq": 1 if bagging < 1 else 0,
        "verbose": -1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
    }
    # The binning must allow the same small leaves, or weights get dropped as unsplittable.
    dataset_params = {
        "min_data_in_leaf": params["min_data_in_leaf"],
        "min_data_in_bin": 1,
        "feature_pre_filter": False,
    }
    rng = np.random.default_rng(seed)
    if len(targets) >= 10:
        # Early stopping on a seeded fifth of the runs, as in CLIMB.
        order = rng.permutation(len(targets))
        held = order[: max(2, len(targets) // 5)]
        fit = order[len(held) :]
        train = lightgbm.Dataset(features[fit], targets[fit], params=dataset_params)
        valid = lightgbm.Dataset(
            features[held], targets[held], reference=train, params=dataset_params
        )
        return lightgbm.train(
            params,
            train,
            num_boost_round=config.predictor_iterations,
            valid_sets=[valid],
            callbacks=[lightgbm.early_stopping(config.predictor_patience, verbose=False)],
        )
    return lightgbm.train(
        params,
        lightgbm.Dataset(features, targets, params=dataset_params),
        num_boost_round=config.predictor_iterations,
    )


@dataclass
class SearchFiles:
    directory: Path
    clusters: int

    @property
    def columns(self) -> list[str]:
        return [f"w{index}" for index in range(self.clusters)]

    def _read(self, name: str, key: str) -> list[dict[str, Any]]:
        path = self.directory / name
        if not path.is_file():
            return []
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        mixtures = []
        for line, row in enumerate(rows, start=2):
            where = f"{path}:{line}"
            identifier = row.get("id") or ""
            # Ids name proxy folders: anything but a mixture hash could leave the run directory.
            if not MIXTURE_ID.fullmatch(identifier):
                raise ForgetlessError(f"{where}: {identifier!r} is not a mixture id")
            try:
                weights = np.array([float(row[c]) for c in self.columns])
                number = int(row[key])
            except (KeyError, TypeError, ValueError):
                raise ForgetlessError(
                    f"{where}: a {key} and {len(self.columns)} weights expected"
                ) from None
            if not np.isfinite(weights).all():
                raise ForgetlessError(f"{where}: weights must be finite")
            mixtures.append({"id": identifier, key: number, "weights": weights})
        return mixtures

    def _write(self, name: str, key: str, rows: list[tuple[str, int, np.ndarray]]) -> None:
        path = self.directory / name
        new = not path.is_file()
        with open(path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["id", key, *self.columns])
            for identifier, number, weights in rows:
                writer.writerow([identifier, number, *(f"{w:.6f}" for w in weights)])

    def mixtures(self) -> list[dict[str, Any]]:
        return self._read(MIXTURES_FILE, "round")

    def add_mixtures(self, round_index: int, proposals: np.ndarray) -> None:
        self._write(MIXTURES_FILE, "round", [(mixture_id(w), round_index, w) for w in proposals])

    def references(self) -> list[dict[str, Any]]:
        """The reference mixture's runs: id, proxy seed, weights."""
        return self._read(REFERENCE_FILE, "seed")

    def add_references(self, weights: np.ndarray, seed: int, count: int) -> None:
        self._write(
            REFERENCE_FILE,
            "seed",
            [(mixture_id(weights, offset), seed + offset, weights) for offset in range(count)],
        )

    def verification_runs(self) -> list[dict[str, Any]]:
        """The final candidates' runs under fresh proxy seeds: id, proxy seed, weights."""
        return self._read(VERIFY_FILE, "seed")

    def add_verification_runs(self, candidates: list[np.ndarray], seed: int, count: int) -> None:
        # Seeds after the search's own: the best observed run is not measured again under the
        # seed whose luck may have made it the best.
        distinct = {mixture_id(weights): weights for weights in candidates}
        rows = [
            (mixture_id(weights, offset), seed + offset, weights)
            for weights in distinct.values()
            for offset in range(1, count + 1)
        ]
        self._write(VERIFY_FILE, "seed", rows)

    def metrics(self) -> dict[str, dict[str, float]]:
        path = self.directory / METRICS_FILE
        if not path.is_file():
            return {}
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if "objective" not in (reader.fieldnames or []):
                raise ForgetlessError(f"{path}:1: no 'objective' column")
            rows = list(reader)
        metrics = {}
        for line, row in enumerate(rows, start=2):
            try:
                values = {k: float(v) for k, v in row.items() if k != "id"}
            except (TypeError, ValueError):
                raise ForgetlessError(f"{path}:{line}: a number expected in every column") from None
            if not math.isfinite(values["objective"]):
                raise ForgetlessError(
                    f"{path}:{line}: objective {values['objective']} is not finite; rerun that "
                    "proxy or remove the row"
                )
            metrics[row["id"]] = values
        return metrics

    def add_metrics(self, identifier: str, values: dict[str, float]) -> None:
        path = self.directory / METRICS_FILE
        new = not path.is_file()
        names = ["objective", *sorted(k for k in values if k != "objective")]
        if not new:
            with open(path, newline="") as handle:
                names = next(csv.reader(handle))[1:]
        with open(path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["id", *names])
            writer.writerow(
                [identifier, *(f"{values.get(name, float('nan')):.6f}" for name in names)]
            )


def _std(values) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def cross_validated(
    features: np.ndarray, targets: np.ndarray, config: SearchConfig, seed: int, folds: int = 5
) -> tuple[float | None, float | None]:
    """Spearman and root-mean-square error of out-of-fold predictions against the observed
    objectives.

    The next round's runs all come from the predictor's best region, where a few-leaf model
    may score them alike; k-fold over every run so far measures how well it ranks mixtures
    it has not seen across the whole space searched. The error is in the objective's units,
    comparable with the proxies' seed noise.
    """
    if len(targets) < 2 * folds:
        return None, None
    order = np.random.default_rng([seed, len(targets)]).permutation(len(targets))
    predicted = np.empty(len(targets))
    for held in np.array_split(order, folds):
        fit = np.setdiff1d(order, held)
        model = fit_predictor(features[fit], targets[fit], config, seed)
        predicted[held] = model.predict(features[held])
    return rank_correlation(predicted, targets), float(np.sqrt(np.mean((predicted - targets) ** 2)))


def constraint_excess(losses: dict[str, Any], limits: dict[str, float]) -> Any:
    """How far constrained losses (numbers, or arrays of them) exceed their limits, summed."""
    return sum((np.maximum(losses[task] - limit, 0.0) for task, limit in limits.items()), 0.0)


class Ranker:
    """Predictors of the objective and of each constrained task, fitted on the runs so far;
    ranks mixtures feasible-first (every constrained loss predicted within its limit), then by
    predicted objective."""

    def __init__(
        self,
        features: np.ndarray,
        metrics: list[dict[str, float]],
        limits: dict[str, float],
        config: SearchConfig,
        seed: int,
    ):
        self.limits = limits
        self.models = {}
        for name in ["objective", *limits]:
            values = np.array([m.get(name, math.nan) for m in metrics])
            if not np.isfinite(values).all():
                raise ForgetlessError(
                    f"{METRICS_FILE}: a proxy run has no finite {name!r}; every run must score "
                    "each constrained task (rerun it or fill the column)"
                )
            self.models[name] = fit_predictor(features, values, config, seed)

    def predict(self, pool: np.ndarray) -> dict[str, np.ndarray]:
        return {name: model.predict(pool) for name, model in self.models.items()}

    def violation(self, predicted: dict[str, np.ndarray]) -> np.ndarray:
        """How far each mixture's predicted constrained losses exceed their limits, summed."""
        # Adding zeros keeps one entry per mixture when there is no constraint to sum.
        return constraint_excess(predicted, self.limits) + np.zeros(len(predicted["objective"]))

    def rank(self, pool: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        predicted = self.predict(pool)
        violation = self.violation(predicted)
        # Stable: without constraints this is the plain ascending order of the objective.
        return np.lexsort((predicted["objective"], violation)), predicted, violation


def reference_summary(
    runs: list[dict[str, Any]], done: dict[str, dict[str, float]], tasks: list[str]
) -> dict[str, Any]:
    """The reference mixture's runs and, per task and for the objective, their mean and
    seed-to-seed standard deviation."""
    rows = [{"id": run["id"], "seed": run["seed"], **done[run["id"]]} for run in runs]
    summary: dict[str, Any] = {"weights": runs[0]["weights"].tolist(), "runs": rows}
    for name in ["objective", *tasks]:
        values = [row.get(name, math.nan) for row in rows]
        if not np.isfinite(values).all():
            raise ForgetlessError(
                f"{METRICS_FILE}: a reference run has no finite {name!r}; rerun it"
            )
        summary[name] = {"mean": float(np.mean(values)), "std": _std(values)}
    return summary


def constraint_limits(config: SearchConfig, reference: dict[str, Any]) -> dict[str, float]:
    """Each constrained task's largest allowed mean token loss: a perplexity at most
    (1 + increase) x the reference runs' mean perplexity (geometric, over their seeds)."""
    return {
        task: reference[task]["mean"] + math.log1p(increase)
        for task, increase in config.constraints.items()
    }


def _warn_without_signal(spearman: float | None, runs: int) -> None:
    # The final mixture is the predictor's choice; one that cannot rank the proxy runs it has
    # not seen picks what is, in effect, a draw from the prior, which the user must know.
    needed = significant_rank_correlation(runs)
    if spearman is not None and spearman > needed:
        return
    shown = "undefined" if spearman is None else f"{spearman:.2f}"
    logger.warning(
        "the mixture predictor ranks held-out proxy runs with Spearman %s, no better than "
        "chance at %d runs (%.2f needed), so the searched mixture is close to a random draw "
        "from the prior; more proxy runs (mix.search.rounds) or less noisy proxies would help",
        shown,
        runs,
        needed,
    )


def final_mixture(
    ranker: Ranker, pool: np.ndarray, top_k: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """The mean of the best ``top_k`` draws (RegMix), only feasible ones when any is. Where
    the mean of feasible draws is itself predicted to break a constraint (they sit on both
    sides of its edge), fewer of the best are averaged: half as many each time, down to one."""
    order, predicted, violation = ranker.rank(pool)
    feasible = int((violation == 0).sum())
    count = min(top_k, feasible) if feasible else min(top_k, len(pool))
    if not feasible:
        logger.warning(
            "no candidate mixture is predicted to satisfy mix.search.constraints; the final "
            "mixture is the least violating"
        )
    while True:
        chosen = order[:count]
        weights = pool[chosen].mean(axis=0)
        averaged = ranker.predict(weights[None, :])
        if not feasible or count == 1 or ranker.violation(averaged)[0] == 0:
            break
        count //= 2
    details = {
        "predicted_objective": float(averaged["objective"][0]),
        "top_k": len(chosen),
        "top_k_predicted_objective": [
            float(predicted["objective"][chosen].min()),
            float(predicted["objective"][chosen].max()),
        ],
    }
    if ranker.limits:
        details["predicted_losses"] = {t: float(averaged[t][0]) for t in ranker.limits}
        details["feasible"] = bool(ranker.violation(averaged)[0] == 0)
        details["feasible_candidates"] = feasible
    return weights, details


def run_search(
    config: SearchConfig,
    seed: int,
    prior: np.ndarray,
    directory: str | Path,
    runner=None,
    *,
    reference: np.ndarray | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every round; returns the per-round report and the final mixture.

    With ``runner=None`` no proxy is trained here: the pending proposals are written to
    ``mixtures.csv`` (and the reference runs to ``reference.csv``) and the search stops until
    their rows appear in ``metrics.csv``. ``reference`` (default: ``prior``) is the mixture
    run under ``noise_runs`` proxy seeds and that constraints are relative to; a runner is
    called as ``runner(weights, workdir)``, or with ``seed=`` for a reference run under
    another proxy seed than the search's.
    """
    files = SearchFiles(Path(directory), len(prior))
    files.directory.mkdir(parents=True, exist_ok=True)
    reference = prior if reference is None else np.asarray(reference, dtype=np.float64)
    # Constraints are relative to the reference, so it is run at least once with them.
    reference_count = max(config.noise_runs, 1 if config.constraints else 0)
    if runner is not None and not _takes_seed(runner):
        for setting, needs_seeds in (
            ("noise_runs", reference_count > 1),
            ("verify_runs", config.verify_runs > 0),
        ):
            if needs_seeds:
                raise ForgetlessError(
                    f"mix.search.{setting} needs a proxy runner that takes seed=; set it to 0"
                )
    if reference_count and not files.references():
        files.add_references(reference, seed, reference_count)
    references = files.references()
    pending_references = _run_references(files, references, seed, runner, progress)
    tasks = list(config.constraints)
    limits: dict[str, float] = {}
    if config.constraints and not pending_references:
        limits = constraint_limits(config, reference_summary(references, files.metrics(), tasks))
    rounds: list[dict[str, Any]] = []
    for round_index, count in enumerate(config.rounds):
        recorded = [m for m in files.mixtures() if m["round"] == round_index]
        done = files.metrics()
        history = [m for m in files.mixtures() if m["round"] < round_index]
        ranker = None
        if round_index > 0:
            ranker = Ranker(
                np.array([m["weights"] for m in history]),
                [done[m["id"]] for m in history],
                limits,
                config,
                seed,
            )
        if not recorded:
            # One generator per round: a resumed search proposes exactly what it would have.
            rng = np.random.default_rng([seed, round_index])
            if ranker is None:
                proposals = dirichlet_draws(prior, count, rng, config)
            else:
                pool = dirichlet_draws(prior, config.candidates, rng, config)
                best = ranker.rank(pool)[0][: max(count * count, 128)]
                proposals = pool[
                    np.sort(rng.choice(best, size=min(count, len(best)), replace=False))
                ]
            files.add_mixtures(round_index, proposals)
            recorded = [m for m in files.mixtures() if m["round"] == round_index]
        pending = [m for m in recorded if m["id"] not in done]
        if (pending or pending_references) and runner is None:
            return {
                "status": "waiting",
                "step": f"round {round_index + 1}",
                "pending": [m["id"] for m in [*pending_references, *pending]],
                "rounds": rounds,
            }
        for mixture in tqdm(pending, desc=f"round {round_index + 1}", disable=not progress):
            _run_proxy(files, mixture, runner)
        done = files.metrics()
        actual = np.array([done[m["id"]]["objective"] for m in recorded])
        entry: dict[str, Any] = {
            "round": round_index + 1,
            "runs": len(recorded),
            "best_objective": float(actual.min()),
            "mean_objective": float(actual.mean()),
            "std_objective": _std(actual),
        }
        if ranker is not None:
            predicted = ranker.predict(np.array([m["weights"] for m in recorded]))["objective"]
            entry["spearman_held_out"] = rank_correlation(predicted, actual)
        so_far = history + recorded
        spearman, error = cross_validated(
            np.array([m["weights"] for m in so_far]),
            np.array([done[m["id"]]["objective"] for m in so_far]),
            config,
            seed,
        )
        entry["spearman_cross_validated"] = spearman
        entry["rmse_cross_validated"] = error
        if limits:
            entry["feasible_runs"] = sum(_keeps(done[m["id"]], limits) for m in recorded)
        rounds.append(entry)
    everything = files.mixtures()
    done = files.metrics()
    _warn_without_signal(rounds[-1]["spearman_cross_validated"], len(everything))
    features = np.array([m["weights"] for m in everything])
    objective = np.array([done[m["id"]]["objective"] for m in everything])
    ranker = Ranker(features, [done[m["id"]] for m in everything], limits, config, seed)
    pool = dirichlet_draws(
        prior, config.candidates, np.random.default_rng([seed, len(config.rounds)]), config
    )
    weights, details = final_mixture(ranker, pool, config.top_k)
    observed_ok = np.array([_keeps(done[m["id"]], limits) for m in everything])
    candidates = np.flatnonzero(observed_ok) if observed_ok.any() else np.arange(len(objective))
    observed = int(candidates[np.argmin(objective[candidates])])
    best_observed = {
        "id": everything[observed]["id"],
        "weights": features[observed].tolist(),
        "objective": float(objective[observed]),
    }
    if config.verify_runs:
        if not files.verification_runs():
            files.add_verification_runs([weights, features[observed]], seed, config.verify_runs)
        runs = files.verification_runs()
        pending = [run for run in runs if run["id"] not in done]
        if pending and runner is None:
            return {
                "status": "waiting",
                "step": "verification",
                "pending": [run["id"] for run in pending],
                "rounds": rounds,
            }
        for run in tqdm(pending, desc="verification", disable=not progress):
            _run_proxy(files, run, runner, seed=run["seed"])
        verified = verify_candidates(runs, files.metrics(), limits)
        weights = np.array(verified["candidates"][verified["chosen"]]["weights"])
        details["verification"] = verified["candidates"]
        details["chosen"] = verified["chosen"]
    outcome: dict[str, Any] = {
        "status": "done",
        "rounds": rounds,
        "prior": prior.tolist(),
        "final": {"weights": weights.tolist(), **details},
        "best_observed": best_observed,
    }
    if references:
        outcome["reference"] = reference_summary(references, done, tasks)
    if limits:
        outcome["constraints"] = {
            task: {
                "max_relative_increase": config.constraints[task],
                "reference_perplexity": math.exp(outcome["reference"][task]["mean"]),
                "limit_perplexity": math.exp(limit),
                "final_predicted_perplexity": math.exp(details["predicted_losses"][task]),
            }
            for task, limit in limits.items()
        }
    return outcome


def verify_candidates(
    runs: list[dict[str, Any]], done: dict[str, dict[str, float]], limits: dict[str, float]
) -> dict[str, Any]:
    """Pick the final mixture from the verification runs: the first candidate in ``runs`` is
    the predicted one, the second the best observed. Each is judged by its mean over the
    fresh seeds; a candidate keeping every limit beats one that does not, then the lower
    objective wins (ties: the predicted one); with none keeping them, the least violating."""
    groups: list[tuple[np.ndarray, list[dict[str, float]]]] = []
    for run in runs:
        for weights, rows in groups:
            if np.array_equal(weights, run["weights"]):
                rows.append(done[run["id"]])
                break
        else:
            groups.append((run["weights"], [done[run["id"]]]))
    names = ["predicted", "best_observed"] if len(groups) == 2 else ["predicted"]
    candidates = {}
    for name, (weights, rows) in zip(names, groups, strict=True):
        means = {key: float(np.mean([row[key] for row in rows])) for key in ["objective", *limits]}
        excess = float(constraint_excess(means, limits))
        candidates[name] = {
            "weights": weights.tolist(),
            "runs": len(rows),
            "objective": means["objective"],
            "objective_std": _std([row["objective"] for row in rows]),
            "losses": {task: means[task] for task in limits},
            "keeps_constraints": excess == 0,
            "excess": excess,
        }
    chosen = min(candidates, key=lambda n: (candidates[n]["excess"], candidates[n]["objective"]))
    if candidates[chosen]["excess"] > 0:
        logger.warning(
            "neither the predicted mixture nor the best observed run keeps "
            "mix.search.constraints under the verification seeds; the final mixture is the "
            "least violating"
        )
    if chosen != "predicted":
        logger.warning(
            "the predicted mixture measured worse than the best observed run under the "
            "verification seeds (%s); the final mixture is that run's",
            "breaks a constraint"
            if candidates["predicted"]["excess"] > 0
            else f"objective {candidates['predicted']['objective']:.4f} against "
            f"{candidates[chosen]['objective']:.4f}",
        )
    return {"chosen": chosen, "candidates": candidates}


def _run_proxy(files: SearchFiles, mixture: dict[str, Any], runner, **seed) -> None:
    workdir = files.directory / PROXIES_DIR / mixture["id"]
    metrics = runner(mixture["weights"], workdir, **seed)
    _check_objective(mixture["id"], metrics)
    files.add_metrics(mixture["id"], metrics)


def _keeps(metrics: dict[str, float], limits: dict[str, float]) -> bool:
    """Whether a run's observed losses are within every limit (a missing one is not)."""
    return all(metrics.get(task, math.nan) <= limit for task, limit in limits.items())


def _run_references(
    files: SearchFiles, references: list[dict[str, Any]], seed: int, runner, progress: bool
) -> list[dict[str, Any]]:
    """Train the reference runs not yet done; returns those still pending (without a
    runner, all of them)."""
    pending = [run for run in references if run["id"] not in files.metrics()]
    if runner is None:
        return pending
    for run in tqdm(pending, desc="reference", disable=not progress):
        _run_proxy(files, run, runner, **({} if run["seed"] == seed else {"seed": run["seed"]}))
    return []


def _takes_seed(runner) -> bool:
    import inspect

    parameters = inspect.signature(runner).parameters.values()
    return any(p.name == "seed" or p.kind is p.VAR_KEYWORD for p in parameters)


def _check_objective(identifier: str, metrics: dict[str, float]) -> None:
    if not math.isfinite(metrics["objective"]):
        raise ForgetlessError(
            f"proxy run {identifier} gave a non-finite objective "
            f"({metrics['objective']}); lower mix.search.proxy_learning_rate"
        )
