"""seqlab: interchangeable sequence backbones on forecasting, classification and translation."""

from seqlab.utils.resolvers import register_resolvers

__version__ = "0.1.0"

register_resolvers()
