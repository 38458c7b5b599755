import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The reference copy of the built-in data files; tests that need it skip without it."""
    configured = os.environ.get("FORGETLESS_DATA_DIR")
    candidate = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not candidate.is_dir():
        pytest.skip(
            f"built-in data files not found at {candidate}; set FORGETLESS_DATA_DIR to a copy"
        )
    return candidate
