from seqlab.callbacks.divergence import DivergenceGuard, TrainingDiverged
from seqlab.callbacks.run_stats import RunStats

__all__ = ["DivergenceGuard", "RunStats", "TrainingDiverged"]
