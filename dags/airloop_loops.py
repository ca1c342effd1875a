"""
Every loop spec in a folder, as its two DAGs: ``<name>_loop`` (a retraining turn, scheduled by the
loop's drift Asset) and ``<name>_drift_monitor``. The folder is ``$AIRLOOP_LOOPS_DIR``, else
``loops/`` beside this file; ``airloop init DATA --label COLUMN`` drafts a spec and its suite there.
A spec that does not validate fails this file with an import error naming the spec and the field
(`airloop loops check FOLDER` says the same before a commit). See docs/loops.md.

(Airflow's DAG processor skips files that mention neither "airflow" nor "dag": this one does.)
"""

from __future__ import annotations

import os
from pathlib import Path

from airloop.loops.dags import folder_dags

FOLDER = os.environ.get("AIRLOOP_LOOPS_DIR", str(Path(__file__).parent / "loops"))

globals().update(folder_dags(FOLDER))
