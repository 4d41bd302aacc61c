"""Pre-LayerNorm Transformer encoder-decoder on ``scaled_dot_product_attention``.

Readable top to bottom: sinusoidal positions, one attention module used for self- and
cross-attention, encoder and decoder layers, and a decoder key/value cache so step-by-step
decoding costs O(1) projections per new token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqlab.backbones.base import Backbone, State, key_padding_to_attn_mask
from seqlab.errors import ConfigError


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """Vaswani et al. (2017) encodings for integer ``positions`` [T] -> [T, d_model]."""
    half = d_model // 2
    freqs = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / half)
    )
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if d_model % 2:
        enc = F.pad(enc, (0, 1))
    return enc


class Attention(nn.Module):
    """Multi-head attention; keys and values can be projected once and reused (caches)."""

    def __init__(self, d_model: int, nhead: int, dropout: float) -> None:
        super().__init__()
        if nhead < 1 or d_model % nhead:
            raise ConfigError(
                f"model.d_model={d_model} must be a multiple of model.nhead={nhead} (the heads split it; "
                "nhead >= 1)"
            )
        self.nhead = nhead
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split(self, x: Tensor) -> Tensor:  # [B,T,D] -> [B,H,T,D/H]
        batch, steps, width = x.shape
        return x.view(batch, steps, self.nhead, width // self.nhead).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        key, value = self.key_value(x).chunk(2, dim=-1)
        return self._split(key), self._split(value)

    def forward(
        self,
        x: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        query = self._split(self.query(x))
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        batch, _, steps, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(batch, steps, -1))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(d_model, dim_feedforward),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
        )


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, nhead, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, dim_feedforward, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool = False) -> Tensor:
        h = self.norm_attn(x)
        attended = self.attn(h, *self.attn.keys_values(h), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ff(self.norm_ff(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, nhead, dropout)
        self.norm_cross = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, nhead, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, dim_feedforward, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        y: Tensor,
        cache: tuple[Tensor, Tensor] | None,
        memory: Tensor | tuple[Tensor, Tensor],
        memory_attn_mask: Tensor | None,
        write_at: int | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """-> (output, self-attention keys/values so far, memory keys/values). ``memory`` is the
        encoder output on the first call and its projected keys/values (returned then) after, so
        every projection runs inside ``forward`` (where FSDP gathers this layer's weights).
        ``cache``: the keys/values of the steps before; with ``write_at`` (decoding without
        autograd), buffers holding ``write_at`` steps with room for the new ones, which are written
        into them in place (returned whole) instead of a new concatenation a step."""
        memory_kv = self.cross_attn.keys_values(memory) if isinstance(memory, Tensor) else memory
        h = self.norm_self(y)
        key, value = self.self_attn.keys_values(h)
        steps = y.shape[1]
        past = 0
        if cache is not None and write_at is not None:
            past = write_at
            cache[0][:, :, past : past + steps] = key
            cache[1][:, :, past : past + steps] = value
            returned = cache
            key, value = cache[0][:, :, : past + steps], cache[1][:, :, : past + steps]
        elif cache is not None:
            past = cache[0].shape[2]
            key, value = torch.cat([cache[0], key], dim=2), torch.cat([cache[1], value], dim=2)
            returned = (key, value)
        else:
            returned = (key, value)
        if past == 0:  # plain causal attention over the new block
            attended = self.self_attn(h, key, value, is_causal=steps > 1)
        elif steps == 1:  # one new step sees every step
            attended = self.self_attn(h, key, value)
        else:  # new steps see every cached step and the new steps up to themselves
            mask = torch.ones(steps, past + steps, dtype=torch.bool, device=y.device).tril(diagonal=past)
            attended = self.self_attn(h, key, value, attn_mask=mask)
        y = y + self.dropout(attended)
        y = y + self.dropout(self.cross_attn(self.norm_cross(y), *memory_kv, attn_mask=memory_attn_mask))
        y = y + self.dropout(self.ff(self.norm_ff(y)))
        return y, returned, memory_kv


#: the steps written into a cache buffer so far (an attribute of the tensor, shared by every
#: state that holds it): a state holding fewer is a second continuation of an earlier state
FILLED = "_seqlab_cache_filled"


def with_room(buffer: Tensor, used: int, needed: int) -> Tensor:
    """A buffer (keys or values, time on dim 2) this decoding step may write ``needed`` steps
    into, its first ``used`` steps those of ``buffer``: ``buffer`` itself when it has room and is
    marked as holding ``used`` steps (not a buffer another continuation of the same state wrote
    past them, nor an unmarked alias of one: a view, a ``detach()``), else a new
    buffer twice that long, so a decoding one step at a time copies its cache O(log T) times,
    not once a step. An inference-mode buffer is copied outside inference mode (it cannot be
    written to there)."""
    room = buffer.shape[2] >= needed and getattr(buffer, FILLED, None) == used
    if room and not (buffer.is_inference() and not torch.is_inference_mode_enabled()):
        return buffer
    grown = buffer.new_empty(*buffer.shape[:2], max(2 * needed, 16), buffer.shape[3])
    grown[:, :, :used] = buffer[:, :, :used]
    return grown


class TransformerBackbone(Backbone):
    """Transformer encoder (and, with ``with_decoder``, decoder with cross-attention)."""

    supports_parallel_time = True
    layer_classes = (EncoderLayer, DecoderLayer)
    source_state_keys = ("memory_k", "memory_v")

    def __init__(
        self,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 2,
        num_decoder_layers: int | None = None,
        dim_feedforward: int = 256,
        dropout: float = 0.1,
        causal: bool = False,
        with_decoder: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.causal = causal
        self.input_dropout = nn.Dropout(dropout)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.encoder_norm = nn.LayerNorm(d_model)
        self.decoder_layers = nn.ModuleList()
        if with_decoder:
            self.decoder_layers.extend(
                DecoderLayer(d_model, nhead, dim_feedforward, dropout)
                for _ in range(num_decoder_layers if num_decoder_layers is not None else num_layers)
            )
            self.decoder_norm = nn.LayerNorm(d_model)

    @staticmethod
    def reorder_state(state: State, index: Tensor) -> State:
        """Backbone's, with the selected cache buffers marked as holding the state's steps (fresh
        copies: the next step writes into them in place)."""
        reordered = Backbone.reorder_state(state, index)
        for name in ("self_k", "self_v"):
            for buffer in reordered.get(name, []):
                setattr(buffer, FILLED, reordered["position"])
        return reordered

    def _add_positions(self, x: Tensor, offset: int = 0) -> Tensor:
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        return self.input_dropout(x + sinusoidal_positions(positions, self.d_model).to(x.dtype))

    def encode(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        attn_mask = key_padding_to_attn_mask(pad_mask)
        # causal without padding: SDPA's own causal masking, which its flash kernels take (they
        # take no explicit mask); with padding, the two masks combined
        is_causal = self.causal and attn_mask is None
        if self.causal and attn_mask is not None:
            steps = x.shape[1]
            attn_mask = attn_mask & torch.ones(steps, steps, dtype=torch.bool, device=x.device).tril()
        h = self._add_positions(x)
        for layer in self.encoder_layers:
            h = layer(h, attn_mask, is_causal)
        return self.encoder_norm(h)

    def decode(
        self,
        y: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        state: State | None = None,
    ) -> tuple[Tensor, State]:
        if not len(self.decoder_layers):
            raise RuntimeError("this backbone was built without a decoder (with_decoder=False)")
        if state is None:  # the first call projects memory keys/values once for the whole decoding
            state = {"position": 0, "self_k": [], "self_v": [], "memory_k": [], "memory_v": []}
        memory_attn_mask = key_padding_to_attn_mask(memory_mask)
        h = self._add_positions(y, offset=state["position"])
        past, needed = state["position"], state["position"] + y.shape[1]
        new_state: State = {"position": needed, "self_k": [], "self_v": [], "memory_k": [], "memory_v": []}
        # without autograd the cache grows in place; with it, a write would change tensors that
        # earlier steps' attention saved for backward: then each step concatenates
        in_place = not torch.is_grad_enabled()
        for i, layer in enumerate(self.decoder_layers):
            cache, write_at = None, None
            if state["self_k"]:
                keys, values = state["self_k"][i], state["self_v"][i]
                if in_place:
                    cache, write_at = (with_room(keys, past, needed), with_room(values, past, needed)), past
                else:
                    cache = (keys[:, :, :past], values[:, :, :past])
            memory_in = (state["memory_k"][i], state["memory_v"][i]) if state["memory_k"] else memory
            h, (key, value), (memory_k, memory_v) = layer(h, cache, memory_in, memory_attn_mask, write_at)
            if write_at is not None:
                setattr(key, FILLED, needed)
                setattr(value, FILLED, needed)
            for name, tensor in zip(
                ("self_k", "self_v", "memory_k", "memory_v"), (key, value, memory_k, memory_v)
            ):
                new_state[name].append(tensor)
        return self.decoder_norm(h), new_state
