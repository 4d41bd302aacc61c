"""Step-by-step sequence generation: greedy and beam search over any backbone's stateful ``decode``.

Both take ``step(tokens[N,1], state) -> (log_probs[N,V], state)``: one decoder step for N
hypotheses with the backbone's state (RNN hidden state, Transformer key/value cache), so a
sequence of U tokens costs U decoder steps. Beam search keeps ``beam_size`` live hypotheses per
sentence and selects surviving beams with ``reorder_state``; finished hypotheses are scored
``log p / length ** length_penalty`` (length counts the [EOS]; fairseq's normalisation) and a
sentence stops once it has ``beam_size`` of them. Every sentence ends at its own maximum
length (``max_len_a * source length + max_len_b``) with a forced [EOS]. Padding and [BOS]
are never generated.

Where the parameters are sharded (FSDP, FSDP2, DeepSpeed ZeRO-3) every decoder step is a
collective, so the processes must take as many steps as each other: ``agree`` (the maximum of an
integer over the processes) keeps them in step; a process whose sentences are finished runs
steps whose results it ignores until every process is done (``synced_gpus`` in Hugging Face's
``generate``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Step = Callable[[Tensor, Any], tuple[Tensor, Any]]
Reorder = Callable[[Any, Tensor], Any]
#: the maximum of an integer over the processes that decode together
Agree = Callable[[int], int]


def alone(value: int) -> int:
    """``Agree`` for a process decoding on its own."""
    return value


def _mask_scores(
    log_probs: Tensor, banned: list[int], eos_id: int, at_limit: Tensor, too_short: bool = False
) -> Tensor:
    """Forbid ``banned`` tokens everywhere, [EOS] while the hypotheses are ``too_short`` and
    everything but [EOS] where ``at_limit`` [N] (the limit wins over the minimum)."""
    log_probs = log_probs.clone()
    log_probs[:, banned] = float("-inf")
    if too_short:
        eos = log_probs[at_limit, eos_id].clone()
        log_probs[:, eos_id] = float("-inf")
        log_probs[at_limit, eos_id] = eos
    if bool(at_limit.any()):
        eos = log_probs[at_limit, eos_id].clone()
        log_probs[at_limit] = float("-inf")
        log_probs[at_limit, eos_id] = eos
    return log_probs


@torch.no_grad()
def greedy_search(
    step: Step,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    max_lengths: Tensor,
    banned: list[int],
    device,
    agree: Agree = alone,
    min_length: int = 1,
) -> list[list[int]]:
    """The most probable next token at every step; returns each sentence's tokens without [EOS].

    [EOS] is refused before ``min_length`` tokens (fairseq's ``--min-len``, 1 by default: an empty
    translation is never the answer) unless a sentence's ``max_lengths`` comes first."""
    tokens = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    finished = [False] * batch_size  # on the host: one copy of the step's tokens, not one per row
    outputs: list[list[int]] = [[] for _ in range(batch_size)]
    state = None
    max_lengths = max_lengths.to(device)
    for t in range(agree(int(max_lengths.max()))):
        log_probs, state = step(tokens, state)
        log_probs = _mask_scores(log_probs, banned, eos_id, t + 1 >= max_lengths, t < min_length)
        tokens = log_probs.argmax(dim=-1, keepdim=True)
        for i, token in enumerate(tokens.view(-1).tolist()):
            if finished[i]:
                continue
            if token == eos_id:
                finished[i] = True
            else:
                outputs[i].append(token)
        if not agree(int(not all(finished))):
            break
    return outputs


@torch.no_grad()
def beam_search(
    step: Step,
    reorder: Reorder,
    batch_size: int,
    beam_size: int,
    bos_id: int,
    eos_id: int,
    max_lengths: Tensor,
    banned: list[int],
    device,
    length_penalty: float = 1.0,
    agree: Agree = alone,
    min_length: int = 1,
) -> list[list[int]]:
    """The best finished hypothesis of each sentence (without [EOS]); ``min_length`` as in
    ``greedy_search``.

    ``step`` sees ``batch_size * beam_size`` rows, sentence-major (rows ``b*K ... b*K+K-1`` are
    sentence b's beams): the caller repeats the encoder memory that way before calling.
    """
    k = beam_size
    scores = torch.full((batch_size, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
    tokens = torch.full((batch_size * k, 1), bos_id, dtype=torch.long, device=device)
    limits = max_lengths.to(device).repeat_interleave(k)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch_size)]
    done = [False] * batch_size  # on the host: a GPU is waited for once a step, not once a sentence
    state = None
    base = torch.arange(batch_size, device=device)[:, None] * k
    for t in range(agree(int(max_lengths.max()))):
        log_probs, state = step(tokens[:, -1:], state)
        log_probs = _mask_scores(log_probs.float(), banned, eos_id, t + 1 >= limits, t < min_length)
        vocab = log_probs.shape[-1]
        candidates = (scores.view(-1, 1) + log_probs).view(batch_size, k * vocab)
        top_scores, top_index = candidates.topk(2 * k, dim=-1)  # at most k of them end in [EOS]
        beam, token = top_index // vocab, top_index % vocab
        is_eos = token == eos_id
        rank = torch.arange(2 * k, device=device).expand_as(token)
        # hypotheses ending among the k best are finished (the others were outscored by live beams)
        ends = (is_eos & (rank < k) & top_scores.isfinite()).nonzero().tolist()
        ends = [(b, j) for b, j in ends if not done[b]]
        if ends:  # their scores and tokens copied to the host together
            at = torch.tensor(ends, device=device)
            rows = at[:, 0] * k + beam[at[:, 0], at[:, 1]]
            ended = top_scores[at[:, 0], at[:, 1]].tolist()
            for (b, _), score, hypothesis in zip(ends, ended, tokens[rows, 1:].tolist()):
                finished[b].append((score / (t + 1) ** length_penalty, hypothesis))
        for b in range(batch_size):
            if not done[b] and len(finished[b]) >= k:
                done[b] = True
        if not agree(int(not all(done))):
            break
        # the k best candidates that do not end the sentence continue
        keep = torch.where(is_eos, rank + 2 * k, rank).topk(k, dim=-1, largest=False).indices
        scores = top_scores.gather(1, keep)
        if any(done):
            scores = scores.masked_fill(torch.tensor(done, device=device)[:, None], float("-inf"))
        rows = (base + beam.gather(1, keep)).flatten()
        tokens = torch.cat([tokens[rows], token.gather(1, keep).reshape(-1, 1)], dim=1)
        state = reorder(state, rows)
    best = []
    for b in range(batch_size):
        if finished[b]:
            best.append(max(finished[b], key=lambda item: item[0])[1])
        else:  # unreachable: the limit forces [EOS] on every live beam
            best.append(tokens[b * k, 1:].tolist())
    return best


__all__ = ["Agree", "alone", "beam_search", "greedy_search"]
