"""Mixture search: the regularised predictor, the top-k mean, proxy seed noise and retention
constraints, on synthetic objectives (no model is trained)."""

import hashlib
import math

import numpy as np
import pytest

from forgetless.config import load_config
from forgetless.errors import ForgetlessError
from forgetless.mix.config import SearchConfig
from forgetless.mix.search import (
    REFERENCE_FILE,
    VERIFY_FILE,
    SearchFiles,
    constraint_excess,
    final_mixture,
    fit_predictor,
    mixture_id,
    run_search,
    verify_candidates,
)


def _noise(weights, seed, scale):
    key = hashlib.sha256(np.round(weights, 6).tobytes() + str(seed).encode()).digest()
    return float(np.random.default_rng(int.from_bytes(key[:8], "little")).normal(0, scale))


def test_predictor_is_regularised_seeded_and_learns_a_smooth_objective():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    features = rng.dirichlet(np.ones(5), size=60)
    targets = features[:, 0] - features[:, 1] + rng.normal(0, 0.02, size=60)
    model = fit_predictor(features, targets, SearchConfig(), seed=0)
    assert model.params["lambda_l2"] == 1.0 and model.params["feature_fraction"] == 0.8
    assert model.params["bagging_fraction"] == 0.8 and model.params["bagging_freq"] == 1
    # Early stopping on the held-out fifth ended boosting well before the 1000 rounds.
    assert 0 < model.best_iteration < 1000
    again = fit_predictor(features, targets, SearchConfig(), seed=0)
    assert np.array_equal(model.predict(features), again.predict(features))
    fresh = rng.dirichlet(np.ones(5), size=200)
    truth = fresh[:, 0] - fresh[:, 1]
    assert spearmanr(model.predict(fresh), truth).statistic > 0.7


def test_predictor_fits_a_single_run():
    # A first round of one run (or one left after deduplication) must not leave bagging
    # an empty sample.
    model = fit_predictor(np.array([[0.5, 0.5]]), np.array([1.0]), SearchConfig(), seed=0)
    assert model.params["bagging_fraction"] == 1.0
    assert model.predict(np.array([[0.2, 0.8]])).shape == (1,)


class _LinearRanker:
    """A stand-in for Ranker with known predictions: objective = -w0, task = -w1."""

    def __init__(self, limits):
        self.limits = limits

    def predict(self, pool):
        return {"objective": -pool[:, 0], "task": -pool[:, 1]}

    def violation(self, predicted):
        return constraint_excess(predicted, self.limits) + np.zeros(len(predicted["objective"]))

    def rank(self, pool):
        predicted = self.predict(pool)
        violation = self.violation(predicted)
        return np.lexsort((predicted["objective"], violation)), predicted, violation


def test_final_mixture_is_the_mean_of_the_best_feasible_draws():
    pool = np.random.default_rng(1).dirichlet(np.ones(3), size=400)
    weights, details = final_mixture(_LinearRanker({}), pool, top_k=10)
    best = pool[np.argsort(-pool[:, 0])[:10]]
    np.testing.assert_allclose(weights, best.mean(axis=0))
    assert details["top_k"] == 10 and details["predicted_objective"] == -weights[0]
    low, high = details["top_k_predicted_objective"]
    assert low == -best[:, 0].max() and high == -best[:, 0].min()
    single, _ = final_mixture(_LinearRanker({}), pool, top_k=1)
    assert np.array_equal(single, best[0])
    # With a constraint (w1 >= 0.3) only draws predicted to keep it are averaged.
    constrained, details = final_mixture(_LinearRanker({"task": -0.3}), pool, top_k=10)
    feasible = pool[pool[:, 1] >= 0.3]
    expected = feasible[np.argsort(-feasible[:, 0])[:10]].mean(axis=0)
    np.testing.assert_allclose(constrained, expected)
    assert details["feasible"] and details["feasible_candidates"] == len(feasible)
    assert constrained[0] < weights[0]  # retention costs domain weight
    # No draw can keep w1 >= 2: the least violating are averaged, and the report says so.
    _, details = final_mixture(_LinearRanker({"task": -2.0}), pool, top_k=10)
    assert details["feasible"] is False and details["feasible_candidates"] == 0


def _seeded_runner(optimum, noise):
    calls = []

    def runner(weights, workdir, seed=None):
        calls.append(seed)
        value = float(np.abs(weights - optimum).sum()) + _noise(weights, seed, noise)
        return {"objective": value}

    return runner, calls


def test_noise_runs_measure_the_proxy_seed_spread(tmp_path):
    prior = np.full(4, 0.25)
    natural = np.array([0.4, 0.3, 0.2, 0.1])
    runner, calls = _seeded_runner(np.array([0.7, 0.1, 0.1, 0.1]), noise=0.05)
    config = SearchConfig(rounds=[12, 6], candidates=500, predictor_iterations=50, noise_runs=3)
    outcome = run_search(config, 5, prior, tmp_path, runner, reference=natural, progress=False)
    # The reference runs come first: the search's own seed, then two more; the verification
    # of two final candidates under three fresh seeds each comes last.
    assert calls[:3] == [None, 6, 7] and len(calls) == 3 + 12 + 6 + 2 * 3
    assert calls[-6:] == [6, 7, 8] * 2
    reference = outcome["reference"]
    assert [run["seed"] for run in reference["runs"]] == [5, 6, 7]
    assert [run["id"] for run in reference["runs"]] == [
        mixture_id(natural),
        mixture_id(natural, 1),
        mixture_id(natural, 2),
    ]
    objectives = [run["objective"] for run in reference["runs"]]
    assert reference["objective"]["std"] == pytest.approx(np.std(objectives, ddof=1), abs=1e-6)
    assert 0 < reference["objective"]["std"] < 0.2
    first = outcome["rounds"][0]
    assert first["std_objective"] > reference["objective"]["std"]  # mixtures differ more
    assert first["rmse_cross_validated"] > 0 and "spearman_cross_validated" in first
    assert (tmp_path / REFERENCE_FILE).read_text().splitlines()[0] == "id,seed,w0,w1,w2,w3"
    again = run_search(config, 5, prior, tmp_path, runner, reference=natural, progress=False)
    assert len(calls) == 27 and again == outcome


def test_noise_runs_need_a_seeded_runner_and_two_runs(tmp_path):
    config = SearchConfig(rounds=[4], candidates=50, noise_runs=2)
    with pytest.raises(ForgetlessError, match="noise_runs needs .* takes seed="):
        run_search(config, 0, np.full(3, 1 / 3), tmp_path, lambda w, d: {"objective": 1.0})
    config = SearchConfig(rounds=[4], candidates=50, noise_runs=0)
    with pytest.raises(ForgetlessError, match="verify_runs needs .* takes seed="):
        run_search(config, 0, np.full(3, 1 / 3), tmp_path, lambda w, d: {"objective": 1.0})
    with pytest.raises(ForgetlessError, match="mix.search.noise_runs.*at least 2"):
        load_config(None, {"mix.search.noise_runs": 1})
    with pytest.raises(ForgetlessError, match="above -1"):
        load_config(None, {"mix.search.constraints": {"ppl:c4": -1.0}})


def _trade_off_runner():
    """Cluster 0 is the domain, cluster 1 general text: the domain loss falls with w0, the
    general loss rises as w1 falls."""

    def runner(weights, workdir, seed=None):
        return {
            "objective": 3.0 - weights[0] + _noise(weights, seed, 0.01),
            "ppl:general": 2.0 - 0.5 * weights[1] + _noise(weights, seed, 0.002),
        }

    return runner


def test_constraints_keep_general_loss_within_the_bound(tmp_path):
    prior = np.full(3, 1 / 3)
    natural = np.array([0.2, 0.6, 0.2])
    common = {"rounds": [24, 12, 12], "candidates": 4000, "noise_runs": 2}
    free = run_search(
        SearchConfig(**common), 0, prior, tmp_path / "free", _trade_off_runner(), reference=natural
    )
    constrained = run_search(
        SearchConfig(**common, constraints={"ppl:general": 0.02}),
        0,
        prior,
        tmp_path / "constrained",
        _trade_off_runner(),
        reference=natural,
        progress=False,
    )
    reference_loss = 2.0 - 0.5 * 0.6
    bound = constrained["constraints"]["ppl:general"]
    assert bound["reference_perplexity"] == pytest.approx(math.exp(reference_loss), rel=1e-3)
    assert bound["limit_perplexity"] == pytest.approx(1.02 * bound["reference_perplexity"])
    # Unconstrained, the search trades general text for domain weight; constrained, the true
    # general loss of its mixture stays within the bound (w1 >= about 0.56) and the domain
    # still gets what is left.
    free_w, kept_w = (np.array(o["final"]["weights"]) for o in (free, constrained))
    assert free_w[1] < 0.4
    assert 2.0 - 0.5 * kept_w[1] <= math.log(bound["limit_perplexity"]) + 0.01
    assert kept_w[0] > natural[0]
    assert constrained["final"]["feasible"]
    # Near the bound the mean of all 128 best draws crosses it; fewer are averaged, not one.
    assert 1 < constrained["final"]["top_k"] < 128
    assert all("feasible_runs" in entry for entry in constrained["rounds"])
    observed = constrained["best_observed"]
    assert 2.0 - 0.5 * observed["weights"][1] <= math.log(bound["limit_perplexity"]) + 0.01


def test_constrained_runs_must_score_the_constrained_task(tmp_path):
    config = SearchConfig(rounds=[12, 4], candidates=100, constraints={"ppl:general": 0.1})

    def runner(weights, workdir, seed=None):
        return {"objective": float(weights[0])}

    with pytest.raises(ForgetlessError, match="no finite 'ppl:general'"):
        run_search(config, 0, np.full(3, 1 / 3), tmp_path, runner, progress=False)


def test_a_truncated_pretrained_proxy_keeps_its_first_blocks():
    import torch

    from forgetless.mix.proxy import truncate_layers
    from forgetless.models import load_model

    loaded = load_model("tiny-llama", dtype="float32")
    first = loaded.model.model.layers[0]
    blocks = len(loaded.model.model.layers)
    assert blocks >= 2
    truncate_layers(loaded.model, 1, "tiny-llama")
    assert list(loaded.model.model.layers) == [first]
    assert loaded.model.config.num_hidden_layers == 1
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(loaded.model(input_ids=ids, labels=ids).loss)
    with pytest.raises(ForgetlessError, match="proxy_layers=5 but tiny-llama has 1 blocks"):
        truncate_layers(loaded.model, 5, "tiny-llama")


def test_verification_keeps_the_measured_better_candidate():
    runs = [
        {"id": "a1", "weights": np.array([0.9, 0.1])},
        {"id": "a2", "weights": np.array([0.9, 0.1])},
        {"id": "b1", "weights": np.array([0.5, 0.5])},
        {"id": "b2", "weights": np.array([0.5, 0.5])},
    ]

    def metrics(a, b, general_a=1.0, general_b=1.0):
        return {
            "a1": {"objective": a[0], "ppl:general": general_a},
            "a2": {"objective": a[1], "ppl:general": general_a},
            "b1": {"objective": b[0], "ppl:general": general_b},
            "b2": {"objective": b[1], "ppl:general": general_b},
        }

    # Without constraints the lower mean objective wins.
    verified = verify_candidates(runs, metrics((2.0, 2.2), (2.0, 2.1)), {})
    assert verified["chosen"] == "best_observed"
    assert verified["candidates"]["best_observed"]["weights"] == [0.5, 0.5]
    predicted = verified["candidates"]["predicted"]
    assert predicted["runs"] == 2 and predicted["objective"] == pytest.approx(2.1)
    assert predicted["objective_std"] == pytest.approx(np.std([2.0, 2.2], ddof=1))
    assert verify_candidates(runs, metrics((2.0, 2.0), (2.0, 2.0)), {})["chosen"] == "predicted"
    # A better objective does not buy a broken constraint; with both broken, the smaller
    # excess wins.
    limits = {"ppl:general": 1.5}
    assert verify_candidates(runs, metrics((1.0, 1.0), (2.0, 2.0), 1.6), limits)["chosen"] == (
        "best_observed"
    )
    both = verify_candidates(runs, metrics((1.0, 1.0), (2.0, 2.0), 1.6, 1.9), limits)
    assert both["chosen"] == "predicted"
    assert not both["candidates"]["predicted"]["keeps_constraints"]
    # One candidate when the predicted mixture is the best run observed.
    assert list(verify_candidates(runs[:2], metrics((1.0, 1.0), (0, 0)), {})["candidates"]) == [
        "predicted"
    ]


def test_a_predicted_mixture_that_was_run_is_verified_once(tmp_path):
    files = SearchFiles(tmp_path, 2)
    files.add_verification_runs([np.array([0.3, 0.7]), np.array([0.3, 0.7])], seed=0, count=2)
    runs = files.verification_runs()
    assert [run["seed"] for run in runs] == [1, 2]
    assert [run["id"] for run in runs] == [mixture_id([0.3, 0.7], 1), mixture_id([0.3, 0.7], 2)]


def test_an_extrapolated_mixture_that_measures_worse_is_replaced(tmp_path):
    """The proxy punishes every mixture no round proposed (as a cliff outside the region the
    runs explored would): the search must end on the best mixture it actually saw."""
    prior = np.full(3, 1 / 3)
    seen = {}

    def runner(weights, workdir, seed=None):
        key = tuple(np.round(weights, 6))
        if seed is None:  # the rounds' runs, under the search's seed
            seen[key] = True
        value = float(np.abs(weights - [0.8, 0.1, 0.1]).sum()) + _noise(weights, seed, 0.01)
        return {"objective": value + (0 if key in seen else 1.0)}

    config = SearchConfig(rounds=[12, 6], candidates=500, predictor_iterations=50, noise_runs=0)
    outcome = run_search(config, 3, prior, tmp_path, runner, progress=False)
    final = outcome["final"]
    assert final["chosen"] == "best_observed"
    assert final["weights"] == outcome["best_observed"]["weights"]
    verification = final["verification"]
    assert verification["predicted"]["objective"] > verification["best_observed"]["objective"]
    rows = (tmp_path / VERIFY_FILE).read_text().splitlines()
    assert rows[0] == "id,seed,w0,w1,w2"
    assert [row.split(",")[1] for row in rows[1:]] == ["4", "5", "6"] * 2
    # Proxies run elsewhere: the verification waits like a round.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mixtures.csv").write_text((tmp_path / "mixtures.csv").read_text())
    verifying = {row.split(",")[0] for row in rows[1:]}
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()
    kept = [row for row in metrics if row.split(",")[0] not in verifying]
    (elsewhere / "metrics.csv").write_text("\n".join(kept) + "\n")
    waiting = run_search(config, 3, prior, elsewhere, None, progress=False)
    assert waiting["status"] == "waiting" and waiting["step"] == "verification"
    assert len(waiting["pending"]) == 6
