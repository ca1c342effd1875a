"""Feast: the feature store that training sets are built from and online features are served by."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from airflow.sdk import conf

from airloop import settings
from airloop.hooks.base import EmbeddedDefaultHook

if TYPE_CHECKING:
    from feast import FeatureStore

    from airloop.feast_store import StoreConfig

# The reference feature repo, next to the reference DAGs.
EMBEDDED_REPO = "features"


class FeastHook(EmbeddedDefaultHook):
    """
    Opens a Feast feature store (``feast.FeatureStore``) described by a ``feast`` connection.

    The connection's form is declared in provider.yaml. Its ``extra`` holds ``repo_path`` (the
    feature repo: definitions and, unless given apart, ``feature_store.yaml``) and/or
    ``feature_store_yaml``; ``online_store`` and ``offline_store`` replace those blocks of the YAML
    (e.g. ``{"type": "redis", "connection_string": "redis:6379"}``).
    Without a ``feast_default`` connection the hook uses the embedded default: the reference repo in
    ``<dags folder>/features`` on Feast's local provider (file offline store, SQLite online store)
    under ``AIRLOOP_HOME``.

    :param feast_conn_id: Airflow connection of type ``feast``.
    """

    conn_name_attr = "feast_conn_id"
    default_conn_name = "feast_default"
    conn_type = "feast"
    hook_name = "Feast feature store"

    def __init__(self, feast_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.feast_conn_id = feast_conn_id

    @cached_property
    def store_config(self) -> StoreConfig:
        """What a step needs to open the store, as plain values."""
        from airloop.feast_store import embedded_config, store_config

        conn = self.connection_or_none(self.feast_conn_id)
        if conn is None:
            repo = Path(conf.get("core", "dags_folder")) / EMBEDDED_REPO
            settings.feast_dir().mkdir(parents=True, exist_ok=True)
            return {"repo_path": str(repo), "config": embedded_config(settings.feast_dir())}
        extra = dict(conn.extra_dejson)
        overrides = {key: extra.pop(key) for key in ("online_store", "offline_store") if key in extra}
        try:
            return store_config(extra.get("repo_path"), extra.get("feature_store_yaml"), overrides)
        except ValueError as exc:
            raise ValueError(f"connection {self.feast_conn_id!r}: {exc}") from exc

    @cached_property
    def store(self) -> FeatureStore:
        from airloop.feast_store import feature_store

        return feature_store(self.store_config)

    def get_conn(self) -> FeatureStore:
        return self.store

    def test_connection(self) -> tuple[bool, str]:
        try:
            views = sorted(view.name for view in self.store.list_feature_views())
        except Exception as e:
            return False, f"Feast store of connection {self.feast_conn_id!r} did not open: {e}"
        return True, f"Feast project {self.store.project!r}: feature views {views}"
