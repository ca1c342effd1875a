"""What a validation gate hands on to training: the types of its result and summary, the summary's
artefact path and the run tags that record it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

# Where the run a validation gates keeps the validation's summary.
VALIDATION_ARTIFACT = "validation/summary.json"


class Failure(TypedDict):
    """One failed expectation (or the fingerprint check) and what the data showed instead."""

    expectation: str
    column: str | None
    kwargs: dict[str, Any]
    observed: Any


class _Verdict(TypedDict):
    success: bool
    evaluated: int
    successful: int
    failed: list[Failure]
    # ``airloop.tables.fingerprint`` of the data: ``{"rows", "columns", "sha256"}``.
    fingerprint: dict[str, Any]
    suite: str
    rows: int
    batches: int


class ValidationResult(_Verdict):
    """The validation step's result: the verdict, GX's statistics and where the Data Docs are."""

    statistics: dict[str, Any]
    docs_index: str | None
    data: str


class ValidationSummary(_Verdict):
    """What the gate operator returns and the gated MLflow run keeps: the verdict, the data's name
    (its URI, or ``sql on <conn_id>: <query>``) and the Data Docs (artefact-store path and URI)."""

    data_uri: str
    docs: str
    docs_uri: str


def gated_run_tags(
    validation: Mapping[str, Any] | None, data_uri: str, data_print: Mapping[str, Any]
) -> dict[str, str]:
    """Tags for the MLflow run that ``validation`` (a ``ValidationSummary``) lets through.

    Raises ValueError when the data at ``data_uri`` is not what was validated (it changed in between).
    """
    if not validation:
        return {}
    validated = (validation.get("fingerprint") or {}).get("sha256")
    if validation.get("data_uri") == data_uri and validated and validated != data_print["sha256"]:
        raise ValueError(
            f"{data_uri} changed since it was validated: sha256 {data_print['sha256']}, validated {validated}"
        )
    failed = ", ".join(
        f"{f.get('expectation')}({f.get('column') or 'table'})" for f in validation.get("failed") or []
    )
    tags = {
        "airloop.validation.success": str(bool(validation.get("success"))).lower(),
        "airloop.validation.suite": str(validation.get("suite")),
        "airloop.validation.expectations": f"{validation.get('successful')}/{validation.get('evaluated')}",
        "airloop.validation.docs": str(validation.get("docs_uri") or validation.get("docs")),
    }
    if failed:
        tags["airloop.validation.failed"] = failed[:5000]
    return tags
