"""Randomly initialised models of published architectures: ``random:<shape>`` model names.

They serve speed and memory work (``benchmarks/osft_sizes.py``, ``scripts/gpu_check.sh``)
where the real weights cannot be downloaded: step time and memory depend on the shapes, not
on the values. Only the dimensions that set compute and memory are copied from each model's
published ``config.json``; rotary settings, token ids and the tokenizer are not (the byte-level
test tokenizer is used, so text encodes to ids far below the vocabulary size).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from forgetless.errors import ForgetlessError

RANDOM_PREFIX = "random:"


def _shape(hidden, intermediate, layers, heads, kv_heads, vocab, tied, head_dim=None) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim or hidden // heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }


SHAPES: dict[str, dict] = {
    "smollm2-135m": _shape(576, 1536, 30, 9, 3, 49152, True),
    "smollm2-360m": _shape(960, 2560, 32, 15, 5, 49152, True),
    # Qwen3's matrices in Llama blocks: its per-head query/key norms (0.001 % of the
    # parameters) are left out.
    "qwen3-0.6b": _shape(1024, 3072, 28, 16, 8, 151936, True, head_dim=128),
    "llama-3.2-1b": _shape(2048, 8192, 16, 32, 8, 128256, True),
    "smollm2-1.7b": _shape(2048, 8192, 24, 32, 32, 49152, True),
    "llama-3.2-3b": _shape(3072, 8192, 28, 24, 8, 128256, True),
    "llama-3.1-8b": _shape(4096, 14336, 32, 32, 8, 128256, False),
}


def is_random_shape(name: str) -> bool:
    return name.startswith(RANDOM_PREFIX)


def shape_config(name: str) -> LlamaConfig:
    """The Llama configuration of ``random:<shape>``."""
    shape = name.removeprefix(RANDOM_PREFIX)
    if shape not in SHAPES:
        raise ForgetlessError(
            f"unknown model shape {name!r}; choose one of "
            + ", ".join(RANDOM_PREFIX + known for known in SHAPES)
        )
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)


def random_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``random:<shape>`` built directly on ``device`` in ``dtype`` (no host copy of a
    model that may not fit there), seeded without touching the caller's random state."""
    config = shape_config(name)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def parameter_count(name: str) -> int:
    """Parameters of ``random:<shape>``, without building it."""
    config = shape_config(name)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    query = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 2 * hidden * query + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * per_layer + embeddings + hidden
