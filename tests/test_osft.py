"""OSFT: the projection, the rank policies, and training that stays in the allowed subspace."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

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
    target_modules,
)

TEXTS = [
    f"Sample {i}: the quick brown fox jumps over the lazy dog, {i * 7} times. " * 3
    for i in range(40)
]


def reference_projection(weight: torch.Tensor, rank: int, x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    left = torch.eye(weight.shape[0], dtype=torch.float64) - u[:, :rank] @ u[:, :rank].T
    right = torch.eye(weight.shape[1], dtype=torch.float64) - vh[:rank].T @ vh[:rank]
    return left @ x.double() @ right


@pytest.mark.parametrize("shape", [(12, 12), (20, 12), (12, 20)])
@pytest.mark.parametrize("rank", [2, 10])
def test_projection_matches_the_definition_with_either_stored_factor(shape, rank):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    x = torch.randn(shape, generator=generator)
    basis = SubspaceBasis(weight, rank)
    # Square factors switch to the complement once it is the smaller one (rank > r / 2).
    assert basis.left_complement == (shape[0] == 12 and rank == 10)
    assert basis.right_complement == (shape[1] == 12 and rank == 10)
    projected = basis.project(x.clone())
    torch.testing.assert_close(
        projected.double(), reference_projection(weight, rank, x), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(basis.project(projected.clone()), projected, atol=1e-5, rtol=0)
    assert max(basis.high_energy(projected)) < 1e-5 * float(projected.norm())


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


def test_adaptive_ranks_follow_the_papers_formula_and_are_clamped():
    modules = dict(list(target_modules(tiny().model, OsftConfig().target_modules).items())[:3])
    names = list(modules)
    importance = {names[0]: 0.5, names[1]: 1.0, names[2]: 1.5}  # normalised: 0.5, 1.0, 1.5
    config = OsftConfig(mrr=0.1, trr=0.6)
    choices = choose_ranks(modules, config, importance)
    for choice, normalised in zip(choices, [0.5, 1.0, 1.5], strict=True):
        r = min(choice.shape)
        expected = round((0.1 + normalised * (0.6 - 0.1)) * r)
        assert choice.rank == min(max(expected, 1), r - 1)
    with pytest.raises(ForgetlessError, match="not positive"):
        choose_ranks(modules, config, {name: -0.1 for name in names})


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
    per_matrix = layer_importance(loaded.model, modules, batches, granularity="matrix")
    assert len(set(per_matrix.values())) > 1


def drift_leakage(model, initial, ranks):
    worst = 0.0
    for choice in ranks:
        weight = model.get_submodule(choice["name"]).weight.detach()
        start = initial[choice["name"] + ".weight"]
        drift = weight - start
        basis = SubspaceBasis(start, choice["rank"])
        worst = max(worst, max(basis.high_energy(drift)) / float(drift.norm()))
    return worst


def run_plain_trainer(model, tokenizer, callback, tmp_path):
    """The README's drop-in example: a stock Trainer with the callback added."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=3e-3,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    data = pack_text(tokenizer, TEXTS, 32)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()


class GradientOnlyProjection(OsftCallback):
    """The common shortcut: project the gradient only, not the AdamW update."""

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projector._before_step = {}


@pytest.mark.parametrize(
    ("callback_type", "bound"), [(OsftCallback, 1e-5), (GradientOnlyProjection, None)]
)
def test_update_stays_in_the_allowed_subspace_only_when_the_update_is_projected(
    callback_type, bound, tmp_path
):
    loaded = tiny()
    initial = {name: param.detach().clone() for name, param in loaded.model.named_parameters()}
    callback = callback_type(loaded.model, OsftConfig(rank_policy="fixed"), verbose=False)
    run_plain_trainer(loaded.model, loaded.tokenizer, callback, tmp_path)
    leakage = drift_leakage(loaded.model, initial, callback.ranks)
    if bound is not None:
        assert leakage < bound
        # untargeted parameters (embeddings, norms) are frozen by default
        assert torch.equal(
            loaded.model.model.embed_tokens.weight, initial["model.embed_tokens.weight"]
        )
    else:
        # AdamW's element-wise scaling and weight decay leak into the frozen subspace
        assert leakage > 1e-2


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
    assert "OSFT preserved (frozen) rank per matrix" in capsys.readouterr().out
    ranks = json.loads((tmp_path / "osft_ranks.json").read_text())
    assert len(ranks) == 14 and all(1 <= entry["rank"] < min(entry["shape"]) for entry in ranks)
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
