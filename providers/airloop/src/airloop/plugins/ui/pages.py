"""The Airloop pages as HTML: every value is escaped here; hrefs into the app are built from its mount
path, hrefs into Airflow from ``[api] base_url``.

Values are written for people: three significant figures, rates as percentages, times as dates
(UTC, with the exact instant in ``<time datetime>``), paths the app serves as links. The data API
keeps the raw values.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from airloop.plugins.ui import FILES_ROUTE, base_path
from airloop.plugins.ui.sources import (
    AuditView,
    DagRun,
    ModelRecord,
    Problem,
    ServingStatus,
    VersionRecord,
)

STYLESHEET = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1f2933; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #cbd2d9; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f0f4f8; }
table.record { margin: 0; }
.alias { background: #e3f8ff; border-radius: 0.3rem; padding: 0 0.4rem; margin-right: 0.2rem; }
.bad { color: #ab091e; font-weight: bold; }
.good { color: #0e7c3a; font-weight: bold; }
.empty { color: #7b8794; }
.banner { background: #ffe3e3; border: 1px solid #ab091e; border-radius: 0.3rem; padding: 0.6rem 1rem;
  margin: 0.5rem 0 1rem; }
pre { background: #f5f7fa; padding: 0.6rem; overflow-x: auto; }
"""
STYLESHEET_PATH = "/static/airloop.css"

VERDICT_CSS = {
    **dict.fromkeys(("pass", "promoted", "no_drift"), "good"),
    **dict.fromkeys(("fail", "rolled_back", "drift", "invalid_window"), "bad"),
}
# Metrics that are shares of rows (the last word of the name): shown as percentages.
RATES = {"accuracy", "precision", "recall", "rate", "share", "agreement"}
# Record keys that hold times: shown as dates.
TIMES = {"at", "started", "ended", "created", "updated", "time", "timestamp"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(root: str, path: str) -> str:
    return _e(root + path)


def _three(value: float) -> str:
    """Three significant figures; thousands and more whole, with separators."""
    rounded = float(f"{value:.3g}")
    if abs(rounded) >= 1000:
        return f"{rounded:,.0f}"
    return f"{rounded:#.3g}".rstrip(".")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def number(value: Any) -> str:
    """Whole numbers whole (with thousands separators), others to three significant figures."""
    if not _finite(value):
        return str(value)
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return _three(value)


def percent(value: Any) -> str:
    """A share (0.953) as a percentage to three significant figures (95.3 %)."""
    return f"{_three(value * 100)} %" if _finite(value) else str(value)


def is_rate(name: str) -> bool:
    return name.lower().replace(".", "_").rsplit("_", 1)[-1] in RATES


def metric(name: str, value: Any) -> str:
    return percent(value) if is_rate(name) else number(value)


def moment(value: Any, *, milliseconds: bool = False) -> datetime | None:
    """An ISO string (also ``20260201T000000Z``), epoch seconds or, with ``milliseconds``, MLflow's
    epoch milliseconds, as an aware datetime (naive times are UTC); None if it is none of these."""
    try:
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            found = datetime.fromtimestamp(value / 1000 if milliseconds else value, UTC)
        elif isinstance(value, str) and value:
            found = datetime.fromisoformat(value)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return found if found.tzinfo else found.replace(tzinfo=UTC)


def when(value: Any, *, milliseconds: bool = False) -> str:
    """A time as a date for people, in UTC; the value itself if it is not a time."""
    found = moment(value, milliseconds=milliseconds)
    if found is None:
        return _e(value if value is not None else "")
    utc = found.astimezone(UTC)
    return f'<time datetime="{_e(utc.isoformat())}">{utc:%Y-%m-%d %H:%M:%S} UTC</time>'


def _rejected(flag: bool) -> str:
    return '<span class="bad">rejected</span>' if flag else ""


def _aliases(names: list[str]) -> str:
    return "".join(f'<span class="alias">{_e(name)}</span>' for name in names)


def _pairs(mapping: Mapping[str, Any], *, metrics: bool = False) -> str:
    if not mapping:
        return '<span class="empty">none</span>'
    show = metric if metrics else (lambda _, value: str(value))
    return "<br>".join(f"{_e(key)} = {_e(show(key, value))}" for key, value in mapping.items())


def _verdict(value: Any) -> str:
    return f'<span class="{VERDICT_CSS.get(str(value), "")}">{_e(value)}</span>'


def _table(headers: list[str] | None, rows: list[list[str]], css: str = "") -> str:
    """A table of already-escaped cells (``headers`` None: rows of key and value, no header)."""
    head = "".join(f"<th>{_e(header)}</th>" for header in headers or [])
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    klass = f' class="{css}"' if css else ""
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    return f"<table{klass}>{thead}<tbody>{body}</tbody></table>"


def banner(problem: Problem) -> str:
    """A backing service that did not answer, at the top of the page."""
    service, detail = _e(problem["service"]), _e(problem["detail"])
    return f'<div class="banner" role="alert"><strong>{service}</strong>: {detail}</div>'


def page(root: str, title: str, body: str, problems: Sequence[Problem] = ()) -> str:
    """A whole document around ``body`` (already escaped), for the app mounted at ``root``."""
    nav = " ".join(
        f'<a href="{_href(root, path)}">{_e(label)}</a>'
        for path, label in (("/models", "Models"), ("/rollouts", "Rollouts"), ("/drift", "Drift"))
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Airloop: {_e(title)}</title>"
        f'<link rel="stylesheet" href="{_href(root, STYLESHEET_PATH)}"></head>'
        f"<body><nav>{nav}</nav><h1>{_e(title)}</h1>{''.join(map(banner, problems))}{body}</body></html>"
    )


def error(message: Any) -> str:
    return f'<p class="bad">{_e(message)}</p>'


def _version_link(root: str, name: str, version: str) -> str:
    path = f"/models/{quote(name, safe='')}/versions/{quote(version, safe='')}"
    return f'<a href="{_href(root, path)}">{_e(version)}</a>'


def _elsewhere(url: str, label: str) -> str:
    # MLflow refuses to be framed: its pages open in a tab of their own.
    return f'<a href="{_e(url)}" target="_blank" rel="noopener noreferrer">{_e(label)}</a>'


def _dag_run(run: DagRun) -> str:
    path = f"{base_path()}/dags/{quote(run['dag_id'], safe='')}/runs/{quote(run['run_id'], safe='')}"
    # Airflow's own page, out of the frame the Airloop page may be shown in.
    return f'<a href="{_e(path)}" target="_top">DAG run</a>'


def _links(found: VersionRecord) -> str:
    links = [_elsewhere(found["mlflow_version_url"], "MLflow version")]
    if found["mlflow_run_url"]:
        links.append(_elsewhere(found["mlflow_run_url"], "MLflow run"))
    if found["dag_run"]:
        links.append(_dag_run(found["dag_run"]))
    return "<br>".join(links)


VERSION_COLUMNS = ["Version", "Aliases", "Status", "Rejected", "Created", "Metrics", "Links", "Tags"]


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
                when(v["created"], milliseconds=True),
                _pairs(v["metrics"], metrics=True),
                _links(v),
                _pairs(v["tags"]),
            ]
            for v in model["versions"]
        ]
        sections.append(
            f"<h2>{_e(model['name'])}</h2><p>{_e(model['description'])}</p>"
            f"<p>Aliases: {_pairs(model['aliases'])}</p><p>Tags: {_pairs(model['tags'])}</p>"
            + _table(VERSION_COLUMNS, rows)
        )
    return "".join(sections)


def _file_link(root: str, relative: str, label: str) -> str:
    return f'<a href="{_href(root, FILES_ROUTE + "/" + quote(relative))}">{_e(label)}</a>'


def record(root: str, value: Any, files: Mapping[str, str], key: str = "") -> str:
    """An audit record for people: mappings and lists of mappings as tables, numbers and times
    formatted by their key, strings that name a file the app serves as links to it."""
    if isinstance(value, Mapping):
        if not value:
            return '<span class="empty">none</span>'
        rows = [[_e(k), record(root, v, files, str(k))] for k, v in value.items()]
        return _table(None, rows, "record")
    if isinstance(value, list):
        if value and all(isinstance(item, Mapping) for item in value):
            headers = list(dict.fromkeys(k for item in value for k in item))
            rows = [[record(root, item.get(h, ""), files, h) for h in headers] for item in value]
            return _table(headers, rows, "record")
        return ", ".join(record(root, item, files, key) for item in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return '<span class="empty">none</span>'
    if key in TIMES or key.endswith(("_at", "_time")):
        return when(value)
    if isinstance(value, int | float):
        return _e(metric(key, value))
    if isinstance(value, str) and value in files:
        return _file_link(root, files[value], value)
    return _e(value)


def version(root: str, found: VersionRecord, audit: AuditView) -> str:
    """One version's details and its loop audit record (or why there is none)."""
    details = _table(
        ["Aliases", "Status", "Rejected", "Created", "Run", "Source", "Metrics", "Links", "Tags"],
        [
            [
                _aliases(found["aliases"]),
                _e(found["status"]),
                _rejected(found["rejected"]),
                when(found["created"], milliseconds=True),
                _e(found["run_id"] or ""),
                _e(found["source"] or ""),
                _pairs(found["metrics"], metrics=True),
                _links(found),
                _pairs(found["tags"]),
            ]
        ],
    )
    if audit["problem"]:
        trail = banner(audit["problem"])
    elif not audit["stages"]:
        note = audit["note"]
        trail = f'<p class="empty">No audit record{": " + _e(note) if note else "."}</p>'
    else:
        trail = "".join(
            f"<h3>{_e(stage.get('stage', ''))} <small>{when(stage.get('at'))}</small></h3>"
            + record(root, stage.get("record"), audit["files"])
            for stage in audit["stages"]
        )
    return details + "<h2>Loop audit</h2>" + trail


def _serving(status: ServingStatus) -> str:
    """What the serving target serves now for one deployment."""
    if status["note"]:
        return f'<p class="empty">Not served now: {_e(status["note"])}</p>'
    if not status["deployed"]:
        return ""  # the target did not answer: the banner at the top says so
    rows = [
        [
            _e(name),
            _e(p["model_version"]),
            _e(p["weight"]),
            "shadow" if p["shadow"] else "live",
            '<span class="good">yes</span>' if p["healthy"] else '<span class="bad">no</span>',
            _e(number(p["requests"])) if p["requests"] is not None else "",
            _e(number(p["errors"])) if p["errors"] is not None else "",
            _e(percent(p["accuracy"])) if p["accuracy"] is not None else "",
        ]
        for name, p in status["predictors"].items()
    ]
    headers = ["Predictor", "Version", "Traffic %", "Role", "Healthy", "Requests", "Errors", "Live accuracy"]
    return f"<h3>Serving now ({_e(status['target'])} target)</h3>" + _table(headers, rows)


def rollouts(root: str, reports: dict[str, list[dict[str, Any]]], live: Sequence[ServingStatus] = ()) -> str:
    if not reports:
        return '<p class="empty">No rollout reports.</p>'
    now = {status["deployment"]: status for status in live}
    sections = []
    for deployment, items in reports.items():
        sections.append(f"<h2>{_e(deployment)}</h2>")
        if deployment in now:
            sections.append(_serving(now[deployment]))
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
                    when(step.get("started")),
                    when(step.get("ended")),
                ]
                for step in report.get("steps", [])
            ]
            # A rollout under way has a phase and no decision yet.
            outcome = report.get("decision") or report.get("phase", "")
            sections.append(
                f"<p>Model {_e(report.get('model_name', ''))}: champion {_e(report.get('champion', ''))}, "
                f"challenger {_e(report.get('challenger', ''))}; {_verdict(outcome)}"
                f" ({when(report.get('started'))} to {when(report.get('ended'))}) "
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
                    when(report["at"]),
                    _verdict(report.get("verdict", report.get("error", ""))),
                    _e(report.get("severity", "")),
                    _e(number(report.get("n_reference", ""))),
                    _e(number(report.get("n_current", ""))),
                    link,
                ]
            )
        sections.append(_table(["At", "Verdict", "Severity", "Reference rows", "Current rows", ""], rows))
        latest = items[0] if items else {}
        features = [
            [
                _e(feature),
                _e(number(stats.get("statistic", ""))),
                _e(number(stats.get("p_value", ""))),
                '<span class="bad">drift</span>' if stats.get("drift") else "",
            ]
            for feature, stats in latest.get("features", {}).items()
        ]
        if features:
            sections.append(
                f"<h3>Features at {when(latest['at'])}</h3>"
                + _table(["Feature", "Statistic", "p-value", "Drift"], features)
            )
    return "".join(sections)
