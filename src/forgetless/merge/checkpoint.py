"""Reading checkpoints tensor by tensor and writing a merged one without holding it in memory.

A merge touches every tensor of N + 1 checkpoints. Loading them whole (as mergekit's simple
path or ``from_pretrained`` does) needs N + 1 models in memory; here each tensor is read on
its own and the output is streamed to disk, so memory stays at a few tensors whatever N is.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from forgetless.errors import ForgetlessError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Files of a checkpoint directory that are not weights and are copied from the base.
NON_WEIGHT_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
SKIPPED_FILES = {WEIGHTS_INDEX_NAME, "merge_report.json", "osft_ranks.json"}

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Checkpoint:
    """A Hugging Face checkpoint directory with safetensors weights (one file or sharded)."""

    directory: Path
    label: str
    shard_of: dict[str, Path]
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, name: str, directory: Path | None = None) -> Checkpoint:
        """The checkpoint ``name`` (a path, hub id or alias), found in ``directory`` if given."""
        directory = directory or resolve_checkpoint_dir(name)
        shard_of = _weight_files(directory)
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(shard_of.values())):
            with safetensors_file(shard) as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    dtype_name = view.get_dtype()
                    if dtype_name not in SAFETENSORS_DTYPES:
                        raise ForgetlessError(
                            f"{shard}: tensor {key} has unsupported dtype {dtype_name}"
                        )
                    tensors[key] = TensorInfo(
                        SAFETENSORS_DTYPES[dtype_name], tuple(view.get_shape())
                    )
        return cls(directory, name, shard_of, tensors)

    def config(self) -> dict:
        file = self.directory / "config.json"
        if not file.is_file():
            raise ForgetlessError(f"{self.label}: no config.json in {self.directory}")
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ForgetlessError(f"{file}: not a valid config.json ({error})") from None

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``; non-finite values are refused, they would poison the merge."""
        # Opening per read (not once per merge) unmaps the file after every tensor, so pages
        # of N expert files do not pile up in the process's resident memory.
        shard = self.shard_of[key]
        with safetensors_file(shard) as handle:
            try:
                tensor = handle.get_tensor(key)
            except Exception as error:  # the library's own error type; the file is at fault
                raise ForgetlessError(
                    f"{shard}: cannot read {key} ({_first_line(error)})"
                ) from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ForgetlessError(f"{self.label}: tensor {key} holds NaN or infinite values")
        return tensor

    def delta(self, key: str, reference: torch.Tensor) -> torch.Tensor:
        """This checkpoint's tensor ``key`` minus ``reference`` (the base's, in fp32)."""
        return self.read(key).float().sub_(reference)

    def check_against(self, base: Checkpoint) -> None:
        """Raise a one-line ForgetlessError unless this fine-tune can be merged into ``base``."""
        base_config = base.config()
        config = self.config()
        for key in ARCHITECTURE_KEYS:
            if config.get(key) != base_config.get(key):
                raise ForgetlessError(
                    f"{self.label}: {key} is {config.get(key)!r} but the base has "
                    f"{base_config.get(key)!r}; experts must be fine-tunes of the base"
                )
        missing = sorted(set(base.tensors) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(base.tensors))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has extra tensor {extra[0]}"
            count = len(missing) + len(extra)
            raise ForgetlessError(
                f"{self.label} {what} ({count} tensor names differ from the base)"
            )
        for key, info in base.tensors.items():
            if self.tensors[key].shape != info.shape:
                raise ForgetlessError(
                    f"{self.label}: {key} has shape {list(self.tensors[key].shape)}, "
                    f"the base {list(info.shape)}"
                )
        check_tokenizer(base, self.directory, self.label)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def safetensors_file(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # safetensors raises its own error type for a corrupt file
        raise ForgetlessError(
            f"{path}: not a readable safetensors file ({_first_line(error)})"
        ) from None


def resolve_checkpoint_dir(name: str) -> Path:
    """A local checkpoint directory for an alias, a path, or a hub id (downloaded if online)."""
    from forgetless.model_shapes import is_random_shape
    from forgetless.models import (
        SMOLLM2_ALIAS,
        TINY_LLAMA_ALIAS,
        is_path_like,
        random_checkpoint_dir,
        smollm2_checkpoint_dir,
    )

    if name == SMOLLM2_ALIAS:
        return smollm2_checkpoint_dir()
    if name == TINY_LLAMA_ALIAS or is_random_shape(name):
        return random_checkpoint_dir(name)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ForgetlessError(f"{name} is a file; give the checkpoint directory")
    if is_path_like(name):
        raise ForgetlessError(f"checkpoint not found: {name}")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as error:  # offline, unknown repo, gated: all user-fixable
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ForgetlessError(
            f"{name!r} is not a local directory and cannot be fetched from the hub: {first_line}"
        ) from None


def _weight_files(directory: Path) -> dict[str, Path]:
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise ForgetlessError(f"{index}: not a valid safetensors index ({error})") from None
        missing = sorted({file for file in weight_map.values() if not (directory / file).is_file()})
        if missing:
            raise ForgetlessError(f"{directory}: shard {missing[0]} listed in the index is missing")
        return {key: directory / file for key, file in weight_map.items()}
    single = directory / WEIGHTS_NAME
    if single.is_file():
        with safetensors_file(single) as handle:
            return {key: single for key in handle.keys()}
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise ForgetlessError(
            f"{directory} has PyTorch .bin weights; merging reads safetensors only: re-save it "
            "with model.save_pretrained(path) (safetensors is the default)"
        )
    raise ForgetlessError(f"{directory}: no model.safetensors or {WEIGHTS_INDEX_NAME}")


ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "tie_word_embeddings",
)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def _tokenizer_digest(directory: Path) -> str | None:
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        file = directory / name
        if file.is_file():
            found = True
            digest.update(name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest() if found else None


def check_tokenizer(base: Checkpoint, directory: Path, label: str) -> None:
    """Raise a one-line ForgetlessError if the tokenizer in ``directory`` (if any) maps tokens
    to other ids than the base's."""
    base_digest, expert_digest = _tokenizer_digest(base.directory), _tokenizer_digest(directory)
    if base_digest is None or expert_digest is None or base_digest == expert_digest:
        return
    # Files may differ in formatting only; what matters is the token -> id map.
    from transformers import AutoTokenizer

    base_vocab = AutoTokenizer.from_pretrained(base.directory).get_vocab()
    expert_vocab = AutoTokenizer.from_pretrained(directory).get_vocab()
    if base_vocab != expert_vocab:
        changed = len(set(base_vocab.items()) ^ set(expert_vocab.items()))
        raise ForgetlessError(
            f"{label}: its tokenizer differs from the base's ({len(expert_vocab)} vs "
            f"{len(base_vocab)} tokens, {changed} entries differ)"
        )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*$", re.IGNORECASE)
_UNITS = {
    None: 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise ForgetlessError(f"cannot read size {text!r}; write e.g. 500MB or 5GB")
    unit = match.group(2).lower() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


def plan_shards(tensors: dict[str, TensorInfo], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, info in tensors.items():
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += info.nbytes
    return shards


def _header(keys: Iterable[str], tensors: dict[str, TensorInfo]) -> bytes:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        info = tensors[key]
        header[key] = {
            "dtype": DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # safetensors pads the header with spaces so the data starts 8-byte aligned.
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def write_streaming(
    directory: Path,
    tensors: dict[str, TensorInfo],
    produce: Iterator[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
) -> None:
    """Write tensors produced one at a time as a (sharded) safetensors checkpoint.

    safetensors' own writers take every tensor at once; since the header (names, dtypes,
    shapes, offsets) is known before any value is computed, it is written first and each
    tensor's bytes are appended as soon as it exists, so only one tensor is ever held.
    ``produce`` must yield the tensors in the order of ``tensors``.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for keys, name in zip(shards, names, strict=True):
        with open(directory / name, "wb") as out:
            out.write(_header(keys, tensors))
            for expected in keys:
                key, tensor = next(produce)
                info = tensors[key]
                if (
                    key != expected
                    or tensor.dtype != info.dtype
                    or tuple(tensor.shape) != info.shape
                ):
                    raise RuntimeError(f"merge produced {key} out of plan (expected {expected})")
                out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if len(shards) > 1:
        weight_map = {key: name for keys, name in zip(shards, names, strict=True) for key in keys}
        index = {
            "metadata": {"total_size": sum(info.nbytes for info in tensors.values())},
            "weight_map": weight_map,
        }
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_non_weight_files(source: Path, target: Path) -> None:
    """Copy config, generation config and tokenizer files (not weights or reports)."""
    for file in sorted(source.iterdir()):
        if file.is_file() and file.suffix in NON_WEIGHT_SUFFIXES and file.name not in SKIPPED_FILES:
            shutil.copyfile(file, target / file.name)
