"""Loops declared by a spec (a YAML file, ``spec``) and the DAGs each one becomes (``dags``)."""
