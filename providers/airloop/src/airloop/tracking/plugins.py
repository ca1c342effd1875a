"""MLflow plugins, registered through entry points, that apply the open ``mlflow_calls`` block's settings.

MLflow loads this module itself when it builds its plugin registries; outside a block both plugins
behave exactly like MLflow without them.
"""

from __future__ import annotations

from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository, _get_s3_client
from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

from airloop.tracking.session import ACTIVE


class ConnectionAuthHeaderProvider(RequestHeaderProvider):
    """The connection's ``Authorization`` header on MLflow's REST requests (tracking, registry and
    proxied artefacts). MLflow's own ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``/``_TOKEN``, when the
    environment has them, are applied after this and win."""

    def in_context(self) -> bool:
        settings = ACTIVE.settings
        return settings is not None and settings.authorization is not None

    def request_headers(self) -> dict[str, str]:
        settings = ACTIVE.settings
        return {"Authorization": settings.authorization} if settings and settings.authorization else {}


class ConnectionS3ArtifactRepository(S3ArtifactRepository):
    """MLflow's S3 artefact repository, with the connection's credentials, endpoint and region."""

    def _get_s3_client(self):
        settings = ACTIVE.settings
        if settings is None or not settings.s3:
            return super()._get_s3_client()
        s3 = dict(settings.s3)
        # MLflow's cached client factory: one boto3 client per distinct set of values.
        return _get_s3_client(
            access_key_id=s3.get("aws_access_key_id"),
            secret_access_key=s3.get("aws_secret_access_key"),
            session_token=s3.get("aws_session_token"),
            region_name=s3.get("region_name"),
            s3_endpoint_url=s3.get("endpoint_url"),
        )
