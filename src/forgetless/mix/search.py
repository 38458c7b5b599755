"""The iterative mixture search: Dirichlet proposals, proxy runs, a LightGBM predictor.

Round 1 proposes mixtures with a RegMix-style Dirichlet sampler around the prior (each
super-cluster's token share ** 0.5). Every later round fits the predictor on all (mixture,
objective) pairs so far, ranks ``candidates`` fresh draws, keeps the best max(N^2, 128) and
samples its N proposals from them. The final mixture is the predictor's best fresh draw.

Three plain files keep the sampler, the runner and the predictor apart, so proxy runs can be
done elsewhere and fed back: ``mixtures.csv`` (id, round, one weight column per
super-cluster), ``metrics.csv`` (id, objective, per-target losses) and ``search.json`` (the
predictor's Spearman correlation per round and the final mixture).
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
from forgetless.mix.config import SearchConfig

logger = logging.getLogger(__name__)
MIXTURES_FILE = "mixtures.csv"
MIXTURE_ID = re.compile(r"[0-9a-f]{12}")
METRICS_FILE = "metrics.csv"
PROXIES_DIR = "proxies"


def mixture_id(weights: np.ndarray) -> str:
    rounded = ",".join(f"{value:.6f}" for value in np.asarray(weights, dtype=np.float64))
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

    params = {
        "objective": "regression",
        "learning_rate": config.predictor_learning_rate,
        "max_depth": config.predictor_max_depth,
        "num_leaves": 2**config.predictor_max_depth - 1,
        # Few proxy runs: let leaves hold few samples, or no split is ever made.
        "min_data_in_leaf": max(1, min(20, len(targets) // 8)),
        "min_data_in_bin": 1,
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
            callbacks=[lightgbm.early_stopping(100, verbose=False)],
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

    def mixtures(self) -> list[dict[str, Any]]:
        path = self.directory / MIXTURES_FILE
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
                round_index = int(row["round"])
            except (KeyError, TypeError, ValueError):
                raise ForgetlessError(
                    f"{where}: a round and {len(self.columns)} weights expected"
                ) from None
            if not np.isfinite(weights).all():
                raise ForgetlessError(f"{where}: weights must be finite")
            mixtures.append({"id": identifier, "round": round_index, "weights": weights})
        return mixtures

    def add_mixtures(self, round_index: int, proposals: np.ndarray) -> None:
        path = self.directory / MIXTURES_FILE
        new = not path.is_file()
        with open(path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["id", "round", *self.columns])
            for weights in proposals:
                writer.writerow([mixture_id(weights), round_index, *(f"{w:.6f}" for w in weights)])

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


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def cross_validated_spearman(
    features: np.ndarray, targets: np.ndarray, config: SearchConfig, seed: int, folds: int = 5
) -> float | None:
    """Spearman of out-of-fold predictions against the observed objectives.

    The next round's runs all come from the predictor's best region, where a few-leaf model
    may score them alike; k-fold over every run so far measures how well it ranks mixtures
    it has not seen across the whole space searched.
    """
    if len(targets) < 2 * folds:
        return None
    order = np.random.default_rng([seed, len(targets)]).permutation(len(targets))
    predicted = np.empty(len(targets))
    for held in np.array_split(order, folds):
        fit = np.setdiff1d(order, held)
        model = fit_predictor(features[fit], targets[fit], config, seed)
        predicted[held] = model.predict(features[held])
    return _spearman(predicted, targets)


def run_search(
    config: SearchConfig,
    seed: int,
    prior: np.ndarray,
    directory: str | Path,
    runner=None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every round; returns the per-round report and the final mixture.

    With ``runner=None`` no proxy is trained here: the pending proposals are written to
    ``mixtures.csv`` and the search stops until their rows appear in ``metrics.csv``.
    """
    files = SearchFiles(Path(directory), len(prior))
    files.directory.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, Any]] = []
    for round_index, count in enumerate(config.rounds):
        recorded = [m for m in files.mixtures() if m["round"] == round_index]
        done = files.metrics()
        history = [m for m in files.mixtures() if m["round"] < round_index]
        predictor = None
        if round_index > 0:
            features = np.array([m["weights"] for m in history])
            objective = np.array([done[m["id"]]["objective"] for m in history])
            predictor = fit_predictor(features, objective, config, seed)
        if not recorded:
            # One generator per round: a resumed search proposes exactly what it would have.
            rng = np.random.default_rng([seed, round_index])
            if predictor is None:
                proposals = dirichlet_draws(prior, count, rng, config)
            else:
                pool = dirichlet_draws(prior, config.candidates, rng, config)
                ranked = np.argsort(predictor.predict(pool), kind="stable")
                best = ranked[: max(count * count, 128)]
                proposals = pool[
                    np.sort(rng.choice(best, size=min(count, len(best)), replace=False))
                ]
            files.add_mixtures(round_index, proposals)
            recorded = [m for m in files.mixtures() if m["round"] == round_index]
        pending = [m for m in recorded if m["id"] not in done]
        if pending and runner is None:
            return {
                "status": "waiting",
                "round": round_index,
                "pending": [m["id"] for m in pending],
                "rounds": rounds,
            }
        for mixture in tqdm(pending, desc=f"round {round_index + 1}", disable=not progress):
            workdir = files.directory / PROXIES_DIR / mixture["id"]
            metrics = runner(mixture["weights"], workdir)
            if not math.isfinite(metrics["objective"]):
                raise ForgetlessError(
                    f"proxy run {mixture['id']} gave a non-finite objective "
                    f"({metrics['objective']}); lower mix.search.proxy_learning_rate"
                )
            files.add_metrics(mixture["id"], metrics)
        done = files.metrics()
        actual = np.array([done[m["id"]]["objective"] for m in recorded])
        entry: dict[str, Any] = {
            "round": round_index + 1,
            "runs": len(recorded),
            "best_objective": float(actual.min()),
            "mean_objective": float(actual.mean()),
        }
        if predictor is not None:
            predicted = predictor.predict(np.array([m["weights"] for m in recorded]))
            entry["spearman_held_out"] = _spearman(predicted, actual)
        so_far = history + recorded
        entry["spearman_cross_validated"] = cross_validated_spearman(
            np.array([m["weights"] for m in so_far]),
            np.array([done[m["id"]]["objective"] for m in so_far]),
            config,
            seed,
        )
        rounds.append(entry)
    everything = files.mixtures()
    done = files.metrics()
    features = np.array([m["weights"] for m in everything])
    objective = np.array([done[m["id"]]["objective"] for m in everything])
    predictor = fit_predictor(features, objective, config, seed)
    pool = dirichlet_draws(
        prior, config.candidates, np.random.default_rng([seed, len(config.rounds)]), config
    )
    predicted = predictor.predict(pool)
    best = int(np.argmin(predicted))
    observed = int(np.argmin(objective))
    return {
        "status": "done",
        "rounds": rounds,
        "prior": prior.tolist(),
        "final": {"weights": pool[best].tolist(), "predicted_objective": float(predicted[best])},
        "best_observed": {
            "id": everything[observed]["id"],
            "weights": features[observed].tolist(),
            "objective": float(objective[observed]),
        },
    }
