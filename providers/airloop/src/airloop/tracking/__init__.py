"""MLflow as the system of record: client sessions, artefacts, models, the registry and audit."""
