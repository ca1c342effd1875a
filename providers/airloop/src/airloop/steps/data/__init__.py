"""Data steps: the validation gate, suite profiling, Feast features."""
