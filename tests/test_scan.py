"""The parallel scans equal the sequential recurrence they replace, forward and backward."""

from __future__ import annotations

import pytest
import torch

from seqlab.backbones.minrnn import MinRNNBackbone
from seqlab.backbones.scan import gated_scan, linear_scan, log_scan, positive_activation, scan_reference

LENGTHS = [1, 2, 3, 16, 37, 100]
FAST_METHODS = ["sequential", "blocked"]


def float64(*shape: int, low: float | None = None, scale: float = 1.0) -> torch.Tensor:
    x = (
        torch.rand(*shape, dtype=torch.float64)
        if low is not None
        else torch.randn(*shape, dtype=torch.float64)
    )
    return ((x + low if low is not None else x) * scale).requires_grad_()


def gated_reference(u: torch.Tensor, c: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """minGRU written out: z = sigmoid(u), g(c) = c + 1/2 (c >= 0) | sigmoid(c)."""
    z = torch.sigmoid(u)
    g = torch.where(c >= 0, c + 0.5, torch.sigmoid(c))
    return scan_reference(1 - z, z * g, h0)


def grads(output: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((output * weight).sum(), inputs))


@pytest.mark.parametrize("method", FAST_METHODS)
@pytest.mark.parametrize("steps", LENGTHS)
def test_linear_scan_equals_the_recurrence(method: str, steps: int) -> None:
    torch.manual_seed(steps)
    a, b, h0 = float64(steps, 3, 5, low=0.0), float64(steps, 3, 5), float64(3, 5)
    weight = torch.randn(steps, 3, 5, dtype=torch.float64)  # a loss that weighs every step
    fast, ref = linear_scan(a, b, h0, method), scan_reference(a, b, h0)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
    for got, want in zip(grads(fast, [a, b, h0], weight), grads(ref, [a, b, h0], weight)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", [*FAST_METHODS, "log"])
@pytest.mark.parametrize("steps", LENGTHS)
def test_gated_scan_equals_the_mingru_recurrence(method: str, steps: int) -> None:
    torch.manual_seed(steps)
    u, c = float64(steps, 4, 6, scale=3.0), float64(steps, 4, 6, scale=3.0)
    h0 = float64(4, 6, low=0.1)  # positive, as every minGRU state is (the log form needs it)
    weight = torch.randn(steps, 4, 6, dtype=torch.float64)
    fast, ref = gated_scan(u, c, h0, method), gated_reference(u, c, h0)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
    for got, want in zip(grads(fast, [u, c, h0], weight), grads(ref, [u, c, h0], weight)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # without an initial state the recurrence starts from zeros
    torch.testing.assert_close(gated_scan(u, c, None, method), gated_reference(u, c, None), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_custom_backward_passes_gradcheck(method: str) -> None:
    torch.manual_seed(0)
    u, c, h0 = float64(9, 2, 3, scale=2.0), float64(9, 2, 3, scale=2.0), float64(2, 3)
    assert torch.autograd.gradcheck(lambda *x: gated_scan(*x, method), (u, c, h0))
    a, b = float64(9, 2, 3, low=0.0), float64(9, 2, 3)
    assert torch.autograd.gradcheck(lambda *x: linear_scan(*x, method), (a, b, h0))


def test_log_scan_is_the_recurrence_in_log_space() -> None:
    torch.manual_seed(0)
    a, b = torch.rand(50, 2, 3, dtype=torch.float64), torch.rand(50, 2, 3, dtype=torch.float64) + 0.01
    h0 = torch.rand(2, 3, dtype=torch.float64) + 0.1
    torch.testing.assert_close(log_scan(a.log(), b.log()), scan_reference(a, b), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        log_scan(a.log(), b.log(), h0.log()), scan_reference(a, b, h0), atol=1e-6, rtol=0
    )


def test_long_sequences_in_float32() -> None:
    """Strongly decaying and saturated gates over 4096 steps: no overflow, no NaN. The direct forms
    stay within float32 rounding of the float64 recurrence (a in (0, 1) makes it contractive); the
    log-space form loses ~3 digits to its long cumulative sums (measured 4e-3), so it is not the
    default anywhere."""
    torch.manual_seed(0)
    u, c = torch.randn(4096, 2, 8) * 20, torch.randn(4096, 2, 8) * 20
    ref = gated_reference(u.double(), c.double(), None)
    for method, tolerance in (("sequential", 1e-5), ("blocked", 1e-5), ("log", 1e-2)):
        h = gated_scan(u, c, None, method)
        assert torch.isfinite(h).all(), method
        error = ((h.double() - ref).abs() / (ref.abs() + 1)).max().item()
        assert error < tolerance, (method, error)


@pytest.mark.parametrize("method", FAST_METHODS)
@pytest.mark.parametrize("gate", [-16.0, -8.0, 0.0, 8.0, 16.0])
def test_float32_gradients_of_nearly_closed_and_open_gates(method: str, gate: float) -> None:
    """The fused backward in float32 against the same maths in float64: z and 1 - z each formed as 1
    minus the other lost their digits where a gate nearly closes or opens (minLSTM's long memory:
    forget logit 5, input logit -12 gives z = 6e-6), 10% off at |u| = 16 and exactly 0 past 17."""
    torch.manual_seed(int(gate) + 100)
    u = (gate + torch.randn(64, 3, 8)).requires_grad_()
    c = (torch.randn(64, 3, 8) * 2).requires_grad_()
    weight = torch.randn(64, 3, 8)
    u64, c64 = u.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    got = grads(gated_scan(u, c, None, method), [u, c], weight)
    want = grads(gated_reference(u64, c64, None), [u64, c64], weight.double())
    for name, g32, g64 in zip(("u", "c"), got, want):
        error = ((g32.double() - g64).norm() / g64.norm()).item()
        assert error < 1e-4, (name, error)


def test_positive_activation_is_continuous_and_positive() -> None:
    x = torch.linspace(-30, 30, 10001)
    g = positive_activation(x)
    assert (g > 0).all()
    torch.testing.assert_close(positive_activation(torch.zeros(1)), torch.tensor([0.5]))
    assert (g.diff() >= 0).all()  # monotone: no jump at 0
    # trainable through (it modified autograd's saved sigmoid output in place): g' = sigmoid' below 0, 1 above
    x = torch.tensor([-2.0, -0.5, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(positive_activation(x).sum(), x)
    s = torch.sigmoid(x.detach()[:2])
    torch.testing.assert_close(grad, torch.cat([s * (1 - s), torch.ones(2, dtype=torch.float64)]))


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_every_scan_method_gives_the_same_backbone(cell: str) -> None:
    """The scan form is a speed choice only: the same weights give the same encodings."""
    torch.manual_seed(0)
    reference = MinRNNBackbone(cell=cell, d_model=16, dim_feedforward=32, dropout=0.0, scan="sequential")
    x = torch.randn(3, 40, 16)
    pad = torch.arange(40)[None, :] >= torch.tensor([40, 17, 1])[:, None]
    expected = reference.encode(x, pad)
    for method in ("blocked", "log"):
        other = MinRNNBackbone(cell=cell, d_model=16, dim_feedforward=32, dropout=0.0, scan=method)
        other.load_state_dict(reference.state_dict())
        torch.testing.assert_close(other.encode(x, pad), expected, atol=1e-5, rtol=1e-4)


def test_bad_scan_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"model\.scan"):
        MinRNNBackbone(scan="parallel")
    with pytest.raises(ValueError, match=r"model\.cell"):
        MinRNNBackbone(cell="mamba")
    # a bidirectional encoder splits its hidden width between the directions: rounded to even
    assert MinRNNBackbone(d_model=15, bidirectional=True).hidden == 16
    assert MinRNNBackbone(d_model=16, expansion=1.5, bidirectional=True).hidden == 24  # as before
    with pytest.raises(ValueError, match="scan method"):
        linear_scan(torch.rand(3, 1, 1), torch.rand(3, 1, 1), method="log")


@pytest.mark.parametrize("method", [*FAST_METHODS, "log"])
def test_reduced_precision_inputs_are_scanned_in_float32(method: str) -> None:
    """Under bf16-mixed the projections hand the scan bfloat16 inputs: the state is carried in
    float32 and rounded once, so the error is bfloat16's rounding (~0.1%), not one rounding per
    step over thousands of steps (1-4% when the state was carried in bfloat16)."""
    torch.manual_seed(0)
    u, c = (torch.randn(4096, 4, 32) - 5).bfloat16(), torch.randn(4096, 4, 32).bfloat16()
    u.requires_grad_(), c.requires_grad_()
    ref = gated_reference(u.double(), c.double(), None)
    h = gated_scan(u, c, None, method)
    assert h.dtype == torch.bfloat16
    error = ((h.double() - ref).abs() / ref.abs().clamp_min(1e-3)).mean().item()
    assert error < 3e-3, error
    h.float().sum().backward()
    assert u.grad.dtype == c.grad.dtype == torch.bfloat16 and torch.isfinite(u.grad).all()
    a, b = torch.sigmoid(-u.detach()), c.detach()
    linear = linear_scan(a, b, None, method if method != "log" else "sequential")
    assert linear.dtype == torch.bfloat16
    linear_ref = scan_reference(a.double(), b.double())
    assert ((linear.double() - linear_ref).abs().max() / linear_ref.abs().max()).item() < 1e-2
    positive = (torch.rand(a.shape) + 0.1).bfloat16()
    logged, logged_ref = log_scan(a.log(), positive.log()), scan_reference(a.double(), positive.double())
    assert logged.dtype == torch.bfloat16
    assert ((logged.double() - logged_ref).abs() / logged_ref).mean().item() < 3e-3


def test_model_size_solves_the_width_of_a_bidirectional_minrnn_with_any_expansion() -> None:
    """model.size searches multiples of 4; expansion 1.25 made every other hidden width odd, which
    the bidirectional encoder refused (naming a width the user never set)."""
    from seqlab.tasks.base import SIZES, build_backbone

    for expansion in (1.25, 0.75):
        config = {"_target_": "seqlab.backbones.minrnn.MinRNNBackbone", "bidirectional": True,
                  "expansion": expansion, "d_model": 128, "dim_feedforward": 256, "nhead": 4}  # fmt: skip
        backbone = build_backbone({**config, "size": "tiny"})
        assert backbone.hidden % 2 == 0
        count = sum(p.numel() for p in backbone.parameters())
        assert abs(count - SIZES["tiny"]) < 0.2 * SIZES["tiny"], (expansion, backbone.d_model, count)
