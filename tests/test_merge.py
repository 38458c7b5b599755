"""Merging experts: the merge rules, streaming checkpoint I/O, determinism and user errors."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from forgetless.errors import ForgetlessError
from forgetless.merge import merge_checkpoints
from forgetless.merge.checkpoint import TensorInfo, parse_size, write_streaming
from forgetless.merge.config import MergeConfig
from forgetless.merge.diagnostics import OverlapMeter, expected_collision_rate
from forgetless.merge.methods import merge_tensor
from forgetless.models import load_model


def _save(model, tokenizer, directory: Path, **kwargs) -> str:
    model.save_pretrained(directory, **kwargs)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny-llama base and three 'experts': the base plus seeded, distinct perturbations."""
    root = tmp_path_factory.mktemp("merge")
    loaded = load_model("tiny-llama")
    base = _save(loaded.model, loaded.tokenizer, root / "base")
    experts = []
    for index in range(3):
        expert = load_model("tiny-llama")
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for parameter in expert.model.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        experts.append(_save(expert.model, expert.tokenizer, root / f"expert{index}"))
    return base, experts


def _weights(directory) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_task_arithmetic_of_one_expert_reproduces_it(checkpoints, tmp_path):
    base, experts = checkpoints
    merge_checkpoints(base, experts[:1], tmp_path / "out", MergeConfig(method="task_arithmetic"))
    merged, expert = _weights(tmp_path / "out"), _weights(experts[0])
    for key in expert:
        torch.testing.assert_close(merged[key], expert[key], rtol=0, atol=1e-6)


def test_sotu_sums_masked_deltas_and_keep_one_is_task_arithmetic(checkpoints, tmp_path):
    base, experts = checkpoints
    config = MergeConfig(method="sotu", keep=0.25, seed=3)
    report = merge_checkpoints(base, experts, tmp_path / "sotu", config)
    merged, base_weights = _weights(tmp_path / "sotu"), _weights(base)
    deltas = [{k: v - base_weights[k] for k, v in _weights(e).items()} for e in experts]
    key = "model.layers.0.mlp.down_proj.weight"
    merged_delta = merged[key] - base_weights[key]
    # Every merged entry is a sum of a subset of the experts' entries, never rescaled.
    changed = merged_delta.abs() > 1e-7
    assert 0.4 < changed.float().mean() < 0.7  # 1 - 0.75^3 = 0.58 of positions touched
    single = [(merged_delta - d[key]).abs() < 1e-6 for d in deltas]
    assert sum(s.float().mean() for s in single) > 0.3  # positions kept by exactly one expert
    assert report.overlap["kept_fraction"] == pytest.approx([0.25] * 3, abs=0.01)
    assert report.overlap["collision_rate"] == pytest.approx(
        expected_collision_rate(3, 0.25), abs=0.01
    )
    # Independent masks shrink the cosine of two deltas by the keep fraction.
    raw, masked = report.overlap["mean_abs_cosine_raw"], report.overlap["mean_abs_cosine_masked"]
    assert masked < raw

    merge_checkpoints(base, experts, tmp_path / "dense", MergeConfig(method="sotu", keep=1.0))
    merge_checkpoints(base, experts, tmp_path / "ta", MergeConfig(method="task_arithmetic"))
    dense, arithmetic = _weights(tmp_path / "dense"), _weights(tmp_path / "ta")
    for key in dense:
        torch.testing.assert_close(dense[key], arithmetic[key], rtol=0, atol=1e-6)


def test_dare_rescales_kept_entries(checkpoints, tmp_path):
    base, experts = checkpoints
    merge_checkpoints(base, experts[:1], tmp_path / "dare", MergeConfig(method="dare", keep=0.5))
    merged, base_weights, expert = _weights(tmp_path / "dare"), _weights(base), _weights(experts[0])
    key = "model.layers.1.self_attn.q_proj.weight"
    merged_delta, delta = merged[key] - base_weights[key], expert[key] - base_weights[key]
    kept = merged_delta != 0
    torch.testing.assert_close(merged_delta[kept], 2 * delta[kept], rtol=1e-5, atol=1e-6)


def _ties_reference(deltas: list[torch.Tensor], keep: float) -> torch.Tensor:
    """TIES written the direct way: stack, trim per expert, elect, disjoint mean."""
    stacked = torch.stack(deltas)
    flat = stacked.abs().reshape(len(deltas), -1)
    kept = math.ceil(keep * flat.shape[1])
    thresholds = flat.topk(kept, dim=1).values[:, -1]
    trimmed = stacked * (stacked.abs() >= thresholds.view(-1, *[1] * deltas[0].dim()))
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_ties_matches_a_direct_implementation():
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(7, 11, generator=generator) for _ in range(4)]
    meter = OverlapMeter(4)
    meter.start("w", deltas[0].numel())
    merged = merge_tensor(
        "w", lambda t: deltas[t].clone(), 4, MergeConfig(method="ties", keep=0.3), meter
    )
    meter.finish()
    assert meter.summary()["kept_fraction"] == pytest.approx([24 / 77] * 4)  # ceil(0.3 * 77)
    torch.testing.assert_close(merged, _ties_reference(deltas, 0.3))


def test_same_seed_same_bytes_other_seed_other_masks(checkpoints, tmp_path):
    base, experts = checkpoints
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        merge_checkpoints(base, experts, tmp_path / name, MergeConfig(seed=seed), progress=False)
    weights = {name: _digest(tmp_path / name / "model.safetensors") for name in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]
    report = "merge_report.json"
    assert _digest(tmp_path / "a" / report) == _digest(tmp_path / "b" / report)


def test_sharded_inputs_and_outputs_match_single_files(checkpoints, tmp_path):
    base, experts = checkpoints
    expert = AutoModelForCausalLM.from_pretrained(experts[1])
    tokenizer_source = load_model("tiny-llama").tokenizer
    sharded_expert = _save(expert, tokenizer_source, tmp_path / "sharded", max_shard_size="50KB")
    assert (Path(sharded_expert) / "model.safetensors.index.json").is_file()
    config = MergeConfig(seed=5)
    merge_checkpoints(base, [experts[0], experts[1]], tmp_path / "single", config)
    sharded = config.model_copy(update={"max_shard_size": "100KB"})
    merge_checkpoints(base, [experts[0], sharded_expert], tmp_path / "multi", sharded)
    assert (tmp_path / "multi" / "model.safetensors.index.json").is_file()
    single, multi = _weights(tmp_path / "single"), _weights(tmp_path / "multi")
    for key in single:
        assert torch.equal(single[key], multi[key])
    for file in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "multi" / file).read_bytes() == (Path(base) / file).read_bytes()


def test_streaming_writer_round_trips_every_dtype(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2).half(),
        "d": torch.tensor(1.5),
    }
    plan = {key: TensorInfo(value.dtype, tuple(value.shape)) for key, value in tensors.items()}
    write_streaming(tmp_path, plan, iter(tensors.items()), max_shard_bytes=10**9)
    loaded = load_file(tmp_path / "model.safetensors")
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("100KiB") == 102_400
    with pytest.raises(ForgetlessError, match="500MB"):
        parse_size("five gigs")


def _mutate_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("break_expert", "needle"),
    [
        (lambda d: _mutate_config(d, num_hidden_layers=3), "num_hidden_layers is 3"),
        (lambda d: _mutate_config(d, model_type="qwen2"), "model_type is 'qwen2'"),
        (
            lambda d: save_file(
                {
                    **load_file(d / "model.safetensors"),
                    "model.norm.weight": torch.ones(65),
                },
                d / "model.safetensors",
                metadata={"format": "pt"},
            ),
            "model.norm.weight has shape [65]",
        ),
        (
            lambda d: (d / "tokenizer.json").write_text(
                (d / "tokenizer.json").read_text().replace('"<|im_start|>"', '"<|start|>"')
            ),
            "tokenizer differs",
        ),
        (
            lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").touch()),
            "re-save it",
        ),
    ],
    ids=["layers", "model-type", "shape", "tokenizer", "bin-weights"],
)
def test_incompatible_expert_gives_a_clear_error(checkpoints, tmp_path, break_expert, needle):
    base, experts = checkpoints
    broken = tmp_path / "broken"
    loaded = AutoModelForCausalLM.from_pretrained(experts[0])
    _save(loaded, load_model("tiny-llama").tokenizer, broken)
    break_expert(broken)
    with pytest.raises(ForgetlessError, match=needle.replace("[", r"\[").replace("|", r"\|")):
        merge_checkpoints(base, [experts[1], str(broken)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_merge_takes_several_experts_after_one_flag(checkpoints, tmp_path, run_cli):
    base, experts = checkpoints
    output = tmp_path / "merged"
    argv = ["merge", "--base", base, "--experts", *experts, "--output-dir", str(output)]
    code, out, err = run_cli([*argv, "--keep", "0.3", "--seed", "2"])
    assert code == 0, err
    report = json.loads((output / "merge_report.json").read_text())
    assert report["experts"] == experts and report["keep"] == 0.3 and report["seed"] == 2
    assert "collision rate" in err

    code, _, err = run_cli([*argv, "--keep", "0.3"])
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(["merge", "--base", base, "--experts", base, "--output-dir", base])
    assert code == 2 and "one of the inputs" in err


def test_non_finite_expert_weights_are_refused_and_nothing_is_written(checkpoints, tmp_path):
    base, experts = checkpoints
    broken = tmp_path / "broken"
    loaded = load_model(experts[0])
    with torch.no_grad():
        next(loaded.model.parameters())[0, 0] = float("nan")
    _save(loaded.model, loaded.tokenizer, broken)
    with pytest.raises(ForgetlessError, match="holds NaN or infinite values"):
        merge_checkpoints(base, [experts[1], str(broken)], tmp_path / "out", MergeConfig())
    assert not (tmp_path / "out").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken"]
