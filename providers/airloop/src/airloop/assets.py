"""The Assets that connect Airloop's DAGs (data-aware scheduling)."""

from __future__ import annotations

from airflow.sdk import Asset


def drift_asset(model_name: str) -> Asset:
    """Updated when the drift monitor asks for ``model_name`` to be retrained."""
    return Asset(name=f"airloop_drift__{model_name}", uri=f"airloop://drift/{model_name}", group="airloop")
