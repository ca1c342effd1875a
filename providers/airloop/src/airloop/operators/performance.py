"""The performance monitor: how well the served models do while their labels are still coming."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Context

from airloop import artefacts, settings
from airloop.hooks.mlflow import MlflowHook
from airloop.operators.base import StepOperator
from airloop.operators.drift import monitored
from airloop.steps.drift.requests import Detection, PerformanceRequest, PerformanceResult

if TYPE_CHECKING:
    from airloop.labels import ServedRows

RUNTIME = "monitoring"
STEP = "airloop.steps.drift.performance:monitor"


class PerformanceMonitorOperator(StepOperator):
    """
    Judge the champion's performance over the last ``window_minutes`` of the requests the gateway
    logged for ``deployment``, from the labels that have matured and, for the rest, NannyML's
    confidence-based estimate (CBPE), plus drift of its predictions (``airloop.steps.drift.performance``,
    in the ``monitoring`` runtime). Each model version in the window is measured against its own
    reference: its served OpenVINO IR on its holdout.

    The result has the shape of a drift detection, so ``DriftDecideRetrainOperator`` turns a drop into
    a retrain with the same policy (severity ``high``: realized accuracy dropped; ``medium``: the
    estimate dropped clearly; ``low``: the predictions drifted). The report (every version's realized
    and estimated accuracy, its bounds, predicted-class shares) goes to
    ``performance/<model>/<time>/report.json`` in the artefact store, and the champion's run gets the
    metrics ``performance.realized_accuracy``, ``performance.estimated_accuracy`` (one step per check).

    :param model_name: registered model whose ``champion`` is judged.
    :param deployment: the serving deployment whose request and labels logs are read.
    :param window_minutes: how far back to read.
    :param max_drop: accuracy the champion may lose against its reference before it counts as a drop.
    :param min_rows: fewest served rows to judge; ``min_labels``: fewest matured labels for the realized
        accuracy to count.
    """

    template_fields: Sequence[str] = (
        "model_name",
        "deployment",
        "window_minutes",
        "max_drop",
        "min_rows",
        "min_labels",
    )

    def __init__(
        self,
        *,
        model_name: str,
        deployment: str = "airloop",
        window_minutes: float = 60,
        max_drop: float = PerformanceRequest.max_drop,
        min_rows: int = PerformanceRequest.min_rows,
        min_labels: int = PerformanceRequest.min_labels,
        mlflow_conn_id: str = MlflowHook.default_conn_name,
        runtime: str = RUNTIME,
        **kwargs: Any,
    ) -> None:
        super().__init__(runtime=runtime, **kwargs)
        self.model_name = model_name
        self.deployment = deployment
        self.window_minutes = window_minutes
        self.max_drop = max_drop
        self.min_rows = min_rows
        self.min_labels = min_labels
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> Detection:
        hook = MlflowHook(mlflow_conn_id=self.mlflow_conn_id)
        champion, prefix = monitored(hook, self.model_name, "performance")
        window, result = measure(
            hook,
            self.model_name,
            self.deployment,
            time.time() - float(self.window_minutes) * 60,
            lambda request: self.run_step(STEP, request, context),
            monitored=str(champion),
            max_drop=float(self.max_drop),
            min_rows=int(self.min_rows),
            min_labels=int(self.min_labels),
        )
        if result is None:
            reason = "no answered request in the window"
            return self._detection(champion, window, prefix, "insufficient_data", "none", reason)
        with artefacts.staging(prefix) as folder:
            (Path(folder) / "report.json").write_text(json.dumps(result, indent=2, allow_nan=False))
        figures = result["versions"].get(str(champion))
        if figures:
            run_id = hook.client.get_model_version(self.model_name, str(champion)).run_id
            step = int(time.time())
            for key in ("realized_accuracy", "estimated_accuracy"):
                if figures[key] is not None:
                    hook.client.log_metric(run_id, f"performance.{key}", figures[key], step=step)
        self.log.info("performance of v%s: %s (%s)", champion, result["verdict"], result["reason"])
        for version, numbers in result["versions"].items():
            self.log.info(
                "v%s: %d rows, %d labelled, realized %s, estimated %s [%s, %s], reference %.3f",
                version,
                numbers["rows"],
                numbers["labelled"],
                numbers["realized_accuracy"],
                numbers["estimated_accuracy"],
                numbers["estimated_lower"],
                numbers["estimated_upper"],
                numbers["reference_accuracy"],
            )
        drifted = {"high": ["accuracy"], "medium": ["accuracy"], "low": ["predictions"]}
        return self._detection(
            champion,
            window,
            prefix,
            result["verdict"],
            result["severity"],
            result["reason"],
            figures["rows"] if figures else 0,
            drifted.get(result["severity"], []),
        )

    def _detection(
        self,
        champion: str,
        window: ServedRows,
        prefix: str,
        verdict: Any,
        severity: Any,
        reason: str,
        rows: int = 0,
        drifted: list[str] | None = None,
    ) -> Detection:
        """The verdict as a drift detection, which ``DriftDecideRetrainOperator`` judges."""
        return {
            "model_name": self.model_name,
            "champion": str(champion),
            "verdict": verdict,
            "severity": severity,
            "drifted_features": drifted or [],
            "share_drifted": None,
            "n_current": rows,
            "n_effective": rows,
            "n_reference": 0,
            "message": reason,
            "report": f"{prefix}/report.json",
            "window": {"deployment": self.deployment, "requests": window.requests, "kind": "performance"},
        }


def measure(
    hook: MlflowHook,
    model_name: str,
    deployment: str,
    since: float,
    run: Callable[[dict[str, Any]], PerformanceResult],
    **options: Any,
) -> tuple[ServedRows, PerformanceResult | None]:
    """The rows ``deployment`` answered since ``since`` (epoch seconds), with the labels come so far,
    and ``run`` (the step, in its runtime) on them with ``options`` (``PerformanceRequest``'s fields);
    None when nothing was answered. Each version in the window gets its reference: its IR on its holdout."""
    from airloop import labels

    window = labels.served_rows(settings.artefact_root(), deployment, since)
    classes = window.classes
    if classes is None:
        return window, None
    with tempfile.TemporaryDirectory() as tmp:
        references = {v: _reference(hook, model_name, v, classes, Path(tmp)) for v in sorted(window.versions)}
        window_path = f"{tmp}/window.parquet"
        window.to_parquet(window_path, classes)
        request = PerformanceRequest(
            window_path=window_path, references=references, classes=classes, **options
        )
        return window, run(request.to_dict())


def _reference(hook: MlflowHook, model_name: str, version: str, classes: list[str], tmp: Path) -> str:
    """The version's served IR on its holdout, as the step reads it."""
    import pandas as pd

    from airloop.labels import LABEL, probability_columns
    from airloop.openvino_ir import IR_PATH, fetch_ir, ir_predictor, table_rows
    from airloop.tracking.artifacts import HOLDOUT_PATH, read_data

    run_id = hook.client.get_model_version(model_name, version).run_id
    folder = tmp / f"v{version}"
    with hook.session():
        ir = fetch_ir({**hook.step_config(), "ir_uri": f"runs:/{run_id}/{IR_PATH}", "dst_dir": str(folder)})
        holdout = read_data(hook.tracking_uri, f"runs:/{run_id}/{HOLDOUT_PATH}")
    manifest = ir["manifest"]
    names = manifest["feature_names"]
    if [str(c) for c in manifest["classes"]] != classes:
        raise ValueError(
            f"version {version} predicts {manifest['classes']}; its answers were logged as {classes}"
        )
    (label,) = [c for c in holdout.columns if c not in names] or [None]
    if label is None:
        raise ValueError(f"version {version}'s holdout has no label column beside its features {names}")
    probabilities = ir_predictor(f"{ir['model_dir']}/model.xml")(table_rows(manifest, holdout))
    reference = pd.DataFrame(probabilities, columns=probability_columns(classes))
    reference[LABEL] = [classes[i] for i in _class_index(holdout[label], classes)]
    path = str(folder / "reference.parquet")
    reference.to_parquet(path, index=False)
    return path


def _class_index(values: Any, classes: list[str]) -> list[int]:
    from airloop.serving.model import label_value

    index = {label_value(c): i for i, c in enumerate(classes)}
    return [index[label_value(v)] for v in values]
