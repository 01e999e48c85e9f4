"""Benchmarks against baselines: `seed_fastapi` is the seed's design; `compare.py` runs both."""
