"""Locations on disk shared by every stage."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of forgetless's user cache (``FORGETLESS_CACHE_DIR`` or ``~/.cache/forgetless``)."""
    root = os.environ.get("FORGETLESS_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "forgetless"
