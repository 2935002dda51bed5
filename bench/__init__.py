"""Benchmarks: a load generator against the real server, and the bare-forward ceiling."""
