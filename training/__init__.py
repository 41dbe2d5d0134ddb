"""Training: data, optimisers, procedures, timing and results. Knows no particular model."""
from training import metrics, optim, procedures, results, timing

__all__ = ["metrics", "optim", "procedures", "results", "timing"]
