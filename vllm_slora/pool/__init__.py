"""Scheduler-side unified pool: adapter residency on vLLM's BlockPool."""
