"""The frontier report: domain gain vs general retention vs compute, across training arms.

A comparison evaluates several arms (full fine-tuning, LoRA, OSFT, ...; an arm swept over one
setting gives several points) from the same base model on the same items, each with its paired
change against the base per task and a 95 % interval. This module orients the changes of the
two plotted tasks so that right and up are better, finds the Pareto-optimal arms and renders
``frontier.json``, ``frontier.md`` and ``frontier.html``. The page is self-contained (inline CSS,
an inline SVG plot, no script) so it reads the same from an archive with the network off.
"""

from __future__ import annotations

import copy
import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgetless.errors import ForgetlessError
from forgetless.io import write_json_atomic, write_text_atomic

# The sign that turns a change into an improvement, and what the improvement is called.
_ORIENTATION = {"% perplexity": (-1.0, "% perplexity reduction"), "points": (1.0, "points")}
# Tableau 10 without its grey, which would read as the base model or an axis.
_PALETTE = "#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd #8c564b #e377c2 #bcbd22 #17becf".split()
_WIDTH, _HEIGHT = 960, 600
_LEFT, _RIGHT, _TOP, _BOTTOM = 80, 735, 20, 525  # the plot area; the legend is right of it
_COMPUTE = (  # column header, key in "compute", format
    ("tokens", "tokens", ",.0f"),
    ("epochs", "epochs", ".2f"),
    ("seconds", "seconds", ",.1f"),
    ("peak memory (MiB)", "peak_memory_mb", ",.0f"),
)
_CHAR_WIDTH = 7.0  # a generous estimate for 12 px sans-serif, so labels rather miss than clash
_UNEQUAL_TOKENS = 1.1  # a larger ratio of the arms' training tokens is noted in the report


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_finite(item, f"{where}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ForgetlessError(f"{where} is {value}; a report needs finite numbers")


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["x"] >= b["x"] and a["y"] >= b["y"] and (a["x"] > b["x"] or a["y"] > b["y"])


def build_frontier(comparison: dict[str, Any]) -> dict[str, Any]:
    """The comparison plus, per arm, its oriented position and Pareto status."""
    if not comparison.get("arms"):
        raise ForgetlessError("the comparison has no arms to report")
    labels = [arm["label"] for arm in comparison["arms"]]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ForgetlessError(f"arm labels must be unique; repeated: {', '.join(repeated)}")
    _check_finite(comparison, "comparison")
    frontier = copy.deepcopy(comparison)
    arms = frontier["arms"]
    for axis in ("x", "y"):
        task = frontier.get(f"{axis}_task")
        if not task:
            raise ForgetlessError(f"the comparison names no {axis}_task")
        units = set()
        for arm in arms:
            change = arm["changes"].get(task)
            if change is None:
                raise ForgetlessError(
                    f"arm {arm['label']!r} has no change for {axis}_task {task!r}"
                )
            if change["unit"] not in _ORIENTATION:
                raise ForgetlessError(
                    f"arm {arm['label']!r}: cannot orient unit {change['unit']!r} of {task!r} "
                    f"(known: {', '.join(_ORIENTATION)})"
                )
            units.add(change["unit"])
            sign = _ORIENTATION[change["unit"]][0]
            arm[axis] = sign * change["change"]
            arm[f"{axis}_ci95"] = sorted(sign * bound for bound in change["ci95"])
        if len(units) > 1:
            raise ForgetlessError(f"arms report {task!r} in different units: {sorted(units)}")
        frontier[f"{axis}_unit"] = _ORIENTATION[units.pop()][1]
    for arm in arms:
        arm["dominated_by"] = [other["label"] for other in arms if _dominates(other, arm)]
        arm["pareto"] = not arm["dominated_by"]
        arm["forgets"] = arm["y_ci95"][1] < 0
    frontier["pareto_labels"] = [arm["label"] for arm in arms if arm["pareto"]]
    return frontier


# --- text shared by the Markdown and the HTML -------------------------------------------------


def _signed(value: float) -> str:
    # Rounding first keeps a tiny negative from printing as "-0.0".
    return f"{round(value, 1) + 0.0:+.1f}"


def _with_ci(value: float, ci: list[float]) -> str:
    return f"{_signed(value)} [{_signed(ci[0])}, {_signed(ci[1])}]"


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _table(frontier: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    arms, x_task, y_task = frontier["arms"], frontier["x_task"], frontier["y_task"]
    tasks = dict.fromkeys([*frontier.get("domain_tasks", []), *frontier.get("general_tasks", [])])
    for arm in arms:
        tasks.update(dict.fromkeys(arm["changes"]))
    others = [task for task in tasks if task not in (x_task, y_task)]
    units = {
        task: next((arm["changes"][task]["unit"] for arm in arms if task in arm["changes"]), "")
        for task in others
    }
    header = [
        "arm",
        f"domain gain: {x_task} ({frontier['x_unit']})",
        f"general: {y_task} ({frontier['y_unit']})",
        *(f"{task} ({units[task]})" for task in others),
        *(column for column, _, _ in _COMPUTE),
        "Pareto",
    ]
    rows = []
    for arm in arms:
        changes, compute = arm["changes"], arm.get("compute") or {}
        rows.append(
            [
                arm["label"] + (" †" if arm["forgets"] else ""),
                _with_ci(arm["x"], arm["x_ci95"]),
                _with_ci(arm["y"], arm["y_ci95"]),
                *(
                    _with_ci(changes[task]["change"], changes[task]["ci95"])
                    if task in changes
                    else "–"
                    for task in others
                ),
                *(_number(compute.get(key), spec) for _, key, spec in _COMPUTE),
                "yes" if arm["pareto"] else "",
            ]
        )
    return header, rows


def _axes_sentence(frontier: dict[str, Any]) -> str:
    return (
        f"x = domain gain on {frontier['x_task']} ({frontier['x_unit']}; right is better), "
        f"y = general retention on {frontier['y_task']} ({frontier['y_unit']}; 0 = no "
        f"forgetting, below 0 = forgetting). Every change is paired against the base model "
        f"{frontier['model']} on the same evaluation items, with its 95 % interval in brackets; "
        "the other task columns give the raw change in the unit named (for perplexity, "
        "negative is better)."
    )


def _notes(frontier: dict[str, Any]) -> list[str]:
    notes = [
        "Pareto-optimal (no other arm has as much domain gain and as much general retention, "
        f"and more of one): {', '.join(frontier['pareto_labels'])}."
    ]
    if frontier.get("seeds"):
        notes.append(
            f"Each point is the mean of its models trained under the seeds {frontier['seeds']} "
            "(each model's own changes are under `models` in frontier.json); its interval "
            "resamples the items (paired) and the seeds, and its compute is one model's, on "
            "average."
        )
    if any(arm["forgets"] for arm in frontier["arms"]):
        notes.append(
            f"† forgets: the whole 95 % interval of the change on {frontier['y_task']} lies "
            "below 0, forgetting beyond the noise of the evaluation."
        )
    base = [
        f"{task} {score['metric']} {score['value']:.4g}"
        + (" [{:.4g}, {:.4g}]".format(*score["ci95"]) if score.get("ci95") else "")
        + (f" (n = {score['n']})" if score.get("n") is not None else "")
        for task, score in (frontier.get("base") or {}).items()
    ]
    if base:
        notes.append(f"Base model {frontier['model']}: {'; '.join(base)}.")
    tokens = [arm["compute"]["tokens"] for arm in frontier["arms"] if arm["compute"]["tokens"]]
    # A gain bought with more tokens is not a better method; say so where the arms differ by
    # more than packing and rounding move a token count (a few per cent).
    if tokens and max(tokens) > _UNEQUAL_TOKENS * min(tokens):
        notes.append(
            f"Not at equal tokens: the arms trained on {min(tokens):,.0f} to {max(tokens):,.0f} "
            f"tokens ({max(tokens) / min(tokens):.2f}×), so their gains and retention also "
            "reflect how much each trained."
        )
    repeated = [arm["label"] for arm in frontier["arms"] if arm["compute"]["epochs"] > 1.0]
    if repeated:
        most = max(arm["compute"]["epochs"] for arm in frontier["arms"])
        notes.append(
            f"Repeated data: {', '.join(repeated)} trained on their data more than once (up to "
            f"{most:.2f} epochs), where a small set can be memorised rather than learnt."
        )
    if any(arm["compute"].get("peak_memory_mb") is not None for arm in frontier["arms"]):
        notes.append(
            "Seconds: wall time of each arm's data and training stages. Peak memory: allocated "
            "CUDA memory on a GPU; on a CPU the process's resident memory, which includes what "
            "arms trained earlier in the same process left behind."
        )
    return notes


def render_markdown(frontier: dict[str, Any]) -> str:
    header, rows = _table(frontier)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    alignment = ["---", *(["---:"] * (len(header) - 2)), "---"]
    table = "\n".join(line(cells) for cells in (header, alignment, *rows))
    blocks = [f"# {frontier['title']}", _axes_sentence(frontier), table, *_notes(frontier)]
    return "\n\n".join(blocks) + "\n"


# --- the SVG plot ------------------------------------------------------------------------------


def _axis(values: list[float], start: float, end: float) -> tuple[list[float], Callable]:
    """Round ticks spanning ``values`` and 0, and the map from data to pixels."""
    low, high = min(*values, 0.0), max(*values, 0.0)
    pad = (high - low) * 0.06 or 1.0
    low, high = low - pad, high + pad
    raw_step = (high - low) / 6
    power = 10 ** math.floor(math.log10(raw_step))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw_step)
    low, high = math.floor(low / step) * step, math.ceil(high / step) * step
    ticks = [low + i * step for i in range(round((high - low) / step) + 1)]
    return ticks, lambda value: start + (value - low) / (high - low) * (end - start)


def _tick(value: float) -> str:
    return f"{round(value, 9) + 0.0:g}"


def _tag(name: str, content: str = "", **attrs: Any) -> str:
    """An SVG element; ``class_`` stands for ``class``, other underscores for dashes."""
    pairs = " ".join(
        f'{key.rstrip("_").replace("_", "-")}="'
        f'{f"{value:.1f}" if isinstance(value, float) else html.escape(str(value))}"'
        for key, value in attrs.items()
    )
    return f"<{name} {pairs}>{content}</{name}>" if content else f"<{name} {pairs}/>"


def _diamond(x: float, y: float, r: float) -> str:
    return f"M{x - r:.1f},{y:.1f} L{x:.1f},{y - r:.1f} L{x + r:.1f},{y:.1f} L{x:.1f},{y + r:.1f} Z"


def _place_labels(points: list[tuple[float, float, str]], taken: list[tuple[float, ...]]) -> str:
    """Each label beside its point, at the first spot inside the plot that hits no other label
    or marker (the first spot inside the plot when all do)."""
    out = []
    for px, py, text in points:
        width = _CHAR_WIDTH * len(text)
        spots = []
        for dx, dy in ((9, -7), (9, 16), (-9, -7), (-9, 16), (9, 4), (-9, 4), (0, -12), (0, 24)):
            left = px + dx - (0 if dx > 0 else width if dx < 0 else width / 2)
            box = (left, py + dy - 10, left + width, py + dy + 3)
            if _LEFT < box[0] and box[2] < _RIGHT and _TOP < box[1] and box[3] < _BOTTOM:
                spots.append((box, dx, dy))
        clear = [s for s in spots if not any(_overlaps(s[0], t) for t in taken)]
        box, dx, dy = (clear or spots or [((0, 0, 0, 0), 9, -7)])[0]
        taken.append(box)
        anchor = "start" if dx > 0 else "end" if dx < 0 else "middle"
        out.append(
            _tag(
                "text", html.escape(text), x=px + dx, y=py + dy, text_anchor=anchor, class_="label"
            )
        )
    return "".join(out)


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _sweep_order(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def setting(arm: dict[str, Any]) -> tuple:
        return tuple(value for _, value in sorted((arm.get("sweep") or {}).items()))

    try:
        return sorted(points, key=setting)
    except TypeError:  # sweep values that do not compare: keep the order of the comparison
        return points


def _svg(frontier: dict[str, Any]) -> str:
    arms = frontier["arms"]
    xticks, px = _axis([v for arm in arms for v in (arm["x"], *arm["x_ci95"])], _LEFT, _RIGHT)
    yticks, py = _axis([v for arm in arms for v in (arm["y"], *arm["y_ci95"])], _BOTTOM, _TOP)
    names = list(dict.fromkeys(arm["arm"] for arm in arms))
    colour = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}
    ox, oy = px(0.0), py(0.0)
    out = [
        _tag("rect", x=_LEFT, y=oy, width=_RIGHT - _LEFT, height=_BOTTOM - oy, class_="forgetting")
    ]
    for t in xticks:
        out.append(_tag("line", x1=px(t), x2=px(t), y1=_TOP, y2=_BOTTOM, class_="grid"))
        out.append(
            _tag("text", _tick(t), x=px(t), y=_BOTTOM + 18, text_anchor="middle", class_="tick")
        )
    for t in yticks:
        out.append(_tag("line", x1=_LEFT, x2=_RIGHT, y1=py(t), y2=py(t), class_="grid"))
        out.append(
            _tag("text", _tick(t), x=_LEFT - 8, y=py(t) + 4, text_anchor="end", class_="tick")
        )
    out.append(_tag("line", x1=ox, x2=ox, y1=_TOP, y2=_BOTTOM, class_="zero"))
    out.append(_tag("line", x1=_LEFT, x2=_RIGHT, y1=oy, y2=oy, class_="zero"))
    out.append(
        _tag("rect", x=_LEFT, y=_TOP, width=_RIGHT - _LEFT, height=_BOTTOM - _TOP, class_="frame")
    )
    front = sorted((arm for arm in arms if arm["pareto"]), key=lambda arm: (arm["x"], -arm["y"]))
    lines = [(_sweep_order([a for a in arms if a["arm"] == n]), "sweep", colour[n]) for n in names]
    for points, kind, stroke in [*lines, (front, "front", "#222")]:
        if len(points) > 1:
            path = " ".join(f"{px(arm['x']):.1f},{py(arm['y']):.1f}" for arm in points)
            out.append(_tag("polyline", points=path, class_=kind, stroke=stroke))
    for arm in arms:
        x, y = px(arm["x"]), py(arm["y"])
        (x0, x1), (y0, y1) = map(px, arm["x_ci95"]), map(py, arm["y_ci95"])
        bars = [(x0, x1, y, y), (x, x, y0, y1)]  # the intervals, then their end caps
        bars += [(v, v, y - 4, y + 4) for v in (x0, x1)] + [(x - 4, x + 4, v, v) for v in (y0, y1)]
        segments = "".join(_tag("line", x1=a, x2=b, y1=c, y2=d) for a, b, c, d in bars)
        out.append(_tag("g", segments, class_="errorbar", stroke=colour[arm["arm"]]))
    out.append(_tag("path", d=_diamond(ox, oy, 6), class_="base"))
    for arm in arms:
        c, pareto = colour[arm["arm"]], arm["pareto"]
        tip = (
            f"{arm['label']}: domain gain {_with_ci(arm['x'], arm['x_ci95'])}, "
            f"general {_with_ci(arm['y'], arm['y_ci95'])}"
        )
        title, x, y = _tag("title", html.escape(tip)), px(arm["x"]), py(arm["y"])
        kind, r, fill = ("arm-point pareto", 7, c) if pareto else ("arm-point", 5.5, "#fff")
        out.append(
            _tag(
                "circle",
                title,
                cx=x,
                cy=y,
                r=r,
                fill=fill,
                stroke=c,
                class_=kind,
                data_arm=arm["label"],
            )
        )
    markers = [(px(a["x"]) - 8, py(a["y"]) - 8, px(a["x"]) + 8, py(a["y"]) + 8) for a in arms]
    labels = [(ox, oy, "base"), *((px(arm["x"]), py(arm["y"]), arm["label"]) for arm in arms)]
    out.append(_place_labels(labels, markers))
    x_title = f"domain gain: {frontier['x_task']}, {frontier['x_unit']} →"
    y_title = f"general retention: {frontier['y_task']}, {frontier['y_unit']} →"
    places = (
        f"translate({(_LEFT + _RIGHT) / 2} {_BOTTOM + 44})",
        f"translate(22 {(_TOP + _BOTTOM) / 2}) rotate(-90)",
    )
    for text, place in zip((x_title, y_title), places, strict=True):
        out.append(
            _tag("text", html.escape(text), transform=place, class_="title", text_anchor="middle")
        )
    out.append(_legend(names, colour))
    size = {"width": _WIDTH, "height": _HEIGHT, "viewBox": f"0 0 {_WIDTH} {_HEIGHT}"}
    return _tag(
        "svg", "\n".join(out), id="frontier-plot", role="img", aria_label=frontier["title"], **size
    )


def _legend(names: list[str], colour: dict[str, str]) -> str:
    # Glyphs are drawn around (10, -4), the middle of a 20 px slot left of the text baseline.
    def swatch(stroke: str, kind: str = "sweep") -> str:
        return _tag("line", x1=0, x2=20, y1=-4, y2=-4, class_=kind, stroke=stroke)

    bar = "".join(
        _tag("line", x1=a, x2=b, y1=c, y2=d)
        for a, b, c, d in ((0, 20, -4, -4), (0, 0, -8, 0), (20, 20, -8, 0))
    )
    rows = [
        (swatch(colour[n]) + _tag("circle", cx=10, cy=-4, r=5, fill=colour[n]), n) for n in names
    ]
    rows += [
        ("", ""),  # a gap between the arms and the key
        (_tag("circle", cx=10, cy=-4, r=6, fill="#444"), "Pareto-optimal"),
        (
            _tag("circle", cx=10, cy=-4, r=5, fill="#fff", stroke="#444", stroke_width=2),
            "dominated",
        ),
        (swatch("#222", "front"), "Pareto front"),
        (swatch("#444"), "sweep, in order"),
        (_tag("g", bar, class_="errorbar", stroke="#444"), "paired 95 % interval"),
        (_tag("path", d=_diamond(10, -4, 6), class_="base"), "base model"),
        (_tag("rect", x=0, y=-10, width=20, height=12, class_="forgetting"), "forgetting (y < 0)"),
    ]
    body = _tag("text", "arms", x=0, y=0, class_="title") + "".join(
        _tag(
            "g",
            glyph + _tag("text", html.escape(text), x=28, y=0),
            transform=f"translate(0 {20 * row})",
        )
        for row, (glyph, text) in enumerate(rows, start=1)
    )
    return _tag("g", body, class_="legend", transform=f"translate({_RIGHT + 22} {_TOP + 14})")


_CSS = """
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: #222;
  margin: 1.5em auto; max-width: 980px; padding: 0 10px; line-height: 1.4; }
h1 { font-size: 1.35em; margin-bottom: .3em; } p { font-size: .9em; }
p.sub { color: #555; margin-top: 0; }
svg { display: block; max-width: 100%; height: auto; font-size: 12px; }
svg text { fill: #222; } svg .tick { fill: #555; font-size: 11px; }
svg .title { font-size: 13px; font-weight: bold; }
svg .label { paint-order: stroke; stroke: #fff; stroke-width: 3px; stroke-linejoin: round; }
.grid { stroke: #e8e8e8; } .zero { stroke: #666; stroke-dasharray: 5 3; }
.frame { fill: none; stroke: #999; } .forgetting { fill: #fdf3f2; } .base { fill: #222; }
.sweep { fill: none; stroke-width: 2; stroke-opacity: .55; }
.front { fill: none; stroke-width: 1.5; stroke-dasharray: 7 4; }
.errorbar { stroke-width: 1.4; stroke-opacity: .7; }
.arm-point { stroke-width: 2; } .arm-point.pareto { stroke: #222; stroke-width: 1.5; }
table { border-collapse: collapse; font-size: .82em; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 7px; vertical-align: top; }
th { text-align: left; background: #f4f4f4; } td:first-child { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.pareto td:first-child { font-weight: bold; } tr.forgets td { background: #fdf3f2; }
"""


def render_html(frontier: dict[str, Any]) -> str:
    e = html.escape
    header, rows = _table(frontier)
    head = "".join(f"<th>{e(cell)}</th>" for cell in header)
    body = []
    for arm, row in zip(frontier["arms"], rows, strict=True):
        classes = " ".join(name for name in ("pareto", "forgets") if arm[name])
        cells = [
            f"<td>{e(row[0])}</td>",
            *(f'<td class="num">{e(c)}</td>' for c in row[1:-1]),
            f"<td>{e(row[-1])}</td>",
        ]
        body.append(f'<tr class="{classes}">{"".join(cells)}</tr>')
    notes = "".join(f"<p>{e(note)}</p>" for note in _notes(frontier))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(frontier["title"])}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{e(frontier["title"])}</h1>
<p class="sub">{e(frontier["model"])} · x: domain gain on {e(frontier["x_task"])} ·
y: general retention on {e(frontier["y_task"])} · up and right are better</p>
{_svg(frontier)}
<table>
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
<p>{e(_axes_sentence(frontier))} Each marker is one arm, its error bars the paired 95 %
intervals on both axes. Filled markers are Pareto-optimal, joined by the dashed front; the points
of a sweep share a colour and are joined in the order of the swept setting. The base model sits
at the origin; the shaded half below it is forgetting.</p>
{notes}
</body>
</html>
"""


def write_frontier(frontier: dict[str, Any], directory: str | Path) -> list[str]:
    """``frontier.json``, ``frontier.md`` and ``frontier.html`` in ``directory``; their names."""
    directory = Path(directory)
    write_json_atomic(directory / "frontier.json", frontier)
    write_text_atomic(directory / "frontier.md", render_markdown(frontier))
    write_text_atomic(directory / "frontier.html", render_html(frontier))
    return ["frontier.json", "frontier.md", "frontier.html"]
