"""One pattern for every extra link: the operator persists a few values, the link formats a URL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import XCom
from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskInstanceKey
    from airflow.sdk import BaseOperator, Context


class AirloopLink(BaseOperatorLink):
    """Subclasses set ``name``, ``key`` and ``format_link``; operators call ``persist`` in ``execute``."""

    name: ClassVar[str]
    key: ClassVar[str]

    def format_link(self, **values: Any) -> str:
        raise NotImplementedError

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        values = XCom.get_value(key=self.key, ti_key=ti_key)
        return self.format_link(**values) if values else ""

    @classmethod
    def persist(cls, context: Context, **values: Any) -> None:
        context["ti"].xcom_push(key=cls.key, value=values)


def ui_base_url() -> str:
    """Where the Airflow UI (and so the Airloop plugin) is served."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "http://localhost:8080").rstrip("/")


def artefact_url(path: str) -> str:
    """URL of an artefact-store file through the Airloop UI plugin (browsers refuse file:// links)."""
    return f"{ui_base_url()}/airloop/files/{path.lstrip('/')}"
