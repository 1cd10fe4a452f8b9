"""Benchmarks of luo-orchestrator (``make bench``); numbers go to docs/benchmarks.md."""
