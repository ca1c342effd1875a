"""Drift steps: detect (over pluggable detectors, with their conformance suite in ``checks``), reports,
request windows, the retraining policy."""
