"""Rollout steps: the rollout state machine and the canary analysis of each window."""
