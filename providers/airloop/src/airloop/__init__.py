"""Airloop: an Airflow provider that closes the machine learning loop."""

__version__ = "0.1.0"
