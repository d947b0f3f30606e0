"""Benchmarks of celery-singleton-lock against other Redis locks; run ``python -m benchmarks``."""
