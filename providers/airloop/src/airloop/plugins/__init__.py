"""Airflow plugins that ship with the provider (provider.yaml and the ``airflow.plugins`` entry point)."""
