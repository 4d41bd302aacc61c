from seqlab.callbacks.divergence import DivergenceGuard, TrainingDiverged
from seqlab.callbacks.progress import RichProgressBar
from seqlab.callbacks.resume import (
    ExactResume,
    LastCheckpoint,
    RecentCheckpoints,
    SaveOnSigterm,
    StepCheckpoint,
)
from seqlab.callbacks.run_stats import RunStats

__all__ = [
    "DivergenceGuard",
    "ExactResume",
    "LastCheckpoint",
    "RecentCheckpoints",
    "RichProgressBar",
    "RunStats",
    "SaveOnSigterm",
    "StepCheckpoint",
    "TrainingDiverged",
]
