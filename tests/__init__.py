"""Airloop's tests. A package, so pytest puts the repository on ``sys.path`` and the shared test
helpers import as ``tests.fakes``."""
