"""Task LightningModules: each owns embeddings, heads, losses, metrics and decoding."""

from seqlab.tasks.base import SeqTask
from seqlab.tasks.forecasting import ForecastingTask

__all__ = ["ForecastingTask", "SeqTask"]
