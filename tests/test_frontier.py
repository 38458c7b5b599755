"""The frontier report: orientation, Pareto flags, validation and the rendered pages."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from forgetless.errors import ForgetlessError
from forgetless.report.frontier import (
    build_frontier,
    render_html,
    render_markdown,
    write_frontier,
)

X_TASK, Y_TASK = "ppl:medical_pool@test", "c4"


def _change(unit: str, change: float, low: float, high: float) -> dict:
    return {"unit": unit, "change": change, "ci95": [low, high]}


def _arm(label: str, arm: str, sweep: dict, domain: tuple, c4: tuple, arc: tuple) -> dict:
    return {
        "label": label,
        "arm": arm,
        "sweep": sweep,
        "description": f"{arm} fine-tuning",
        "changes": {
            X_TASK: _change("% perplexity", *domain),
            Y_TASK: _change("% perplexity", *c4),
            "arc_easy": _change("points", *arc),
        },
        "compute": {
            "tokens": 49152,
            "epochs": 0.31,
            "steps": 48,
            "seconds": 130.2,
            "peak_memory_mb": None if arm == "osft" else 2100.5,
        },
        "model_dir": f"runs/demo/{arm}/train/model",
    }


@pytest.fixture
def comparison() -> dict:
    # Oriented (x, y): full (7, -21) forgets; lora (3, -1); the osft sweep, listed out of order,
    # (5, -0.2) at 3e-4 and (2, 0.5) at 1e-4; ogs+osft (6, 0.1) dominates lora and osft 3e-4.
    return {
        "title": "forgetless demo: SmolLM2-135M on medical_pool",
        "model": "smollm2-135m",
        "x_task": X_TASK,
        "y_task": Y_TASK,
        "domain_tasks": [X_TASK],
        "general_tasks": [Y_TASK, "arc_easy"],
        "base": {
            "c4": {
                "metric": "perplexity",
                "value": 25.1,
                "higher_is_better": False,
                "n": 50,
                "ci95": [24.0, 26.3],
            },
            "arc_easy": {
                "metric": "accuracy",
                "value": 0.61,
                "higher_is_better": True,
                "n": 300,
                "ci95": [0.55, 0.66],
            },
        },
        "arms": [
            _arm(
                "full lr=5e-4",
                "full",
                {"train.learning_rate": 5e-4},
                (-7.0, -8.1, -5.9),
                (21.0, 18.2, 23.9),
                (-4.7, -6.9, -2.5),
            ),
            _arm("lora", "lora", {}, (-3.0, -4.0, -2.0), (1.0, -0.5, 2.5), (-0.3, -2.0, 1.4)),
            _arm(
                "osft lr=3e-4",
                "osft",
                {"train.learning_rate": 3e-4},
                (-5.0, -6.0, -4.1),
                (0.2, -0.8, 1.2),
                (0.3, -1.5, 2.0),
            ),
            _arm(
                "osft lr=1e-4",
                "osft",
                {"train.learning_rate": 1e-4},
                (-2.0, -2.8, -1.2),
                (-0.5, -1.5, 0.5),
                (0.5, -1.2, 2.1),
            ),
            _arm(
                "ogs+osft", "ogs+osft", {}, (-6.0, -7.1, -4.8), (-0.1, -0.9, 0.8), (0.8, -0.9, 2.4)
            ),
        ],
    }


def _by_label(frontier: dict) -> dict[str, dict]:
    return {arm["label"]: arm for arm in frontier["arms"]}


def test_orientation_pareto_and_forgetting(comparison):
    frontier = build_frontier(comparison)
    arms = _by_label(frontier)
    full = arms["full lr=5e-4"]
    # Perplexity falling on the domain is a gain; rising on c4 is forgetting.
    assert full["x"] == pytest.approx(7.0) and full["x_ci95"] == pytest.approx([5.9, 8.1])
    assert full["y"] == pytest.approx(-21.0) and full["y_ci95"] == pytest.approx([-23.9, -18.2])
    assert arms["osft lr=1e-4"]["y"] == pytest.approx(0.5)
    assert frontier["x_unit"] == frontier["y_unit"] == "% perplexity reduction"

    assert frontier["pareto_labels"] == ["full lr=5e-4", "osft lr=1e-4", "ogs+osft"]
    assert {label: arm["pareto"] for label, arm in arms.items()} == {
        "full lr=5e-4": True,
        "lora": False,
        "osft lr=3e-4": False,
        "osft lr=1e-4": True,
        "ogs+osft": True,
    }
    assert arms["lora"]["dominated_by"] == ["osft lr=3e-4", "ogs+osft"]
    assert arms["osft lr=3e-4"]["dominated_by"] == ["ogs+osft"]
    assert arms["ogs+osft"]["dominated_by"] == []
    assert [label for label, arm in arms.items() if arm["forgets"]] == ["full lr=5e-4"]
    # The input is kept, not modified.
    assert frontier["base"] == comparison["base"] and "x" not in comparison["arms"][0]


def test_accuracy_axis_keeps_its_sign(comparison):
    comparison["y_task"] = "arc_easy"
    arms = _by_label(build_frontier(comparison))
    assert arms["full lr=5e-4"]["y"] == pytest.approx(-4.7)
    assert arms["full lr=5e-4"]["y_ci95"] == pytest.approx([-6.9, -2.5])
    assert arms["full lr=5e-4"]["forgets"] and not arms["lora"]["forgets"]
    assert arms["ogs+osft"]["y"] == pytest.approx(0.8)


def _refused(comparison: dict) -> str:
    with pytest.raises(ForgetlessError) as raised:
        build_frontier(comparison)
    message = str(raised.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(comparison, bad):
    broken = copy.deepcopy(comparison)
    broken["arms"][1]["changes"]["arc_easy"]["ci95"][0] = bad
    assert "arms[1].changes.arc_easy.ci95[0]" in _refused(broken)
    broken = copy.deepcopy(comparison)
    broken["arms"][0]["compute"]["seconds"] = bad
    assert "seconds" in _refused(broken)


def test_invalid_comparisons_are_refused(comparison):
    duplicate = copy.deepcopy(comparison)
    duplicate["arms"][1]["label"] = "full lr=5e-4"
    assert "full lr=5e-4" in _refused(duplicate)

    missing = copy.deepcopy(comparison)
    del missing["arms"][2]["changes"][Y_TASK]
    assert "osft lr=3e-4" in _refused(missing) and Y_TASK in _refused(missing)

    missing_x = copy.deepcopy(comparison)
    del missing_x["arms"][0]["changes"][X_TASK]
    assert X_TASK in _refused(missing_x)

    assert "no arms" in _refused({**comparison, "arms": []})


def test_markdown_table(comparison):
    text = render_markdown(build_frontier(comparison))
    for arm in comparison["arms"]:
        assert arm["label"] in text
    assert (
        "Pareto-optimal (no other arm has as much domain gain and as much general "
        "retention, and more of one): full lr=5e-4, osft lr=1e-4, ogs+osft."
    ) in text
    full_row = next(line for line in text.splitlines() if line.startswith("| full lr=5e-4"))
    assert full_row.startswith("| full lr=5e-4 † | +7.0 [+5.9, +8.1] | -21.0 [-23.9, -18.2] |")
    assert "| -4.7 [-6.9, -2.5] | 49,152 | 0.31 | 130.2 | 2,100 | yes |" in full_row
    osft_row = next(line for line in text.splitlines() if line.startswith("| osft lr=1e-4"))
    assert osft_row.endswith("| – | yes |")
    assert "† forgets" in text
    assert "arc_easy (points)" in text
    assert "Not at equal tokens" not in text  # every arm trained 49,152 tokens
    assert "Repeated data" not in text  # nor more than one epoch


def test_unequal_tokens_are_noted(comparison):
    comparison["arms"][0]["compute"]["tokens"] = 98304
    text = render_markdown(build_frontier(comparison))
    assert "Not at equal tokens: the arms trained on 49,152 to 98,304 tokens (2.00×)" in text


def test_repeated_data_is_noted(comparison):
    comparison["arms"][1]["compute"]["epochs"] = 2.5
    text = render_markdown(build_frontier(comparison))
    label = comparison["arms"][1]["label"]
    assert f"Repeated data: {label} trained on their data more than once (up to 2.50" in text


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


def _parse(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser.elements


def _assert_plot(elements: list, labels: list[str]) -> None:
    assert any(tag == "svg" and attrs.get("id") == "frontier-plot" for tag, attrs in elements)
    points = [attrs for _, attrs in elements if "arm-point" in (attrs.get("class") or "").split()]
    assert sorted(point["data-arm"] for point in points) == sorted(labels)


def test_html_is_self_contained(comparison):
    comparison["arms"][1]["label"] = 'lora <script>alert("x")</script> & co'
    frontier = build_frontier(comparison)
    page = render_html(frontier)
    elements = _parse(page)
    tags = {tag for tag, _ in elements}
    assert page.startswith("<!DOCTYPE html>")
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "image", "use"}
    for _, attrs in elements:
        assert not {"src", "href", "xlink:href", "srcset"} & set(attrs)
    assert "url(" not in page and "@import" not in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
    _assert_plot(elements, [arm["label"] for arm in frontier["arms"]])
    assert "lora &lt;script&gt;" in page
    assert [tag for tag, _ in elements].count("table") == 1 and "49,152" in page


def test_plot_joins_sweeps_in_order_and_the_pareto_front(comparison):
    elements = _parse(render_html(build_frontier(comparison)))
    centre = {
        attrs["data-arm"]: f"{attrs['cx']},{attrs['cy']}"
        for _, attrs in elements
        if "arm-point" in (attrs.get("class") or "").split()
    }
    lines = {
        attrs["class"]: attrs["points"].split() for tag, attrs in elements if tag == "polyline"
    }
    # Only the osft sweep has two points; it is listed 3e-4 first but drawn from 1e-4.
    assert lines["sweep"] == [centre["osft lr=1e-4"], centre["osft lr=3e-4"]]
    assert lines["front"] == [centre["osft lr=1e-4"], centre["ogs+osft"], centre["full lr=5e-4"]]


def test_write_frontier(comparison, tmp_path):
    frontier = build_frontier(comparison)
    names = write_frontier(frontier, tmp_path / "report")
    assert names == ["frontier.json", "frontier.md", "frontier.html"]
    assert json.loads((tmp_path / "report" / "frontier.json").read_text()) == frontier
    assert (tmp_path / "report" / "frontier.md").read_text() == render_markdown(frontier)
    assert (tmp_path / "report" / "frontier.html").read_text() == render_html(frontier)


# --- the page in a real browser ----------------------------------------------------------------


def _find_chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def _chromium(binary: str, tmp_path: Path, *args: str) -> str:
    """Run headless Chromium offline; its stdout. Killed with all its helpers after 60 s."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium did not finish within 60 s: {' '.join(command)}")
    assert process.returncode == 0, f"chromium failed ({process.returncode}): {stderr[-2000:]}"
    return stdout


def _hex(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])


def test_page_renders_in_chromium(comparison, tmp_path):
    binary = _find_chromium()
    if binary is None:
        pytest.skip("no chromium binary (PATH or /usr/bin/chromium); apt-get install chromium")
    frontier = build_frontier(comparison)
    labels = [arm["label"] for arm in frontier["arms"]]
    page = tmp_path / "frontier.html"
    page.write_text(render_html(frontier), encoding="utf-8")

    _assert_plot(_parse(_chromium(binary, tmp_path, "--dump-dom", page.as_uri())), labels)

    from PIL import Image

    screenshot = tmp_path / "frontier.png"
    _chromium(
        binary, tmp_path, f"--screenshot={screenshot}", "--window-size=1000,1400", page.as_uri()
    )
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1400, 1000)
    assert (pixels.min(axis=2) < 200).mean() > 0.02, "the page is (nearly) blank"
    # Every arm's colour must be on screen, so the markers and bars were actually drawn.
    colours = {
        attrs["stroke"]
        for _, attrs in _parse(page.read_text())
        if "arm-point" in (attrs.get("class") or "").split()
    }
    assert len(colours) >= 2
    for colour in colours:
        close = (np.abs(pixels - _hex(colour)).sum(axis=2) < 40).sum()
        assert close >= 30, f"arm colour {colour} hardly appears in the screenshot ({close} px)"
