"""The Airloop pages as HTML: every value is escaped here, every href is built from the mount path."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from airloop.plugins.ui import FILES_ROUTE
from airloop.plugins.ui.sources import ModelRecord, VersionRecord

STYLESHEET = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1f2933; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #cbd2d9; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f0f4f8; }
.alias { background: #e3f8ff; border-radius: 0.3rem; padding: 0 0.4rem; margin-right: 0.2rem; }
.bad { color: #ab091e; font-weight: bold; }
.good { color: #0e7c3a; font-weight: bold; }
.empty { color: #7b8794; }
pre { background: #f5f7fa; padding: 0.6rem; overflow-x: auto; }
"""
STYLESHEET_PATH = "/static/airloop.css"

VERDICT_CSS = {
    **dict.fromkeys(("pass", "promoted", "no_drift"), "good"),
    **dict.fromkeys(("fail", "rolled_back", "drift", "invalid_window"), "bad"),
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(root: str, path: str) -> str:
    return _e(root + path)


def _rejected(flag: bool) -> str:
    return '<span class="bad">rejected</span>' if flag else ""


def _aliases(names: list[str]) -> str:
    return "".join(f'<span class="alias">{_e(name)}</span>' for name in names)


def _pairs(mapping: Mapping[str, Any]) -> str:
    if not mapping:
        return '<span class="empty">none</span>'
    return "<br>".join(f"{_e(key)} = {_e(value)}" for key, value in mapping.items())


def _verdict(value: Any) -> str:
    return f'<span class="{VERDICT_CSS.get(str(value), "")}">{_e(value)}</span>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A table of already-escaped cells."""
    head = "".join(f"<th>{_e(header)}</th>" for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(root: str, title: str, body: str) -> str:
    """A whole document around ``body`` (already escaped), for the app mounted at ``root``."""
    nav = " ".join(
        f'<a href="{_href(root, path)}">{_e(label)}</a>'
        for path, label in (("/models", "Models"), ("/rollouts", "Rollouts"), ("/drift", "Drift"))
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Airloop: {_e(title)}</title>"
        f'<link rel="stylesheet" href="{_href(root, STYLESHEET_PATH)}"></head>'
        f"<body><nav>{nav}</nav><h1>{_e(title)}</h1>{body}</body></html>"
    )


def error(message: Any) -> str:
    return f'<p class="bad">{_e(message)}</p>'


def _version_link(root: str, name: str, version: str) -> str:
    path = f"/models/{quote(name, safe='')}/versions/{quote(version, safe='')}"
    return f'<a href="{_href(root, path)}">{_e(version)}</a>'


def models(root: str, records: list[ModelRecord]) -> str:
    if not records:
        return '<p class="empty">No registered models.</p>'
    sections = []
    for model in records:
        rows = [
            [
                _version_link(root, model["name"], v["version"]),
                _aliases(v["aliases"]),
                _e(v["status"]),
                _rejected(v["rejected"]),
                _pairs(v["metrics"]),
                _pairs(v["tags"]),
            ]
            for v in model["versions"]
        ]
        sections.append(
            f"<h2>{_e(model['name'])}</h2><p>{_e(model['description'])}</p>"
            f"<p>Aliases: {_pairs(model['aliases'])}</p><p>Tags: {_pairs(model['tags'])}</p>"
            + _table(["Version", "Aliases", "Status", "Rejected", "Metrics", "Tags"], rows)
        )
    return "".join(sections)


def version(found: VersionRecord, stages: Sequence[Mapping[str, Any]], reason: str) -> str:
    """One version's details and its loop audit record (or why there is none)."""
    details = _table(
        ["Aliases", "Status", "Rejected", "Run", "Source", "Metrics", "Tags"],
        [
            [
                _aliases(found["aliases"]),
                _e(found["status"]),
                _rejected(found["rejected"]),
                _e(found["run_id"] or ""),
                _e(found["source"] or ""),
                _pairs(found["metrics"]),
                _pairs(found["tags"]),
            ]
        ],
    )
    if not stages:
        audit = f'<p class="empty">No audit record{": " + _e(reason) if reason else "."}</p>'
    else:
        audit = "".join(
            f"<h3>{_e(stage.get('stage', ''))} <small>{_e(stage.get('at', ''))}</small></h3>"
            f"<pre>{_e(json.dumps(stage.get('record'), indent=2, sort_keys=True, default=str))}</pre>"
            for stage in stages
        )
    return details + "<h2>Loop audit</h2>" + audit


def _file_link(root: str, relative: str, label: str) -> str:
    return f'<a href="{_href(root, FILES_ROUTE + "/" + quote(relative))}">{_e(label)}</a>'


def rollouts(root: str, reports: dict[str, list[dict[str, Any]]]) -> str:
    if not reports:
        return '<p class="empty">No rollout reports.</p>'
    sections = []
    for deployment, items in reports.items():
        sections.append(f"<h2>{_e(deployment)}</h2>")
        for report in items:
            if "error" in report:
                sections.append(error(report["error"]))
                continue
            steps = [
                [
                    _e(step.get("kind", "canary")),
                    _e(step.get("weight", "")),
                    # A shadow step mirrors a share of requests to the challenger; its answers are dropped.
                    _e(step.get("mirror", "")),
                    _verdict(step.get("verdict", "")),
                    "<br>".join(_e(reason) for reason in step.get("reasons", [])),
                    _e(step.get("started", "")),
                    _e(step.get("ended", "")),
                ]
                for step in report.get("steps", [])
            ]
            # A rollout under way has a phase and no decision yet.
            outcome = report.get("decision") or report.get("phase", "")
            sections.append(
                f"<p>Model {_e(report.get('model_name', ''))}: champion {_e(report.get('champion', ''))}, "
                f"challenger {_e(report.get('challenger', ''))}; {_verdict(outcome)}"
                f" ({_e(report.get('started', ''))} to {_e(report.get('ended', ''))}) "
                + _file_link(root, f"rollouts/{deployment}/{report['file']}", "JSON")
                + "</p>"
                + _table(["Step", "Traffic %", "Mirrored %", "Verdict", "Reasons", "Started", "Ended"], steps)
            )
    return "".join(sections)


def drift(root: str, reports: dict[str, list[dict[str, Any]]]) -> str:
    if not reports:
        return '<p class="empty">No drift reports.</p>'
    sections = []
    for model, items in reports.items():
        sections.append(f"<h2>{_e(model)}</h2>")
        rows = []
        for report in items:
            link = ""
            if report["has_html"]:
                link = _file_link(root, f"drift/{model}/{report['at']}/report.html", "report")
            rows.append(
                [
                    _e(report["at"]),
                    _verdict(report.get("verdict", report.get("error", ""))),
                    _e(report.get("severity", "")),
                    _e(report.get("n_reference", "")),
                    _e(report.get("n_current", "")),
                    link,
                ]
            )
        sections.append(_table(["At", "Verdict", "Severity", "Reference rows", "Current rows", ""], rows))
        latest = items[0] if items else {}
        features = [
            [
                _e(feature),
                _e(stats.get("statistic", "")),
                _e(stats.get("p_value", "")),
                '<span class="bad">drift</span>' if stats.get("drift") else "",
            ]
            for feature, stats in latest.get("features", {}).items()
        ]
        if features:
            sections.append(
                f"<h3>Features at {_e(latest['at'])}</h3>"
                + _table(["Feature", "Statistic", "p-value", "Drift"], features)
            )
    return "".join(sections)
