"""Parallel-scan RNNs: minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?").

Their gates read only the input, never the previous state:

- minGRU:  z = sigmoid(W_z x), h~ = g(W_h x),               h_t = (1 - z_t) h_{t-1} + z_t h~_t
- minLSTM: f = sigmoid(W_f x), i = sigmoid(W_i x), h~ = g(W_h x),
           f' = f / (f + i), i' = i / (f + i),              h_t = f'_t h_{t-1} + i'_t h~_t

so every gate of the whole sequence is one matrix product and only an elementwise linear
recurrence is left, which a scan evaluates in parallel over time (``seqlab.backbones.scan``).
minLSTM is a minGRU whose gate is ``i' = sigmoid(softplus(-W_f x) - softplus(-W_i x))``, so both
run through the same fused scan. Decoding steps one token at a time with the same weights (the
state is one vector per layer), so generation is O(1) per token like any RNN.

Layers are stacked as in the paper: pre-LayerNorm residual blocks of a min-RNN (projected back
to ``d_model``) and an MLP. Padding (on the right) is neutralised inside the scan (z = 0 there:
the state passes through unchanged), so it changes nothing, in either direction.
The translation decoder adds cross-attention over the encoder memory to each block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqlab.backbones.base import Backbone, State, key_padding_to_attn_mask
from seqlab.backbones.scan import SCAN_METHODS, gated_scan
from seqlab.backbones.transformer import Attention, FeedForward

CELLS = {"mingru": 2, "minlstm": 3}  # input projections per direction: gate(s) and candidate
#: a pre-activation that makes z = sigmoid(.) exactly 0 in every float format: padded steps keep
#: the state as it is
_CLOSED = -1.0e4


class MinRNN(nn.Module):
    """One minGRU/minLSTM recurrence over batch-first ``x`` [B,T,D] -> [B,T,D] (and final states).

    Computes time-major inside (each scan step then reads contiguous memory). ``bidirectional``
    runs a second recurrence right to left over each sequence's own steps.
    """

    def __init__(self, cell: str, d_model: int, hidden: int, bidirectional: bool, scan: str) -> None:
        super().__init__()
        self.cell = cell
        self.hidden = hidden
        self.directions = 2 if bidirectional else 1
        self.scan = scan
        self.proj = nn.Linear(d_model, CELLS[cell] * hidden * self.directions)
        self.out = nn.Linear(hidden * self.directions, d_model)

    def _gate_candidate(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        if self.cell == "mingru":
            gate, candidate = pre.chunk(2, dim=-1)
            return gate, candidate
        forget, update, candidate = pre.chunk(3, dim=-1)
        # z = i' = i / (f + i) = sigmoid(log sigmoid(W_i x) - log sigmoid(W_f x))
        return F.softplus(-forget) - F.softplus(-update), candidate

    def forward(
        self, x: Tensor, pad_mask: Tensor | None = None, state: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """-> (outputs [B,T,D], final states [B, directions * hidden]); ``state`` [B, hidden]
        continues a causal (one-direction) recurrence from a previous call."""
        pre = self.proj(x.transpose(0, 1))  # [T,B,...] time-major
        outputs, finals = [], []
        for direction, pre_dir in enumerate(pre.chunk(self.directions, dim=-1)):
            gate, candidate = self._gate_candidate(pre_dir)
            if pad_mask is not None:
                gate = gate.masked_fill(pad_mask.transpose(0, 1)[..., None], _CLOSED)
            if direction == 1:  # right to left: padding comes first and leaves the zero state alone
                gate, candidate = gate.flip(0), candidate.flip(0)
            # scanned in float32 at least (as gated_scan would under bf16-mixed; a float64 model in
            # float64), and the final state kept so: decoding carries it from step to step, where
            # rounding it each time would add up
            work = torch.promote_types(candidate.dtype, torch.float32)
            h0 = state.to(work) if state is not None and direction == 0 else None
            h = gated_scan(gate.to(work), candidate.to(work), h0, self.scan)
            finals.append(h[-1])
            h = h.to(candidate.dtype)
            outputs.append(h.flip(0) if direction == 1 else h)
        h = outputs[0] if self.directions == 1 else torch.cat(outputs, dim=-1)
        return self.out(h).transpose(0, 1), torch.cat(finals, dim=-1)


class MinRNNEncoderLayer(nn.Module):
    """x + MinRNN(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, cell: str, d_model: int, hidden: int, dim_feedforward: int, dropout: float,
        bidirectional: bool, scan: str,
    ) -> None:  # fmt: skip
        super().__init__()
        self.norm_rnn = nn.LayerNorm(d_model)
        self.rnn = MinRNN(cell, d_model, hidden, bidirectional, scan)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, dim_feedforward, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad_mask: Tensor | None) -> Tensor:
        mixed, _ = self.rnn(self.norm_rnn(x), pad_mask)
        x = x + self.dropout(mixed)
        return x + self.dropout(self.ff(self.norm_ff(x)))


class MinRNNDecoderLayer(nn.Module):
    """y + MinRNN(LN(y)) (causal, continuing from the state), y + CrossAttention(LN(y), memory),
    y + MLP(LN(y))."""

    def __init__(
        self, cell: str, d_model: int, hidden: int, nhead: int, dim_feedforward: int, dropout: float,
        scan: str,
    ) -> None:  # fmt: skip
        super().__init__()
        self.norm_rnn = nn.LayerNorm(d_model)
        self.rnn = MinRNN(cell, d_model, hidden, bidirectional=False, scan=scan)
        self.norm_cross = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, nhead, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, dim_feedforward, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        y: Tensor,
        state: Tensor | None,
        memory: Tensor | tuple[Tensor, Tensor],
        memory_attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """-> (output, final recurrent state, memory keys/values). ``memory`` is the encoder output
        on the first call and its projected keys/values (returned then) after, so every projection
        runs inside ``forward`` (where FSDP gathers this layer's weights)."""
        memory_kv = self.cross_attn.keys_values(memory) if isinstance(memory, Tensor) else memory
        mixed, state = self.rnn(self.norm_rnn(y), state=state)
        y = y + self.dropout(mixed)
        y = y + self.dropout(self.cross_attn(self.norm_cross(y), *memory_kv, attn_mask=memory_attn_mask))
        y = y + self.dropout(self.ff(self.norm_ff(y)))
        return y, state, memory_kv


class MinRNNBackbone(Backbone):
    """Stacked minGRU/minLSTM blocks (and, with ``with_decoder``, a decoder with cross-attention)."""

    supports_parallel_time = True
    layer_classes = (MinRNNEncoderLayer, MinRNNDecoderLayer)
    source_state_keys = ("memory_k", "memory_v")

    def __init__(
        self,
        cell: str = "mingru",
        d_model: int = 128,
        num_layers: int = 2,
        num_decoder_layers: int | None = None,
        expansion: float = 1.0,
        dim_feedforward: int = 256,
        nhead: int = 4,
        dropout: float = 0.1,
        bidirectional: bool = False,
        scan: str = "auto",
        with_decoder: bool = False,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"model.cell={cell!r} is not one of {sorted(CELLS)}")
        if scan not in SCAN_METHODS:
            raise ValueError(f"model.scan={scan!r} is not one of {list(SCAN_METHODS)}")
        # bidirectional: the hidden width is split between the directions, so rounded to an even
        # width (the width of every expansion that gave an even one before)
        hidden = (
            max(2, 2 * round(expansion * d_model / 2))
            if bidirectional
            else max(1, round(expansion * d_model))
        )
        self.cell = cell
        self.d_model = d_model
        self.causal = not bidirectional
        # each layer's output projection mixes the directions: no half of the output reads right
        # to left, but the right-to-left summary is at the first step (a 1-layer encoder's last
        # step has read only the last token right to left)
        self.summary_at_ends = bidirectional
        self.hidden = hidden
        per_direction = hidden // 2 if bidirectional else hidden
        self.encoder_layers = nn.ModuleList(
            MinRNNEncoderLayer(cell, d_model, per_direction, dim_feedforward, dropout, bidirectional, scan)
            for _ in range(num_layers)
        )
        self.encoder_norm = nn.LayerNorm(d_model)
        self.decoder_layers = nn.ModuleList()
        if with_decoder:
            self.decoder_layers.extend(
                MinRNNDecoderLayer(cell, d_model, hidden, nhead, dim_feedforward, dropout, scan)
                for _ in range(num_decoder_layers if num_decoder_layers is not None else num_layers)
            )
            self.decoder_norm = nn.LayerNorm(d_model)

    def encode(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        # a mask without padding is dropped (the masking passes cost more than the check) where
        # the check is free: on an accelerator it would make the host wait for the device
        if pad_mask is not None and pad_mask.device.type == "cpu" and not bool(pad_mask.any()):
            pad_mask = None
        for layer in self.encoder_layers:
            x = layer(x, pad_mask)
        return self.encoder_norm(x)

    def decode(
        self,
        y: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        state: State | None = None,
    ) -> tuple[Tensor, State]:
        if not len(self.decoder_layers):
            raise RuntimeError("this backbone was built without a decoder (with_decoder=False)")
        memory_attn_mask = key_padding_to_attn_mask(memory_mask)
        new_state: State = {"hidden": [], "memory_k": [], "memory_v": []}
        for i, layer in enumerate(self.decoder_layers):
            hidden = state["hidden"][i] if state is not None else None
            memory_in = (state["memory_k"][i], state["memory_v"][i]) if state is not None else memory
            y, hidden, (memory_k, memory_v) = layer(y, hidden, memory_in, memory_attn_mask)
            for name, tensor in zip(("hidden", "memory_k", "memory_v"), (hidden, memory_k, memory_v)):
                new_state[name].append(tensor)
        return self.decoder_norm(y), new_state


__all__ = ["MinRNN", "MinRNNBackbone", "MinRNNDecoderLayer", "MinRNNEncoderLayer"]
