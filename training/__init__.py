"""Training: data, optimisers, procedures, metrics, timing, results and plots.

Knows no particular model: everything takes a model (a `nets.Layer`), an objective and a
gradient engine.
"""
from training import (
    benchmark,
    data,
    distributed,
    metrics,
    optim,
    parallel,
    plots,
    procedures,
    results,
    timing,
)

__all__ = [
    "benchmark",
    "data",
    "distributed",
    "metrics",
    "optim",
    "parallel",
    "plots",
    "procedures",
    "results",
    "timing",
]
