"""Online features for prediction requests that carry only entity keys, from Feast's feature server.

When a serving target is configured with ``features``, a client may send entity keys instead of
features, ``{"data": {"names": ["observation_id"], "ndarray": [[17], [42]]}}``: the gateway asks a
Feast feature server (``feast serve``, ``POST /get-online-features``) for the configured features of
those entities and forwards them to the model in the configured order, the order the model was
trained on (the model checks the names against its manifest and refuses any other order).

Configuration, in the serving connection's extra: ``"features": {"url": "http://feast:6566",
"entities": ["observation_id"], "features": ["observations:f0", ...]}``.

The lookup goes over HTTP, not through Feast's SDK: Feast needs numpy 2 and the serving runtime
numpy<2, and a feature server scales apart from the gateway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

PRESENT = "PRESENT"


class FeatureLookupError(Exception):
    """A lookup that failed; ``code`` is the HTTP status the gateway answers with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FeatureLookup:
    url: str
    entities: tuple[str, ...]
    features: tuple[str, ...]

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> FeatureLookup | None:
        """The lookup a serving target's ``features`` option describes; None without one."""
        if not config:
            return None
        if not isinstance(config, dict) or not {"url", "entities", "features"} <= config.keys():
            raise ValueError(f"features must be {{'url', 'entities', 'features'}}, got {config!r}")
        url, entities, features = config["url"], config["entities"], config["features"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"features.url must be the feature server's http(s) URL, got {url!r}")
        for name, value in (("entities", entities), ("features", features)):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"features.{name} must be a non-empty list of names, got {value!r}")
        short = [ref.rpartition(":")[2] for ref in features]
        if not all(":" in ref for ref in features) or len(set(short)) != len(short):
            raise ValueError(
                f"features.features must be distinct 'view:feature' references, got {features!r}"
            )
        return cls(url.rstrip("/"), tuple(entities), tuple(features))

    @property
    def names(self) -> list[str]:
        """Feature names as the model knows them (Feast's names without the view)."""
        return [ref.rpartition(":")[2] for ref in self.features]

    def wants(self, names: list[str] | None) -> bool:
        """Whether a request's columns are entity keys, so its features must be looked up."""
        return bool(names) and set(names or ()) <= set(self.entities)

    async def enrich(
        self, session: aiohttp.ClientSession, names: list[str], rows: list[list[Any]]
    ) -> tuple[list[str], list[list[Any]], bytes]:
        """Entity key rows -> (feature names, feature rows, the request body to forward)."""
        if (
            set(names) != set(self.entities)
            or not isinstance(rows, list)
            or not all(isinstance(row, list) and len(row) == len(names) for row in rows)
        ):
            raise FeatureLookupError(
                400,
                f"expected rows of the entity keys {list(self.entities)}, "
                f"got names {names} and rows {rows!r:.200}",
            )
        keys = {name: [row[i] for row in rows] for i, name in enumerate(names)}
        request = {"features": list(self.features), "entities": keys}
        try:
            async with session.post(f"{self.url}/get-online-features", json=request) as answer:
                text = await answer.text()
                if answer.status != 200:
                    raise FeatureLookupError(
                        502, f"feature server {self.url} answered {answer.status}: {text[:300]}"
                    )
                found = json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise FeatureLookupError(
                504 if isinstance(exc, TimeoutError) else 502, f"feature server {self.url}: {exc!r}"
            ) from exc
        feature_rows = self._rows(found, keys, len(rows))
        body = json.dumps({"data": {"names": self.names, "ndarray": feature_rows}}, separators=(",", ":"))
        return self.names, feature_rows, body.encode()

    def _rows(self, found: dict[str, Any], keys: dict[str, list[Any]], n: int) -> list[list[Any]]:
        """The answer's columns put in the model's order; every value must be present."""
        try:
            columns = dict(zip(found["metadata"]["feature_names"], found["results"], strict=True))
            ordered = [columns[name] for name in self.names]
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureLookupError(
                502, f"feature server {self.url} answered without the features {self.names}: {exc!r}"
            ) from exc
        missing = sorted(
            {i for column in ordered for i, status in enumerate(column["statuses"][:n]) if status != PRESENT}
        )
        if missing:
            where = [{name: values[i] for name, values in keys.items()} for i in missing[:5]]
            raise FeatureLookupError(
                404,
                f"no online features for {len(missing)} of {n} rows, e.g. {where}: "
                "unknown entities, or their feature views are not materialised",
            )
        return [[column["values"][i] for column in ordered] for i in range(n)]
