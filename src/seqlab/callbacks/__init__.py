from seqlab.callbacks.divergence import DivergenceGuard, TrainingDiverged
from seqlab.callbacks.progress import RichProgressBar
from seqlab.callbacks.resume import ExactResume, LastCheckpoint, SaveOnSigterm, StepCheckpoint
from seqlab.callbacks.run_stats import RunStats

__all__ = [
    "DivergenceGuard",
    "ExactResume",
    "LastCheckpoint",
    "RichProgressBar",
    "RunStats",
    "SaveOnSigterm",
    "StepCheckpoint",
    "TrainingDiverged",
]
