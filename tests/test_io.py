"""Atomic writes: whole or nothing, ordinary permissions, no temporary files left behind."""

import json
import os
import stat

import pytest

from forgetless.errors import ForgetlessError
from forgetless.io import atomic_directory, atomic_file, write_json_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_folders_get_the_umask_permissions(tmp_path, umask_022):
    write_text_atomic(tmp_path / "a.txt", "text")
    write_json_atomic(tmp_path / "sub" / "b.json", {"x": 1})
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "sub" / "b.json") == 0o644
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "weights").write_bytes(b"w")
    assert _mode(tmp_path / "model") == 0o755
    assert (tmp_path / "model" / "weights").read_bytes() == b"w"


def test_a_failed_write_leaves_the_old_version_and_no_temporary_file(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_file(target) as out:
        out.write("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "model") as staging:
        (staging / "weights").write_bytes(b"half")
        raise RuntimeError("killed")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt"]


def test_a_finished_folder_replaces_the_previous_one_whole(tmp_path):
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "old").write_text("1")
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "new").write_text("2")
    assert [path.name for path in (tmp_path / "model").iterdir()] == ["new"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_a_killed_writers_leftovers_go_with_the_next_write(tmp_path):
    (tmp_path / ".model.abc123.partial").mkdir()
    (tmp_path / ".model.abc123.partial" / "weights").write_bytes(b"half")
    (tmp_path / ".a.txt.xyz.partial").write_text("half")
    write_text_atomic(tmp_path / "a.txt", "whole")
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "weights").write_bytes(b"whole")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "model"]


def test_a_non_finite_number_is_refused_by_name_and_nothing_is_written(tmp_path):
    target = tmp_path / "summary.json"
    with pytest.raises(ForgetlessError, match=r"tasks\[1\]\.loss is not a finite"):
        write_json_atomic(target, {"tasks": [{"loss": 1.0}, {"loss": float("nan")}]})
    with pytest.raises(ForgetlessError, match="gain is not a finite"):
        write_json_atomic(target, {"gain": float("-inf")})
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(target, {"spearman": None})
    assert json.loads(target.read_text()) == {"spearman": None}
