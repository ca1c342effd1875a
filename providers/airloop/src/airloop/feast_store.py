"""A Feast store as plain values (``StoreConfig``) and the FeatureStore built from them: shared by the
feast hook and the Feast steps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from feast import FeatureStore


class StoreConfig(TypedDict):
    """What a step needs to open a store: the feature repo's folder and feature_store.yaml as a dict."""

    repo_path: str
    config: dict[str, Any]


def embedded_config(home: Path) -> dict[str, Any]:
    """The embedded default: Feast's local provider, file offline store, SQLite online store in ``home``."""
    return {
        "project": "airloop",
        "provider": "local",
        "registry": str(home / "registry.db"),
        "online_store": {"type": "sqlite", "path": str(home / "online.db")},
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }


def store_config(
    repo_path: str | None = None,
    feature_store_yaml: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> StoreConfig:
    """The store from a repo folder and/or its feature_store.yaml.

    The YAML defaults to ``<repo_path>/feature_store.yaml`` and the repo to the YAML's folder;
    ``${VAR}`` in it expands as Feast itself does. ``overrides`` (``online_store``, ``offline_store``)
    replace those blocks whole: a Redis online store shares no option with a SQLite one.
    """
    import yaml

    if feature_store_yaml:
        yaml_path = Path(feature_store_yaml)
        repo = Path(repo_path) if repo_path else yaml_path.parent
    elif repo_path:
        repo = Path(repo_path)
        yaml_path = repo / "feature_store.yaml"
    else:
        raise ValueError("a Feast store needs repo_path (the feature repo folder) or feature_store_yaml")
    if not repo.is_dir():
        raise ValueError(f"Feast repo_path {repo} is not a folder")
    if not yaml_path.is_file():
        raise ValueError(f"Feast configuration {yaml_path} does not exist")
    try:
        config = yaml.safe_load(os.path.expandvars(yaml_path.read_text()))
    except yaml.YAMLError as exc:
        raise ValueError(f"Feast configuration {yaml_path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict) or "project" not in config:
        raise ValueError(f"Feast configuration {yaml_path} must be a mapping with a 'project'")
    return {"repo_path": str(repo.resolve()), "config": _merged(config, overrides)}


def _merged(config: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(overrides or {}) - {"online_store", "offline_store"})
    if unknown:
        raise ValueError(f"only online_store and offline_store can be overridden, not {unknown}")
    return {**config, **(overrides or {})}


def feature_store(store: StoreConfig) -> FeatureStore:
    """A FeatureStore for ``store``; ValueError names a configuration Feast rejects."""
    from feast import FeatureStore, RepoConfig
    from pydantic import ValidationError

    try:
        config = RepoConfig(**store["config"])
    except ValidationError as exc:
        raise ValueError(f"invalid Feast configuration for repo {store['repo_path']}: {exc}") from exc
    config.repo_path = Path(store["repo_path"])  # relative source and registry paths resolve against it
    return FeatureStore(repo_path=store["repo_path"], config=config)
