"""What a validation gate hands on to training: its summary's artefact path and the run tags that
record it."""

from __future__ import annotations

from typing import Any

# Where the run a validation gates keeps the validation's summary.
VALIDATION_ARTIFACT = "validation/summary.json"


def gated_run_tags(
    validation: dict[str, Any] | None, data_uri: str, data_print: dict[str, Any]
) -> dict[str, str]:
    """Tags for the MLflow run that ``validation`` (the gate operator's summary) lets through.

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
