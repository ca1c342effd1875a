"""Entry point Airflow reads (``apache_airflow_provider``); provider.yaml is the source of truth."""

from __future__ import annotations

from importlib import resources
from importlib.metadata import version


def get_provider_info() -> dict:
    import yaml  # Airflow depends on PyYAML

    # A fresh dict each call: Airflow's providers manager adds keys to the one it gets.
    info = yaml.safe_load(resources.files("airloop").joinpath("provider.yaml").read_text())
    info["versions"] = [version("airflow-provider-airloop")]
    return info
