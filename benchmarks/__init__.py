"""Benchmarks that print and save numbers; run them as modules (python -m benchmarks.<name>)."""
