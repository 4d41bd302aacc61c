"""Sequence backbones behind one contract (see ``base.Backbone``)."""

from seqlab.backbones.base import Backbone, State
from seqlab.backbones.minrnn import MinRNNBackbone
from seqlab.backbones.rnn import RNNBackbone
from seqlab.backbones.transformer import TransformerBackbone

__all__ = ["Backbone", "MinRNNBackbone", "RNNBackbone", "State", "TransformerBackbone"]
