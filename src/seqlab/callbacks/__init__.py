from seqlab.callbacks.run_stats import RunStats

__all__ = ["RunStats"]
