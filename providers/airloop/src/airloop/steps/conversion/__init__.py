"""Conversion steps: convert to OpenVINO IR (one route per model family), optimise, batch-score."""
