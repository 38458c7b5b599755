"""random:<shape> models: published shapes, seeded, built on the device, refused when unknown."""

import pytest
import torch

from forgetless.errors import ForgetlessError
from forgetless.model_shapes import SHAPES, parameter_count, shape_config
from forgetless.models import load_model, load_tokenizer

# Parameter counts as the models' cards state them (rounded to the unit they use).
PUBLISHED = {
    "smollm2-135m": 135e6,
    "smollm2-360m": 362e6,
    "qwen3-0.6b": 0.6e9,
    "llama-3.2-1b": 1.24e9,
    "smollm2-1.7b": 1.7e9,
    "llama-3.2-3b": 3.21e9,
    "llama-3.1-8b": 8.03e9,
}


def test_every_shape_has_its_published_size():
    assert set(SHAPES) == set(PUBLISHED)
    for shape, published in PUBLISHED.items():
        assert parameter_count(f"random:{shape}") == pytest.approx(published, rel=0.01), shape


def test_counted_parameters_are_the_built_ones():
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(shape_config("random:qwen3-0.6b"))
    assert sum(p.numel() for p in model.parameters()) == parameter_count("random:qwen3-0.6b")


def test_a_random_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = load_model("random:smollm2-135m", dtype="float32", device="cpu")
    assert torch.equal(torch.rand(1), expected)
    second = load_model("random:smollm2-135m", dtype="float32", device="cpu").model
    weight = first.model.model.layers[3].mlp.up_proj.weight
    assert weight.shape == (1536, 576)
    assert torch.equal(weight, second.model.layers[3].mlp.up_proj.weight)
    assert first.tokenizer("a b").input_ids  # the byte-level tokenizer
    assert load_tokenizer("random:smollm2-135m").vocab_size == first.tokenizer.vocab_size


def test_unknown_shape_and_revision_are_refused():
    with pytest.raises(ForgetlessError, match="unknown model shape 'random:gpt-5'.*llama-3.2-1b"):
        load_model("random:gpt-5", device="cpu")
    with pytest.raises(ForgetlessError, match="packaged alias"):
        load_model("random:smollm2-135m", revision="main", device="cpu")
