"""Rollout steps: the rollout state machine, the canary analysis of each window, and the ingest of
ground truth that comes after its predictions (the labels the canary and the monitoring judge on)."""
