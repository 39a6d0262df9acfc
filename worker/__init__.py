"""Celery workers: the expensive jobs (attribution, valuation, mislabel, evaluate, build_index)."""
