"""Linear recurrences ``h_t = a_t * h_{t-1} + b_t`` (elementwise), computed over a whole sequence.

This is the recurrence of the parallel-scan RNNs (minGRU, minLSTM: Feng et al. 2024): their gates
depend only on the input, so ``a`` and ``b`` are computed for every step at once and only this
cheap elementwise recurrence remains. How it is evaluated decides the speed, so there are three
forms, chosen by ``method`` (``scripts/benchmark.py scan`` measures them):

- ``sequential``: one fused multiply-add per step, in place, without autograd recording the steps;
  the backward pass is the same recurrence run backwards (a custom ``autograd.Function``). T small
  kernels: the fastest form on CPU, where a kernel launch costs ~1 us.
- ``blocked``: the sequence is cut into ~sqrt(T) blocks; every block is scanned from a zero state
  at once (vectorised over blocks), then the carries are propagated block to block, then added
  with the block-local decay products. ~2 sqrt(T) larger kernels instead of T small ones: the form
  for accelerators, where launches dominate. Exact (no logs, no division), same backward trick.
- ``log``: the log-space prefix sum of Heinsen (2023),
  ``h = exp(cumsum(log a) + logcumsumexp(log b - cumsum(log a)))``, recorded by autograd. It needs
  positive ``b`` (minGRU's ``g`` activation guarantees it) and is the textbook reference form.
  Measured here it is the slowest form and the least accurate: in float32 over 4096 steps its
  long cumulative sums lose ~3 digits (relative error 4e-3 vs 4e-6 for the direct forms, whose
  recurrence is contractive since 0 < a < 1), and its gradients more (they difference the long
  sums: 1% normwise at T=4096, noise where gates are nearly open), so nothing uses it by default.

All forms take time-major tensors ``[T, B, H]`` (each step then reads contiguous memory) and
return ``h`` of the same shape; ``gated_scan`` fuses minGRU's gate and candidate activations into
the scan and its backward, which on CPU matters more than the scan itself.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

SCAN_METHODS = ("auto", "sequential", "blocked", "log")
#: dtypes whose scans run in float32 (the state is rounded once, not at every step)
REDUCED_FLOATS = (torch.bfloat16, torch.float16)


def _scan_sequential_(a: Tensor, h: Tensor, reverse: bool = False) -> Tensor:
    """In place: ``h[t] = a[t] * h[t-1] + h[t]`` over the first (time) dimension; ``h`` holds b.
    ``reverse``: ``h[t] = a[t+1] * h[t+1] + h[t]`` from the end (the backward of the scan)."""
    steps, coefficients = h.unbind(0), a.unbind(0)  # views made once, not per step
    if reverse:
        for t in range(len(steps) - 2, -1, -1):
            steps[t].addcmul_(coefficients[t + 1], steps[t + 1])
    else:
        for t in range(1, len(steps)):
            steps[t].addcmul_(coefficients[t], steps[t - 1])
    return h


def _scan_blocked_(a: Tensor, h: Tensor, reverse: bool = False) -> Tensor:
    """The same scan in ~2 sqrt(T) vectorised steps (see the module docstring); in place unless
    the length needs padding to whole blocks or ``reverse`` (then on a flipped copy)."""
    if reverse:  # the reverse scan is the forward scan of the flipped sequence, a shifted by one
        a_reversed = torch.empty_like(a)
        a_reversed[0] = 1.0  # unused: the scan starts from the last step
        a_reversed[1:] = a[1:].flip(0)
        return h.copy_(_scan_blocked_(a_reversed, h.flip(0)).flip(0))
    steps = h.shape[0]
    block = max(1, math.isqrt(steps))
    blocks = -(-steps // block)
    pad = blocks * block - steps
    if pad:  # identity steps (a=1, b=0) at the end change nothing before them
        a = torch.cat([a, a.new_ones((pad, *a.shape[1:]))])
        h = torch.cat([h, h.new_zeros((pad, *h.shape[1:]))])
    a_blocks = a.view(blocks, block, *a.shape[1:])
    h_blocks = h.view(blocks, block, *h.shape[1:])
    decay = a_blocks.clone()  # decay[k, i] = a[k, 0] * ... * a[k, i]: product within block k
    for i in range(1, block):  # local scans of every block at once, each from a zero state
        h_blocks[:, i].addcmul_(a_blocks[:, i], h_blocks[:, i - 1])
        decay[:, i].mul_(decay[:, i - 1])
    carry = h_blocks[:, -1].clone()  # each block's final state, then made global
    for k in range(1, blocks):
        carry[k].addcmul_(decay[k, -1], carry[k - 1])
    h_blocks[1:].addcmul_(decay[1:], carry[:-1].unsqueeze(1))
    return h_blocks.view(blocks * block, *h.shape[1:])[:steps]


_SCANNERS = {"sequential": _scan_sequential_, "blocked": _scan_blocked_}


def _scan(a: Tensor, h: Tensor, h0: Tensor, method: str) -> Tensor:
    """In place on ``h`` (which holds b): the recurrence from the initial state ``h0``."""
    h[0].addcmul_(a[0], h0)
    return _SCANNERS[method](a, h)


def _reverse_scan(a: Tensor, grad: Tensor, method: str) -> Tensor:
    """dL/dh_t = grad_t + a_{t+1} dL/dh_{t+1}: the backward of the scan, itself a scan run backwards
    (on a fresh buffer; ``grad`` is left as it is)."""
    return _SCANNERS[method](a, grad.clone(memory_format=torch.contiguous_format), reverse=True)


def _check_method(method: str, device: torch.device) -> str:
    if method == "auto":
        return "sequential" if device.type == "cpu" else "blocked"
    if method not in _SCANNERS:
        raise ValueError(f"scan method {method!r} is not one of {list(_SCANNERS)} (or auto)")
    return method


class _LinearScan(torch.autograd.Function):
    """h = scan(a, b, h0) with a backward that is the reverse scan (no per-step autograd graph):
    dL/db_t = dL/dh_t, dL/da_t = dL/dh_t * h_{t-1}, dL/dh0 = a_0 dL/dh_0."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor, method: str) -> Tensor:  # type: ignore[override]
        a = a.contiguous()
        h = _scan(a, b.clone(memory_format=torch.contiguous_format), h0, method)
        ctx.method = method
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor):  # type: ignore[override]
        a, h, h0 = ctx.saved_tensors
        grad = _reverse_scan(a, grad_h, ctx.method)
        grad_a = torch.empty_like(grad)
        torch.mul(grad[1:], h[:-1], out=grad_a[1:])
        torch.mul(grad[0], h0, out=grad_a[0])
        return grad_a, grad, grad[0] * a[0], None


def _eager(scan):
    """The scan functions run eagerly under ``torch.compile`` (``model.compile=true``): tracing
    their T-step loops would unroll them into a graph per length (measured: minutes and ~11 GB
    at T=1024); the projections, norms and MLP around them still compile."""
    return torch.compiler.disable(scan)


def _float32_state(scan):
    """Scans of bfloat16/float16 inputs (``bf16-mixed``) run in float32 and round the states once
    at the end: a state carried in bfloat16 collects a rounding error at every step (measured over
    4,096 steps: 1-4% mean relative error, against 0.1% rounded once), and the log-space form's
    cumulative sums would lose every digit."""

    @functools.wraps(scan)
    def scan_in_float32(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if x.dtype not in REDUCED_FLOATS:
            return scan(x, *args, **kwargs)
        args = tuple(arg.float() if isinstance(arg, Tensor) else arg for arg in args)
        kwargs = {key: arg.float() if isinstance(arg, Tensor) else arg for key, arg in kwargs.items()}
        return scan(x.float(), *args, **kwargs).to(x.dtype)

    return scan_in_float32


@_float32_state
def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None, method: str = "auto") -> Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` for time-major ``a, b`` [T, B, H]; ``h0`` [B, H] (zeros if None).

    ``method``: ``sequential`` | ``blocked`` | ``auto`` (sequential on CPU, blocked elsewhere);
    ``blocked`` multiplies ``a`` across a block, so it needs ``|a| <= 1`` (as every gate is).
    The log-space form takes log inputs: see :func:`log_scan`. Reduced-precision inputs are
    scanned in float32 (``_float32_state``), as in the other two scans.
    """
    method = _check_method(method, a.device)
    if h0 is None:
        h0 = a.new_zeros(a.shape[1:])
    return _eager(_LinearScan.apply)(a, b, h0, method)


def positive_activation(x: Tensor) -> Tensor:
    """minGRU's ``g``: x + 0.5 for x >= 0, sigmoid(x) below; positive, continuous, so candidate
    states stay positive (which the log-space scan needs) and grow linearly rather than saturate."""
    return torch.sigmoid(x.clamp(max=0)) + x.clamp(min=0)


def log_positive_activation(x: Tensor) -> Tensor:
    """log g(x), computed without forming g for very negative x."""
    return torch.where(x >= 0, (x.clamp(min=0) + 0.5).log(), -F.softplus(-x))


class _GatedScan(torch.autograd.Function):
    """The minGRU recurrence fused: h_t = (1 - z_t) h_{t-1} + z_t g(c_t), z = sigmoid(u).

    The gate and candidate activations are computed inside, in place where possible, and the
    backward writes the gate and candidate gradients directly: a handful of passes over [T, B, H]
    instead of the dozen temporaries the same code written with autograd-tracked ops allocates.
    The backward recomputes ``z`` and ``1 - z`` (as ``sigmoid(-u)``) from a copy of ``u``: either
    one formed as 1 minus the other loses its digits where a gate is nearly open or nearly closed
    (float32 gradients were 10% off at |u| = 16 and exactly 0 beyond 17). The copy
    is saved, not ``u`` itself, which is usually a slice of the projection's output and would keep
    all of it alive: with ``g``, as much memory as saving ``1 - z`` and ``g`` took before.
    """

    @staticmethod
    def forward(ctx, u: Tensor, c: Tensor, h0: Tensor, method: str) -> Tensor:  # type: ignore[override]
        # three buffers, everything else in place (on CPU a fresh buffer costs more than a pass)
        a = torch.sigmoid(u)  # z, then 1 - z below
        h = c.clamp(min=0.0)
        g = c.clamp(max=0.0).sigmoid_().add_(h)  # positive_activation(c)
        torch.mul(g, a, out=h)  # b = z g: the scan runs in place on it
        # 1 - z formed so is off by up to 6e-8 where z is near 1: for the forward, no more than
        # the state's own rounding (the backward's products need its relative precision)
        a.neg_().add_(1.0)
        h = _scan(a, h, h0, method)
        ctx.method = method
        ctx.save_for_backward(a.copy_(u), g, h, h0)  # the scan is done with a: u in it
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor):  # type: ignore[override]
        u, g, h, h0 = ctx.saved_tensors
        a = torch.neg(u).sigmoid_()  # 1 - z
        grad = _reverse_scan(a, grad_h, ctx.method)  # dL/dh_t
        grad_h0 = grad[0] * a[0]
        # dL/dz_t = dL/dh_t (g_t - h_{t-1});  dL/du = dL/dz z (1 - z)
        grad_u = torch.empty_like(grad)
        torch.sub(g[1:], h[:-1], out=grad_u[1:])
        torch.sub(g[0], h0, out=grad_u[0])
        grad_c = torch.sigmoid(u)  # z
        grad_u.mul_(grad).mul_(a).mul_(grad_c)
        grad_c.mul_(grad)
        # dL/dc = dL/dh_t z g'(c), g' = g (1 - g) for c < 0 (g < 1/2) and 1 above, written
        # branch-free (a masked fill or a boolean mask is 3-10x slower) as s (1 - s) + 3/4 [g > 1/2],
        # s = min(g, 1/2), the step through the spent ``grad`` buffer and s in the spent ``a``. (For
        # 0 < c < 3e-8, where 1/2 + c rounds to 1/2, the slope is 1/4: a loss of nothing measurable.)
        step = torch.sub(g, 0.5, out=grad).clamp_(min=0.0).sign_().mul_(0.75)
        slope = torch.clamp(g, max=0.5, out=a)
        grad_c.mul_(slope.addcmul_(slope, slope, value=-1.0).add_(step))
        return grad_u, grad_c, grad_h0, None


@_float32_state
def gated_scan(u: Tensor, c: Tensor, h0: Tensor | None = None, method: str = "auto") -> Tensor:
    """``h_t = (1 - z_t) h_{t-1} + z_t g(c_t)`` with ``z = sigmoid(u)`` (minGRU; minLSTM after its
    gate normalisation), for time-major pre-activations ``u, c`` [T, B, H]; ``h0`` [B, H] or None
    (zeros; ``log`` takes its log, so it needs a positive one). ``method``: ``sequential`` |
    ``blocked`` | ``log`` | ``auto`` (see the module docstring)."""
    if method == "log":  # log(1 - z) = -softplus(u), log z = -softplus(-u)
        log_b = log_positive_activation(c) - F.softplus(-u)
        return log_scan(-F.softplus(u), log_b, None if h0 is None else torch.log(h0))
    if h0 is None:
        h0 = u.new_zeros(u.shape[1:])
    return _eager(_GatedScan.apply)(u, c, h0, _check_method(method, u.device))


@_float32_state
def log_scan(log_a: Tensor, log_b: Tensor, log_h0: Tensor | None = None) -> Tensor:
    """Heinsen's log-space scan: ``h_t = a_t h_{t-1} + b_t`` from time-major ``log a``, ``log b``
    [T, B, H] (so ``b > 0``); ``log_h0`` [B, H] is the log of the initial state (None: h0 = 0)."""
    if log_h0 is not None:
        log_a = torch.cat([torch.zeros_like(log_h0[None]), log_a])
        log_b = torch.cat([log_h0[None], log_b])
    a_star = torch.cumsum(log_a, dim=0)
    h = torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=0))
    return h if log_h0 is None else h[1:]


def scan_reference(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """The recurrence step by step with autograd (time-major [T, B, H]): the definition the fast
    forms are tested against."""
    h = a.new_zeros(a.shape[1:]) if h0 is None else h0
    outputs = []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        outputs.append(h)
    return torch.stack(outputs)


__all__ = [
    "SCAN_METHODS",
    "gated_scan",
    "linear_scan",
    "log_positive_activation",
    "log_scan",
    "positive_activation",
    "scan_reference",
]
