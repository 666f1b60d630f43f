"""Orchestration: listener wiring, series completion, Celery tasks, state and database."""
