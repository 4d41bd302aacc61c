"""The RNN family (Elman RNN, LSTM, GRU) behind the backbone contract.

The encoder is cuDNN-friendly ``nn.RNN``/``nn.LSTM``/``nn.GRU`` over packed sequences, so
padding changes nothing. The decoder is the same recurrence attending over the encoder
memory, with Luong (multiplicative, after the recurrence: parallel over time under teacher
forcing) or Bahdanau (additive, before it: the context is an input of each step) attention.

Truncated backpropagation through time (``tbptt_steps``): in training, the encoder runs all but
the last ``tbptt_steps`` steps of an unpadded sequence without autograd and backpropagates
through the last ``tbptt_steps`` only, so a long look-back costs a no-grad forward plus a short
forward/backward, and activation memory stops growing with the length. The earlier steps still
shape the state (and the outputs a head may pool) but receive no gradient.

Under ``bf16-mixed`` the recurrences run in float32 (``recur``), as the min-RNN scans do; the
projections and attention around them stay in bfloat16 (not under FSDP's ``bf16-mixed``, whose
weights are bfloat16 in the forward pass, nor DeepSpeed's, which has no autocast). PyTorch's
autocast wrapper for cuDNN RNNs casts to float16 whatever the autocast dtype
(``aten/src/ATen/cudnn/AutocastRNN.cpp``), so on a GPU the recurrence would run in float16 with
no loss scaler, and on most CPUs oneDNN has no bfloat16 RNN kernel for float32 inputs ("could
not create a primitive descriptor"). Under ``16-mixed`` (float16 with a GradScaler) autocast
keeps its float16 cuDNN kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from seqlab.backbones.base import Backbone, State, lengths_from_mask, masked_mean

RECURRENCES: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
ATTENTIONS = ("luong", "bahdanau")

Recurrent = Tensor | tuple[Tensor, Tensor]


def _float32(value: Tensor | PackedSequence | tuple[Tensor, Tensor] | None) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple) and not isinstance(value, PackedSequence):
        return tuple(_float32(part) for part in value)
    return value.float()  # inputs and states of a torch RNN are floating point


def recur(
    module: nn.RNNBase, x: Tensor | PackedSequence, state: Recurrent | None = None
) -> tuple[Tensor | PackedSequence, Recurrent]:
    """``module(x, state)``, under bfloat16 autocast in float32 with autocast off (see the module
    docstring): the outputs and states come back in float32, and the ops after it cast them as
    autocast does. A wrapped recurrence (FSDP's unit, whose ``bf16-mixed`` swaps in bfloat16
    copies of the weights inside its forward while float32 views show outside it) and weights
    that are not float32 are left to autocast as before: a float32 input would not match them."""
    device = (x.data if isinstance(x, PackedSequence) else x).device.type
    if (
        not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))
        or torch.get_autocast_dtype(device) != torch.bfloat16
        or not isinstance(module, nn.RNNBase)
        or module.weight_ih_l0.dtype != torch.float32
    ):
        return module(x, state)
    with torch.autocast(device, enabled=False):
        return module(_float32(x), _float32(state))


class RNNBackbone(Backbone):
    """Stacked RNN/LSTM/GRU encoder; with ``with_decoder``, an attention decoder of the same cell."""

    # the encoder and decoder recurrences (each one fused multi-layer module)
    layer_classes = (nn.RNNBase,)
    source_state_keys = ("memory_keys",)  # Bahdanau attention's projected memory

    def __init__(
        self,
        cell: str = "lstm",
        d_model: int = 128,
        num_layers: int = 2,
        num_decoder_layers: int | None = None,
        dropout: float = 0.1,
        bidirectional: bool = False,
        attention: str = "luong",
        with_decoder: bool = False,
        tbptt_steps: int | None = None,
    ) -> None:
        super().__init__()
        if cell not in RECURRENCES:
            raise ValueError(f"model.cell={cell!r} is not one of {sorted(RECURRENCES)}")
        if attention not in ATTENTIONS:
            raise ValueError(f"model.attention={attention!r} is not one of {list(ATTENTIONS)}")
        if bidirectional and d_model % 2:
            raise ValueError(
                f"model.d_model={d_model}: model.bidirectional=true needs an even width (the two "
                "directions split it)"
            )
        if tbptt_steps is not None and (tbptt_steps < 1 or bidirectional):
            raise ValueError(
                f"model.tbptt_steps={tbptt_steps}: expected a positive number of steps with a "
                "unidirectional encoder (a backward direction needs the whole sequence), or null"
            )
        self.tbptt_steps = tbptt_steps
        self.cell = cell
        self.d_model = d_model
        self.causal = not bidirectional
        self.reversed_half = bidirectional
        self.attention = attention
        recurrence = RECURRENCES[cell]
        self.encoder = recurrence(
            input_size=d_model,
            hidden_size=d_model // 2 if bidirectional else d_model,
            num_layers=num_layers,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
            batch_first=True,
        )
        self.output_dropout = nn.Dropout(dropout)
        self.with_decoder = with_decoder
        if with_decoder:
            self.decoder_layers = num_decoder_layers if num_decoder_layers is not None else num_layers
            layers = self.decoder_layers
            # decoder's initial hidden state from the mean of the memory (Bahdanau et al. 2015)
            self.init_hidden = nn.Linear(d_model, layers * d_model)
            self.decoder = recurrence(
                input_size=2 * d_model if attention == "bahdanau" else d_model,
                hidden_size=d_model,
                num_layers=layers,
                dropout=dropout if layers > 1 else 0.0,
                batch_first=True,
            )
            if attention == "luong":  # score(s, m) = s^T W m  ("general")
                self.score = nn.Linear(d_model, d_model, bias=False)
            else:  # score(s, m) = v^T tanh(W_s s + W_m m)
                self.query_proj = nn.Linear(d_model, d_model, bias=False)
                self.memory_proj = nn.Linear(d_model, d_model)
                self.energy = nn.Linear(d_model, 1, bias=False)
            self.combine = nn.Linear(2 * d_model, d_model)

    # ------------------------------------------------------------------ encoder
    def encode(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        # packing takes the lengths on the CPU: one host synchronisation per batch, which also
        # tells whether anything is padded at all
        lengths = None if pad_mask is None else lengths_from_mask(pad_mask, cpu=True)
        keep = self.tbptt_steps if self.training and torch.is_grad_enabled() else None
        if keep is not None and pad_mask is not None:
            # padded text: only the batches whose lengths happen to match would be truncated
            raise ValueError(
                f"model.tbptt_steps={keep} truncates unpadded series (forecasting); this task pads "
                "its sequences: set model.tbptt_steps=null"
            )
        if lengths is None or bool((lengths == x.shape[1]).all()):
            if keep is not None and x.shape[1] > keep:
                with torch.no_grad():  # the steps the gradient does not reach
                    early, state = recur(self.encoder, x[:, :-keep])
                late, _ = recur(self.encoder, x[:, -keep:], state)
                return self.output_dropout(torch.cat([early, late], dim=1))
            out, _ = recur(self.encoder, x)
            return self.output_dropout(out)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = recur(self.encoder, packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.output_dropout(out)

    # ------------------------------------------------------------------ decoder
    def _initial_state(self, memory: Tensor, memory_mask: Tensor | None) -> State:
        batch = memory.shape[0]
        hidden = torch.tanh(self.init_hidden(masked_mean(memory, memory_mask)))
        state: State = {"hidden": hidden.view(batch, self.decoder_layers, self.d_model)}
        if self.cell == "lstm":
            state["cell"] = torch.zeros_like(state["hidden"])
        if self.attention == "bahdanau":  # projected memory, computed once per decoding
            state["memory_keys"] = self.memory_proj(memory)
        return state

    def _recurrent_state(self, state: State) -> Recurrent:
        # states are stored batch-first (for reorder_state); nn.RNNBase wants [layers, B, D]
        hidden = state["hidden"].transpose(0, 1).contiguous()
        if self.cell == "lstm":
            return hidden, state["cell"].transpose(0, 1).contiguous()
        return hidden

    def _store(self, state: State, recurrent: Recurrent) -> State:
        if isinstance(recurrent, tuple):
            return {**state, "hidden": recurrent[0].transpose(0, 1), "cell": recurrent[1].transpose(0, 1)}
        return {**state, "hidden": recurrent.transpose(0, 1)}

    @staticmethod
    def _attend(scores: Tensor, memory: Tensor, memory_mask: Tensor | None) -> Tensor:
        """scores [B,U,S] -> context [B,U,D]."""
        if memory_mask is not None:
            scores = scores.masked_fill(memory_mask[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1) @ memory

    def decode(
        self,
        y: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        state: State | None = None,
    ) -> tuple[Tensor, State]:
        if not self.with_decoder:
            raise RuntimeError("this backbone was built without a decoder (with_decoder=False)")
        if state is None:
            state = self._initial_state(memory, memory_mask)
        if self.attention == "luong":
            out, recurrent = recur(self.decoder, y, self._recurrent_state(state))
            scores = self.score(out) @ memory.transpose(1, 2)
            context = self._attend(scores, memory, memory_mask)
            state = self._store(state, recurrent)
        else:
            outputs, contexts = [], []
            for step in range(y.shape[1]):
                query = self.query_proj(state["hidden"][:, -1])  # top layer's previous state
                energy = self.energy(torch.tanh(state["memory_keys"] + query[:, None, :])).squeeze(-1)
                context = self._attend(energy[:, None, :], memory, memory_mask)
                step_in = torch.cat([y[:, step : step + 1], context], dim=-1)
                step_out, recurrent = recur(self.decoder, step_in, self._recurrent_state(state))
                state = self._store(state, recurrent)
                outputs.append(step_out)
                contexts.append(context)
            out, context = torch.cat(outputs, dim=1), torch.cat(contexts, dim=1)
        combined = torch.tanh(self.combine(torch.cat([out, context], dim=-1)))
        return self.output_dropout(combined), state
