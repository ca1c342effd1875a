"""The embedded default: the reference loop on one machine, with a simulated world around it.

``world`` writes the data that "arrives" (with an injectable shift) and plays the clients that call the
model and later report the true label; ``runner`` starts Airflow and drives the reference DAGs.
"""
