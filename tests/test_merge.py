"""Merging experts: the merge rules, streaming checkpoint I/O, determinism and user errors."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from forgetless.cards import CARD_FILE
from forgetless.config import validate_config
from forgetless.errors import ForgetlessError
from forgetless.merge import merge_checkpoints
from forgetless.merge.checkpoint import TensorInfo, parse_size, write_streaming
from forgetless.merge.config import MergeConfig
from forgetless.merge.diagnostics import OverlapMeter, expected_collision_rate
from forgetless.merge.methods import mask_seed, merge_tensor, random_mask
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
        expected_collision_rate([0.25] * 3), abs=0.01
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


def _ties_reference(
    deltas: list[torch.Tensor], keeps: list[float], weights: list[float] | None = None
) -> torch.Tensor:
    """TIES written the direct way, weighted as mergekit does: stack, trim per expert, weight,
    elect the sign of the weighted sum, mean weighted by the agreeing experts' weights."""
    weight = torch.tensor(weights or [1.0] * len(deltas)).view(-1, *[1] * deltas[0].dim())
    trimmed = []
    for delta, keep in zip(deltas, keeps, strict=True):
        threshold = delta.abs().flatten().topk(math.ceil(keep * delta.numel())).values[-1]
        trimmed.append(delta * (delta.abs() >= threshold))
    weighted = torch.stack(trimmed) * weight
    elected = torch.sign(weighted.sum(0))
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    return (weighted * agree).sum(0) / (weight * agree).sum(0).clamp(min=1e-12)


def _merge_tensor(deltas: list[torch.Tensor], config: MergeConfig) -> tuple[torch.Tensor, dict]:
    meter = OverlapMeter(len(deltas))
    meter.start("w", deltas[0].numel())
    merged = merge_tensor("w", lambda t: deltas[t].clone(), len(deltas), config, meter)
    meter.finish()
    return merged, meter.summary()


def test_ties_matches_a_direct_implementation():
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(7, 11, generator=generator) for _ in range(4)]
    merged, summary = _merge_tensor(deltas, MergeConfig(method="ties", keep=0.3))
    assert summary["kept_fraction"] == pytest.approx([24 / 77] * 4)  # ceil(0.3 * 77)
    torch.testing.assert_close(merged, _ties_reference(deltas, [0.3] * 4))


def test_weighted_ties_with_densities_matches_mergekits_rule():
    generator = torch.Generator().manual_seed(1)
    deltas = [torch.randn(9, 13, generator=generator) for _ in range(4)]
    densities, weights = [0.2, 0.5, 0.3, 0.9], [1.0, 2.5, 0.4, 0.7]
    config = MergeConfig(method="ties", densities=densities, weights=weights)
    merged, summary = _merge_tensor(deltas, config)
    kept = [math.ceil(density * 117) / 117 for density in densities]
    assert summary["kept_fraction"] == pytest.approx(kept)
    torch.testing.assert_close(merged, _ties_reference(deltas, densities, weights))
    # A weight scales the election, not only the mean: the unweighted merge differs.
    unweighted, _ = _merge_tensor(deltas, MergeConfig(method="ties", densities=densities))
    assert not torch.allclose(merged, unweighted)


def test_weights_multiply_deltas_and_normalize_divides_by_their_sum():
    generator = torch.Generator().manual_seed(2)
    deltas = [torch.randn(5, 6, generator=generator) for _ in range(2)]
    weighted = MergeConfig(method="task_arithmetic", weights=[2.0, 0.5])
    torch.testing.assert_close(_merge_tensor(deltas, weighted)[0], 2 * deltas[0] + 0.5 * deltas[1])
    mean = weighted.model_copy(update={"normalize": True})
    expected = (2 * deltas[0] + 0.5 * deltas[1]) / 2.5
    torch.testing.assert_close(_merge_tensor(deltas, mean)[0], expected)
    plain_mean = MergeConfig(method="task_arithmetic", normalize=True)
    torch.testing.assert_close(_merge_tensor(deltas, plain_mean)[0], (deltas[0] + deltas[1]) / 2)


def test_fair_dare_is_the_experts_average_in_expectation():
    """DARE rescales each kept entry by 1/keep, so its sum is task arithmetic in expectation;
    normalised by the number of experts it is their average, the scale the other rows use."""
    values = [1.0, 2.0, 3.0, 6.0]  # constant deltas: an entry's merged value is one draw
    deltas = [torch.full((250, 400), value) for value in values]
    for masks in ("independent", "disjoint"):
        summed, _ = _merge_tensor(deltas, MergeConfig(method="dare", keep=0.25, masks=masks))
        fair = MergeConfig(method="dare", keep=0.25, masks=masks, normalize=True)
        averaged, _ = _merge_tensor(deltas, fair)
        # Per-entry std ≤ 3.1 over 100,000 entries: the mean's std is ≤ 0.01 (×4 when summed).
        assert float(summed.mean()) == pytest.approx(sum(values), abs=0.16)
        assert float(averaged.mean()) == pytest.approx(sum(values) / 4, abs=0.04)
    # Disjoint masks covering every entry: each is exactly one expert's delta, rescaled.
    assert set(averaged.unique().tolist()) == set(values)


def test_disjoint_masks_partition_the_entries_at_each_experts_density():
    generator = torch.Generator().manual_seed(3)
    deltas = [torch.randn(300, 400, generator=generator) for _ in range(4)]
    densities = [0.1, 0.2, 0.3, 0.4]  # summing to 1: every entry goes to exactly one expert
    config = MergeConfig(method="sotu", masks="disjoint", densities=densities, seed=4)
    merged, summary = _merge_tensor(deltas, config)
    assert summary["collision_rate"] == 0.0
    assert summary["kept_fraction"] == pytest.approx(densities, abs=0.005)
    owners = (merged == torch.stack(deltas)).sum(0)
    assert bool((owners == 1).all())
    # Exactly orthogonal, not merely nearly so.
    assert summary["cosine_masked"][0][1:] == [0.0, 0.0, 0.0]
    again, _ = _merge_tensor(deltas, config)
    other, _ = _merge_tensor(deltas, config.model_copy(update={"seed": 5}))
    assert torch.equal(merged, again) and not torch.equal(merged, other)


def test_independent_masks_keep_their_bits():
    """The masks of merges made before disjoint masks existed: stored digests of their bits."""
    digests = ["aed9b3ed639291c2", "01852aa7424cde02", "b74c1f3df88ae6d7"]
    for expert, digest in enumerate(digests):
        mask = random_mask(
            (64, 48), 0.25, mask_seed(7, expert, "model.layers.0.mlp.up_proj.weight")
        )
        assert hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16] == digest


def test_independent_sotu_bytes_match_the_plain_formula(checkpoints, tmp_path):
    """θ₀ + Σ (U_e < keep) ⊙ δ_e, accumulated in fp32 in expert order, with U_e drawn from
    sha256(seed/expert/tensor): the merge as it was written before masks and weights."""
    base, experts = checkpoints
    merge_checkpoints(base, experts, tmp_path / "out", MergeConfig(keep=0.25, seed=3))
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base_weights = load_file(Path(base) / "model.safetensors")
    expert_weights = [load_file(Path(expert) / "model.safetensors") for expert in experts]
    for key, base_tensor in base_weights.items():
        reference = base_tensor.float()
        total = None
        for index, weights in enumerate(expert_weights):
            digest = hashlib.sha256(f"3/{index}/{key}".encode()).digest()
            seed = int.from_bytes(digest[:8], "little") & (2**63 - 1)
            draw = torch.rand(reference.shape, generator=torch.Generator().manual_seed(seed))
            delta = (weights[key].float() - reference) * (draw < 0.25)
            total = delta if total is None else total + delta
        assert torch.equal(merged[key], (reference + total).to(base_tensor.dtype)), key


def test_disjoint_dare_with_weights_and_densities_end_to_end(checkpoints, tmp_path):
    base, experts = checkpoints
    densities, weights = [0.2, 0.3, 0.4], [1.0, 2.0, 1.0]
    config = MergeConfig(
        method="dare", masks="disjoint", densities=densities, weights=weights, normalize=True
    )
    report = merge_checkpoints(base, experts, tmp_path / "out", config, progress=False)
    assert report.overlap["collision_rate"] == 0.0
    assert report.overlap["kept_fraction"] == pytest.approx(densities, abs=0.01)
    # The contrast the report offers: what independent masks at these densities would give.
    # 1 - (0.2·0.7·0.6 + 0.3·0.8·0.6 + 0.4·0.8·0.7) / (1 - 0.8·0.7·0.6)
    assert report.expected_collision_rate == pytest.approx(0.319277, abs=1e-6)
    saved = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert saved["masks"] == "disjoint" and saved["normalize"] is True
    assert saved["densities"] == densities and saved["weights"] == weights
    card = (tmp_path / "out" / CARD_FILE).read_text()
    assert "| masks | disjoint |" in card and "| weights | 1, 2, 1 |" in card
    assert "| densities | 0.2, 0.3, 0.4 |" in card and "| normalize | true |" in card
    # Every changed entry is one expert's delta × its weight / (its density × Σ weights).
    merged, base_weights = _weights(tmp_path / "out"), _weights(base)
    key = "model.layers.1.mlp.up_proj.weight"
    merged_delta = merged[key] - base_weights[key]
    candidates = torch.stack(
        [
            (_weights(expert)[key] - base_weights[key]) * weight / (density * sum(weights))
            for expert, weight, density in zip(experts, weights, densities, strict=True)
        ]
    )
    changed = merged_delta != 0
    assert 0.85 < changed.float().mean() < 0.95  # 0.2 + 0.3 + 0.4 of the entries
    closest = (candidates - merged_delta).abs().min(0).values
    assert float(closest[changed].max()) < 1e-5

    again = merge_checkpoints(base, experts, tmp_path / "again", config, progress=False)
    assert _digest(tmp_path / "again" / "model.safetensors") == _digest(
        tmp_path / "out" / "model.safetensors"
    )
    assert again.to_dict() == report.to_dict()


def test_ties_and_task_arithmetic_report_no_masks(checkpoints, tmp_path):
    base, experts = checkpoints
    config = MergeConfig(method="ties", keep=0.5)
    report = merge_checkpoints(base, experts[:2], tmp_path / "out", config, progress=False)
    assert report.masks is None and report.expected_collision_rate is None


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"weights": [1.0, -1.0]}, "merge.weights.1: Input should be greater than 0"),
        ({"weights": [1.0, float("nan")]}, "merge.weights.1: Input should be a finite number"),
        ({"densities": [0.5, 1.5]}, "merge.densities.1: Input should be less than or equal to 1"),
        ({"weights": []}, "merge.weights: List should have at least 1 item"),
        ({"method": "ties", "masks": "disjoint"}, "masks 'disjoint' partitions random masks"),
        ({"method": "task_arithmetic", "densities": [0.5]}, "task_arithmetic keeps every entry"),
        ({"masks": "orthogonal"}, "merge.masks: Input should be 'independent' or 'disjoint'"),
    ],
    ids=[
        "negative-weight",
        "nan-weight",
        "density-above-1",
        "no-weights",
        "disjoint-ties",
        "densities-task-arithmetic",
        "unknown-masks",
    ],
)
def test_invalid_merge_settings_are_one_line_errors(settings, needle):
    with pytest.raises(ForgetlessError, match=needle) as error:
        validate_config({"merge": settings})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"weights": [1.0, 2.0]}, "merge.weights has 2 values for 3 experts"),
        ({"densities": [0.1] * 4}, "merge.densities has 4 values for 3 experts"),
        (
            {"masks": "disjoint", "keep": 0.4},
            "merge.masks disjoint .* keeps of the 3 experts must sum to at most 1: "
            "3 experts × merge.keep 0.4 = 1.2",
        ),
        (
            {"masks": "disjoint", "densities": [0.5, 0.4, 0.2]},
            "must sum to at most 1: merge.densities sum to 1.1",
        ),
    ],
    ids=["weights", "densities", "disjoint-keep", "disjoint-densities"],
)
def test_settings_that_do_not_fit_the_experts_fail_before_anything_is_read(
    settings, needle, tmp_path
):
    # The experts do not exist: the settings are checked before any checkpoint is opened.
    experts = [str(tmp_path / f"missing{index}") for index in range(3)]
    with pytest.raises(ForgetlessError, match=needle) as error:
        merge_checkpoints("tiny-llama", experts, tmp_path / "out", MergeConfig(**settings))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


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


def test_cli_per_expert_settings_after_one_flag(checkpoints, tmp_path, run_cli):
    base, experts = checkpoints
    argv = ["merge", "--base", base, "--experts", *experts[:2], "--output-dir", str(tmp_path / "m")]
    argv += ["--masks", "disjoint", "--weights", "1", "0.5", "--densities", "0.3", "0.6"]
    code, out, err = run_cli([*argv, "--normalize", "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert report["masks"] == "disjoint" and report["normalize"] is True
    assert report["weights"] == [1.0, 0.5] and report["densities"] == [0.3, 0.6]
    assert report["overlap"]["collision_rate"] == 0.0
    code, _, err = run_cli([*argv[:-6], "--weights", "1", "--output-dir", str(tmp_path / "n")])
    assert code == 2 and "merge.weights has 1 values for 2 experts" in err
