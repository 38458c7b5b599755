"""Data selection: per-sample gradient features, anchor metrics, the Navigator, and the
selection run end to end on the tiny model."""

import json

import numpy as np
import pytest
import torch

from forgetless.config import load_config
from forgetless.data.features import sample_example
from forgetless.data.records import TextRecord
from forgetless.errors import ForgetlessError
from forgetless.io import load_tensors
from forgetless.models import load_model
from forgetless.select import gradients as gradient_module
from forgetless.select.config import GradientConfig, NavigatorConfig
from forgetless.select.gradients import (
    RandomProjector,
    extract_gradient_features,
    gradient_modules,
    per_sample_losses,
)
from forgetless.select.metrics import (
    allowed_cost,
    anchor_from_gradients,
    conflict,
    constrained_top_k,
    exact_choice,
    orthogonality,
)
from forgetless.select.navigator import top_k_quality, train_navigator, warn_without_signal


def _records(count=7):
    return [
        TextRecord(text=f"sample {index} says " + "abc def " * (index + 2), id=f"r{index}")
        for index in range(count)
    ]


@pytest.fixture
def tiny():
    return load_model("tiny-llama")


def _explicit_projection(model, tokenizer, record, modules, projector, max_length):
    ids, labels = sample_example(tokenizer, record, max_length)
    logits = model(input_ids=torch.tensor([ids])).logits
    loss, _ = per_sample_losses(logits, torch.tensor([labels]))
    grads = torch.autograd.grad(loss.sum(), [module.weight for module in modules.values()])
    projected = sum(
        projector.project(name, grad.reshape(1, -1))
        for name, grad in zip(modules, grads, strict=True)
    )
    norm = torch.sqrt(sum(grad.pow(2).sum() for grad in grads))
    return projected[0].detach(), norm.item(), loss.item()


# last_blocks and a LoRA on the output layer: the backward stops below the lowest featured
# layer (GraphStart) with the same result.
@pytest.mark.parametrize(
    ("parameters", "lora_targets"),
    [
        ("blocks", None),
        ("lora", ["q_proj", "v_proj"]),
        ("last_blocks", None),
        ("lora", ["lm_head"]),
    ],
)
def test_batched_features_equal_per_sample_autograd(tiny, tmp_path, parameters, lora_targets):
    model, tokenizer = tiny.model, tiny.tokenizer
    if lora_targets:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules=lora_targets, init_lora_weights=False)
        )
    settings = GradientConfig(
        parameters=parameters, projection_dim=32, batch_size=3, shard_size=4, max_length=48
    )
    records = _records()
    features = extract_gradient_features(
        model, tokenizer, records, settings, tmp_path, progress=False
    )
    assert features.ids == [record.id for record in records]
    projector = RandomProjector(32, "rademacher", 0, "cpu")
    modules = gradient_modules(model, parameters)
    for row, record in enumerate(records):
        expected, norm, loss = _explicit_projection(
            model, tokenizer, record, modules, projector, 48
        )
        # Padding and batching must not change a sample's gradient (float16 storage).
        np.testing.assert_allclose(features.vectors[row], expected.numpy(), atol=2e-3, rtol=2e-3)
        assert features.norm[row] == pytest.approx(norm, rel=1e-4)
        assert features.loss[row] == pytest.approx(loss, rel=1e-5)


def test_adam_preconditioned_features_are_the_projected_adam_update(tiny, tmp_path):
    """LESS's training-gradient features: m' / sqrt(v' + eps) of each sample's gradient from
    the warm-up's moments, then the same projection."""
    from peft import LoraConfig, get_peft_model

    from forgetless.select.gradients import AdamPreconditioner

    torch.manual_seed(0)
    model = get_peft_model(
        tiny.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    generator = torch.Generator().manual_seed(2)
    moments = {"betas": torch.tensor([0.9, 0.999], dtype=torch.float64)}
    for name, param in model.named_parameters():
        if "lora_" in name:
            moments[f"{name}:exp_avg"] = torch.randn(param.shape, generator=generator) * 1e-3
            moments[f"{name}:exp_avg_sq"] = torch.rand(param.shape, generator=generator) * 1e-6
    settings = GradientConfig(projection_dim=32, batch_size=3, max_length=48)
    records = _records(4)
    features = extract_gradient_features(
        model, tokenizer := tiny.tokenizer, records, settings, tmp_path, progress=False,
        adam_moments=moments,
    )  # fmt: skip
    modules = gradient_modules(model, "lora")
    projector = RandomProjector(32, "rademacher", 0, "cpu")
    for row, record in enumerate(records):
        ids, labels = sample_example(tokenizer, record, 48)
        loss, _ = per_sample_losses(
            model(input_ids=torch.tensor([ids])).logits, torch.tensor([labels])
        )
        grads = torch.autograd.grad(loss.sum(), [module.weight for module in modules.values()])
        expected = 0
        for name, grad in zip(modules, grads, strict=True):
            key = f"{name}.weight"
            first = 0.9 * moments[f"{key}:exp_avg"] + 0.1 * grad
            second = 0.999 * moments[f"{key}:exp_avg_sq"] + 0.001 * grad.pow(2)
            update = first / torch.sqrt(second + AdamPreconditioner.EPS)
            expected = expected + projector.project(name, update.reshape(1, -1))[0]
        np.testing.assert_allclose(
            features.vectors[row], expected.detach().numpy(), atol=5e-3, rtol=5e-3
        )


def test_a_kronecker_sketch_of_lora_cannot_be_preconditioned():
    with pytest.raises(ValueError, match="cannot be Adam-preconditioned"):
        GradientConfig(parameters="lora", projector="kronecker")
    GradientConfig(parameters="lora", projector="kronecker", preconditioner="none")


def test_kronecker_features_are_each_layers_sketched_gradient(tiny, tmp_path):
    """Every layer's slice is P_out G P_in^T of that layer's autograd gradient, and a bias
    column sits beside the weight's."""
    from forgetless.select.gradients import KroneckerSketch

    model, tokenizer = tiny.model, tiny.tokenizer
    biased = model.model.layers[0].self_attn.q_proj
    biased.bias = torch.nn.Parameter(torch.randn(biased.out_features) * 0.1)
    settings = GradientConfig(
        parameters="blocks", projector="kronecker", projection_dim=14 * 9, batch_size=3,
        max_length=48,
    )  # fmt: skip
    records = _records(5)
    features = extract_gradient_features(
        model, tokenizer, records, settings, tmp_path, progress=False
    )
    modules = gradient_modules(model, "blocks")
    sketch = KroneckerSketch(modules, 14 * 9, 0, "cpu")
    assert sketch.side == 3 and features.vectors.shape == (5, 14 * 9)
    for row, record in enumerate(records):
        ids, labels = sample_example(tokenizer, record, 48)
        loss, _ = per_sample_losses(
            model(input_ids=torch.tensor([ids])).logits, torch.tensor([labels])
        )
        expected = []
        for name, module in modules.items():
            weights = [module.weight] + ([module.bias] if module.bias is not None else [])
            grads = torch.autograd.grad(loss.sum(), weights, retain_graph=True)
            gradient = torch.cat([grads[0], grads[1][:, None]], 1) if len(grads) == 2 else grads[0]
            out_factor, in_factor = sketch.factors[name]
            expected.append((out_factor.T @ gradient @ in_factor).reshape(-1))
        expected = torch.cat(expected).detach().numpy()
        np.testing.assert_allclose(features.vectors[row], expected, atol=2e-3, rtol=2e-3)
        assert features.norm[row] == pytest.approx(float(np.linalg.norm(expected)), rel=1e-3)


def test_projection_is_seeded_and_preserves_inner_products():
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(4, 5000, generator=generator)
    first = RandomProjector(2048, "rademacher", 7, "cpu").project("layer", vectors)
    again = RandomProjector(2048, "rademacher", 7, "cpu", cache_bytes=0).project("layer", vectors)
    assert torch.equal(first, again)
    other = RandomProjector(2048, "rademacher", 8, "cpu").project("layer", vectors)
    assert not torch.equal(first, other)
    exact = vectors @ vectors.T
    approx = first @ first.T
    # Johnson-Lindenstrauss: relative error of norms ~ sqrt(2/d).
    assert torch.allclose(approx.diagonal(), exact.diagonal(), rtol=0.1)
    gaussian = RandomProjector(2048, "gaussian", 7, "cpu").project("layer", vectors)
    assert torch.allclose((gaussian @ gaussian.T).diagonal(), exact.diagonal(), rtol=0.1)


def test_extraction_resumes_after_an_interrupted_shard(tiny, tmp_path, monkeypatch):
    settings = GradientConfig(parameters="blocks", projection_dim=16, batch_size=2, shard_size=3)
    records = _records(8)
    clean = extract_gradient_features(
        tiny.model, tiny.tokenizer, records, settings, tmp_path / "clean", progress=False
    )
    calls = {"count": 0}
    original = gradient_module.pad_batch

    def failing_pad_batch(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:  # inside the second shard
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(gradient_module, "pad_batch", failing_pad_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_gradient_features(
            tiny.model, tiny.tokenizer, records, settings, tmp_path / "resumed", progress=False
        )
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["done_shards"] == 1
    with pytest.raises(ForgetlessError, match="incomplete"):
        gradient_module.load_gradient_features(tmp_path / "resumed")
    monkeypatch.setattr(gradient_module, "pad_batch", original)
    resumed = extract_gradient_features(
        tiny.model, tiny.tokenizer, records, settings, tmp_path / "resumed", progress=False
    )
    assert np.array_equal(np.asarray(resumed.vectors), np.asarray(clean.vectors))
    assert np.array_equal(resumed.loss, clean.loss)


def test_anchor_metrics():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(20, 3)))[0]
    anchor_gradients = rng.normal(size=(50, 3)) @ basis.T
    anchor = anchor_from_gradients(anchor_gradients, rank=3)
    assert anchor.captured == pytest.approx(1.0)
    inside = anchor_gradients[:2]
    outside = rng.normal(size=(2, 20))
    outside -= outside @ basis @ basis.T
    np.testing.assert_allclose(orthogonality(inside, anchor), 0.0, atol=1e-9)
    np.testing.assert_allclose(orthogonality(outside, anchor), 1.0, atol=1e-9)
    opposed = -anchor.mean[None, :]
    assert conflict(opposed, anchor)[0] == pytest.approx(1.0)
    assert conflict(anchor.mean[None, :], anchor)[0] == 0.0


def test_constrained_top_k_meets_the_cost_limit():
    rng = np.random.default_rng(0)
    utility = rng.normal(size=200)
    cost = np.clip(utility + rng.normal(scale=0.5, size=200), 0, None)  # useful = costly
    free, lam, met = constrained_top_k(utility, cost, 20, cost_limit=10.0)
    assert met and lam == 0.0 and set(free) == set(np.argsort(-utility)[:20])
    limit = 0.5 * cost.mean()
    chosen, lam, met = constrained_top_k(utility, cost, 20, cost_limit=limit)
    assert met and lam > 0 and cost[chosen].mean() <= limit
    assert utility[chosen].mean() < utility[free].mean()


@pytest.mark.parametrize(
    ("spearman", "samples", "unscored", "warned"),
    [
        (-0.05, 200, 3783, True),  # the financial rerun's Navigator (docs/select.md)
        (None, 200, 3783, True),  # constant scores: a Navigator that learnt nothing
        (0.12, 200, 3783, False),  # just above the one-sided 5 % bound, 0.117 at 200
        (0.12, 100, 3783, True),  # the same correlation at 100 samples is chance (0.165)
        (-0.05, 200, 0, False),  # every sample scored exactly: the Navigator ranks none
    ],
)
def test_a_navigator_without_signal_is_said(caplog, spearman, samples, unscored, warned):
    with caplog.at_level("WARNING", logger="forgetless.select.navigator"):
        warn_without_signal({"spearman_vs_exact": spearman, "samples": samples}, unscored)
    assert ("no better than chance" in caplog.text) is warned
    if warned:
        assert f"the {unscored} pool samples without a gradient" in caplog.text


def test_an_unmeetable_cost_limit_is_said_and_selects_the_least_costly(caplog):
    rng = np.random.default_rng(0)
    utility = rng.normal(size=200)
    cost = rng.uniform(1.0, 2.0, size=200)  # every sample costs at least 1
    chosen, _, met = constrained_top_k(utility, cost, 20, cost_limit=0.5)
    assert not met
    assert set(chosen) == set(np.argsort(cost)[:20])
    with caplog.at_level("WARNING", logger="forgetless.select.metrics"):
        choice = exact_choice(utility, cost, budget=0.1, cost_limit=0.3, basis="pool_mean")
    assert not choice.limit_met and choice.limit == pytest.approx(0.3 * cost.mean())
    assert "select.cost_limit cannot be met" in caplog.text


def test_a_feasible_cost_limit_is_always_met_and_spans_least_costly_to_unconstrained():
    rng = np.random.default_rng(1)
    utility = rng.normal(size=300)
    # Costs in a narrow band and rising with utility: a pool-mean limit cannot be met.
    cost = 1.0 + 0.1 * utility + rng.normal(scale=0.05, size=300)
    least = np.sort(cost)[:30].mean()
    free = cost[np.argsort(-utility)[:30]].mean()
    assert allowed_cost(utility, cost, 30, 0.5, "feasible") == pytest.approx((least + free) / 2)
    assert not exact_choice(utility, cost, 0.1, 0.5, "pool_mean").limit_met
    lams = []
    for share in (0.1, 0.5, 0.9):
        choice = exact_choice(utility, cost, 0.1, share, "feasible")
        chosen, _, met = constrained_top_k(utility, cost, 30, choice.limit)
        assert choice.limit_met and met and cost[chosen].mean() <= choice.limit
        lams.append(choice.multiplier)
    # A looser limit needs a smaller multiplier; at 1 the constraint is gone (LESS's choice).
    assert lams[0] > lams[1] > lams[2] > 0
    assert exact_choice(utility, cost, 0.1, 1.0, "feasible").multiplier == 0.0


def _synthetic_task(count=400, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(count, 6)).astype(np.float32)
    utility = np.tanh(features[:, 0])
    cost = 1 / (1 + np.exp(-2 * features[:, 1]))  # independent of utility
    return features, utility, cost


def test_navigator_learns_the_constrained_choice_and_is_deterministic():
    features, utility, cost = _synthetic_task()
    settings = NavigatorConfig(iterations=150, candidates=40, episodes=16, learning_rate=3e-3)
    limit = 0.5 * cost.mean()
    navigator, log = train_navigator(
        features, utility, cost, settings, budget=0.1, cost_limit=limit, progress=False
    )
    again, _ = train_navigator(
        features, utility, cost, settings, budget=0.1, cost_limit=limit, progress=False
    )
    for key, value in navigator.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    assert len(log) == 150 and {"reward", "cost", "lam"} <= set(vars(log[0]))
    # On fresh samples the Navigator's top 10 % beats a random pick on utility and keeps
    # the cost near the limit it was trained for.
    fresh_features, fresh_utility, fresh_cost = _synthetic_task(seed=1)
    top = top_k_quality(navigator.score(fresh_features), fresh_utility, fresh_cost, 0.1)
    assert top["utility"] > fresh_utility.mean() + 0.3
    assert top["cost"] < 1.3 * limit
    assert log[-1].lam > 0


def _select_config(method, tmp_path):
    return load_config(
        None,
        {
            "model.name": "tiny-llama",
            "data.source": "pubmedqa",
            "data.limit": 40,
            "select.method": method,
            "select.budget": 0.25,
            "select.anchor.samples": 8,
            "select.validation.samples": 6,
            "select.featured_samples": 24,
            "select.gradient.projection_dim": 32,
            "select.gradient.warmup_steps": 2,
            "select.gradient.max_length": 400,
            "select.gradient.shard_size": 16,
            "select.navigator.iterations": 20,
            "select.navigator.candidates": 12,
        },
    )


GRADIENT_PASSES = {"gradients_anchor", "gradients_validation", "gradients_pool"}


def _stage_fingerprints(config):
    from forgetless.select.stages import Selection, selection_stages

    selection = Selection(config.model, config.data, config.select, data_dir=config.data_dir)
    # The same upstream fingerprints for both configs: each stage's own settings are compared.
    return {
        stage.name: stage.fingerprint(dict.fromkeys(stage.depends_on, "upstream"))
        for stage in selection_stages(selection)
    }


@pytest.mark.parametrize(
    ("setting", "value", "changed"),
    [
        # The projection is applied to gradients taken under the warm-up: it reruns only
        # the gradient passes, not the warm-up.
        ("projection_dim", 64, GRADIENT_PASSES),
        ("preconditioner", "none", GRADIENT_PASSES),
        ("warmup_steps", 3, {"warmup", *GRADIENT_PASSES}),
        # Memory for projection blocks changes the time, never the values.
        ("projector_cache_mb", 0, set()),
    ],
)
def test_each_selection_stage_reruns_only_for_the_settings_it_uses(
    setting, value, changed, tmp_path
):
    config = _select_config("less", tmp_path)
    before = _stage_fingerprints(config)
    setattr(config.select.gradient, setting, value)
    after = _stage_fingerprints(config)
    assert {name for name in before if before[name] != after[name]} == changed | (
        {"selection_less"} if changed else set()
    )


@pytest.mark.parametrize("method", ["ogs", "orthogonal", "less", "random"])
def test_selection_runs_end_to_end_and_is_reproducible(
    method, tmp_path, shared_data_dir, select_twice
):
    from forgetless.data import load_records

    results, selected = select_twice(_select_config(method, tmp_path), method)
    selection = results[f"selection_{method}"]
    summary = selection.summary
    assert summary["selected"] == round(0.25 * 34) == len(selected.splitlines())
    rows = [json.loads(line) for line in selected.splitlines()]
    assert [row["rank"] for row in rows] == list(range(len(rows)))
    # The selection is a trainable data file.
    records = load_records(str(selection.directory / "selected.jsonl"))
    assert [record.id for record in records] == [row["id"] for row in rows]
    if method != "random":
        # The warm-up kept its Adam moments, which precondition the pool's gradients.
        moments = load_tensors(results["warmup"].directory / "adam_moments.safetensors")
        assert "betas" in moments and any(
            key.endswith("lora_A.default.weight:exp_avg_sq") for key in moments
        )
        metrics = summary["gradient_metrics"]
        assert set(metrics) >= {"orthogonality", "conflict", "utility"}
        assert (selection.directory / "histograms.png").stat().st_size > 0
    if method == "ogs":
        navigator = results["navigator"].summary
        folds = navigator["cross_validation"]
        assert folds["folds"] == 5 and folds["samples"] == 24
        for key in ("spearman_vs_exact", "ridge_spearman_vs_exact"):
            assert -1.0 <= folds[key] <= 1.0
        log = json.loads((results["navigator"].directory / "log.json").read_text())
        assert len(log) == 20 and {"reward", "cost", "lam"} <= set(log[0])
        # Every featured sample is ranked by its exact score, so the selection holds the
        # featured samples the exact constrained choice would keep among them.
        scores = np.load(results["navigator"].directory / "scores.npy")
        assert scores.shape == (34,) and np.isfinite(scores).sum() >= 24


def test_selection_cli(tmp_path, run_cli, shared_data_dir):
    code, out, err = run_cli(
        [
            "select",
            "--output-dir",
            str(tmp_path / "run"),
            "--model",
            "tiny-llama",
            "--data",
            "pubmedqa",
            "--limit",
            "30",
            "--method",
            "less",
            "--budget",
            "0.2",
            "--set",
            "select.anchor.samples=4",
            "--set",
            "select.validation.samples=4",
            "--set",
            "select.gradient.warmup_steps=1",
            "--set",
            "select.gradient.max_length=400",
            "--set",
            "select.gradient.projection_dim=16",
        ]
    )
    assert code == 0, err
    assert "utility" in out
    assert (tmp_path / "run" / "selection_less" / "selected.jsonl").is_file()


def test_the_supervised_reference_ranks_a_learnable_score_and_not_noise():
    from scipy.stats import spearmanr

    from forgetless.select.navigator import supervised_reference

    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(200, 8))

    def held_out_spearman(target):
        predicted = supervised_reference(inputs[:150], target[:150], inputs[150:])
        return spearmanr(predicted, target[150:]).statistic

    assert held_out_spearman(inputs @ rng.normal(size=8)) > 0.95
    assert abs(held_out_spearman(rng.normal(size=200))) < 0.4


def test_folds_are_seeded_and_balanced():
    from forgetless.select.navigator import fold_assignment

    folds = fold_assignment(23, 5, seed=3)
    assert np.array_equal(folds, fold_assignment(23, 5, seed=3))
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 5, 5, 5]


def test_head_sketch_is_the_projected_output_layer_gradient(tiny):
    """S = P_V G P_H^T exactly, G the gradient of the sample's mean loss with respect to the
    output layer (formed here by autograd through a detached copy of that layer)."""
    from forgetless.select.head_sketch import head_gradient_sketches, sketch_matrices

    model, tokenizer = tiny.model, tiny.tokenizer
    records = _records(4)
    sketches = head_gradient_sketches(
        model, tokenizer, records, max_length=64, batch_size=3, rows=8, columns=4,
        seed=5, progress=False,
    )  # fmt: skip
    head = model.get_output_embeddings().weight
    vocab_signs, hidden_signs = sketch_matrices(*head.shape, 8, 4, seed=5)
    for index, record in enumerate(records):
        ids, labels = sample_example(tokenizer, record, 64)
        hidden = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state
        weight = head.detach().clone().requires_grad_(True)
        loss, count = per_sample_losses(hidden @ weight.T, torch.tensor([labels]))
        (gradient,) = torch.autograd.grad(loss.sum(), weight)
        expected = (vocab_signs.T @ gradient @ hidden_signs).reshape(-1)
        torch.testing.assert_close(
            torch.from_numpy(sketches.vectors[index]), expected, rtol=1e-4, atol=1e-6
        )
        assert sketches.tokens[index] == count.item()
        assert sketches.loss[index] == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["random", "less"])
def test_a_token_budget_keeps_the_ranking_head_that_reaches_it(method, tmp_path, shared_data_dir):
    from forgetless.data.features import training_tokens
    from forgetless.select import run_selection

    config = _select_config(method, tmp_path)
    config.select.budget_tokens = 3000
    fraction = run_selection(
        _select_config(method, tmp_path), tmp_path / "fraction", progress=False
    )
    results = run_selection(config, tmp_path / "tokens", progress=False)
    summary = results[f"selection_{method}"].summary
    rows = [
        json.loads(line)
        for line in (results[f"selection_{method}"].directory / "selected.jsonl").open()
    ]
    records = {record.id: record for record in _pool_records(config)}
    tokens = training_tokens(
        load_model("tiny-llama").tokenizer, [records[row["id"]] for row in rows], 400
    )
    assert summary["budget_tokens"] == 3000 and summary["tokens"] == tokens.sum()
    assert tokens[:-1].sum() < 3000 <= tokens.sum()
    # The same ranking as the fraction budget: one is a prefix of the other.
    other = [
        json.loads(line)["id"]
        for line in (fraction[f"selection_{method}"].directory / "selected.jsonl").open()
    ]
    shorter = min(len(other), len(rows))
    assert other[:shorter] == [row["id"] for row in rows][:shorter]


def _pool_records(config):
    from forgetless.select.data import PoolSettings, SelectionData

    settings = PoolSettings(
        model=config.model, data=config.data, validation=config.select.validation,
        seed=config.select.seed,
    )  # fmt: skip
    return SelectionData.load(settings, data_dir=config.data_dir).candidates


def test_less_checkpoints_combine_as_a_learning_rate_weighted_mean_of_cosines(
    tmp_path, shared_data_dir
):
    from forgetless.select import run_selection
    from forgetless.select.gradients import load_gradient_features
    from forgetless.select.warmup import checkpoint_steps

    assert checkpoint_steps(20, 3) == [7, 14, 20] and checkpoint_steps(3, 3) == [1, 2, 3]
    config = _select_config("less", tmp_path)
    config.select.gradient.warmup_steps = 3
    config.select.gradient.checkpoints = 2
    results = run_selection(config, tmp_path / "run", progress=False)
    warmup = results["warmup"].directory
    weights = [
        json.loads((warmup / f"checkpoint_{k}" / "learning_rate.json").read_text()) for k in (1, 2)
    ]
    assert [entry["step"] for entry in weights] == [2, 3]
    assert weights[0]["weight"] > weights[1]["weight"] > 0  # a linear decay
    pool = results["gradients_pool"].directory
    combined = load_gradient_features(pool).dense()
    parts = [load_gradient_features(pool / f"checkpoint_{k}").dense() for k in (1, 2)]
    assert combined.shape[1] == 2 * parts[0].shape[1]

    def cosines(rows):
        units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return units[:5] @ units[5:10].T

    share = np.array([entry["weight"] for entry in weights])
    share = share / share.sum()
    expected = share[0] * cosines(parts[0]) + share[1] * cosines(parts[1])
    np.testing.assert_allclose(cosines(combined), expected, atol=5e-3)
    assert results["selection_less"].summary["selected"] > 0


def test_checkpoints_need_a_lora_warmup_long_enough():
    with pytest.raises(ValueError, match="parameters to lora"):
        GradientConfig(parameters="blocks", checkpoints=2)
    with pytest.raises(ValueError, match="at least as many warmup_steps"):
        GradientConfig(checkpoints=4, warmup_steps=3)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("full", {"parameters": "blocks"}),
        ("osft", {"parameters": "blocks"}),
        (
            "lora",
            {
                "parameters": "lora",
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_target_modules": "all-linear",
            },
        ),
    ],
)
def test_target_gradients_are_those_the_training_method_trains(method, expected):
    config = load_config(
        None,
        {
            "select.gradient.parameters": "target",
            "train.method": method,
            "train.lora.r": 4,
            "train.lora.alpha": 8,
        },
    )
    gradient = config.select.gradient.model_dump()
    assert {key: gradient[key] for key in expected} == expected
    # Resolved once: the same stages (and cache) as the set named outright.
    named = load_config(
        None,
        {
            **{f"select.gradient.{k}": v for k, v in expected.items()},
            "train.method": method,
            "train.lora.r": 4,
            "train.lora.alpha": 8,
        },
    )
    assert named.select == config.select


def test_target_gradients_that_do_not_fit_the_other_settings_are_refused():
    # LESS's checkpoints need a LoRA warm-up: fine for a LoRA target, not for a full one.
    lora = load_config(
        None,
        {
            "select.gradient.parameters": "target",
            "train.method": "lora",
            "select.gradient.checkpoints": 2,
        },
    )
    assert lora.select.gradient.parameters == "lora"
    with pytest.raises(ForgetlessError, match="is blocks for train.method full, and then"):
        load_config(
            None, {"select.gradient.parameters": "target", "select.gradient.checkpoints": 2}
        )
    with pytest.raises(ForgetlessError, match="parameters=target is lora for train.method lora"):
        load_config(
            None,
            {
                "select.gradient.parameters": "target",
                "train.method": "lora",
                "select.gradient.projector": "kronecker",
            },
        )


def test_a_lora_targets_warmup_adapts_every_linear_layer(tmp_path, shared_data_dir):
    from forgetless.select import run_selection

    config = load_config(
        None,
        {
            "select.gradient.parameters": "target",
            "train.method": "lora",
            "train.lora.r": 2,
            "model.name": "tiny-llama",
            "data.source": "pubmedqa",
            "data.limit": 40,
            "select.method": "less",
            "select.anchor.samples": 4,
            "select.validation.samples": 6,
            "select.gradient.projection_dim": 32,
            "select.gradient.warmup_steps": 1,
            "select.gradient.max_length": 400,
        },
    )
    results = run_selection(config, tmp_path / "run", progress=False)
    moments = load_tensors(results["warmup"].directory / "adam_moments.safetensors")
    adapted = {key.split(".lora_A.")[0].rsplit(".", 1)[-1] for key in moments if ".lora_A." in key}
    assert adapted >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
