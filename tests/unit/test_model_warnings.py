"""A model logged and loaded in a worker, where Airflow's modules are imported: skops asks every
imported module for the names it pickles, and Airflow's deprecated modules answer with warnings that
would fill the task log. Only warnings about the model itself may come out."""

from __future__ import annotations

import warnings

import airflow.utils.timezone  # noqa: F401  (one of Airflow's modules that warn of deprecated names)
import numpy as np
import pandas as pd

from airloop.steps.training.train import train
from airloop.tracking.models import load_model


def test_logging_and_loading_a_model_leaves_skops_lookups_out_of_the_log(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(200, 3)), columns=["a", "b", "c"])
    table["label"] = (table["a"] + table["b"] > 0).astype(int)
    table.to_parquet(tmp_path / "train.parquet")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trained = train(
            {
                "tracking_uri": tracking_uri,
                "data_uri": str(tmp_path / "train.parquet"),
                "experiment": "quiet",
                "artifact_root": (tmp_path / "artefacts").as_uri(),
                "estimator": "sklearn.linear_model.LogisticRegression",
            }
        )
        model = load_model(tracking_uri, trained["model_uri"])
    from_skops = [str(w.message) for w in seen if "skops" in w.filename]
    assert from_skops == [], from_skops[:3]
    assert set(model.predict(table[["a", "b", "c"]])) == {0, 1}
