"""The backbone contract: the one seam between tasks and sequence models.

Every backbone maps embedded sequences to contextual states (``encode``) and can decode causally
with a state (``decode``), so a task never branches on the backbone type:

- ``encode(x[B,T,D], pad_mask[B,T] | None) -> memory[B,T,D]``
- ``decode(y[B,U,D], memory[B,S,D], memory_mask[B,S] | None, state=None) -> (out[B,U,D], state)``

Masks are boolean and ``True`` marks padding (PyTorch's ``key_padding_mask`` convention); padding
is on the right. ``decode`` is causal: feeding ``y`` in one call or one step at a time with the
returned state gives the same outputs, so greedy and beam search cost O(U) decoder steps.
A state is a dict of tensors whose first dimension is the batch (plus plain ints), which lets
``reorder_state`` serve beam search for every backbone. A call may write into a state's tensors
past the steps it holds (the Transformer's cache grows in place when decoding without autograd);
a second continuation of one state copies what it would overwrite, so a state may be continued
more than once.

Positional information belongs to the backbone (the Transformer adds sinusoidal positions,
an RNN needs none): only the backbone knows the decoding position held in its state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

State = dict[str, Any]


class Backbone(nn.Module):
    """Base class of every sequence backbone; see the module docstring for the contract."""

    #: width of inputs and outputs of ``encode`` and ``decode``
    d_model: int
    #: ``encode`` output at step t depends only on inputs up to t
    causal: bool = False
    #: the second half of the ``encode`` features reads right to left (bidirectional nn.RNN,
    #: LSTM, GRU), so it has seen the whole sequence at the first step (see ``pool``)
    reversed_half: bool = False
    #: bidirectional with the directions mixed at every step (minGRU/minLSTM project both back to
    #: ``d_model``): the left-to-right summary sits at the last step, the right-to-left one at the
    #: first, so ``last`` and ``first`` pooling average the two (see ``pool``)
    summary_at_ends: bool = False
    #: the training step processes all time steps in parallel (documents the compute pattern)
    supports_parallel_time: bool = False
    #: the repeated blocks: the units FSDP shards (``trainer=fsdp`` wraps them, ``trainer=fsdp2``
    #: calls ``fully_shard`` on each) and activation checkpointing recomputes
    layer_classes: tuple[type[nn.Module], ...] = ()

    def encode(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__}.encode: every backbone implements it (seqlab.backbones.base)"
        )

    def decode(
        self,
        y: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        state: State | None = None,
    ) -> tuple[Tensor, State]:
        raise NotImplementedError(
            f"{type(self).__name__}.decode: translation decodes with it (seqlab.backbones.base); "
            "forecasting and classification need encode only"
        )

    @classmethod
    def decodes(cls) -> bool:
        """Whether this backbone implements ``decode`` (translation needs it)."""
        return cls.decode is not Backbone.decode

    #: decoding-state entries computed from the source alone (the memory's keys and values): the
    #: same rows for every beam of a sentence, so beam search leaves them as they are
    source_state_keys: tuple[str, ...] = ()

    def pool(self, states: Tensor, pad_mask: Tensor | None, how: str) -> Tensor:
        """``pool`` of this backbone's ``encode`` output (its direction layout taken into account)."""
        return pool(states, pad_mask, how, self.reversed_half, self.summary_at_ends)

    @classmethod
    def reorder_beams(cls, state: State, index: Tensor) -> State:
        """``reorder_state`` for beam search, whose ``index`` keeps every row among its own
        sentence's beams (which share one source): the source's entries are not copied. Copying
        them was two thirds of the reordering's time (a 3-layer Transformer, width 256, 32
        sentences x 5 beams of 30 tokens: 0.24-0.31 s of a 1.0 s search, 0.09 s without)."""
        kept = {key: state[key] for key in cls.source_state_keys if key in state}
        reordered = cls.reorder_state({key: v for key, v in state.items() if key not in kept}, index)
        return {**reordered, **kept}

    @staticmethod
    def reorder_state(state: State, index: Tensor) -> State:
        """Select (and repeat) batch entries of a decoding state, e.g. surviving beams."""
        return {
            key: value.index_select(0, index)
            if isinstance(value, Tensor)
            else [item.index_select(0, index) for item in value]
            if isinstance(value, list)
            else value
            for key, value in state.items()
        }

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return self.encode(x, pad_mask)


def lengths_from_mask(pad_mask: Tensor, cpu: bool = False) -> Tensor:
    """Valid lengths of right-padded sequences, on ``pad_mask``'s device or, with ``cpu``, moved
    to the CPU. Every sequence must hold at least one step: checked where the lengths are on the
    CPU (on an accelerator the check would make the host wait for the device at every batch;
    the datasets never produce empty sequences, so that check is the CPU runs' and the tests')."""
    lengths = (~pad_mask).sum(dim=1)
    if cpu:
        lengths = lengths.cpu()
    if lengths.device.type == "cpu" and bool((lengths == 0).any()):
        raise ValueError("a sequence in the batch is empty (all positions are padding)")
    return lengths


def masked_mean(x: Tensor, pad_mask: Tensor | None) -> Tensor:
    """Mean over time of x[B,T,D], ignoring padded steps."""
    if pad_mask is None:
        return x.mean(dim=1)
    keep = (~pad_mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


POOLINGS = ("mean", "max", "last", "first")


def pool(
    states: Tensor,
    pad_mask: Tensor | None,
    how: str,
    reversed_half: bool = False,
    summary_at_ends: bool = False,
) -> Tensor:
    """[B,T,D] encoder states -> [B,D], ignoring padded steps (``pad_mask`` True = padding).

    ``last``: the last real step; ``first``: the first (a [CLS] token, for a non-causal
    encoder). With ``reversed_half`` (the backbone's) both take each direction's final state:
    the first half at the last step, the second half at the first step. With
    ``summary_at_ends`` both are the mean of the first and the last real steps (a bidirectional
    encoder whose directions share each step's features: each end holds one direction's summary).
    Every sequence holds at least one step (the datasets drop empty texts; an empty one is an
    error on the CPU, unchecked on an accelerator: see ``lengths_from_mask``)."""
    if how == "mean":
        return masked_mean(states, pad_mask)
    if how == "max":
        if pad_mask is None:
            return states.max(dim=1).values
        return states.masked_fill(pad_mask.unsqueeze(-1), float("-inf")).max(dim=1).values
    if how == "first" and not (reversed_half or summary_at_ends):
        return states[:, 0]
    last = (
        lengths_from_mask(pad_mask) - 1
        if pad_mask is not None
        else torch.full((states.shape[0],), states.shape[1] - 1, device=states.device)
    )
    final = states[torch.arange(states.shape[0], device=states.device), last]
    if reversed_half:
        half = states.shape[-1] // 2
        final = torch.cat([final[:, :half], states[:, 0, half:]], dim=-1)
    elif summary_at_ends:
        final = (final + states[:, 0]) / 2
    return final


def key_padding_to_attn_mask(pad_mask: Tensor | None) -> Tensor | None:
    """[B,S] padding mask (True = pad) -> [B,1,1,S] attention mask (True = attend) for SDPA."""
    if pad_mask is None:
        return None
    return (~pad_mask)[:, None, None, :]


__all__ = [
    "POOLINGS",
    "Backbone",
    "State",
    "key_padding_to_attn_mask",
    "lengths_from_mask",
    "masked_mean",
    "pool",
]
