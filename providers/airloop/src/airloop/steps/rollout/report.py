"""The rollout report: one JSON file per attempt (``RolloutReport``), and what the task's result and the
loop's audit record keep of it.

Files: ``<root>/rollouts/<deployment>/<model>-v<version>.json`` for the first attempt, then
``<model>-v<version>-attempt-<n>.json``: a later attempt never overwrites an earlier one's report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from airloop.steps.rollout.requests import (
    AuditStep,
    EarlierAttempt,
    ResultStep,
    RolloutAuditRecord,
    RolloutReport,
    RolloutResult,
)

REPORTS = "rollouts"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Folder(Protocol):
    """Where reports are kept: a ``pathlib.Path`` or Airflow's ``ObjectStoragePath`` (the artefact root)."""

    @property
    def name(self) -> str: ...

    def __truediv__(self, key: str) -> Folder: ...

    def exists(self) -> bool: ...

    def iterdir(self) -> Iterable[Folder]: ...

    def mkdir(self, *, parents: bool = ..., exist_ok: bool = ...) -> None: ...

    def read_text(self) -> str: ...

    def write_text(self, data: str) -> int: ...

    def replace(self, target: Any) -> Any: ...


class Reports:
    """The reports of the rollouts of one model version to one deployment, under ``root``."""

    def __init__(self, root: Folder, deployment: str, model_name: str, version: str) -> None:
        self.root = root
        self.folder = f"{REPORTS}/{deployment}"
        self.stem = f"{model_name}-v{version}"

    def path(self, attempt: int | None = None) -> str:
        """The report of ``attempt``, relative to the root; by default the latest (the first when none)."""
        attempt = attempt or max(self.attempts(), default=1)
        suffix = "" if attempt == 1 else f"-attempt-{attempt}"
        return f"{self.folder}/{self.stem}{suffix}.json"

    def attempts(self) -> list[int]:
        folder = self.root / self.folder
        if not folder.exists():
            return []
        pattern = re.compile(re.escape(self.stem) + r"(?:-attempt-(\d+))?\.json")
        return sorted(int(m.group(1) or 1) for p in folder.iterdir() if (m := pattern.fullmatch(p.name)))

    def load(self, attempt: int | None = None) -> RolloutReport | None:
        """The report of ``attempt``, by default the latest; ``None`` when there is none."""
        path = self.root / self.path(attempt)
        return cast(RolloutReport, json.loads(path.read_text())) if path.exists() else None

    def save(self, report: RolloutReport) -> None:
        folder = self.root / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        name = self.path(report["attempt"]).rpartition("/")[2]
        staging = folder / f"{name}.tmp"
        staging.write_text(json.dumps(report, indent=2, default=str))
        staging.replace(folder / name)  # a kill mid-write leaves the last complete report


def result(report: RolloutReport, path: str) -> RolloutResult:
    """The task's result for a report that is done or awaiting approval."""
    version = report["challenger"]
    decision = report["decision"] or report["phase"]  # awaiting_approval
    done: RolloutResult = {"decision": decision, "report": path}
    if decision == "deployed":
        done["champion"] = version
    elif decision == "promoted":
        done.update({"champion": version, "previous": str(report["champion"]), "steps": result_steps(report)})
    elif decision == "awaiting_approval":
        done.update(
            {"champion": str(report["champion"]), "challenger": version, "steps": result_steps(report)}
        )
    else:
        last = report["steps"][-1] if report["steps"] else None
        where = f"{last['kind']} {last['weight']}%" if last else "deployment"
        if decision == "rolled_back":
            verdict, reasons = (last.get("verdict"), last.get("reasons", [])) if last else (None, [])
            done["message"] = f"v{version} rolled back at {where} ({verdict}): " + "; ".join(reasons)
        else:
            done["message"] = (
                f"the rollout of v{version} was aborted at {where}: {report['reason']}; "
                f"v{report['champion']} serves all traffic"
            )
    return done


def result_steps(report: RolloutReport) -> list[ResultStep]:
    return [
        {"kind": s["kind"], "weight": s.get("weight"), "verdict": s.get("verdict")} for s in report["steps"]
    ]


def audit_record(report: RolloutReport, reports: Reports) -> RolloutAuditRecord:
    """The rollout stage of the loop's audit record: this attempt, and how the earlier ones ended."""
    earlier: list[EarlierAttempt] = []
    for attempt in range(1, report["attempt"]):
        old = reports.load(attempt)
        if old is not None:
            earlier.append(
                {
                    "attempt": attempt,
                    "report": reports.path(attempt),
                    "decision": old["decision"],
                    "reason": old.get("reason"),
                }
            )
    return {
        "decision": report["decision"] or report["phase"],
        "mode": report["mode"],
        "champion": report["champion"],
        "challenger": report["challenger"],
        "started": report["started"],
        "ended": report["ended"],
        "attempt": report["attempt"],
        "reason": report["reason"],
        "steps": audit_steps(report),
        "report": reports.path(report["attempt"]),
        "earlier": earlier,
    }


def audit_steps(report: RolloutReport) -> list[AuditStep]:
    """The steps as the audit record keeps them: what was decided and on which figures."""
    entries: list[AuditStep] = []
    for step in report["steps"]:
        entry: AuditStep = {"kind": step["kind"], "weight": step["weight"]}
        if "mirror" in step:
            entry["mirror"] = step["mirror"]
        if "verdict" in step:
            entry["verdict"] = step["verdict"]
        if "reasons" in step:
            entry["reasons"] = step["reasons"]
        if "by" in step:
            entry["by"] = step["by"]
        tests = step.get("tests") or {}
        if step["kind"] == "shadow" and tests:
            challenger: Mapping[str, Any] = step.get("challenger_stats") or {}
            champion: Mapping[str, Any] = step.get("champion_stats") or {}
            entry["diff"] = {
                "agreement": challenger.get("agreement"),
                "pairs": challenger.get("pairs"),
                "distribution_distance": tests.get("distribution", {}).get("distance"),
                "p99_ms": {"champion": champion.get("p99_ms"), "challenger": challenger.get("p99_ms")},
            }
        entries.append(entry)
    return entries
