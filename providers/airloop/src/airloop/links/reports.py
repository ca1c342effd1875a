"""Links to the reports Airloop writes to the artefact store, served by the Airloop UI plugin."""

from __future__ import annotations

from typing import Any

from airloop.links.base import AirloopLink, artefact_url


class _ArtefactLink(AirloopLink):
    def format_link(self, *, path: str, **_: Any) -> str:
        return artefact_url(path)


class DataDocsLink(_ArtefactLink):
    name = "Data Docs"
    key = "airloop_data_docs"


class DriftReportLink(_ArtefactLink):
    name = "Drift report"
    key = "airloop_drift_report"


class RolloutReportLink(_ArtefactLink):
    name = "Rollout report"
    key = "airloop_rollout_report"
