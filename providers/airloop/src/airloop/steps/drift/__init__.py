"""Drift steps: detect (over pluggable detectors), reports, request windows, the retraining policy."""
