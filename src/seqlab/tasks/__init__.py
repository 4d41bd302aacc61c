"""Task LightningModules: each owns embeddings, heads, losses, metrics and decoding."""

from seqlab.tasks.base import SeqTask
from seqlab.tasks.classification import ClassificationTask
from seqlab.tasks.forecasting import ForecastingTask

__all__ = ["ClassificationTask", "ForecastingTask", "SeqTask"]
