"""Benchmark harness (`moecli bench`)."""
