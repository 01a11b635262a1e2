"""Benchmarks: `python -m bench` (make bench) compares each fast path with its baseline in one run."""
