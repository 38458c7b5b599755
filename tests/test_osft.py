"""OSFT: the projections, the rank policies, and training that stays in the allowed subspace."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from forgetless.config import load_config
from forgetless.data.features import pack_text
from forgetless.data.records import TextRecord
from forgetless.errors import ForgetlessError
from forgetless.models import load_model
from forgetless.train import train_model
from forgetless.train.config import OsftConfig, TrainConfig
from forgetless.train.osft import (
    OsftCallback,
    SubspaceBasis,
    calibration_batches,
    choose_ranks,
    enclosing_block,
    layer_importance,
    preserved_ratios,
    projection_cost,
    refuse_sharded_launch,
    target_modules,
    trainable_directions,
)

TEXTS = [
    f"Sample {i}: the quick brown fox jumps over the lazy dog, {i * 7} times. " * 3
    for i in range(40)
]
PROJECTIONS = ("two_sided", "top_block")


def spaced_weight(shape, seed=0) -> torch.Tensor:
    """A matrix with well-separated singular values, so its top-k subspaces are well defined
    in fp32 and in fp64 alike."""
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=generator))
    return u @ torch.diag(0.8 ** torch.arange(r, dtype=torch.float32)) @ v.T


def reference_projection(weight, rank, x, projection):
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    u, v = u[:, :rank], vh[:rank].T
    if projection == "two_sided":
        left = torch.eye(weight.shape[0], dtype=torch.float64) - u @ u.T
        right = torch.eye(weight.shape[1], dtype=torch.float64) - v @ v.T
        return left @ x.double() @ right
    return x.double() - u @ u.T @ x.double() @ v @ v.T


def projected(basis: SubspaceBasis, x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    basis.project_(out)
    return out


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("shape", [(12, 12), (20, 12), (12, 20)])
@pytest.mark.parametrize("rank", [2, 7, 10])
def test_projection_matches_the_definition_whichever_factors_are_stored(projection, shape, rank):
    weight = spaced_weight(shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    basis = SubspaceBasis(weight, rank, projection)
    result = projected(basis, x)
    torch.testing.assert_close(
        result.double(), reference_projection(weight, rank, x, projection), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(projected(basis, result), result, atol=1e-5, rtol=0)
    assert max(basis.high_energy(result)) < 1e-5 * float(result.norm())
    assert min(basis.high_energy(x)) > 0.1 * float(x.norm())


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_each_side_stores_the_factor_that_makes_the_projection_cheapest(projection):
    stored = {
        (SubspaceBasis(spaced_weight(shape), rank, projection).left_low,
         SubspaceBasis(spaced_weight(shape), rank, projection).right_low)
        for shape in [(12, 12), (20, 12), (12, 20)]
        for rank in (2, 7, 10)
    }  # fmt: skip
    # The parametrised test above covers every storage combination of each projection.
    assert stored == {(False, False), (False, True), (True, False), (True, True)}
    # A complement exists only on a side whose SVD factor is square.
    assert not SubspaceBasis(spaced_weight((20, 12)), 10, projection).left_low
    # SmolLM2's 576 x 576 matrices at the default ratio: applying the complement first cuts
    # the two-sided projection by a quarter.
    basis = SubspaceBasis(spaced_weight((24, 24)), 12, projection)
    chosen = projection_cost((576, 576), 288, projection, basis.left_low, basis.right_low)
    plain = projection_cost((576, 576), 288, projection, False, False)
    assert chosen == (0.75 * plain if projection == "two_sided" else plain)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_trainable_directions_are_the_rank_of_the_projection(projection):
    shape, rank = (6, 4), 3
    basis = SubspaceBasis(spaced_weight(shape), rank, projection)
    # The projection as a (m*n) x (m*n) matrix: its rank is the trainable dimension.
    columns = [projected(basis, unit.reshape(shape)).flatten() for unit in torch.eye(24)]
    dimension = torch.linalg.matrix_rank(torch.stack(columns), atol=1e-5)
    assert dimension == trainable_directions(shape, rank, projection)
    assert trainable_directions(shape, rank, projection) == (
        (6 - 3) * (4 - 3) if projection == "two_sided" else 6 * 4 - 3 * 3
    )


def test_basis_rejects_ranks_that_leave_nothing_to_train():
    with pytest.raises(ValueError):
        SubspaceBasis(torch.randn(4, 6), 4)


def tiny():
    return load_model("tiny-llama")


def test_fixed_policy_and_overrides_choose_ranks():
    modules = target_modules(tiny().model, OsftConfig().target_modules)
    config = OsftConfig(
        rank_policy="fixed",
        preserve_ratio=0.25,
        rank_overrides={r"layers\.0\.self_attn\.q_proj": 0.75, r"down_proj": 3},
    )
    ranks = {choice.name: choice.rank for choice in choose_ranks(modules, config)}
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    r = min(modules[q0].weight.shape)
    assert ranks[q1] == round(0.25 * r)
    assert ranks[q0] == round(0.75 * r)
    assert ranks["model.layers.1.mlp.down_proj"] == 3


def test_mean_mapping_follows_the_papers_formula_and_clamps():
    modules = dict(list(target_modules(tiny().model, OsftConfig().target_modules).items())[:3])
    names = list(modules)
    importance = {names[0]: 0.5, names[1]: 1.0, names[2]: 1.5}  # normalised: 0.5, 1.0, 1.5
    config = OsftConfig(mrr=0.1, trr=0.7, rank_mapping="mean")
    choices = choose_ranks(modules, config, importance)
    for choice, normalised in zip(choices, [0.5, 1.0, 1.5], strict=True):
        r = min(choice.shape)
        expected = round((0.1 + normalised * (0.7 - 0.1)) * r)
        assert choice.rank == min(max(expected, 1), r - 1)
    assert choices[2].rank == min(choices[2].shape) - 1  # the full rank asked for, clamped
    with pytest.raises(ForgetlessError, match="not positive"):
        choose_ranks(modules, config, {name: -0.1 for name in names})


def test_quantile_mapping_spreads_bunched_importances_within_trr_scaled_bounds():
    # Block-like scores: one outlier, the rest bunched near 0.95 (SmolLM2's shape), one tie.
    scores = [0.006, 0.94, 0.95, 0.95, 0.96, 0.97]
    importance = {f"m{i}": score for i, score in enumerate(scores)}
    for trr, half_width in [(0.5, 0.25), (0.9, 0.05), (0.15, 0.05)]:
        ratios = preserved_ratios(importance, OsftConfig(trr=trr, mrr=0.1))
        values = list(ratios.values())
        assert sum(values) / len(values) == pytest.approx(trr)
        assert min(values) == pytest.approx(trr - half_width)
        assert max(values) == pytest.approx(trr + half_width)
        # Evenly spaced in importance order; the tie shares one ratio.
        assert ratios["m0"] < ratios["m1"] < ratios["m2"] == ratios["m3"] < ratios["m4"]
        step = 2 * half_width / (len(scores) - 1)
        assert ratios["m5"] - ratios["m4"] == pytest.approx(step)
    # The last task of a sequence (final_trr 0.9): the paper's mapping asks for more than the
    # full rank for every above-average matrix; the quantile mapping stays below 0.95.
    modules = {name: nn.Linear(200, 100) for name in importance}
    for mapping, clamped in [("mean", 5), ("quantile", 0)]:
        config = OsftConfig(trr=0.9, rank_mapping=mapping)
        ranks = [choice.rank for choice in choose_ranks(modules, config, importance)]
        assert ranks.count(99) == clamped
    assert max(ranks) == 95


def test_trr_below_mrr_is_a_one_line_config_error():
    with pytest.raises(ForgetlessError, match="trr .* must be at least mrr"):
        load_config(None, {"train.osft.trr": 0.05})


def test_block_importance_is_shared_within_a_block_and_positive():
    loaded = tiny()
    modules = target_modules(loaded.model, OsftConfig().target_modules)
    assert enclosing_block(loaded.model, "model.layers.1.mlp.up_proj") == "model.layers.1"
    records = [TextRecord(text=text) for text in TEXTS[:8]]
    batches = calibration_batches(loaded.tokenizer, records, 32, samples=4)
    assert len(batches) == 4 and batches[0]["input_ids"].shape == (1, 32)
    scores = layer_importance(loaded.model, modules, batches)
    layer1 = {name: value for name, value in scores.items() if ".layers.1." in name}
    assert len(set(layer1.values())) == 1
    assert all(value > 0 for value in scores.values())


def test_matrix_importance_is_the_cosine_with_the_output_rotated_back():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8, bias=False)
    model = nn.Sequential(layer)
    x = torch.randn(5, 8)

    def score(weight):
        layer.weight.data = weight
        modules = {"0": layer}
        svds = {"0": torch.linalg.svd(weight, full_matrices=False)}
        return layer_importance(model, modules, [{"input": x}], "matrix", svds)["0"]

    # For a symmetric W the rotation is the identity: the literal cos(x, Wx).
    a = torch.randn(8, 8)
    symmetric = a @ a.T
    literal = nn.functional.cosine_similarity(x, x @ symmetric.T, dim=-1).mean()
    assert score(symmetric) == pytest.approx(float(literal), abs=1e-5)
    # Rotating the output space does not change it: the literal cosine would.
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    assert score(rotation @ symmetric) == pytest.approx(float(literal), abs=1e-5)


def drift_leakage(model, initial, ranks, projection="two_sided", bases=None):
    """The largest frozen part of a matrix's drift from ``initial``, relative to the drift."""
    bases = {} if bases is None else bases
    worst = 0.0
    for choice in ranks:
        name = choice["name"]
        start = initial[name + ".weight"]
        if name not in bases:
            bases[name] = SubspaceBasis(start, choice["rank"], projection)
        drift = model.get_submodule(name).weight.detach() - start
        worst = max(worst, max(bases[name].high_energy(drift)) / float(drift.norm()))
    return worst


class LeakageRecorder(TrainerCallback):
    """Measures, after OSFT's own step-end hook, how much of the drift is frozen."""

    def __init__(self, model, initial, callback):
        self.model, self.initial, self.callback = model, initial, callback
        self.bases: dict[str, SubspaceBasis] = {}
        self.leakage: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        ranks, projection = self.callback.ranks, self.callback.config.projection
        leak = drift_leakage(self.model, self.initial, ranks, projection, self.bases)
        self.leakage.append(leak)


def run_plain_trainer(model, tokenizer, callbacks, tmp_path, steps=8):
    """The docs' drop-in example: a stock Trainer with the callback added."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=3e-3,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    data = pack_text(tokenizer, TEXTS, 32)
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_every_update_stays_in_the_allowed_subspace_with_both_projections(projection, tmp_path):
    loaded = tiny()
    initial = {name: param.detach().clone() for name, param in loaded.model.named_parameters()}
    config = OsftConfig(rank_policy="fixed", projection=projection, project_gradients=True)
    callback = OsftCallback(loaded.model, config, verbose=False)
    recorder = LeakageRecorder(loaded.model, initial, callback)
    run_plain_trainer(loaded.model, loaded.tokenizer, [callback, recorder], tmp_path)
    assert len(recorder.leakage) == 8 and max(recorder.leakage) < 1e-5
    # untargeted parameters (embeddings, norms) are frozen by default
    assert torch.equal(loaded.model.model.embed_tokens.weight, initial["model.embed_tokens.weight"])


def test_projecting_only_the_step_keeps_every_step_exact(tmp_path):
    loaded = tiny()
    initial = {name: param.detach().clone() for name, param in loaded.model.named_parameters()}
    config = OsftConfig(rank_policy="fixed")  # the default: only the step is projected
    callback = OsftCallback(loaded.model, config, verbose=False)
    projected = []
    callback.projector.project_gradients = lambda: projected.append(1)
    recorder = LeakageRecorder(loaded.model, initial, callback)
    run_plain_trainer(loaded.model, loaded.tokenizer, [callback, recorder], tmp_path)
    # One projection per step (the step's), none of the gradient, and every step exact.
    assert projected == [] and len(recorder.leakage) == 8 and max(recorder.leakage) < 1e-5
    with pytest.raises(ValueError, match="project_gradients: false needs reproject_every: 1"):
        OsftConfig(project_gradients=False, reproject_every=2)


def test_the_drift_leaks_between_reprojections_and_is_exact_at_each_and_at_the_end(tmp_path):
    loaded = tiny()
    initial = {name: param.detach().clone() for name, param in loaded.model.named_parameters()}
    callback = OsftCallback(
        loaded.model,
        OsftConfig(rank_policy="fixed", project_gradients=True, reproject_every=3),
        verbose=False,
    )
    recorder = LeakageRecorder(loaded.model, initial, callback)
    run_plain_trainer(loaded.model, loaded.tokenizer, [callback, recorder], tmp_path)
    exact = [step for step, leak in enumerate(recorder.leakage, start=1) if leak < 1e-5]
    # Steps 3 and 6 are due; 8 is the last. In between, AdamW's element-wise scaling and
    # weight decay leak the projected gradient into the frozen subspaces.
    assert exact == [3, 6, 8]
    assert min(leak for step, leak in enumerate(recorder.leakage, 1) if step not in exact) > 1e-3


def test_train_model_osft_writes_ranks_and_a_plain_checkpoint(tmp_path, capsys):
    loaded = tiny()
    initial = {name: param.detach().clone() for name, param in loaded.model.named_parameters()}
    config = TrainConfig(
        method="osft",
        max_steps=4,
        batch_size=4,
        max_length=32,
        learning_rate=3e-3,
        save_steps=1000,
        osft=OsftConfig(calibration_samples=4),
    )
    records = [TextRecord(text=text) for text in TEXTS]
    model, result = train_model(
        loaded.model, loaded.tokenizer, records, config, tmp_path, calibration_records=records[:8]
    )
    printed = capsys.readouterr().out
    assert "OSFT preserved (frozen) rank per matrix" in printed
    assert "per matrix min" in printed and "trainable (two_sided)" in printed
    ranks = json.loads((tmp_path / "osft_ranks.json").read_text())
    assert len(ranks) == 14 and all(1 <= entry["rank"] < min(entry["shape"]) for entry in ranks)
    # Two blocks: the quantile mapping gives the two blocks' matrices different ranks.
    assert len({entry["rank"] for entry in ranks if entry["name"].endswith("q_proj")}) == 2
    assert drift_leakage(model, initial, ranks) < 1e-5
    reloaded = load_model(str(tmp_path / "model"))
    torch.testing.assert_close(
        reloaded.model.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    )
    assert result.method == "osft" and result.steps == 4


def test_adaptive_policy_without_calibration_is_a_clear_error():
    with pytest.raises(ForgetlessError, match="calibration"):
        OsftCallback(tiny().model, OsftConfig(), calibration=None, verbose=False)


def test_target_regex_that_matches_nothing_is_a_clear_error():
    with pytest.raises(ForgetlessError, match="matches no linear layer"):
        OsftCallback(tiny().model, OsftConfig(target_modules="nothing_here", rank_policy="fixed"))


@pytest.mark.parametrize(
    ("environment", "args", "refusal"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, None, "does not support DeepSpeed ZeRO"),
        ({}, {"deepspeed": "zero2.json"}, "does not support DeepSpeed ZeRO"),
        ({"ACCELERATE_USE_FSDP": "true"}, None, "does not support FSDP1"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, None, "does not support FSDP1"),
        ({}, {"fsdp": True, "fsdp_config": {"version": 1}}, "does not support FSDP1"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, None, None),
        ({}, {"fsdp": True, "fsdp_config": {"version": 2}}, None),
        ({}, {"fsdp": None, "deepspeed": None}, None),
    ],
)
def test_deepspeed_and_fsdp1_are_refused_in_one_line_and_fsdp2_is_not(
    monkeypatch, environment, args, refusal
):
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    args = None if args is None else SimpleNamespace(**args)
    if refusal is None:
        refuse_sharded_launch(args)
        return
    with pytest.raises(ForgetlessError, match=refusal) as raised:
        refuse_sharded_launch(args)
    assert "\n" not in str(raised.value)


def test_zero3_partitioned_parameters_are_refused():
    model = tiny().model
    model.model.layers[0].mlp.up_proj.weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks them
    with pytest.raises(ForgetlessError, match="does not support DeepSpeed ZeRO"):
        OsftCallback(model, OsftConfig(rank_policy="fixed"), verbose=False)
