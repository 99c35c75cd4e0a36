"""Benchmarks of indexcache-ops: `python -m bench` runs them all (see bench/NOTES.md)."""
