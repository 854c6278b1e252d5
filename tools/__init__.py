"""Benchmarks and helpers around the stage scripts; each runs as `python tools/NAME.py` from the repository root."""
