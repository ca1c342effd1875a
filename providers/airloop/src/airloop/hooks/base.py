"""What Airloop's hooks share: the embedded default stands in for a missing default connection."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException


class EmbeddedDefaultHook(BaseHook):
    """A hook whose default connection may be absent: then the embedded default is used."""

    default_conn_name: str  # each hook names its own, as Airflow hooks do

    def connection_or_none(self, conn_id: str) -> Any:
        """The connection, or None when the default one is not defined (any other missing id raises)."""
        try:
            return self.get_connection(conn_id)
        except AirflowNotFoundException:
            if conn_id != self.default_conn_name:
                raise
            self.log.info("No %r connection: using the embedded default", conn_id)
            return None
