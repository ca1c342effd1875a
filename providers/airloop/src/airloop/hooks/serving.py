"""Where models are served: the local serving target, Seldon Core or KServe on Kubernetes."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from airloop.hooks.base import EmbeddedDefaultHook

if TYPE_CHECKING:
    from airloop.serving.base import ServingTarget


class ServingHook(EmbeddedDefaultHook):
    """
    Gives operators and triggers a serving target (``airloop.serving.base.ServingTarget``).

    ``extra`` holds ``{"target": "local" | "seldon" | "kserve", ...target options}``; the password is
    the local gateway's admin token. The local target's ``server`` picks its model server:
    ``"seldon"`` (Seldon's wrapper, the default) or ``"mlserver"`` (MLServer over the V2 protocol, with
    adaptive batching through ``max_batch_size`` and ``max_batch_time``). Without an
    ``airloop_serving_default`` connection the hook uses the local target under ``AIRLOOP_HOME``.

    :param serving_conn_id: Airflow connection of type ``airloop_serving``.
    """

    conn_name_attr = "serving_conn_id"
    default_conn_name = "airloop_serving_default"
    conn_type = "airloop_serving"
    hook_name = "Airloop serving target"

    def __init__(self, serving_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.serving_conn_id = serving_conn_id

    @cached_property
    def target_config(self) -> dict[str, Any]:
        conn = self.connection_or_none(self.serving_conn_id)
        # Fields left empty in the connection form arrive as None: the target's defaults apply.
        extra = {
            key: value for key, value in (conn.extra_dejson if conn else {}).items() if value is not None
        }
        extra.setdefault("target", "local")
        return extra

    @cached_property
    def target(self) -> ServingTarget:
        from airloop.serving.base import get_target

        options = dict(self.target_config)
        kind = options.pop("target")
        conn = self.connection_or_none(self.serving_conn_id)
        if kind == "local" and conn is not None and conn.password:
            # Not in target_config, which a trigger serialises into Airflow's database.
            options["admin_token"] = conn.password
        return get_target(kind, **options)

    def get_conn(self) -> ServingTarget:
        return self.target

    def test_connection(self) -> tuple[bool, str]:
        try:
            target = self.target
        except Exception as e:
            return False, str(e)
        return True, f"Serving target {type(target).__name__} is ready"
