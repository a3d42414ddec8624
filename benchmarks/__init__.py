"""Benchmarks: programs that print figures, never pass/fail tests (docs/reliability.md)."""
