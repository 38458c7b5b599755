import contextlib
import os
from pathlib import Path

import pytest

# Tests never reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DATA = REPO_ROOT.parent / "shared" / "data"
# Commands run by the tests read the reference data beside the checkout, as CI does.
if REFERENCE_DATA.is_dir():
    os.environ.setdefault("FORGETLESS_DATA_DIR", str(REFERENCE_DATA))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The reference copy of the built-in data files; tests that need it skip without it."""
    configured = os.environ.get("FORGETLESS_DATA_DIR")
    candidate = Path(configured) if configured else REFERENCE_DATA
    if not candidate.is_dir():
        pytest.skip(
            f"built-in data files not found at {candidate}; set FORGETLESS_DATA_DIR to a copy"
        )
    return candidate


@pytest.fixture
def user_error(capsys):
    """``with user_error("text"):`` — the block must exit with code 2 after one stderr line,
    ``error: ...`` holding ``text``: the contract for a user's mistake in any command."""

    @contextlib.contextmanager
    def expect(text: str):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            yield
        assert exited.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines

    return expect


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from forgetless.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="module")
def script(request):
    """The module ``scripts/<SCRIPT_NAME>.py`` named by the test module, imported once."""
    import importlib.util
    import sys

    name = request.module.SCRIPT_NAME
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being built.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


@pytest.fixture
def experiment_argv(tmp_path, shared_data_dir):
    """Command line of an experiment script: data, run dir and ``<tmp>/out/<name>`` output,
    extra flags, then one ``--set`` per setting."""

    def build(name: str, settings: dict, *extra: str) -> list[str]:
        argv = ["--data-dir", str(shared_data_dir), "--run-dir", str(tmp_path / "run")]
        argv += ["--output", str(tmp_path / "out" / name), *extra]
        for key, value in settings.items():
            argv += ["--set", f"{key}={value}"]
        return argv

    return build


@pytest.fixture
def select_twice(tmp_path):
    """``select_twice(config, method)`` runs the selection in two fresh run directories, checks
    that both wrote the same ``selected.jsonl`` bytes, and returns (stage results, its bytes)."""
    from forgetless.select import run_selection

    def run(config, method: str):
        outputs = []
        for run_name in ("first", "second"):
            results = run_selection(config, tmp_path / run_name, progress=False)
            outputs.append(
                (results[f"selection_{method}"].directory / "selected.jsonl").read_bytes()
            )
        assert outputs[0] == outputs[1]
        return results, outputs[0]

    return run
