"""
Feature platform: register the feature repo with Feast and keep its online store current.

Each run applies the repo's definitions (idempotent) and materialises every online feature view
incrementally, from where the previous run ended up to now, so that serving can look features up
by entity key. ``airloop_loop`` with ``source=feast`` builds its training sets from the same store.
The ``feast_default`` connection names the repo; without it, the reference repo in ``features/``
runs on the embedded Feast store under AIRLOOP_HOME.
"""

from __future__ import annotations

from airflow.sdk import dag

from airloop.operators.feast import FeastApplyRepoOperator, FeastMaterializeFeaturesOperator


@dag(
    dag_id="airloop_features",
    schedule="@hourly",
    catchup=False,
    max_active_runs=1,
    tags=["airloop"],
    doc_md=__doc__,
)
def airloop_features():
    FeastApplyRepoOperator(task_id="apply") >> FeastMaterializeFeaturesOperator(task_id="materialize")


airloop_features()
