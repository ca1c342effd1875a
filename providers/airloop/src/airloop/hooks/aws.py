"""S3 settings from an Airflow ``aws`` connection (Amazon provider), as plain values for step requests.

Steps may run in another process (a runtime, a pod) and take JSON: the connection's endpoint, region
and credentials go as strings, never as a live session and never through os.environ. The secrets are
registered with Airflow's masker, so they never show in task logs.
"""

from __future__ import annotations

from typing import Any


def s3_settings(aws_conn_id: str, named_by: str) -> dict[str, str]:
    """boto3's names for the connection's S3 settings (``endpoint_url``, ``region_name``,
    ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``), empty ones left out.

    ``named_by`` says what names the connection, for the error when the Amazon provider is missing.
    """
    try:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    except ImportError as exc:
        raise ValueError(
            f"{named_by} names the aws connection {aws_conn_id!r}, which needs the Amazon provider: "
            "pip install 'airflow-provider-airloop[s3]'"
        ) from exc
    from airflow.sdk.log import mask_secret

    aws = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3")
    s3 = {"endpoint_url": aws.conn_config.get_service_endpoint_url("s3"), "region_name": aws.region_name}
    credentials = aws.get_credentials()
    if credentials is not None:
        s3.update(
            aws_access_key_id=credentials.access_key,
            aws_secret_access_key=credentials.secret_key,
            aws_session_token=credentials.token,
        )
        for secret in (credentials.secret_key, credentials.token):
            if secret:
                mask_secret(secret)
    return {key: value for key, value in s3.items() if value}


def fsspec_options(s3: dict[str, str]) -> dict[str, Any]:
    """s3fs's storage options for ``s3_settings``' values."""
    names = {"aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_session_token": "token"}
    options: dict[str, Any] = {names[key]: value for key, value in s3.items() if key in names}
    if "endpoint_url" in s3:
        options["endpoint_url"] = s3["endpoint_url"]
    if "region_name" in s3:
        options["client_kwargs"] = {"region_name": s3["region_name"]}
    return options
