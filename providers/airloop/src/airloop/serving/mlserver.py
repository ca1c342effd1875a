"""The MLServer model class (Apache 2.0): an OpenVINO IR classifier over the V2 inference protocol.

Run in the mlserver runtime by ``mlserver start FOLDER``, with a ``model-settings.json`` there::

    {"name": "airloop-ir", "implementation": "airloop.serving.mlserver.OpenVinoRuntime",
     "parameters": {"uri": "/models/v3"}, "max_batch_size": 32, "max_batch_time": 0.002}

(the local serving target writes it with ``server="mlserver"``). ``max_batch_size`` and
``max_batch_time`` turn on MLServer's adaptive batching: requests arriving within ``max_batch_time``
seconds are scored as one batch of up to ``max_batch_size`` rows.

``load()`` refuses to compile unless every file the manifest lists matches its checksum. A request
holds the rows either as one ``[rows]`` / ``[rows, 1]`` tensor per feature, named after it (V2's named
columns, as the model's metadata declares them), or as one ``[rows, columns]`` tensor of any other name
(columns in the manifest's feature order). Adaptive batching merges requests tensor by tensor name:
clients of one model must all send the same form (the gateway sends named columns). The answer is the
``probabilities`` tensor ``[rows, classes]``, with the manifest's classes in the response's
``parameters.classes``.

A model with an input encoding (``airloop.encoding``; its categorical features take strings, and any
feature a missing value) takes ``BYTES`` tensors too: each element a JSON text (``"x"``, ``1.5``,
``null``; what the gateway sends for such a model, every column so that batching merges alike) or a
plain string (``x``, a category); a numeric tensor's NaN is a missing value there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, Parameters

from airloop.openvino_ir import compile_ir, infer_rows, input_names, ir_rows, read_verified_manifest

OUTPUT = "probabilities"


class OpenVinoRuntime(MLModel):
    """Class probabilities from the verified IR in ``parameters.uri`` (precision hint in
    ``parameters.extra.precision_hint``, default f32: the outputs the conversion's parity gate checked)."""

    async def load(self) -> bool:
        parameters = self.settings.parameters
        if parameters is None or not parameters.uri:
            raise InferenceError(f"model {self.name}: set parameters.uri to the IR's folder")
        model_dir = Path(parameters.uri)
        manifest = read_verified_manifest(model_dir)
        import openvino as ov

        core = ov.Core()
        hint = (parameters.extra or {}).get("precision_hint", "f32")
        one_row, batch = compile_ir(core, core.read_model(str(model_dir / "model.xml")), hint)
        self._manifest = manifest
        self._features: list[str] = [str(f) for f in manifest["feature_names"]]
        self._columns = input_names(manifest)
        classes = [str(c) for c in manifest["classes"]]
        self._classes = Parameters(classes=classes)
        categorical = {
            i["column"]
            for i in (manifest.get("encoding") or {}).get("inputs", [])
            if i["kind"] == "categorical"
        }
        # The V2 metadata clients read (GET /v2/models/<name>): one column per feature, the output.
        self.inputs = [
            MetadataTensor(name=f, datatype="BYTES" if f in categorical else "FP32", shape=[-1])
            for f in self._features
        ]
        self.outputs = [
            MetadataTensor(
                name=OUTPUT, datatype="FP64", shape=[-1, len(classes)], parameters=Parameters(classes=classes)
            )
        ]
        # predict() runs in the server's event loop, one call at a time: one infer request per copy.
        self._one_row, self._batch = one_row.create_infer_request(), batch.create_infer_request()
        warm_up = np.zeros((1, len(self._columns)), dtype=np.float32)
        infer_rows(self._one_row, warm_up)
        infer_rows(self._batch, warm_up)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = self._rows(payload)
        finite = np.isfinite(rows)
        if not finite.all():  # NaN, infinities and values beyond float32: no made-up probabilities
            row, column = np.argwhere(~finite)[0]
            raise InferenceError(f"feature {self._columns[column]!r} of row {row} must be a finite number")
        probabilities = infer_rows(self._one_row if len(rows) == 1 else self._batch, rows, np.float64)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            parameters=self._classes,
            outputs=[NumpyCodec.encode_output(OUTPUT, probabilities)],
        )

    def _rows(self, payload: InferenceRequest) -> np.ndarray:
        """The request's rows as float32 ``[rows, features]``; InferenceError (400) names the mistake."""
        expected = self._features
        kind = object if self._manifest.get("encoding") else np.float32
        try:
            tensors = {i.name: _values(i) for i in payload.inputs}
            if len(tensors) == 1 and next(iter(tensors)) not in expected:
                table = np.asarray(next(iter(tensors.values())), dtype=kind)
            elif set(tensors) == set(expected):
                columns = [np.asarray(tensors[name], dtype=kind) for name in expected]
                if any(c.ndim > 2 or c.size != len(columns[0]) for c in columns):
                    raise InferenceError(f"each feature's tensor needs shape [rows] or [rows, 1]: {expected}")
                table = np.stack([c.reshape(-1) for c in columns], axis=1)
            else:
                raise InferenceError(
                    f"inputs {list(tensors)} do not match the model's features: send one "
                    f"[rows, {len(expected)}] tensor or one tensor per feature of {expected}"
                )
            if table.ndim != 2 or table.shape[1] != len(expected) or not len(table):
                raise InferenceError(
                    f"expected rows of {len(expected)} features, got shape {list(table.shape)}"
                )
            return ir_rows(self._manifest, table)
        except (TypeError, ValueError) as exc:
            raise InferenceError(str(exc) if kind is object else f"features must be numbers: {exc}") from None


def _values(tensor: Any) -> np.ndarray:
    """A request tensor's values; a ``BYTES`` one's elements as the JSON values they hold (a plain
    string, which is no JSON, as itself)."""
    values = NumpyCodec.decode_input(tensor)
    if tensor.datatype != "BYTES":
        return values
    decoded = np.empty(values.shape, dtype=object)
    for index, element in np.ndenumerate(values):
        text = element.decode() if isinstance(element, bytes) else str(element)
        try:
            decoded[index] = json.loads(text)
        except ValueError:
            decoded[index] = text
    return decoded


async def _serve(folder: str, keepalive_s: int) -> None:
    from mlserver import MLServer
    from mlserver.cli.serve import load_settings

    settings, models = await load_settings(folder)
    # Uvicorn's own default (5 s) is shorter than the gateway's pooled connections live: a request sent
    # on a connection the server is closing would fail. MLServer takes it only through this field.
    settings._custom_rest_server_settings = {"timeout_keep_alive": keepalive_s}
    await MLServer(settings).start(models)


def main(argv: list[str] | None = None) -> None:
    """``python -m airloop.serving.mlserver FOLDER [--keepalive S]``: ``mlserver start FOLDER`` with
    the REST server keeping idle connections ``S`` seconds."""
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", help="holds settings.json and the model's model-settings.json")
    parser.add_argument("--keepalive", type=int, default=30, help="seconds an idle connection is kept")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.folder, args.keepalive))


if __name__ == "__main__":
    main()
