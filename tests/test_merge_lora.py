"""PEFT LoRA adapters merged as experts: checked against PEFT's own merge_and_unload."""

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from forgetless.errors import ForgetlessError
from forgetless.merge import merge_checkpoints
from forgetless.merge.config import MergeConfig
from forgetless.models import load_model

SUM = MergeConfig(method="task_arithmetic")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("lora") / "base"
    loaded = load_model("tiny-llama")
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return str(directory)


def _adapter(model, directory: Path, seed: int = 0, **settings) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter of ``model`` with random (not zero) B; PEFT's merged weights."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **settings))
    peft_model.save_pretrained(directory)
    merged = peft_model.merge_and_unload()
    return {key: value.detach().clone() for key, value in merged.state_dict().items()}


def _assert_matches(output: Path, expected: dict[str, torch.Tensor]) -> None:
    merged = load_file(output / "model.safetensors")
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "settings",
    [
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
            # Another rank and alpha for some modules, as PEFT allows.
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"v_proj": 3},
        },
        {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"},
    ],
    ids=["linear-embedding-patterns", "rslora-all-linear"],
)
def test_a_lora_adapter_merges_as_peft_merges_it(base, tmp_path, settings, caplog):
    expected = _adapter(load_model("tiny-llama").model, tmp_path / "adapter", **settings)
    with caplog.at_level(logging.WARNING, logger="forgetless.merge.lora"):
        report = merge_checkpoints(base, [str(tmp_path / "adapter")], tmp_path / "out", SUM)
    _assert_matches(tmp_path / "out", expected)
    assert not caplog.records  # the adapter records no base name: nothing to compare
    # Untargeted tensors (the norms) have delta 0 and keep the base's bytes.
    merged, base_weights = load_file(tmp_path / "out" / "model.safetensors"), _base(base)
    assert torch.equal(merged["model.norm.weight"], base_weights["model.norm.weight"])
    assert 0 < report.overlap["kept_fraction"][0] < 1


def _base(directory: str) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / "model.safetensors")


def test_fan_in_fan_out_layers_are_transposed(tmp_path):
    """GPT-2's Conv1D stores weights as (in, out): PEFT's fan_in_fan_out."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    expected = _adapter(
        model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]
    )
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True  # PEFT switches it on for Conv1D
    merge_checkpoints(str(tmp_path / "gpt2"), [str(tmp_path / "adapter")], tmp_path / "out", SUM)
    _assert_matches(tmp_path / "out", expected)


def test_a_lora_expert_merges_with_a_full_checkpoint(base, tmp_path):
    expected = _adapter(
        load_model("tiny-llama").model, tmp_path / "adapter", r=4, target_modules=["o_proj"]
    )
    full = load_model("tiny-llama")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in full.model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    full.model.save_pretrained(tmp_path / "full")
    full_weights, base_weights = load_file(tmp_path / "full" / "model.safetensors"), _base(base)
    experts = [str(tmp_path / "adapter"), str(tmp_path / "full")]
    merge_checkpoints(base, experts, tmp_path / "out", SUM)
    # Task arithmetic: the base plus both deltas.
    _assert_matches(
        tmp_path / "out",
        {key: expected[key] + full_weights[key] - value for key, value in base_weights.items()},
    )


def _edit_config(directory: Path, **changes) -> None:
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _add_tensor(directory: Path) -> None:
    file = directory / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.model.norm.weight"] = torch.ones(64)
    save_file(tensors, file, metadata={"format": "pt"})


def _to_bin(directory: Path) -> None:
    file = directory / "adapter_model.safetensors"
    torch.save(load_file(file), directory / "adapter_model.bin")
    file.unlink()


@pytest.mark.parametrize(
    ("settings", "edit", "needle"),
    [
        ({"use_dora": True}, None, "DoRA"),
        ({}, lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
        ({}, lambda d: _edit_config(d, bias="all"), "trained biases"),
        ({}, lambda d: _edit_config(d, peft_type="IA3"), "peft_type 'IA3'; only LoRA"),
        ({}, _add_tensor, "model.norm.weight is not a LoRA A or B matrix"),
        ({}, lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model"),
        ({}, _to_bin, "re-save it"),
    ],
    ids=["dora", "modules-to-save", "bias", "not-lora", "extra-tensor", "no-weights", "bin"],
)
def test_what_is_not_plain_lora_is_refused_in_one_line(base, tmp_path, settings, edit, needle):
    _adapter(
        load_model("tiny-llama").model, tmp_path / "adapter", target_modules=["q_proj"], **settings
    )
    if edit is not None:
        edit(tmp_path / "adapter")
    with pytest.raises(ForgetlessError, match=needle) as error:
        merge_checkpoints(base, [str(tmp_path / "adapter")], tmp_path / "out", SUM)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_base_is_refused_or_warned_about(base, tmp_path, caplog):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    _adapter(GPT2LMHeadModel(config), tmp_path / "gpt2", target_modules=["c_attn"])
    with pytest.raises(ForgetlessError, match="adapts transformer.h.0.attn.c_attn.weight, which"):
        merge_checkpoints(base, [str(tmp_path / "gpt2")], tmp_path / "out", SUM)

    # Same shapes, another name: names are not comparable, so the merge goes on and warns.
    _adapter(load_model("tiny-llama").model, tmp_path / "named", target_modules=["q_proj"])
    _edit_config(tmp_path / "named", base_model_name_or_path="someone/other-model")
    with caplog.at_level(logging.WARNING, logger="forgetless.merge.lora"):
        merge_checkpoints(base, [str(tmp_path / "named")], tmp_path / "out", SUM)
    assert "trained on someone/other-model" in caplog.text
