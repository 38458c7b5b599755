"""Atomic writes: every file and folder forgetless produces appears whole or not at all.

A file is written to a temporary sibling and renamed into place; a folder (a model, a
tokenizer, a merged checkpoint) is filled under a temporary sibling name and renamed once
complete. A crash leaves the previous version or nothing, never half a file that a later run
would trust. Results get the permissions of an ordinary file (``0o666`` / ``0o777`` less the
umask), not the owner-only ones of the temporary-file functions.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from forgetless.errors import ForgetlessError


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale(target: Path) -> None:
    """Temporaries a killed writer of ``target`` left behind. (Two processes writing the same
    target at once are not supported anyway: the last rename would win.)"""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A handle on a temporary sibling of ``path`` that replaces ``path`` when the block ends
    without an error (``mode``: ``"w"`` for text, ``"wb"`` for bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as out:
            yield out
            # On disk before the rename: a crash right after it must not leave an empty file.
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as out:
        out.write(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Writes ``data`` as JSON; a NaN or infinity in it is refused (strict JSON has none, and
    a result holding one is wrong or undefined: undefined values are written as null)."""
    try:
        text = json.dumps(data, indent=2, default=str, allow_nan=False)
    except ValueError:
        raise ForgetlessError(
            f"refusing to write {path}: {_non_finite_at(data) or 'a value'} is not a finite number"
        ) from None
    write_text_atomic(path, text + "\n")


def _non_finite_at(data: Any, where: str = "") -> str | None:
    """The key path of the first NaN or infinity inside ``data``."""
    if isinstance(data, float):
        return None if math.isfinite(data) else where or "the value"
    if isinstance(data, Mapping):
        steps = [(value, f"{where}.{key}" if where else str(key)) for key, value in data.items()]
    elif isinstance(data, list | tuple):
        steps = [(value, f"{where}[{index}]") for index, value in enumerate(data)]
    else:
        return None
    for value, inner in steps:
        found = _non_finite_at(value, inner)
        if found:
            return found
    return None


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """An empty staging folder beside ``target`` that replaces ``target`` (and whatever it
    held) once the block ends without an error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    )
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def save_model(model, tokenizer, target: str | Path) -> None:
    """A plain Hugging Face checkpoint (safetensors weights, config, tokenizer), atomically."""
    with atomic_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)


def save_tensors(path: str | Path, tensors: Mapping[str, Any]) -> None:
    """Named torch tensors as one safetensors file, atomically."""
    from safetensors.torch import save

    with atomic_file(path, "wb") as out:
        out.write(
            save({name: value.detach().cpu().contiguous() for name, value in tensors.items()})
        )


def load_tensors(path: str | Path, device: Any = "cpu") -> dict[str, Any]:
    """The tensors of a safetensors file (no code is run, unlike a pickle)."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))
