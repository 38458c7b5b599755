"""scripts/reproduction_check.py: every paired change of a rerun against the published one."""

import json

SCRIPT_NAME = "reproduction_check"


def _change(value, low, high, unit="% perplexity"):
    return {"unit": unit, "change": value, "ci95": [low, high]}


def _table(c4, arc, extra=False):
    rows = [
        {"model": "base", "changes": {}},
        {"model": "sotu", "changes": {"c4": _change(*c4), "arc": _change(*arc, unit="points")}},
    ]
    if extra:
        rows.append({"model": "dare", "changes": {"c4": _change(1.0, 0.0, 2.0)}})
    return {"model": "m", "rows": rows}


def test_each_change_is_matched_by_its_path_and_checked_against_the_interval(
    tmp_path, script, capsys
):
    published, rerun = tmp_path / "published.json", tmp_path / "rerun.json"
    published.write_text(json.dumps(_table((4.0, 3.0, 5.0), (1.0, -1.0, 3.0))))
    rerun.write_text(json.dumps(_table((4.5, 4.0, 5.0), (3.5, 2.0, 5.0), extra=True)))
    script.main([str(published), str(rerun), "--output", str(tmp_path / "check")])
    result = json.loads((tmp_path / "check.json").read_text())
    assert (result["compared"], result["within_interval"]) == (2, 1)
    rows = {row["path"]: row for row in result["rows"]}
    assert rows["rows.sotu.changes.c4"]["within_interval"]
    arc = rows["rows.sotu.changes.arc"]
    assert not arc["within_interval"] and arc["difference"] == 2.5
    assert result["only_rerun"] == ["rows.dare.changes.c4"]
    assert result["largest_difference"] == 2.5
    table = (tmp_path / "check.md").read_text()
    assert "1 of 2 paired changes" in table and "| **no** |" in table
    assert table in capsys.readouterr().out


def test_unreadable_or_unmatched_results_are_one_line_errors(tmp_path, script, user_error):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_table((4.0, 3.0, 5.0), (1.0, -1.0, 3.0))))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with user_error("broken.json:1: invalid JSON"):
        script.main([str(good), str(broken)])
    with user_error("missing.json: No such file"):
        script.main([str(good), str(tmp_path / "missing.json")])
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with user_error("binary.json: 'utf-8' codec"):
        script.main([str(good), str(binary)])
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(_table((float("nan"), 3.0, 5.0), (1.0, -1.0, 3.0))))
    with user_error("rows.sotu.changes.c4 holds a non-finite"):
        script.main([str(good), str(nan)])
    for interval in ([1.0], 2.0):
        short = tmp_path / "short.json"
        short.write_text(json.dumps({"changes": {"c4": {"change": 1.0, "ci95": interval}}}))
        with user_error("changes.c4.ci95 is not a [low, high] pair"):
            script.main([str(good), str(short)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"changes": {"x": {"t": _change(1.0, 0.0, 2.0)}}}))
    with user_error("none of its changes matches"):
        script.main([str(good), str(other)])
    assert not list(tmp_path.glob("*.md"))
