"""The benchmark harness (scripts/benchmark.py) and the throughput figures every run records.

Timings themselves are never asserted (this machine is noisy); what is asserted is that each
measurement measures what it says: activation memory grows with T, FLOPs match the analytic
count, the plain loop and the Trainer path run the same work, the CLI writes its files.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from seqlab import benchmark as bench
from seqlab.backbones.transformer import TransformerBackbone
from seqlab.callbacks.run_stats import flops_per_token
from seqlab.tasks.base import SeqTask
from seqlab.train import train
from tests.conftest import ROOT, run_script


def test_saved_activation_bytes_counts_each_saved_storage_once() -> None:
    x = torch.randn(100, requires_grad=True)
    y = torch.randn(100, requires_grad=True)
    # x * y saves both inputs (400 bytes each); the second product saves the same storages again
    assert bench.saved_activation_bytes(lambda: (x * y * 1.0 + x * y).sum()) == 800
    assert bench.saved_activation_bytes(lambda: (x * y).sum()) == 800
    assert bench.saved_activation_bytes(lambda: (x * y).sum(), exclude=[x]) == 400


def test_scaling_exponent_recovers_the_power() -> None:
    lengths = [64, 128, 256, 512]
    assert bench.scaling_exponent(lengths, [3e-6 * t**2 for t in lengths]) == pytest.approx(2.0)
    assert bench.scaling_exponent(lengths, [0.1 * t for t in lengths]) == pytest.approx(1.0)
    assert bench.scaling_exponent([64], [1.0]) is None
    # each backbone's fitted lengths recorded: one that skipped the longer ones is fitted shorter
    rows = [{"backbone": "a", "T": t, "train_ms": 0.1 * t} for t in (64, 128, 256, 512)]
    rows += [{"backbone": "b", "T": t, "train_ms": 0.1 * t} for t in (64, 128, 256)] + [
        {"backbone": "b", "T": 512}
    ]
    spans: dict[str, list[int]] = {}
    assert bench.exponents(rows, spans=spans) == {"a": 1.0, "b": 1.0}
    assert spans == {"a": [256, 512], "b": [128, 256]}


def test_lengths_rows_and_memory_grow_with_length() -> None:
    rows = bench.bench_lengths(
        backbones=("gru", "transformer", "mingru"), lengths=(8, 32), batch=2, width=16, repeats=1
    )
    assert [(r["backbone"], r["T"]) for r in rows] == [
        ("gru", 8), ("gru", 32), ("transformer", 8), ("transformer", 32), ("mingru", 8), ("mingru", 32),
    ]  # fmt: skip
    for short, long in zip(rows[::2], rows[1::2]):
        assert short["train_tokens_per_s"] > 0 and short["infer_tokens_per_s"] > 0
        # activations kept for backward are per step: 4x the steps, about 4x the memory
        assert 3.0 < long["train_memory_mb"] / short["train_memory_mb"] <= 4.5
    fitted = bench.exponents(rows)
    assert set(fitted) == {"gru", "transformer", "mingru"} and all(math.isfinite(v) for v in fitted.values())


def test_the_exponent_above_the_fixed_cost_sees_through_launch_overhead() -> None:
    """A quadratic cost behind 1 ms of fixed cost per step (a GPU's kernel launches) over the GPU
    lengths: the plain fit reads 0.93; above the shortest length's time, 2."""
    rows = [{"backbone": "attention", "T": T, "train_ms": 1 + 1e-7 * T * T} for T in bench.GPU_LENGTHS]
    rows += [{"backbone": "scan", "T": T, "train_ms": 1 + 1e-4 * T} for T in bench.GPU_LENGTHS]
    assert bench.exponents(rows)["attention"] < 1.5
    above = bench.exponents(rows, above_fixed_cost=True)
    assert above["attention"] == pytest.approx(2.0, abs=0.05) and above["scan"] == pytest.approx(
        1.0, abs=0.05
    )
    # a cost linear in T with no fixed part is 1, not the 1.07 of subtracting T=64's whole time
    linear = [{"backbone": "rnn", "T": T, "train_ms": 0.1 * T} for T in bench.CPU_LENGTHS]
    assert bench.exponents(linear, above_fixed_cost=True)["rnn"] == pytest.approx(1.0, abs=1e-6)


def test_decode_times_generation_token_by_token_with_the_decoders_state(monkeypatch) -> None:
    """Every backbone as the encoder-decoder translation builds, T tokens generated one at a time:
    T decoder calls of one token each, the state handed from one to the next."""
    calls: list[tuple[int, bool]] = []
    real = bench.generation

    def counting(model, memory, steps):
        decode = type(model).decode.__get__(model)  # the class's: wrapped once per length

        def recorded(y, memory, mask, state):
            calls.append((y.shape[1], state is not None))
            return decode(y, memory, mask, state)

        model.decode = recorded
        return real(model, memory, steps)

    monkeypatch.setattr(bench, "generation", counting)
    rows = bench.bench_decode(
        backbones=("gru", "transformer"), lengths=(3, 5), source_length=6, batch=2, width=16, repeats=1
    )
    assert [(r["backbone"], r["T"]) for r in rows] == [
        ("gru", 3),
        ("gru", 5),
        ("transformer", 3),
        ("transformer", 5),
    ]
    assert all(r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and r["params"] > 0 for r in rows)
    # per length: a warm-up and a timed round of both backbones, each step one token; the first without a state
    assert len(calls) == 2 * 2 * (3 + 5) and {width for width, _ in calls} == {1}
    assert calls[:3] == [(1, False), (1, True), (1, True)]


def test_decode_skips_the_longer_lengths_of_a_backbone_out_of_memory(monkeypatch) -> None:
    real = bench.generation

    def failing(model, memory, steps):
        if steps >= 3 and getattr(model, "cell", None) == "gru":
            return lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
        return real(model, memory, steps)

    monkeypatch.setattr(bench, "generation", failing)
    rows = bench.bench_decode(
        backbones=("gru", "lstm"), lengths=(2, 3, 4), source_length=4, batch=1, width=8, repeats=1
    )
    assert [(r["backbone"], r["T"], r.get("skipped")) for r in rows] == [
        ("gru", 2, None), ("gru", 3, "out of memory"), ("gru", 4, "out of memory"),
        ("lstm", 2, None), ("lstm", 3, None), ("lstm", 4, None),
    ]  # fmt: skip


def test_decode_times_the_lengths_in_the_same_rounds(monkeypatch) -> None:
    """Timed one length after another, a host's drift made every backbone's per-token time at
    T=256 longer than at T=1024: the lengths share the rounds, and the per-token growth is a
    paired ratio."""
    real, rounds = bench.round_robin, []

    def timed(calls, device, repeats, warmup=1):
        rounds.append(sorted(calls))
        times, failed = real(calls, device, repeats, warmup)
        # per token: 1 ms at T=2, 3 ms at T=4 (in every round)
        return {key: [key[1] * (1e-3 if key[1] == 2 else 3e-3)] * repeats for key in times}, failed

    monkeypatch.setattr(bench, "round_robin", timed)
    rows = bench.bench_decode(
        backbones=("gru",), lengths=(2, 4), source_length=4, batch=1, width=8, repeats=2
    )
    assert rounds == [[("gru", 2), ("gru", 4)]]
    assert [r["per_token_vs_shortest"] for r in rows] == pytest.approx([1.0, 3.0])


def test_a_slow_backbone_skips_the_longer_lengths() -> None:
    rows = bench.bench_lengths(
        backbones=("rnn",), lengths=(4, 8), batch=1, width=8, repeats=1, max_step_seconds=0
    )
    assert "train_ms" in rows[0] and "skipped" in rows[1]


def test_truncated_bptt_lengths_run() -> None:
    rows = bench.bench_lengths(backbones=("gru",), lengths=(8,), batch=1, width=8, repeats=1, tbptt=4)
    assert rows[0]["backbone"] == "gru+tbptt4" and rows[0]["train_ms"] > 0


def test_a_change_is_timed_beside_its_baseline_in_the_same_rounds(monkeypatch) -> None:
    """Two runs of the harness differ by 10-27% on a shared host: the compile and truncated-BPTT
    speed-ups were ratios of two runs. With ``with_baseline`` the plain backbone is timed in the
    same rounds and the speed-up is the median of the rounds' paired ratios."""
    calls = []  # every timed call takes 1 s, the changed ones 0.5 s
    real = bench.round_robin

    def timed(calls_by_key, device, repeats, warmup=1):
        calls.append(list(calls_by_key))
        times, failed = real(calls_by_key, device, repeats, warmup)
        return {key: [0.5 if "+" in key[0] else 1.0] * len(value) for key, value in times.items()}, failed

    monkeypatch.setattr(bench, "round_robin", timed)
    rows = bench.bench_lengths(
        backbones=("gru", "transformer"),
        lengths=(8,),
        batch=1,
        width=8,
        repeats=3,
        tbptt=4,
        with_baseline=True,
    )
    assert calls == [[("gru+tbptt4", "train"), ("gru+tbptt4", "infer"), ("gru", "train"), ("gru", "infer"),
                      ("transformer", "train"), ("transformer", "infer")]]  # fmt: skip
    by_label = {row["backbone"]: row for row in rows}
    assert (
        by_label["gru+tbptt4"]["train_speedup"] == 2.0
        and by_label["gru+tbptt4"]["train_speedup_all"] == [2.0] * 3
    )
    assert "train_speedup" not in by_label["gru"] and "train_speedup" not in by_label["transformer"]


def test_running_out_of_cpu_memory_skips_the_longer_lengths(monkeypatch) -> None:
    """The CPU allocator raises a plain RuntimeError, not torch.OutOfMemoryError: the lengths
    measured so far are kept, the other backbones go on; any other error stops the benchmark,
    the rows of the lengths done before it handed to ``progress``."""
    real = bench.training_step

    def failing(at: int, message: str):
        """The GRU's training step at length ``at`` raises ``message``."""

        def training_step(model, x, amp=None):
            step = real(model, x, amp)

            def fails() -> None:
                raise RuntimeError(message)

            return fails if x.shape[1] == at and getattr(model, "cell", None) == "gru" else step

        return training_step

    oom = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB"
    monkeypatch.setattr(bench, "training_step", failing(16, oom))
    rows = bench.bench_lengths(backbones=("gru", "lstm"), lengths=(8, 16, 32), batch=1, width=8, repeats=1)
    assert [(r["backbone"], r["T"], r.get("skipped")) for r in rows] == [
        ("gru", 8, None), ("gru", 16, "out of memory"), ("gru", 32, "out of memory at a shorter T"),
        ("lstm", 8, None), ("lstm", 16, None), ("lstm", 32, None),
    ]  # fmt: skip
    monkeypatch.setattr(bench, "training_step", failing(16, "shape mismatch"))
    reported = []
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.bench_lengths(
            backbones=("gru", "lstm"), lengths=(8, 16), batch=1, width=8, repeats=1, progress=reported.append
        )
    assert [(r["backbone"], r["T"]) for r in reported[-1]] == [("gru", 8), ("lstm", 8)]


def test_round_robin_times_every_call_each_round_and_drops_one_out_of_memory() -> None:
    order = []

    def call(name: str, fail_at: int | None = None):
        def fn() -> None:
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

        return fn

    times, failed = bench.round_robin(
        {"a": call("a"), "b": call("b", fail_at=2)}, torch.device("cpu"), repeats=3
    )
    # a warm-up round, then b failed in the first timed one (which began with it: each round one
    # call later)
    assert order == ["a", "b", "b", "a", "a", "a"]
    assert failed == {"b"} and list(times) == ["a"] and len(times["a"]) == 3
    order.clear()
    times, _ = bench.round_robin({k: call(k) for k in "abc"}, torch.device("cpu"), repeats=2)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"] and all(len(t) == 2 for t in times.values())
    assert bench.paired_ratios([2.0, 4.0], [1.0, 1.0]) == [2.0, 4.0]


def test_data_overrides_come_last_and_a_chosen_data_runs_alone(monkeypatch) -> None:
    ran = []
    monkeypatch.setattr(
        bench, "bench_overhead",
        lambda overrides, epochs, repeats: ran.append(overrides) or
        {"data_wait_share": 0.01, "plain_step_ms": 1.0, "trainer_step_ms": 1.0, "ratio": 1.0},
    )  # fmt: skip
    rows = bench.bench_data(extra=["model=gru"])
    assert [r["task"] for r in rows] == list(bench.DATA_TASKS)
    assert all(overrides[-1] == "model=gru" for overrides in ran)  # after model=lstm: it wins
    ran.clear()
    rows = bench.bench_data(extra=["data=sst2", "data.data_dir=/somewhere"])
    assert [r["task"] for r in rows] == ["sst2"]
    assert ran == [[*bench.DATA_COMMON, "data=sst2", "data.data_dir=/somewhere"]]
    assert bench.trainer_device(ran[0]).type == "cpu"  # the overrides compose


class TinyTransformerTask(SeqTask):
    """A task whose loss reads the backbone only, so its FLOPs have a closed form."""

    def __init__(self, d_model: int = 32, num_layers: int = 2, dim_feedforward: int = 64) -> None:
        super().__init__("val/loss", "min")
        self.save_hyperparameters()
        self.backbone = TransformerBackbone(
            d_model=d_model, nhead=4, num_layers=num_layers, dim_feedforward=dim_feedforward, dropout=0.0
        )

    def step_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(batch).square().mean()

    def batch_tokens(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * batch.shape[1]


def test_flops_per_token_match_the_transformer_formula() -> None:
    """6 FLOPs per weight per token (forward 2, backward 4) plus attention's 12 * layers * T * d
    (QK^T and AV, forward and backward): the count the MFU figures rest on."""
    d, layers, ff, steps = 32, 2, 64, 50
    task = TinyTransformerTask(d, layers, ff)
    weights = layers * (4 * d * d + 2 * d * ff)
    expected = 6 * weights + 12 * layers * steps * d
    before = [p.detach().clone() for p in task.parameters()]
    measured = flops_per_token(task, torch.randn(3, steps, d))
    assert measured == pytest.approx(expected, rel=0.02)
    # counted on a meta-device copy: the task's own weights and gradients are untouched
    assert all(torch.equal(a, b) for a, b in zip(before, task.parameters()))
    assert all(p.grad is None for p in task.parameters())


@pytest.mark.parametrize("model", ["mingru", "lstm"])
def test_flops_are_counted_on_padded_text_batches_where_the_model_allows(make_cfg, model: str) -> None:
    """The min-RNNs read nothing back from a padded batch, so the meta-device count works on text
    (~6 FLOPs per non-embedding weight per token); LSTMs pack by lengths read on the CPU: None."""
    from seqlab.train import build_datamodule, build_task

    cfg = make_cfg(
        "data=sentiment_synthetic",
        f"model={model}",
        "model.d_model=32",
        "trainer.accelerator=cpu",
        fast=False,
    )
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    task = build_task(cfg.task, cfg.model, datamodule)
    batch = next(b for b in datamodule.train_dataloader() if bool(b["pad_mask"].any()))  # a padded batch
    counted = flops_per_token(task, batch)
    if model == "lstm":
        assert counted is None
    else:
        weights = sum(p.numel() for name, p in task.named_parameters() if "embed" not in name)
        assert counted == pytest.approx(6 * weights, rel=0.1)
        # as many padding columns again: the same per token (the FLOPs on padding are not useful
        # work; dividing them by the real tokens doubled the count, and MFU with it)
        width = batch["input_ids"].shape[1]
        padded = {**batch, "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, width)),
                  "pad_mask": torch.nn.functional.pad(batch["pad_mask"], (0, width), value=True)}  # fmt: skip
        assert flops_per_token(task, padded) == pytest.approx(counted, rel=0.05)


def test_mfu_is_achieved_over_peak_flops(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("model=transformer", "trainer.max_epochs=1", "callbacks.run_stats.peak_flops=1e10")
    _, objects = train(cfg)
    summary = objects["summary"]
    achieved = summary["flops_per_token"] * summary["train_tokens_per_s"]
    assert summary["achieved_tflops_per_s"] == pytest.approx(achieved / 1e12)
    assert summary["mfu"] == pytest.approx(achieved / 1e10)
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "perf/mfu" in header


def test_train_loss_is_logged_at_logging_steps_only(make_cfg, monkeypatch) -> None:
    """``self.log`` costs Python time on every step it is called: the per-step loss is logged on
    the steps the loggers write (every log_every_n_steps), the epoch mean once per epoch."""
    calls: list[str] = []
    original = SeqTask.log

    def counting_log(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(SeqTask, "log", counting_log)
    cfg = make_cfg("trainer.max_epochs=2", "trainer.log_every_n_steps=10", "trainer.limit_train_batches=25")
    train(cfg)
    assert calls.count("train/loss") == 5  # steps 10, 20, 30, 40, 50 of 2 x 25
    assert calls.count("train/loss_epoch") == 2


SMALL_LSTM = ["model=lstm", "model.d_model=16", "model.num_layers=1", "data.num_steps=1200", "data.lookback=48",
              "data.horizon=12", "data.batch_size=32", "trainer.accelerator=cpu",
              "callbacks.rich_progress_bar=null"]  # fmt: skip


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_plain_loop_trains_exactly_what_the_trainer_trains(tmp_path: Path, precision: str) -> None:
    """The overhead ratio compares like with like: same data order, loss, optimizer, schedule,
    clipping and precision give the same weights after an epoch, bit for bit (in bf16-mixed too:
    the LSTM's recurrence runs in float32 there, and oneDNN's bf16 LSTM backward, which it used to
    run, was not bit-reproducible across the two loops on an AMD EPYC)."""
    timers = bench.StepTimer(), bench.StepTimer()
    overrides = [*SMALL_LSTM, f"trainer.precision={precision}"]
    # two epochs: each epoch's own order (the plain loop did not set the sampler's epoch); no
    # dropout, whose masks follow the random state that the Trainer's validation loader draws from
    overrides.append("model.dropout=0.0")
    by_trainer = bench._trainer_run(overrides, 2, timers[0], tmp_path / "trainer")
    by_hand = bench._plain_run(overrides, 2, timers[1], tmp_path / "plain")
    trained, by_hand_state = by_trainer.state_dict(), by_hand.state_dict()
    assert list(trained) == list(by_hand_state)
    for name, tensor in trained.items():
        assert torch.equal(tensor, by_hand_state[name]), name
    assert len(timers[0].epochs[1]) == len(timers[1].epochs[1]) > 0  # the same steps timed
    assert 0 < timers[1].data_shares[0] < 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.precision=16-mixed", "trainer.precision"),
        ("+trainer.gradient_clip_algorithm=value", "gradient_clip_algorithm"),
        ("trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4"),
        ("trainer.limit_train_batches=10", "trainer.limit_train_batches=10"),
        ("trainer.limit_train_batches=1", "trainer.limit_train_batches=1"),  # one batch, not 1.0
    ],
)
def test_the_plain_loop_refuses_what_it_does_not_mirror(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        bench._plain_run([*SMALL_LSTM, override], 1, bench.StepTimer(), tmp_path)


def test_overhead_and_data_share_results(tmp_path: Path) -> None:
    result = bench.bench_overhead(SMALL_LSTM, epochs=1, repeats=1)
    assert result["trainer_step_ms"] > 0 and result["plain_step_ms"] > 0
    assert result["ratio"] == pytest.approx(result["trainer_step_ms"] / result["plain_step_ms"])
    assert len(result["trainer_epoch_means_ms"]) == len(result["plain_epoch_means_ms"]) == 1
    assert result["ratio_lower_quartile"] == pytest.approx(result["ratio"])  # one epoch each
    assert bench._lower_quartile([4.0, 1.0, 3.0, 2.0, 5.0]) == 2.0
    assert 0 < result["data_wait_share"] < 1


def test_median_interval_is_the_widest_order_statistics_that_reach_the_confidence() -> None:
    values = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
    # n = 10: (x2, x9) covers the median with 1 - 2 * 11/1024 = 97.9%; (x3, x8) only 89%
    assert bench.median_interval(values) == (2.0, 9.0)
    assert bench.median_interval(values, confidence=0.85) == (3.0, 8.0)
    assert bench.median_interval(values[:6]) == (5.0, 10.0)  # n = 6: the extremes cover 96.9%
    assert bench.median_interval(values[:5]) is None  # n = 5: even the extremes cover only 93.8%
    # and it does cover: the true median of a skewed distribution, over many samples of 10
    generator = torch.Generator().manual_seed(0)
    samples = torch.empty(4000, 10).exponential_(generator=generator).tolist()
    median = math.log(2)
    covered = sum(low <= median <= high for low, high in map(bench.median_interval, samples))
    assert 0.965 < covered / len(samples) < 0.99  # 97.9% expected


def test_overhead_pairs_the_runs_of_each_repeat_in_alternating_order(tmp_path: Path, monkeypatch) -> None:
    """Each repeat's two runs give one ratio; their median and its interval are the figure of
    record, robust to a host that is slower for a while (here: repeats 2 and 3 run 3x slow)."""
    calls, collections = [], []
    speed = {0: 1.0, 1: 1.0, 2: 3.0, 3: 3.0, 4: 1.0, 5: 1.0, 6: 1.0}
    overhead = {0: 1.02, 1: 1.04, 2: 1.01, 3: 1.05, 4: 1.03, 5: 1.06, 6: 1.00}

    def fake(name):
        def run(overrides, epochs, timer, workdir):
            repeat = int(workdir.name.removeprefix(name))
            calls.append((name, repeat, len(collections)))
            step = 0.01 * speed[repeat] * (overhead[repeat] if name == "trainer" else 1.0)
            timer.epochs.extend([[step, step]] * epochs)
            timer.data_shares.append(0.01)

        return run

    monkeypatch.setattr(bench, "_trainer_run", fake("trainer"))
    monkeypatch.setattr(bench, "_plain_run", fake("plain"))
    monkeypatch.setattr(bench, "_fresh_heap", lambda: collections.append(1))
    result = bench.bench_overhead(SMALL_LSTM, epochs=2, repeats=7)
    assert [(name, repeat) for name, repeat, _ in calls] == [
        ("trainer", 0), ("plain", 0), ("plain", 1), ("trainer", 1), ("trainer", 2), ("plain", 2),
        ("plain", 3), ("trainer", 3), ("trainer", 4), ("plain", 4), ("plain", 5), ("trainer", 5),
        ("trainer", 6), ("plain", 6),
    ]  # fmt: skip
    assert [seen for *_, seen in calls] == list(range(1, 15)), "a collection before every run"
    assert result["paired_ratios"] == pytest.approx([overhead[r] for r in range(7)])
    assert result["ratio_paired"] == pytest.approx(1.03)
    # n = 7: (x1, x7) is the 95% interval (x2, x6 covers 87.5%)
    assert (result["ratio_paired_low"], result["ratio_paired_high"]) == pytest.approx((1.00, 1.06))
    assert result["ratio"] != pytest.approx(1.03, abs=0.005)  # pooled epochs: the slow repeats weigh in


def test_ablation_pairs_each_variant_with_the_default_run_of_its_repeat(tmp_path: Path, monkeypatch) -> None:
    order = []
    slow = {1: 5.0}  # repeat 1 runs 5x slow: pooled medians would mix it in, pairs do not

    def run(overrides, epochs, timer, workdir, seqlab_hooks=True, bare=False):
        index, repeat = map(int, workdir.name.split("-"))
        order.append(index)
        extra = 0.001 * (repeat + 1) if "trainer.log_every_n_steps=1000000" in overrides else 0.0
        timer.epochs.append([0.01 * slow.get(repeat, 1.0) + extra])

    monkeypatch.setattr(bench, "_trainer_run", run)
    monkeypatch.setattr(
        bench, "_plain_run", lambda overrides, epochs, timer, workdir: run([], epochs, timer, workdir)
    )
    ablations = {"no per-step logging": bench.Ablation(("trainer.log_every_n_steps=1000000",))}
    rows = bench.bench_ablation(SMALL_LSTM, ablations, epochs=1, repeats=6)
    assert order == [0, 1, 2, 2, 1, 0] * 3
    row = {r["variant"]: r for r in rows}["no per-step logging"]
    assert row["vs_default_ms_paired"] == pytest.approx(3.5)  # 1 ... 6 ms, one per repeat
    assert (row["vs_default_low_ms"], row["vs_default_high_ms"]) == pytest.approx((1.0, 6.0))


def test_benchmark_cli_writes_json_and_plot(tmp_path: Path) -> None:
    done = run_script(
        str(ROOT / "scripts" / "benchmark.py"), "lengths", "--backbones", "lstm,mingru", "--lengths", "8,16",
        "--batch", "2", "--width", "16", "--repeats", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    payload = json.loads((tmp_path / "lengths.json").read_text())
    assert payload["environment"]["torch"] == torch.__version__
    assert {r["backbone"] for r in payload["rows"]} == {"lstm", "mingru"}
    assert set(payload["scaling_exponents"]["train"]) == {"lstm", "mingru"}
    assert (tmp_path / "lengths.png").stat().st_size > 10_000
    assert all(len(r["train_ms_all"]) == len(r["infer_ms_all"]) == 1 for r in payload["rows"])
    assert not (tmp_path / "lengths.partial.json").exists()  # only while it runs, or after a failure

    done = run_script(
        str(ROOT / "scripts" / "benchmark.py"), "decode", "--backbones", "lstm,transformer", "--lengths", "2,4",
        "--batch", "2", "--width", "16", "--repeats", "1", "--source-length", "5", "--out", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    payload = json.loads((tmp_path / "decode.json").read_text())
    assert payload["source_length"] == 5 and {(r["backbone"], r["T"]) for r in payload["rows"]} == {
        ("lstm", 2),
        ("lstm", 4),
        ("transformer", 2),
        ("transformer", 4),
    }

    done = run_script(
        str(ROOT / "scripts" / "benchmark.py"), "scan", "--lengths", "16", "--batch", "2", "--d-in", "8",
        "--width", "8", "--repeats", "1", "--methods", "sequential,blocked", "--out", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "scan.json").read_text())["rows"]
    assert [(r["layer"], r["scan"]) for r in rows] == [
        ("nn.GRU", ""), ("mingru", "sequential"), ("mingru", "blocked"), ("minlstm", "sequential"),
        ("minlstm", "blocked"),
    ]  # fmt: skip


def test_benchmark_cli_rejects_an_unknown_backbone_before_measuring(tmp_path: Path) -> None:
    """Every backbone is built before the first length is timed: a wrong name costs no device
    time (the rows of the lengths measured before a later error go to lengths.partial.json)."""
    done = run_script(
        str(ROOT / "scripts" / "benchmark.py"), "lengths", "--backbones", "gru,lstmx", "--lengths", "8,16",
        "--batch", "2", "--width", "8", "--repeats", "2", "--out", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 1
    assert "backbone 'lstmx'" in done.stderr and "expected one of" in done.stderr
    assert not (tmp_path / "lengths.json").exists() and not (tmp_path / "lengths.partial.json").exists()


def test_the_gpu_scan_compares_at_one_float32_precision() -> None:
    """cuDNN may use TF32 by default while matmuls do not: both are set alike while the scan
    benchmark runs on a GPU, and put back afterwards."""
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    for tf32, precision in ((False, "highest"), (True, "high")):
        with bench.float32_matmuls(tf32):
            assert torch.backends.cudnn.allow_tf32 is tf32
            assert torch.get_float32_matmul_precision() == precision
        assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == before


@pytest.mark.slow
def test_startup_measures_time_to_first_step(tmp_path: Path) -> None:
    """``scripts/benchmark.py startup``: the first step comes before the process that took it
    ends (the 1 s of slack this needed went with btime's whole seconds)."""
    overrides = [*bench.STARTUP_OVERRIDES, "data.num_steps=1200", "extras.print_config=false"]
    done = run_script(
        str(ROOT / "scripts" / "benchmark.py"), "startup", "--repeats", "2", "--out", str(tmp_path),
        "--overrides", *overrides,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "startup.json").read_text())
    assert result["environment"]["device"] == "cpu" and len(result["runs_first_step_s"]) == 2
    assert 0 < result["time_to_first_step_s"] < result["process_wall_s"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["transformer", "mingru"])
def test_compiled_blocks_compute_the_same_and_keep_their_names(name: str) -> None:
    """``model.compile=true``: torch.compile on each block in place; checkpoints keep plain keys.
    The min-RNN's scan runs eagerly inside the compiled block (its loop is not unrolled)."""
    from seqlab.tasks.base import build_backbone

    config = bench.backbone_config(name, 32, 2)
    torch.manual_seed(0)
    plain = build_backbone(config)
    torch.manual_seed(0)
    compiled = build_backbone({**config, "compile": True})
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(compiled.encode(x), plain.encode(x), atol=1e-5, rtol=1e-5)


def test_process_start_time_is_the_start_of_the_process() -> None:
    """time_to_first_step_s counts from the process start: not before the parent launched the
    process (the boot time psutil adds the start to is cut to whole seconds: up to 1 s early),
    not after the child's first line ran."""
    import subprocess
    import sys

    child = (
        "import time; first_line = time.time()\n"
        "from seqlab.callbacks.run_stats import process_start_time\n"
        "print(repr(first_line), repr(process_start_time()))"
    )
    for _ in range(3):
        launched = time.time()
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
        first_line, started = map(float, out.stdout.split())
        tick = 1 / os.sysconf("SC_CLK_TCK")  # the start is kept in clock ticks
        assert launched - tick - 0.005 <= started <= first_line


def test_process_start_time_off_linux(monkeypatch) -> None:
    """Without /proc (macOS...): psutil's figure; without psutil as well: None, not an error."""
    import sys

    import psutil

    from seqlab.callbacks import run_stats

    real_read_text = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        if str(self).startswith("/proc"):
            raise FileNotFoundError(self)
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert run_stats.process_start_time() == psutil.Process(os.getpid()).create_time()
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` now raises ImportError
    assert run_stats.process_start_time() is None


def test_the_ablation_runs_every_variant_and_restores_the_dispatch(tmp_path: Path, monkeypatch) -> None:
    from lightning.pytorch.trainer import call

    from seqlab.utils import hooks

    lightning_calls = []
    original = hooks._lightning_dispatch

    def counting(*args, **kwargs):
        lightning_calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(hooks, "_lightning_dispatch", counting)
    import seqlab.train

    with_loggers, with_callbacks = [], []
    build_loggers, build_callbacks = seqlab.train.build_loggers, seqlab.train.build_callbacks
    monkeypatch.setattr(seqlab.train, "build_loggers", lambda *a: with_loggers.append(1) or build_loggers(*a))
    monkeypatch.setattr(
        seqlab.train, "build_callbacks", lambda *a: with_callbacks.append(1) or build_callbacks(*a)
    )
    with_bar = [o for o in SMALL_LSTM if "rich_progress_bar" not in o]  # one variant removes it
    rows = bench.bench_ablation(with_bar, epochs=1, repeats=1)
    assert [r["variant"] for r in rows] == ["plain loop", "default", *bench.OVERHEAD_ABLATIONS]
    assert (
        rows[0]["ratio_to_plain"] == 1.0
        and rows[1]["vs_default_ms"] == rows[1]["vs_default_ms_paired"] == 0.0
    )
    assert rows[1]["vs_default_low_ms"] is None  # one repeat: no interval
    assert all(r["step_ms"] > 0 and len(r["epoch_means_ms"]) == 1 for r in rows)
    assert "on_train_batch_end" in lightning_calls  # the variants with Lightning's dispatch ran it
    assert len(with_loggers) == len(with_callbacks) == len(rows) - 3, "bare loops: no logger, no callback"
    assert call._call_callback_hooks is hooks.call_callback_hooks  # and seqlab's is back
    assert call._call_lightning_module_hook is hooks.call_lightning_module_hook


@pytest.mark.parametrize(
    "name,dtype,expected",
    [
        ("NVIDIA H200", torch.bfloat16, 989.5e12),
        ("NVIDIA H200 NVL", torch.bfloat16, 835.5e12),
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5e12),
        ("NVIDIA H100 NVL", torch.float16, 835.5e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA H200", torch.float32, 494.5e12),  # fp32 matmuls on tensor cores (TF32)
    ],
)
def test_peak_flops_tell_the_board_variants_apart(monkeypatch, name: str, dtype, expected: float) -> None:
    """MFU divides by the device's dense peak: an H200 NVL or H100 PCIe must not get the SXM
    figure their names contain."""
    from seqlab.callbacks import run_stats

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert run_stats.peak_flops(torch.device("cuda", 0), dtype) == expected


def test_run_stats_waits_for_the_device_at_each_timing_boundary(make_cfg, monkeypatch) -> None:
    """On a GPU the host runs ahead of the device: RunStats waits for it before each clock read
    (epoch and validation boundaries, the first step), never per step."""
    from seqlab.callbacks import run_stats

    waits: list[str] = []
    monkeypatch.setattr(run_stats.torch.cuda, "synchronize", lambda device=None: waits.append(str(device)))
    run_stats.settled(torch.device("cpu"))
    assert waits == []
    run_stats.settled(torch.device("cuda", 1))
    assert waits == ["cuda:1"]
    waits.clear()
    calls: list[str] = []
    monkeypatch.setattr(run_stats, "settled", lambda device: calls.append(device.type))
    cfg = make_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=5", "trainer.limit_val_batches=2")
    from seqlab.train import train

    train(cfg)
    # per epoch (5 steps): its start, validation start and end, its end; plus the first step and
    # the sanity-check validation's start
    assert len(calls) == 2 * 4 + 1 + 1, calls


def test_a_cpu_job_reports_no_gpu_memory_of_an_earlier_job(monkeypatch) -> None:
    """``-m trainer=gpu,cpu`` runs both jobs in one process: the CPU job reported the GPU job's
    peak as its own ``peak_memory_mb`` (and the report called the column GPU memory)."""
    import lightning as L

    from seqlab.callbacks.run_stats import RunStats

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # the earlier GPU job's
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * 2**30)
    stats = RunStats()
    assert "peak_gpu_memory_mb" in stats.peak_memory(), "not set up: where it trained is not known"
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    stats.setup(trainer, torch.nn.Linear(1, 1), "fit")
    assert set(stats.peak_memory()) == {"peak_host_memory_mb"}
    assert set(stats.handover()["worker_memory"]) == {"peak_host_memory_mb"}


def test_gpu_results_record_the_float32_math_mode(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    info = bench.environment(torch.device("cuda", 0))
    assert info["device_name"] == "NVIDIA H200"
    assert info["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert info["cudnn_allow_tf32"] is torch.backends.cudnn.allow_tf32
    assert "cpu_count" not in bench.environment(torch.device("cuda", 0))
    assert "cudnn_allow_tf32" not in bench.environment(torch.device("cpu"))
    # the Trainer-path benchmarks' default runs are on the CPU, whatever --device says
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.trainer_device(bench.OVERHEAD_OVERRIDES) == torch.device("cpu")
    assert bench.trainer_device(["trainer=cpu"]) == torch.device("cpu")
    assert bench.trainer_device(["model=lstm"]) == torch.device("cuda")


def test_inference_is_timed_in_evaluation_mode() -> None:
    """cuDNN's RNNs run their training kernel (and keep its reserve buffer) in training mode,
    inference_mode or not: the inference figures were the training forward's."""
    model = bench.build_backbone("gru", 8, 1, torch.device("cpu")).train()
    seen = []
    encode = model.encode
    model.encode = lambda x, *args: seen.append(model.training) or encode(x, *args)
    bench.inference(model, torch.randn(1, 4, 8))()
    assert seen == [False] and model.training  # and the model is handed back as it was


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("bf16-mixed", torch.bfloat16),
        ("16-mixed", torch.float16),
        ("bf16-true", torch.bfloat16),
        ("32-true", torch.float32),
    ],
)
def test_mfu_under_fsdp_counts_against_the_compute_dtypes_peak(precision: str, dtype) -> None:
    """Lightning's helper reads FSDP's gradient-reduction dtype, which seqlab's FSDP plugin keeps
    in float32 under bf16-mixed: MFU was taken against the float32 peak (67 TFLOP/s on an H100,
    not bf16's 989), about 15x too high."""
    import warnings
    from types import SimpleNamespace

    from seqlab.callbacks.run_stats import compute_dtype
    from seqlab.utils.precision import FSDPPrecision

    class Strategy:  # (held by a weak reference)
        pass

    strategy = Strategy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a GradScaler without CUDA, bf16-true's own note)
        plugin = FSDPPrecision(precision, strategy)
    assert compute_dtype(SimpleNamespace(precision_plugin=plugin)) == dtype


def test_figures_of_a_busy_machine_are_called_so() -> None:
    """Under load, one of two repeats took 4.4 s and the other 73 ms (their "median" 2.2 s), and
    the fitted exponents came out negative (gru -1.48): printed as figures, without a word."""
    from seqlab.benchmark import timing_warnings

    rows = [
        {
            "backbone": "rnn",
            "T": 256,
            "train_ms": 2248.8,
            "train_ms_all": [4424.7, 72.9],
            "infer_ms_all": [10.0, 11.0],
        },
        {"backbone": "gru", "T": 64, "train_ms": 5.0, "train_ms_all": [5.0, 5.5, 6.0]},
    ]
    assert timing_warnings(rows, {"rnn": 0.98, "gru": -1.48, "transformer": None}) == [
        "rnn T=256: train_ms repeats from 72.9 to 4425 ms (60.7x)",
        "gru: scaling exponent -1.48 (time falling as T grows)",
    ]
    assert timing_warnings(rows[1:], {"gru": 1.1}) == []
