"""Synthetic concept dataset: vocabulary and deterministic rendering."""
