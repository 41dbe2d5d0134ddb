"""Runnable experiments: `python -m experiments.NAME [--workdir DIR] [options]`."""
