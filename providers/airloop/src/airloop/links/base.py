"""One pattern for every extra link: the operator persists a few values, the link formats a URL.

As in the amazon provider's links (``return_on_error``), a link never raises: a missing or unusable
value yields "", which Airflow shows as no link, never as an error on the task page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import XCom
from airflow.sdk import BaseOperatorLink

from airloop.plugins.ui import FILES_ROUTE, URL_PREFIX

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskInstanceKey
    from airflow.sdk import BaseOperator, Context


log = logging.getLogger(__name__)


class AirloopLink(BaseOperatorLink):
    """Subclasses set ``name``, ``key`` and ``format_link``; operators call ``persist`` in ``execute``."""

    name: ClassVar[str]
    key: ClassVar[str]
    # Keyword arguments: the values ``persist`` stored; each link names the ones it needs.
    format_link: Callable[..., str]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        try:
            values = XCom.get_value(key=self.key, ti_key=ti_key)
            return self.format_link(**values) if values else ""
        except Exception:  # the link is optional; the task it decorates is not
            log.debug("No %r link for %s", self.name, ti_key, exc_info=True)
            return ""

    @classmethod
    def persist(cls, context: Context, **values: Any) -> None:
        context["ti"].xcom_push(key=cls.key, value=values)


def ui_base_url() -> str:
    """Where the Airflow UI (and so the Airloop plugin) is served."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "http://localhost:8080").rstrip("/")


def artefact_url(path: str) -> str:
    """URL of an artefact-store file through the Airloop UI plugin (browsers refuse file:// links)."""
    return f"{ui_base_url()}{URL_PREFIX}{FILES_ROUTE}/{path.lstrip('/')}"
