"""The backbone contract, for every backbone: shapes, padding, causal decoding with state.

Your own backbone (``configs/model/<name>.yaml``) meets the same checks with
``pytest tests/test_backbones.py --model=<name> [--model-arg model.d_model=64 ...]``: the tests
that take the ``backbone`` fixture then run on it (built as the translation task builds it, with a
decoder), those of ``decode`` skipped where it implements none.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from seqlab.backbones import Backbone, MinRNNBackbone, RNNBackbone, TransformerBackbone

WIDTH = 16


def backbones(with_decoder: bool = True) -> dict[str, Backbone]:
    kwargs = {"d_model": WIDTH, "dropout": 0.0, "with_decoder": with_decoder}
    return {
        "rnn": RNNBackbone(cell="rnn", **kwargs),
        "lstm": RNNBackbone(cell="lstm", **kwargs),
        "gru-bahdanau": RNNBackbone(cell="gru", attention="bahdanau", **kwargs),
        "lstm-bidirectional": RNNBackbone(cell="lstm", bidirectional=True, **kwargs),
        "transformer": TransformerBackbone(nhead=4, dim_feedforward=32, **kwargs),
        "transformer-causal": TransformerBackbone(nhead=4, dim_feedforward=32, causal=True, **kwargs),
        "mingru": MinRNNBackbone(cell="mingru", dim_feedforward=32, **kwargs),
        "minlstm-blocked": MinRNNBackbone(cell="minlstm", dim_feedforward=32, scan="blocked", **kwargs),
        "mingru-log": MinRNNBackbone(cell="mingru", dim_feedforward=32, scan="log", **kwargs),
        "minlstm-bidirectional": MinRNNBackbone(
            cell="minlstm", dim_feedforward=32, bidirectional=True, expansion=2.0, **kwargs
        ),
    }


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The ``backbone`` fixture's backbones: the built-in ones, or the ``--model`` configs."""
    if "backbone" in metafunc.fixturenames:
        metafunc.parametrize(
            "backbone", metafunc.config.getoption("--model") or list(backbones()), indirect=True
        )


def user_backbone(name: str, overrides: list[str], output: Path) -> Backbone:
    """``model=<name>`` (with ``overrides``) composed and built as the translation task builds it."""
    from seqlab.tasks.base import build_backbone
    from seqlab.utils.run import compose_config
    from seqlab.utils.settings import to_plain

    cfg = compose_config("train", [f"model={name}", *overrides], output)
    return build_backbone(to_plain(cfg.model), with_decoder=True)


@pytest.fixture
def backbone(request, tmp_path: Path) -> Backbone:
    torch.manual_seed(0)
    if request.config.getoption("--model"):
        return user_backbone(request.param, request.config.getoption("--model-arg"), tmp_path).eval()
    return backbones()[request.param].eval()


@pytest.mark.slow
def test_a_users_backbone_is_checked_against_the_contract(tmp_path: Path) -> None:
    """``--model=<name>`` runs these tests on a backbone of one's own (here found through
    ``hydra.searchpath``, as a config of another package): one that meets the contract passes, its
    decoding tests skipped when it has no decoder; one that reads padding and the future while it
    says it is causal fails where it breaks the contract, named."""
    import subprocess
    import sys

    from tests.conftest import ROOT, why_failed

    (tmp_path / "model").mkdir()
    for name, leak in (("running_mean", False), ("leaky", True)):
        (tmp_path / "model" / f"{name}.yaml").write_text(
            f"_target_: tests.faults.RunningMeanBackbone\nd_model: 12\nleak: {str(leak).lower()}\n"
            "size: null\ncompile: false\n"
        )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_backbones.py",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfs",
    ]
    command += ["-m", "not slow"]  # (not this test again)
    command += ["--model=running_mean", "--model=leaky", f"--model-arg=hydra.searchpath=[file://{tmp_path}]"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, why_failed(result)
    failed = sorted(set(re.findall(r"FAILED tests/test_backbones.py::(\w+)\[(\w+)", result.stdout)))
    assert failed == [
        ("test_a_float64_model_computes_in_float64", "leaky"),  # (its padding check)
        ("test_causal_encoders_ignore_the_future_and_the_others_read_it", "leaky"),
        ("test_padding_changes_nothing", "leaky"),
    ], result.stdout
    assert "RunningMeanBackbone implements no decode (translation refuses it)" in result.stdout
    assert re.search(r"\b(\d+) passed", result.stdout) and "running_mean" not in "".join(f for f, _ in failed)


def needs_decode(backbone: Backbone) -> None:
    """Skip a test of ``decode`` for a backbone that implements none (encoder only)."""
    if not backbone.decodes():
        pytest.skip(f"{type(backbone).__name__} implements no decode (translation refuses it)")


def batch(lengths: list[int], steps: int, width: int = WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(len(lengths), steps, width)
    pad = torch.arange(steps)[None, :] >= torch.tensor(lengths)[:, None]
    return x, pad


def test_encode_shape_and_width(backbone: Backbone) -> None:
    width = backbone.d_model
    x, pad = batch([7, 3, 1], 7, width)
    memory = backbone.encode(x, pad)
    assert memory.shape == (3, 7, width)  # the width it declares (the tasks size their layers by it)
    if type(backbone).__module__.startswith("seqlab."):  # a built-in one: the width it was given
        assert width == WIDTH
    assert torch.isfinite(memory).all()


def test_padding_changes_nothing(backbone: Backbone) -> None:
    """Valid positions of a padded sequence equal the same sequence encoded alone."""
    width = backbone.d_model
    x, pad = batch([7, 4], 7, width)
    x[1, 4:] = 1e3  # garbage in the padding must not leak
    memory = backbone.encode(x, pad)
    alone = backbone.encode(x[1:2, :4])
    torch.testing.assert_close(memory[1, :4], alone[0], atol=1e-5, rtol=1e-4)


def test_a_mask_without_padding_encodes_as_no_mask(backbone: Backbone) -> None:
    width = backbone.d_model
    x, pad = batch([6, 6], 6, width)
    torch.testing.assert_close(backbone.encode(x, pad), backbone.encode(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["mingru", "minlstm-blocked", "minlstm-bidirectional"])
def test_min_rnn_layers_with_a_padding_free_mask_equal_no_mask(name: str) -> None:
    """On an accelerator the min-RNN encoders keep a padding-free mask (checking it would wait for
    the device): the masked path must then give what the unmasked one gives."""
    torch.manual_seed(0)
    model = backbones(with_decoder=False)[name].eval()
    x, pad = batch([6, 6, 6], 6)
    for layer in model.encoder_layers:
        torch.testing.assert_close(layer(x, pad), layer(x, None), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["transformer", "mingru", "minlstm-bidirectional"])
def test_padded_encoding_and_pooling_never_wait_for_the_device(name: str) -> None:
    """On an accelerator, reading a value back (``bool(mask.any())``, ``.item()``) makes the host
    wait for the device at every batch. On the meta device any such read raises, so a padded
    batch that encodes and pools there reads nothing back. (The recurrent backbones read the
    lengths once per batch: packing takes them on the CPU.)"""
    from seqlab.backbones.base import pool

    model = backbones(with_decoder=False)[name].to("meta")
    x = torch.randn(3, 7, WIDTH, device="meta")
    pad = torch.zeros(3, 7, dtype=torch.bool, device="meta")
    states = model.encode(x, pad)
    assert states.shape == (3, 7, WIDTH)
    for how in ("mean", "max", "last"):
        assert pool(states, pad, how).shape == (3, WIDTH)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_an_empty_sequence_in_a_recurrent_batch_is_a_clear_error(cell: str) -> None:
    x, pad = batch([5, 0], 5)
    with pytest.raises(ValueError, match="a sequence in the batch is empty"):
        RNNBackbone(cell=cell, d_model=WIDTH).encode(x, pad)


def test_causal_encoders_ignore_the_future_and_the_others_read_it(backbone: Backbone) -> None:
    """A causal encoder's states up to t do not change with the inputs after t; a bidirectional
    one's (attention over the whole sequence, a backward direction) do: one that lost its
    backward direction would pass as causal."""
    width = backbone.d_model
    x, _ = batch([6], 6, width)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, width)
    before, after = backbone.encode(x)[:, :4], backbone.encode(changed)[:, :4]
    if backbone.causal:
        torch.testing.assert_close(before, after)
    else:
        assert not torch.allclose(before, after, atol=1e-4), "a non-causal encoder ignored the future"
        assert (before - after).abs().amax(dim=-1).min() > 1e-5, "some early position read nothing later"


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_step_by_step_decoding_equals_full_decoding(backbone: Backbone, grad: bool) -> None:
    """Teacher-forced decoding in one call equals decoding one step at a time with the state, and
    in chunks; without autograd (generation), where the Transformer's cache grows in place past
    its first buffers (16 steps, then twice what is needed), as with it."""
    needs_decode(backbone)
    width = backbone.d_model
    x, pad = batch([5, 3], 5, width)
    with torch.set_grad_enabled(grad):
        memory = backbone.encode(x, pad)
        y = torch.randn(2, 40, width)
        full, _ = backbone.decode(y, memory, pad)
        state, outs = None, []
        for step in range(40):
            out, state = backbone.decode(y[:, step : step + 1], memory, pad, state)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-4)
        # chunks (a prefix, a block that overflows the cache, then one step at a time) agree as well
        state, outs = None, []
        for start, stop in [(0, 2), (2, 19), (19, 20), (20, 21), (21, 40)]:
            out, state = backbone.decode(y[:, start:stop], memory, pad, state)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-4)
    if grad:  # the step-by-step graph reaches the weights (nothing written in place under autograd)
        torch.cat(outs, dim=1).sum().backward()
        assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


@torch.no_grad()
def test_a_reordered_state_decodes_on_as_its_rows(backbone: Backbone) -> None:
    """Beam search's use of a state: decode, reorder the rows (here: swap and repeat them), decode
    on; each row continues as the row it was taken from, however the cache was grown before."""
    needs_decode(backbone)
    width = backbone.d_model
    x, pad = batch([5, 3], 5, width)
    memory = backbone.encode(x, pad)
    y = torch.randn(2, 24, width)
    full, _ = backbone.decode(y, memory, pad)
    state = None
    for step in range(18):
        _, state = backbone.decode(y[:, step : step + 1], memory, pad, state)
    rows = torch.tensor([1, 0, 0])
    state = backbone.reorder_state(state, rows)
    outs = []
    for step in range(18, 24):
        out, state = backbone.decode(y[rows, step : step + 1], memory[rows], pad[rows], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full[rows, 18:], atol=1e-5, rtol=1e-4)


def test_a_state_continued_twice_or_in_another_mode_decodes_as_itself(backbone: Backbone) -> None:
    """A state is handed on, but one continued twice (two candidates from one prefix) or made
    under inference mode and continued under no_grad gives each continuation its own steps: the
    Transformer's cache, written in place, is copied first then."""
    needs_decode(backbone)
    width = backbone.d_model
    x, pad = batch([5, 3], 5, width)
    memory = backbone.encode(x, pad)
    y = torch.randn(2, 14, width)
    with torch.no_grad():
        full, _ = backbone.decode(y, memory, pad)
        for made_under in (torch.no_grad, torch.inference_mode):
            with made_under():
                state = None
                for step in range(12):
                    _, state = backbone.decode(y[:, step : step + 1], memory, pad, state)
            first, first_state = backbone.decode(y[:, 12:13], memory, pad, state)
            backbone.decode(torch.randn(2, 1, width), memory, pad, state)  # another continuation
            after, _ = backbone.decode(y[:, 13:14], memory, pad, first_state)
            torch.testing.assert_close(
                torch.cat([first, after], dim=1), full[:, 12:], atol=1e-5, rtol=1e-4, msg=str(made_under)
            )


def test_decoder_is_causal(backbone: Backbone) -> None:
    needs_decode(backbone)
    width = backbone.d_model
    x, _ = batch([4], 4, width)
    memory = backbone.encode(x)
    y = torch.randn(1, 5, width)
    changed = y.clone()
    changed[:, 3:] = torch.randn(1, 2, width)
    torch.testing.assert_close(
        backbone.decode(y, memory)[0][:, :3], backbone.decode(changed, memory)[0][:, :3]
    )


def test_decoder_ignores_padded_memory(backbone: Backbone) -> None:
    needs_decode(backbone)
    width = backbone.d_model
    x, pad = batch([5, 2], 5, width)
    memory = backbone.encode(x, pad)
    y = torch.randn(2, 3, width)
    out, _ = backbone.decode(y, memory, pad)
    noisy = memory.clone()
    noisy[1, 2:] = 1e3
    out_noisy, _ = backbone.decode(y, noisy, pad)
    torch.testing.assert_close(out[1], out_noisy[1])


def test_reorder_state_selects_beams(backbone: Backbone) -> None:
    """Reordering the state equals decoding the reordered batch (what beam search relies on)."""
    needs_decode(backbone)
    width = backbone.d_model
    x, pad = batch([4, 4, 2], 4, width)
    memory = backbone.encode(x, pad)
    y = torch.randn(3, 2, width)
    _, state = backbone.decode(y, memory, pad)
    index = torch.tensor([2, 2, 0])
    reordered = backbone.reorder_state(state, index)
    nxt = torch.randn(3, 1, width)
    out, _ = backbone.decode(nxt, memory[index], pad[index], reordered)
    _, ref_state = backbone.decode(y[index], memory[index], pad[index])
    ref, _ = backbone.decode(nxt, memory[index], pad[index], ref_state)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_beam_reordering_keeps_the_sources_entries_and_equals_reorder_state(backbone: Backbone) -> None:
    """Beam search's reordering (rows among each sentence's beams, which share the source) leaves
    the source's entries as they are, and the next step decodes as with ``reorder_state``."""
    needs_decode(backbone)
    width = backbone.d_model
    x, pad = batch([4, 2], 4, width)
    memory, pad = backbone.encode(x, pad).repeat_interleave(3, dim=0), pad.repeat_interleave(3, dim=0)
    y = torch.randn(6, 2, width)
    index = torch.tensor([2, 2, 0, 4, 3, 3])  # sentence 0's beams, then sentence 1's
    _, state = backbone.decode(y, memory, pad)
    by_beams = backbone.reorder_beams(state, index)
    _, state = backbone.decode(y, memory, pad)
    by_state = backbone.reorder_state(state, index)
    assert set(by_beams) == set(by_state)
    nxt = torch.randn(6, 1, width)
    torch.testing.assert_close(
        backbone.decode(nxt, memory, pad, by_beams)[0], backbone.decode(nxt, memory, pad, by_state)[0]
    )
    kept = [key for key in backbone.source_state_keys if key in state]
    if type(backbone) in (TransformerBackbone, MinRNNBackbone):  # (built-in ones; Luong attention keeps none)
        assert kept
    for key in kept:
        _, fresh = backbone.decode(y, memory, pad)
        assert backbone.reorder_beams(fresh, index)[key] is fresh[key], f"{key} copied"


def test_gradients_reach_every_parameter(backbone: Backbone) -> None:
    width = backbone.d_model
    backbone.train()
    x, pad = batch([5, 3], 5, width)
    memory = backbone.encode(x, pad)
    out = backbone.decode(torch.randn(2, 3, width), memory, pad)[0] if backbone.decodes() else memory
    out.sum().backward()
    missing = [name for name, p in backbone.named_parameters() if p.grad is None]
    assert not missing


def test_encoder_only_backbones_have_no_decoder_parameters() -> None:
    """Forecasting and classification build no decoder, so DDP sees no unused parameters."""
    for name, encoder_only in backbones(with_decoder=False).items():
        full = backbones(with_decoder=True)[name]
        assert sum(p.numel() for p in encoder_only.parameters()) < sum(p.numel() for p in full.parameters())
        with pytest.raises(RuntimeError, match="without a decoder"):
            encoder_only.decode(torch.randn(1, 1, WIDTH), torch.randn(1, 2, WIDTH))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RNNBackbone(cell="transformer"), "model.cell"),
        (lambda: RNNBackbone(attention="dot"), "model.attention"),
        (
            lambda: RNNBackbone(d_model=15, bidirectional=True),
            "model.d_model=15: model.bidirectional=true needs an even",
        ),
        (
            lambda: TransformerBackbone(d_model=30, nhead=4),
            "model.d_model=30 must be a multiple of model.nhead=4",
        ),
        (
            lambda: TransformerBackbone(d_model=32, nhead=0),
            "model.d_model=32 must be a multiple of model.nhead=0",
        ),
        (
            lambda: TransformerBackbone(d_model=32, nhead=-4),
            "model.d_model=32 must be a multiple of model.nhead=-4",
        ),
    ],
)
def test_bad_backbone_settings_are_named(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_truncated_bptt_keeps_the_outputs_and_cuts_the_gradient(cell: str) -> None:
    """tbptt_steps=k: the same outputs; the input gradient of the last k steps is full BPTT's,
    the earlier steps get none; evaluation is untouched."""
    torch.manual_seed(0)
    full = RNNBackbone(cell=cell, d_model=16, num_layers=2, dropout=0.0).train()
    truncated = RNNBackbone(cell=cell, d_model=16, num_layers=2, dropout=0.0, tbptt_steps=5).train()
    truncated.load_state_dict(full.state_dict())
    x = torch.randn(3, 12, 16, dtype=torch.float64, requires_grad=True)
    full.double(), truncated.double()
    expected = full.encode(x)
    (grad_full,) = torch.autograd.grad(expected.square().sum(), x)
    got = truncated.encode(x)
    torch.testing.assert_close(got, expected)
    (grad_cut,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(grad_cut[:, -5:], grad_full[:, -5:])
    assert torch.count_nonzero(grad_cut[:, :-5]) == 0 and torch.count_nonzero(grad_full[:, :-5]) > 0
    truncated.eval()
    (grad_eval,) = torch.autograd.grad(truncated.encode(x).square().sum(), x)
    torch.testing.assert_close(grad_eval, grad_full)
    with pytest.raises(ValueError, match=r"model.tbptt_steps=4: expected a positive number of steps"):
        RNNBackbone(cell=cell, d_model=16, bidirectional=True, tbptt_steps=4)
    # padded batches (text) would be truncated only when every length matched: refused
    unpadded = torch.zeros(2, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"model.tbptt_steps=5 truncates unpadded series"):
        truncated.float().train().encode(torch.randn(2, 9, 16), unpadded)


@torch.no_grad()
def test_a_float64_model_computes_in_float64(backbone: Backbone) -> None:
    """minGRU/minLSTM scanned in float32 whatever the model's dtype: a float64 model (a
    ``64-true`` run, a float64 check) matched its padding-free and step-by-step forms to 2e-7 only,
    and handed float32 states from step to step."""
    width = backbone.d_model
    model = backbone.double()
    x, pad = batch([5, 3], 5, width)
    x = x.double()
    memory = model.encode(x, pad)
    assert memory.dtype == torch.float64
    torch.testing.assert_close(memory[1, :3], model.encode(x[1:2, :3])[0], atol=1e-12, rtol=1e-12)
    if not model.decodes():
        return
    y = torch.randn(2, 6, width, dtype=torch.float64)
    full, _ = model.decode(y, memory, pad)
    _, state = model.decode(y[:, :2], memory, pad)
    rest, state = model.decode(y[:, 2:], memory, pad, state)
    torch.testing.assert_close(rest, full[:, 2:], atol=1e-12, rtol=1e-12)
    tensors = [t for value in state.values() for t in (value if isinstance(value, list) else [value])]
    assert {t.dtype for t in tensors if torch.is_tensor(t) and t.is_floating_point()} <= {torch.float64}


@pytest.mark.parametrize("name", ["mingru", "minlstm-blocked"])
def test_min_rnn_decoding_carries_float32_states_under_bf16_autocast(name: str) -> None:
    """Decoding one step at a time hands the state from call to call: in bfloat16 it would be
    rounded at every step (what the float32 scan avoids within one call)."""
    torch.manual_seed(0)
    model = backbones()[name].eval()
    memory = torch.randn(2, 5, WIDTH)
    y = torch.randn(2, 6, WIDTH)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = model.decode(y[:, :3], memory)
        assert all(h.dtype == torch.float32 for h in state["hidden"])
        _, after = model.decode(y[:, 3:], memory, state=state)
        _, whole = model.decode(y, memory)
    for stepped, full in zip(after["hidden"], whole["hidden"]):
        assert stepped.dtype == torch.float32
        torch.testing.assert_close(stepped, full, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru-bahdanau", "lstm-bidirectional"])
def test_rnn_recurrences_run_in_float32_under_bf16_autocast(name: str) -> None:
    """Under bf16-mixed the nn.RNN/LSTM/GRU recurrences compute in float32 (CUDA autocast would run
    cuDNN in float16 without a scaler; oneDNN mostly has no bf16 RNN kernel): padded or not,
    truncated BPTT or not, the encoder's outputs are float32 and bit-equal to a float32 run, the
    decoder carries float32 states, a bfloat16 input is the float32 run of its values, and
    gradients reach every parameter."""
    torch.manual_seed(0)
    model = backbones()[name].train()
    x, pad = batch([7, 4, 6], 7)
    y = torch.randn(3, 4, WIDTH)
    for mask in (None, pad):
        model.tbptt_steps = 3 if mask is None and not name.endswith("bidirectional") else None
        expected = model.encode(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            encoded = model.encode(x, mask)
            from_bf16 = model.encode(x.bfloat16(), mask)
            decoded, state = model.decode(y, encoded, mask)
        assert encoded.dtype == torch.float32 and torch.equal(encoded, expected)
        assert torch.equal(from_bf16, model.encode(x.bfloat16().float(), mask))
        assert state["hidden"].dtype == torch.float32 and torch.isfinite(decoded).all()
        model.zero_grad()
        (encoded.square().mean() + decoded.float().square().mean()).backward()
        assert all(p.grad is not None and torch.count_nonzero(p.grad) for p in model.parameters())


class FSDPUnitStandIn(torch.nn.Module):
    """What FSDP1 makes of a wrapped recurrence under bf16-mixed: float32 views of the weights
    outside its forward, the module computing with bfloat16 weights inside it."""

    def __init__(self, module: torch.nn.RNNBase) -> None:
        super().__init__()
        self.module = module.to(torch.bfloat16)

    @property
    def weight_ih_l0(self) -> torch.Tensor:
        return self.module.weight_ih_l0.float()

    def forward(self, *args):
        return self.module(*args)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_bfloat16_weights_under_autocast_keep_autocasts_dtype(cell: str, wrapped: bool) -> None:
    """FSDP's bf16-mixed computes with bfloat16 copies of the weights inside its unit's forward:
    the recurrence is then left to autocast (a float32 input would not match them)."""
    torch.manual_seed(0)
    model = RNNBackbone(cell=cell, d_model=WIDTH, dropout=0.0).train()
    model.encoder = FSDPUnitStandIn(model.encoder) if wrapped else model.encoder.to(torch.bfloat16)
    x, _ = batch([7, 7], 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = model.encode(x.bfloat16())
    assert encoded.dtype == torch.bfloat16 and torch.isfinite(encoded.float()).all()


def test_a_backbone_setting_left_null_is_the_backbones_to_read() -> None:
    """A user's backbone with ``dim_feedforward: int | None = None`` (null derives it) met the
    range check with a bare TypeError; a task dropout of null is still refused by name."""
    from seqlab.errors import ConfigError
    from seqlab.tasks.base import _BACKBONE_RANGES, check_probability, check_range

    for key in ("dim_feedforward", "num_layers", "dropout", "num_decoder_layers", "expansion"):
        check_range(f"model.{key}", None, *_BACKBONE_RANGES[key])
    with pytest.raises(ConfigError, match=r"task.head_dropout=None: expected a probability in \[0, 1\]"):
        check_probability("task.head_dropout", None)
