"""The drift report: ``report.json`` for machines and a self-contained ``report.html`` for people.

The HTML page has no script and loads nothing: inline CSS and one SVG histogram per feature
(reference against current), drawn here. Every piece of data is escaped before it reaches the page.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from airloop.steps.drift.requests import DriftResult

BINS = 30
TOP_CATEGORIES = 12
_WIDTH, _HEIGHT, _PAD = 360, 130, 18
_COLOURS = {"reference": "#4c78a8", "current": "#f58518"}


def distributions(
    reference: pd.DataFrame, current: pd.DataFrame, features: Sequence[str], categorical: Collection[str]
) -> dict[str, dict[str, Any]]:
    """Per feature, the share of non-missing values in each bin (numeric) or category, on both sides."""
    return {
        f: (_categories if f in categorical else _histogram)(reference[f].dropna(), current[f].dropna())
        for f in features
    }


def _histogram(reference: pd.Series, current: pd.Series) -> dict[str, Any]:
    import numpy as np

    both = np.concatenate([reference.to_numpy(float), current.to_numpy(float)])
    if len(both) == 0:
        return {"kind": "numeric", "edges": [], "reference": [], "current": []}
    # The central 99% sets the range so one outlier does not squash the plot; tails fold into the end bins.
    low, high = np.quantile(both, [0.005, 0.995])
    if high <= low:
        low, high = low - 0.5, high + 0.5

    def shares(values: pd.Series) -> tuple[list[float], np.ndarray]:
        # Equal bins given as a count and a range: numpy bins by arithmetic instead of sorting the values.
        counts, edges = np.histogram(np.clip(values.to_numpy(float), low, high), bins=BINS, range=(low, high))
        return (counts / max(len(values), 1)).tolist(), edges

    (ref, edges), (cur, _) = shares(reference), shares(current)
    return {"kind": "numeric", "edges": edges.tolist(), "reference": ref, "current": cur}


def _categories(reference: pd.Series, current: pd.Series) -> dict[str, Any]:
    ref = reference.astype(str).value_counts(normalize=True)
    cur = current.astype(str).value_counts(normalize=True)
    shares = ref.add(cur, fill_value=0).sort_values(ascending=False)
    names = shares.index[:TOP_CATEGORIES].tolist()
    return {
        "kind": "categorical",
        "categories": names,
        "other": len(shares) > TOP_CATEGORIES,
        "reference": [float(ref.get(n, 0.0)) for n in names],
        "current": [float(cur.get(n, 0.0)) for n in names],
    }


def write(result: DriftResult, plots: dict[str, dict[str, Any]], report_dir: str) -> DriftResult:
    """Write ``report.json`` (the result plus the distributions) and ``report.html``.

    Returns the result with the two paths filled in, as both files record it.
    """
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    result = result.copy()
    data, page = folder / "report.json", folder / "report.html"
    result["report_json"], result["report_html"] = str(data), str(page)
    data.write_text(json.dumps({**result, "distributions": plots}, indent=2, allow_nan=False))
    page.write_text(render(result, plots), encoding="utf-8")
    return result


def render(result: DriftResult, plots: dict[str, dict[str, Any]]) -> str:
    """The HTML page for one drift result."""
    summary = "".join(
        f"<tr><th>{escape(label)}</th><td>{escape(str(result.get(key)))}</td></tr>"
        for label, key in [
            ("Verdict", "verdict"),
            ("Severity", "severity"),
            ("Backend", "backend"),
            ("Reference rows", "n_reference"),
            ("Current rows", "n_current"),
            ("Share of features drifted", "share_drifted"),
        ]
    )
    rows, figures = [], []
    for name, score in result.get("features", {}).items():
        status = "drift" if score["drift"] else ("ok" if score["tested"] else "untested")
        cells = [
            name,
            score["kind"],
            score["test"],
            _number(score["statistic"]),
            _number(score["p_value"]),
            status,
            _number(score["ref_mean"]),
            _number(score["cur_mean"]),
            f"{score['nan_fraction_ref']:.1%}",
            f"{score['nan_fraction_cur']:.1%}",
        ]
        rows.append(f'<tr class="{status}">' + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
        if name in plots:
            figures.append(
                f"<figure><figcaption>{escape(name)} ({escape(status)})</figcaption>"
                f"{_svg(plots[name])}</figure>"
            )
    legend = " ".join(
        f'<span style="color:{colour}">&#9632; {side}</span>' for side, colour in _COLOURS.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>Drift report: {escape(str(result.get("verdict")))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
tr.drift td {{ background: #fde2e1; }} tr.untested td {{ color: #888; }}
figure {{ display: inline-block; margin: 0.5em; }} figcaption {{ font-size: 0.9em; }}
</style></head><body>
<h1>Drift report</h1>
<p>{escape(str(result.get("message", "")))}</p>
<table>{summary}</table>
<table><tr><th>Feature</th><th>Kind</th><th>Test</th><th>Statistic</th><th>p-value</th><th>Status</th>
<th>Reference mean</th><th>Current mean</th><th>Missing (reference)</th><th>Missing (current)</th></tr>
{"".join(rows)}</table>
<p>{legend}</p>
{"".join(figures)}
</body></html>
"""


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _svg(plot: dict[str, Any]) -> str:
    """Reference and current shares as two overlaid bar series, scaled to the taller bar."""
    ref, cur = plot["reference"], plot["current"]
    if not ref:
        return "<p>no values</p>"
    bars, top = len(ref), max(max(ref), max(cur)) or 1.0
    width = (_WIDTH - 2 * _PAD) / bars
    plot_height = _HEIGHT - 2 * _PAD
    shapes = []
    for side, shares in (("reference", ref), ("current", cur)):
        # Categories sit side by side; numeric bins overlap, so the shapes of the two histograms compare.
        bar = width / 2 if plot["kind"] == "categorical" else width
        offset = bar if plot["kind"] == "categorical" and side == "current" else 0.0
        for i, share in enumerate(shares):
            height = plot_height * share / top
            shapes.append(
                f'<rect x="{_PAD + i * width + offset:.1f}" y="{_PAD + plot_height - height:.1f}" '
                f'width="{bar:.1f}" height="{height:.1f}" fill="{_COLOURS[side]}" '
                f'fill-opacity="0.55"><title>{side}: {share:.2%}</title></rect>'
            )
    if plot["kind"] == "categorical":
        labels = [(_PAD + (i + 0.5) * width, name[:10]) for i, name in enumerate(plot["categories"])]
    else:
        labels = [(_PAD, f"{plot['edges'][0]:.3g}"), (_WIDTH - _PAD, f"{plot['edges'][-1]:.3g}")]
    text = "".join(
        f'<text x="{x:.1f}" y="{_HEIGHT - 4}" font-size="9" text-anchor="middle">{escape(label)}</text>'
        for x, label in labels
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img">'
        f'<line x1="{_PAD}" y1="{_HEIGHT - _PAD}" x2="{_WIDTH - _PAD}" y2="{_HEIGHT - _PAD}" '
        'stroke="#999"/>'
        f"{''.join(shapes)}{text}</svg>"
    )
