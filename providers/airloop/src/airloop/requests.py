"""One typed request per step: a frozen dataclass next to the step, with every default in one place.

The operator builds the request (its arguments carry the same names), it crosses a runtime hop as a
plain dict (``to_dict``) and the step reads it back with ``parse``, which names any unknown or
missing field. Only the standard library is imported here, so operator modules can import requests
at the top without slowing DAG parsing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """Base of every step's request."""

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON-able values, for a runtime hop or a pod."""
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, request: Mapping[str, Any] | Self) -> Self:
        """The request from a dict (or itself); ValueError names unknown and missing fields."""
        if isinstance(request, cls):
            return request
        if not isinstance(request, Mapping):
            raise ValueError(f"{cls.__name__} must be a mapping, got {type(request).__name__}")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(request) - fields.keys())
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(fields)}")
        missing = [
            name
            for name, field in fields.items()
            if name not in request
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"{cls.__name__}: missing required field(s) {missing}")
        return cls(**request)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)
