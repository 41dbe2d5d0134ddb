"""Training: data, optimisers, procedures, learning curves, metrics, timing, results and
plots.

Knows no particular model: everything takes a model (a `nets.Layer`), an objective and a
gradient engine.
"""
from training import (
    benchmark,
    curves,
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
    "curves",
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
