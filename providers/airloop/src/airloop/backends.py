"""One registry idiom for every kind of pluggable backend (serving targets, drift detectors).

A backend is registered under a name as a class or as a lazy ``"module:Class"`` path, imported on
first use: the serving runtime imports this package for the model class but lacks what some targets
need (httpx), and a detector's library (alibi-detect) costs seconds to import. Every backend of a
kind subclasses the kind's base class and passes its public conformance suite
(``airloop.serving.checks.check_target``, ``airloop.steps.drift.checks.check_detector``).
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

from airloop import settings

T = TypeVar("T")


class Registry(Generic[T]):
    """Backends of one kind, by name: ``Registry(ServingTarget, "serving target")``."""

    # ``base`` is a plain ``type``: the bases are abstract, which ``type[T]`` would refuse (mypy's
    # type-abstract); declare the registry's type instead (``TARGETS: Registry[ServingTarget]``).
    def __init__(
        self,
        base: type,
        kind: str,
        entries: dict[str, type[T] | str] | None = None,
        business_source: frozenset[str] = frozenset(),
    ) -> None:
        self.base = base
        self.kind = kind
        self._entries: dict[str, type[T] | str] = dict(entries or {})
        # Backends under the Business Source License: refused in the licence-clean profile.
        self.business_source = business_source

    def register(self, name: str, cls: type[T] | str) -> None:
        """Add ``cls`` (a subclass of the base, or its ``"module:Class"`` path) under ``name``."""
        if not isinstance(cls, str) and not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is neither a {self.base.__name__} subclass nor a 'module:Class' path")
        known = self._entries.get(name)
        if known is not None and known != cls and _path(known) != _path(cls):
            raise ValueError(f"{self.kind} {name!r} is already registered as {_path(known)}")
        self._entries[name] = cls

    def available(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``, imported if it was registered by path."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}: choose one of {self.available()}")
        if name in self.business_source and settings.licence_clean():
            allowed = [n for n in self.available() if n not in self.business_source]
            raise ValueError(
                f"{self.kind} {name!r} is published under the Business Source License, which the "
                f"{settings.LICENCE_CLEAN} profile ({settings.PROFILE_ENV}) leaves out: choose one of "
                f"{allowed}"
            )
        entry = self._entries[name]
        if not isinstance(entry, str):
            return entry
        module, _, attribute = entry.partition(":")
        cls: type[T] = getattr(importlib.import_module(module), attribute)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{entry} registered as {self.kind} {name!r} is not a {self.base.__name__}")
        self._entries[name] = cls
        return cls


def _path(entry: type | str) -> str:
    return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"
