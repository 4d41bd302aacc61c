"""Benchmarks behind ``scripts/benchmark.py``: what the README's performance tables are made of.

- ``scan``: one minGRU / minLSTM layer (input projection, scan per method, output projection)
  against ``nn.GRU`` of the same input width, hidden width and batch: a training step
  (forward + backward) at each length.
- ``lengths``: every backbone at T = 64 ... 2048 (longer on a GPU), one layer of the same width
  (their parameter counts differ: each row gives its own): training-step and inference (a whole
  sequence encoded at once) tokens/s and memory, written as JSON and a log-log plot, with the
  scaling exponent of step time in T (about 1 for a recurrence, towards 2 for attention).
- ``decode``: every backbone as an encoder-decoder generating T tokens one at a time (the
  decoder's state or key-value cache): per-token time against T, what translation's searches pay.
- ``overhead``: the same model, data and optimizer trained through seqlab's Trainer path (the
  default callbacks and loggers of ``python train.py``) and through a plain PyTorch loop,
  in pairs of runs in one process; the median ratio of their per-step times with a 95% interval.
- ``data``: per task, the share of the training step spent waiting for the next batch.
- ``startup``: ``python train.py`` from process start to its first optimizer step.

Every timing is the median of several repeats after a warm-up; on CUDA each timed call ends with
a synchronisation. What is compared (backbones at one length, scan methods against ``nn.GRU``) is
timed in turn, round by round, so that a drift of a shared host hits all alike. Memory is the peak allocated by the timed call on CUDA; on CPU (no allocator
statistics) it is the activation memory autograd keeps for the backward pass.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from seqlab.errors import ConfigError
from seqlab.utils.resolvers import project_root
from seqlab.utils.run import cpu_name

BACKBONES = ("rnn", "lstm", "gru", "transformer", "mingru", "minlstm")
CPU_LENGTHS = (64, 128, 256, 512, 1024, 2048)
GPU_LENGTHS = (*CPU_LENGTHS, 4096, 8192)


# ----------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(
    calls: dict[Any, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> tuple[dict[Any, list[float]], set[Any]]:
    """Wall time of each call in each of ``repeats`` rounds, every call once a round in turn,
    after ``warmup`` untimed rounds: a drift of the host over minutes (another process, clocks;
    10-27% between runs on shared hosts) hits all calls alike, and a ratio taken within a round is
    a paired comparison. Each round starts one call later than the one before (the first call of
    a round does not always meet the host as the previous round's last left it). A call that runs
    out of memory is dropped from then on: returned in the second element (any other error is
    raised)."""
    times: dict[Any, list[float]] = {key: [] for key in calls}
    failed: set[Any] = set()
    keys = list(calls)
    for round_index in range(warmup + repeats):
        shift = round_index % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            fn = calls[key]
            if key in failed:
                continue
            try:
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
            except RuntimeError as error:  # torch.OutOfMemoryError on a GPU, the CPU allocator's own
                if not is_out_of_memory(error):
                    raise
                failed.add(key)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if round_index >= warmup:
                times[key].append(time.perf_counter() - start)
    return {key: value for key, value in times.items() if key not in failed}, failed


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios of two calls timed by ``round_robin``."""
    return [a / b for a, b in zip(numerator, denominator)]


def float32_switches(tf32: bool) -> dict[str, Any]:
    """The settings ``float32_matmuls`` sets, as ``environment`` records them."""
    return {"cudnn_allow_tf32": tf32, "float32_matmul_precision": "high" if tf32 else "highest"}


@contextmanager
def float32_matmuls(tf32: bool) -> Iterator[None]:
    """cuDNN and matmuls both at TF32 (``tf32``) or both at full float32, restored afterwards: by
    default cuDNN (an ``nn.GRU`` baseline) may use TF32 while matmuls (a min-RNN's projections)
    do not, which favours the baseline."""
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    switches = float32_switches(tf32)
    torch.backends.cudnn.allow_tf32 = switches["cudnn_allow_tf32"]
    torch.set_float32_matmul_precision(switches["float32_matmul_precision"])
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``fn()`` runs (storages
    counted once; ``exclude``, e.g. the parameters, not counted): the activation memory of a
    training step, measurable on every device."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def peak_cuda_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory allocated on ``device`` by ``fn()`` beyond what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def scaling_exponent(lengths: Sequence[int], seconds: Sequence[float]) -> float | None:
    """Least-squares slope of log(time) against log(T): 1 for linear, 2 for quadratic cost."""
    if len(lengths) < 2:
        return None
    xs = [math.log(t) for t in lengths]
    ys = [math.log(s) for s in seconds]
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    denominator = sum((x - x_mean) ** 2 for x in xs)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / denominator


#: a repeat this many times slower than another of the same measurement: the machine's load, not
#: the backbone's cost, set the figure (two runs of the harness otherwise differ by 10-27%)
UNSTEADY = 2.0


def timing_warnings(
    rows: Sequence[dict[str, Any]], exponents: dict[str, float | None] | None = None
) -> list[str]:
    """What says a run measured a busy machine: a measurement whose repeats differ by more than
    ``UNSTEADY``x (one of two repeats took 4.4 s, the other 73 ms: their "median" 2.2 s), and a
    negative scaling exponent (time falling as T grows)."""
    found = []
    for row in rows:
        for key, values in row.items():
            if (
                key.endswith("_ms_all")
                and values
                and min(values) > 0
                and max(values) / min(values) > UNSTEADY
            ):
                found.append(
                    f"{row.get('backbone')} T={row.get('T')}: {key.removesuffix('_all')} repeats from "
                    f"{min(values):.4g} to {max(values):.4g} ms ({max(values) / min(values):.1f}x)"
                )
    for name, value in (exponents or {}).items():
        if value is not None and value < 0:
            found.append(f"{name}: scaling exponent {value:.2f} (time falling as T grows)")
    return found


def environment(device: torch.device) -> dict[str, Any]:
    """What a result depends on: date, hardware, threads and versions."""
    import lightning

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }
    if device.type == "cpu":
        info["cpu_count"] = len(os.sched_getaffinity(0))
    else:
        # float32 on tensor cores: by default cuDNN (the nn.GRU/LSTM baselines) may use TF32 while
        # matmuls (the min-RNN projections, attention) do not, which favours the baselines
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["cudnn_version"] = torch.backends.cudnn.version()
    return info


def accelerator_device(accelerator: str) -> torch.device:
    """The device ``train.py`` trains on for ``trainer.accelerator`` (the CPU, or a visible GPU)."""
    return torch.device("cuda" if torch.cuda.is_available() and str(accelerator) != "cpu" else "cpu")


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU's out-of-memory error, or the CPU allocator's (a plain RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def trainer_device(overrides: Sequence[str] = ()) -> torch.device:
    """The device the runs of a Trainer-path benchmark (overhead, ablation, data, start-up) use,
    which its results are recorded for: that of ``train.py`` with ``overrides``."""
    from seqlab.utils.run import compose_config

    with tempfile.TemporaryDirectory(prefix="seqlab-device-") as tmp:
        return accelerator_device(compose_config("train", list(overrides), Path(tmp)).trainer.accelerator)


def autocast(device: torch.device, amp: str | None):
    """bf16/fp16 autocast for the timed calls (``amp=None``: the parameters' float32)."""
    if not amp:
        return nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ConfigError(f"--amp {amp!r}: expected one of {list(dtypes)}")
    return torch.autocast(device.type, dtype=dtypes[amp])


def _first(output: Tensor | tuple[Tensor, ...]) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def training_step(model: nn.Module, x: Tensor, amp: str | None = None) -> Callable[[], None]:
    """Forward (``encode`` for a backbone) and backward of a scalar of every output; gradients
    dropped after each call so that they do not accumulate."""
    forward = getattr(model, "encode", model)
    params = list(model.parameters())

    def step() -> None:
        with autocast(x.device, amp):
            out = _first(forward(x))
        out.float().square().mean().backward()
        for p in params:
            p.grad = None

    return step


def inference(model: nn.Module, x: Tensor, amp: str | None = None) -> Callable[[], None]:
    """``encode`` in evaluation mode (cuDNN's RNNs run their training kernel, which keeps a
    reserve buffer, whenever the module is in training mode), without autograd."""
    forward = getattr(model, "encode", model)

    def run() -> None:
        training = model.training
        model.eval()
        try:
            with torch.inference_mode(), autocast(x.device, amp):
                forward(x)
        finally:
            model.train(training)

    return run


# ----------------------------------------------------------------------------- backbones
def backbone_config(name: str, width: int, num_layers: int) -> dict[str, Any]:
    """``configs/model/<name>.yaml`` at ``width`` and ``num_layers``, without dropout; the
    Transformer's feed-forward (and the min-RNNs' MLP) at twice the width, 4 heads."""
    path = Path(project_root()) / "configs" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"backbone {name!r}: no config {path}; expected one of {list(BACKBONES)}")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    config.pop("size", None)
    config.update(d_model=width, num_layers=num_layers, dropout=0.0)
    if "dim_feedforward" in config:
        config["dim_feedforward"] = 2 * width
    if "nhead" in config:
        config["nhead"] = 4
    return config


def build_backbone(
    name: str,
    width: int,
    num_layers: int,
    device: torch.device,
    compile: bool = False,
    tbptt: int | None = None,
    with_decoder: bool = False,
) -> nn.Module:
    """``tbptt``: truncated BPTT steps for the backbones that have the option (the RNN family);
    ``with_decoder``: the encoder-decoder translation builds."""
    from seqlab.tasks.base import build_backbone as build

    config = {**backbone_config(name, width, num_layers), "compile": compile}
    if tbptt is not None and "tbptt_steps" in config:
        config["tbptt_steps"] = tbptt
    return build(config, **({"with_decoder": True} if with_decoder else {})).to(device)


# ----------------------------------------------------------------------------- scan
def bench_scan(
    lengths: Sequence[int] = (256, 1024, 2048),
    batch: int = 16,
    d_in: int = 64,
    hidden: int = 128,
    methods: Sequence[str] = ("sequential", "blocked", "log"),
    cells: Sequence[str] = ("mingru", "minlstm"),
    repeats: int = 5,
    device: str = "cpu",
    tf32: bool = False,
) -> list[dict[str, Any]]:
    """Training-step time of ``nn.GRU`` and of one min-RNN layer per cell and scan method; on a
    GPU with cuDNN and matmuls at the same float32 precision (``tf32``: both at TF32). The layers
    are timed in turn, round by round (``round_robin``): ``speedup`` is the median of the rounds'
    ``nn.GRU`` time over the layer's (``speedup_all``: every round's)."""
    from seqlab.backbones.minrnn import MinRNN

    dev = torch.device(device)
    torch.manual_seed(0)
    layers: dict[tuple[str, str], nn.Module] = {
        ("nn.GRU", ""): nn.GRU(d_in, hidden, batch_first=True).to(dev)
    }
    for cell in cells:
        for method in methods:
            layers[cell, method] = MinRNN(cell, d_in, hidden, bidirectional=False, scan=method).to(dev)
    rows = []
    with float32_matmuls(tf32) if dev.type == "cuda" else nullcontext():
        for steps in lengths:
            x = torch.randn(batch, steps, d_in, device=dev)
            times, failed = round_robin(
                {key: training_step(layer, x) for key, layer in layers.items()}, dev, repeats
            )
            if failed:
                raise RuntimeError(f"out of memory at T={steps}: {sorted(failed)}; give shorter --lengths")
            baseline = times["nn.GRU", ""]
            for (layer, method), layer_times in times.items():
                ratios = paired_ratios(baseline, layer_times)
                rows.append(
                    {"T": steps, "layer": layer, "scan": method, "train_ms": statistics.median(layer_times) * 1e3,
                     "speedup": statistics.median(ratios), "train_ms_all": [t * 1e3 for t in layer_times],
                     "speedup_all": ratios}
                )  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- lengths
def step_memory(
    train_step: Callable[[], None], infer: Callable[[], None], params: Iterable[Tensor], device: torch.device
) -> tuple[int, int | None] | None:
    """(training, inference) bytes: each call's peak allocated on CUDA; on CPU the activations
    autograd saves for backward (``params`` not counted) and no inference figure. None when it
    runs out of memory."""
    try:
        if device.type == "cuda":
            return peak_cuda_bytes(train_step, device), peak_cuda_bytes(infer, device)
        return saved_activation_bytes(train_step, params), None
    except RuntimeError as error:  # torch.OutOfMemoryError on a GPU, the CPU allocator's own
        if not is_out_of_memory(error):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def bench_lengths(
    backbones: Sequence[str] = BACKBONES,
    lengths: Sequence[int] = CPU_LENGTHS,
    batch: int = 16,
    width: int = 128,
    num_layers: int = 1,
    repeats: int = 3,
    device: str = "cpu",
    amp: str | None = None,
    max_step_seconds: float = 30.0,
    compile: bool = False,
    tbptt: int | None = None,
    with_baseline: bool = False,
    tf32: bool = False,
    progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Per backbone and length: training step (forward + backward) and inference (``encode`` of
    the whole sequence at once: a prefill, not token-by-token generation) time (the median, and
    every repeat's in ``*_ms_all``), tokens/s, memory (``memory_measure`` says which) and the
    backbone's parameters (one width for all: their parameter counts differ, the RNN's most).
    At each length the backbones are timed in turn, round by round (``round_robin``), so that their
    ratios are paired. A backbone whose training step exceeds ``max_step_seconds`` or that runs out
    of memory skips the longer lengths (recorded as ``skipped``). ``compile``: as
    ``model.compile=true`` (compiled in the untimed warm-up round). ``tbptt``: as
    ``model.tbptt_steps`` for the RNN family (other backbones run unchanged). ``with_baseline``:
    each backbone so changed is also timed as it is, in the same rounds, and its row gets
    ``train_speedup`` / ``infer_speedup``: the median over the rounds of the plain backbone's time
    over its own (``*_speedup_all``: every round's); two runs of the harness differ by 10-27% on
    a shared host, more than such a change. On a GPU cuDNN's recurrences and the matmuls run at
    one float32 precision (``tf32``: both at TF32; ``float32_matmuls``), as in ``bench_scan``.
    ``progress(rows)`` after each length: the rows so far outlive an error that stops the run."""
    dev = torch.device(device)
    models: dict[str, nn.Module] = {}  # by label: "gru", "gru+tbptt256", "transformer+compile"
    baseline_of: dict[str, str] = {}  # a changed backbone's label -> its plain one's
    for name in backbones:
        variants = [(compile, tbptt)] + ([(False, None)] if with_baseline and (compile or tbptt) else [])
        for variant_compile, variant_tbptt in variants:
            torch.manual_seed(0)
            model = build_backbone(name, width, num_layers, dev, compile=variant_compile, tbptt=variant_tbptt)
            label = (
                name
                + ("+compile" if variant_compile else "")
                + (f"+tbptt{variant_tbptt}" if getattr(model, "tbptt_steps", None) else "")
            )
            if label not in models:  # (tbptt leaves the other backbones as they are: one of them)
                models[label] = model
            if label != name and with_baseline:
                baseline_of[label] = name
    labels = list(models)
    params = {label: sum(p.numel() for p in model.parameters()) for label, model in models.items()}
    memory_measure = "peak allocated" if dev.type == "cuda" else "saved activations"
    stopped: dict[str, str] = {}  # backbone -> why it skips the longer lengths
    rows: dict[tuple[str, int], dict[str, Any]] = {}

    def in_order() -> list[dict[str, Any]]:  # backbone by backbone, each by length
        return [rows[name, steps] for name in labels for steps in lengths if (name, steps) in rows]

    for steps in lengths:
        x = torch.randn(batch, steps, width, device=dev)
        running = [name for name in labels if name not in stopped]
        calls: dict[tuple[str, str], Callable[[], None]] = {}
        for name in running:
            calls[name, "train"] = training_step(models[name], x, amp)
            calls[name, "infer"] = inference(models[name], x, amp)
        with float32_matmuls(tf32) if dev.type == "cuda" else nullcontext():
            times, failed = round_robin(calls, dev, repeats)
        for name in labels:
            row: dict[str, Any] = {"backbone": name, "T": steps, "batch": batch, "width": width,
                                   "params": params[name]}  # fmt: skip
            if name in stopped:
                rows[name, steps] = {**row, "skipped": stopped[name]}
                continue
            timed = (name, "train") not in failed and (name, "infer") not in failed
            memory = (
                step_memory(calls[name, "train"], calls[name, "infer"], models[name].parameters(), dev)
                if timed
                else None
            )
            if memory is None:
                rows[name, steps] = {**row, "skipped": "out of memory"}
                stopped[name] = "out of memory at a shorter T"
                continue
            train_mem, infer_mem = memory
            train_times, infer_times = times[name, "train"], times[name, "infer"]
            train_s, infer_s = statistics.median(train_times), statistics.median(infer_times)
            tokens = batch * steps
            rows[name, steps] = {
                **row,
                "train_ms": train_s * 1e3,
                "train_tokens_per_s": tokens / train_s,
                "infer_ms": infer_s * 1e3,
                "infer_tokens_per_s": tokens / infer_s,
                "train_memory_mb": train_mem / 2**20,
                "infer_memory_mb": None if infer_mem is None else infer_mem / 2**20,
                "memory_measure": memory_measure,
                "train_ms_all": [t * 1e3 for t in train_times],
                "infer_ms_all": [t * 1e3 for t in infer_times],
            }
            plain = baseline_of.get(name)
            for kind in ("train", "infer") if plain is not None else ():
                if (plain, kind) in times and (name, kind) in times:
                    ratios = paired_ratios(times[plain, kind], times[name, kind])
                    rows[name, steps][f"{kind}_speedup"] = statistics.median(ratios)
                    rows[name, steps][f"{kind}_speedup_all"] = ratios
            if train_s > max_step_seconds:
                stopped[name] = f"training step > {max_step_seconds:g} s at a shorter T"
        if progress is not None:
            progress(in_order())
    return in_order()


def generation(model: nn.Module, memory: Tensor, steps: int) -> Callable[[], None]:
    """``steps`` decoder steps, one token at a time with the decoder's state (the recurrent
    state, or the Transformer's cache of keys and values), attending over ``memory``: what
    greedy or beam search pays per generated token (each step's output fed back as the next
    input, in evaluation mode, without autograd)."""

    def run() -> None:
        training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                y, state = memory[:, :1], None
                for _ in range(steps):
                    y, state = model.decode(y, memory, None, state)
        finally:
            model.train(training)

    return run


def bench_decode(
    backbones: Sequence[str] = BACKBONES,
    lengths: Sequence[int] = (16, 64, 256, 1024),
    source_length: int = 64,
    batch: int = 16,
    width: int = 128,
    num_layers: int = 1,
    repeats: int = 3,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Per backbone (encoder-decoder, as translation builds it) and output length T: the time to
    generate T tokens one at a time after encoding a ``source_length`` source, per decoding step
    (``ms_per_token``: one token of each of the ``batch`` sequences) and in tokens/s (all of them). A recurrent decoder's step costs the same at every position; a Transformer's grows
    with the tokens in its cache (O(T) a step, O(T^2) a sequence). Every (backbone, T) is timed in
    turn, round by round (``round_robin``): lengths too, so that ``per_token_vs_shortest``, the
    median over the rounds of the per-token time at T over that at the shortest T, is a paired
    ratio (timed one length after another, a host's drift made every backbone's per-token time
    at T=256 longer than at T=1024). A (backbone, T) that runs out of memory is ``skipped``."""
    dev = torch.device(device)
    models = {}
    for name in backbones:
        torch.manual_seed(0)
        models[name] = build_backbone(name, width, num_layers, dev, with_decoder=True)
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    source = torch.randn(batch, source_length, width, device=dev)
    with torch.inference_mode():
        memories = {name: model.eval().encode(source).clone() for name, model in models.items()}
    calls = {
        (name, steps): generation(models[name], memories[name], steps)
        for name in backbones
        for steps in lengths
    }
    times, failed = round_robin(calls, dev, repeats)
    shortest = min(lengths)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for name in backbones:
        for steps in lengths:
            row: dict[str, Any] = {"backbone": name, "T": steps, "source_length": source_length, "batch": batch,
                                   "width": width, "params": params[name]}  # fmt: skip
            if (name, steps) in failed:
                rows[name, steps] = {**row, "skipped": "out of memory"}
                continue
            seconds = statistics.median(times[name, steps])
            rows[name, steps] = {
                **row,
                "generate_ms": seconds * 1e3,
                "ms_per_token": seconds * 1e3 / steps,
                "tokens_per_s": batch * steps / seconds,
                "generate_ms_all": [t * 1e3 for t in times[name, steps]],
            }
            if (name, shortest) in times:
                ratios = paired_ratios(
                    [t / steps for t in times[name, steps]], [t / shortest for t in times[name, shortest]]
                )
                rows[name, steps]["per_token_vs_shortest"] = statistics.median(ratios)
    return [rows[name, steps] for name in backbones for steps in lengths]


def exponents(
    rows: Sequence[dict[str, Any]],
    key: str = "train_ms",
    upper_half: bool = True,
    above_fixed_cost: bool = False,
    spans: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """Scaling exponent of ``key`` in T per backbone, fitted over the upper half of the lengths
    measured (where the T-dependent cost dominates fixed costs). ``above_fixed_cost``: of the time
    above what a step costs whatever its length (kernel launches, Python), estimated as the
    intercept at T=0 of the line through the two shortest lengths: on a GPU that cost can exceed
    a quadratic term up to T of several thousand, and a plain fit of 1 ms + 1e-7 ms T^2 over
    T = 1024-8192 reads 0.93, not 2. (Subtracting the shortest length's whole time, its
    T-dependent part too, read 1.07 for a cost linear in T.) ``spans``, where given, gets each
    backbone's first and last T fitted: one that skipped the longer lengths is fitted over
    shorter ones than the others."""
    fitted = {}
    for name in dict.fromkeys(r["backbone"] for r in rows):
        points = sorted((r["T"], r[key]) for r in rows if r["backbone"] == name and r.get(key))
        if above_fixed_cost:
            if len(points) < 3:
                continue
            (t1, v1), (t2, v2) = points[:2]
            fixed = min(max(v1 - (v2 - v1) * t1 / (t2 - t1), 0.0), v1)
            points = [(steps, value - fixed) for steps, value in points if value > fixed]
        if upper_half:
            points = points[max(0, min(len(points) // 2, len(points) - 2)) :]
        slope = scaling_exponent([p[0] for p in points], [p[1] for p in points])
        if slope is not None:
            fitted[name] = round(slope, 2)
            if spans is not None:
                spans[name] = [points[0][0], points[-1][0]]
    return fitted


def plot_lengths(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Training and inference tokens/s and training memory vs T, log-log, one line per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measure = next((r["memory_measure"] for r in rows if r.get("memory_measure")), "saved activations")
    panels = [
        ("train_tokens_per_s", "training tokens/s (fwd+bwd)"),
        ("infer_tokens_per_s", "inference tokens/s (encode, whole sequence)"),
        ("train_memory_mb", f"training memory (MiB, {measure})"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels):
        for name in dict.fromkeys(r["backbone"] for r in rows):
            points = sorted((r["T"], r[key]) for r in rows if r["backbone"] == name and r.get(key))
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- overhead
#: the overhead benchmark's default run: a small LSTM forecaster on the synthetic series
OVERHEAD_OVERRIDES = (
    "model=lstm",
    "model.d_model=64",
    "model.num_layers=1",
    "data.batch_size=64",
    "trainer.accelerator=cpu",
)


class StepTimer:
    """Wall time of every training step after the first ``skip`` of each epoch: from the start
    of one step to the start of the next (forward, backward, optimizer step, whatever runs
    around them, and fetching the next batch), the last step up to its end. Where the loop
    reports its waits for data (``data_wait``), the share of each epoch spent waiting: every
    wait, the first batch's included (loaders may do per-epoch or per-block work there), over the
    epoch's wall time from asking for the first batch to the end of the last step."""

    def __init__(self, skip: int = 3) -> None:
        self.skip = skip
        self.epochs: list[list[float]] = []
        self.data_shares: list[float] = []
        self._starts: list[float] = []
        self._waits: list[float] = []
        self._end: float | None = None

    def epoch_start(self) -> None:
        self._starts, self._waits, self._end = [], [], None

    @staticmethod
    def _now() -> float:
        # on a GPU the host runs ahead of the device: a step ends when its kernels have run
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_start(self) -> None:
        self._starts.append(self._now())

    def data_wait(self, seconds: float) -> None:
        """The batch of the step about to start took ``seconds`` to arrive."""
        self._waits.append(seconds)

    def step_end(self) -> None:
        self._end = self._now()

    def epoch_end(self) -> None:
        marks = self._starts[self.skip :] + ([self._end] if self._end is not None else [])
        if len(marks) < 2:
            return
        steps = [b - a for a, b in itertools.pairwise(marks)]
        self.epochs.append(steps)
        # every wait of the epoch (the first: sampler order, first gather) over its wall time
        if self._waits and self._end is not None:
            span = self._end - self._starts[0] + self._waits[0]
            self.data_shares.append(sum(self._waits) / span)

    def per_epoch_mean(self) -> list[float]:
        return [statistics.fmean(steps) for steps in self.epochs]


def _timer_callback(timer: StepTimer):
    import lightning as L

    class StepTimerCallback(L.Callback):
        """Appended after every other callback, so a step ends after their batch-end hooks."""

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            timer.epoch_start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            timer.step_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            timer.step_end()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            timer.epoch_end()

    return StepTimerCallback()


def _trainer_run(
    overrides: Sequence[str],
    epochs: int,
    timer: StepTimer,
    workdir: Path,
    seqlab_hooks: bool = True,
    bare: bool = False,
) -> nn.Module:
    """One ``fit`` through seqlab's own builders, as ``python train.py`` makes it (default
    callbacks and loggers); validation runs between epochs, outside the timed steps.
    ``seqlab_hooks=False``: Lightning's own hook dispatch (callback, module and strategy hooks)
    instead of ``seqlab.utils.hooks``; ``bare=True``: no callback and no logger at all (not even
    those every run keeps: RunStats, DivergenceGuard, the resume callbacks, CSV), only the
    timer."""
    import lightning as L

    from seqlab.train import build_callbacks, build_datamodule, build_loggers, build_task, build_trainer
    from seqlab.utils import hooks
    from seqlab.utils.run import compose_config

    cfg = compose_config(
        "train", [*overrides, f"trainer.max_epochs={epochs}", "extras.print_config=false"], workdir
    )
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg.data)
    task = build_task(cfg.task, cfg.model, datamodule)
    callbacks = [*([] if bare else build_callbacks(cfg.callbacks)), _timer_callback(timer)]
    trainer = build_trainer(cfg, callbacks, [] if bare else build_loggers(cfg.get("logger"), workdir))
    if not seqlab_hooks:
        hooks.uninstall()
    try:
        trainer.fit(task, datamodule=datamodule)
    finally:
        hooks.install()
    return task


def _plain_run(overrides: Sequence[str], epochs: int, timer: StepTimer, workdir: Path) -> nn.Module:
    """The same task module (its ``step_loss``), data, optimizer, learning-rate schedule and
    gradient clipping in a hand-written loop: no Trainer, no callbacks, no logging, no metrics.
    It also times each wait for a batch (the data-loading share)."""
    import lightning as L
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.pytorch.plugins.precision import Precision

    from seqlab.train import build_datamodule, build_task
    from seqlab.utils.precision import BF16MixedPrecision, fusable
    from seqlab.utils.run import compose_config

    cfg = compose_config("train", [*overrides, "extras.print_config=false"], workdir)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    task = build_task(cfg.task, cfg.model, datamodule)
    loader = datamodule.train_dataloader()
    device = accelerator_device(cfg.trainer.accelerator)  # the device the Trainer path picks
    task.to(device)
    clip = cfg.trainer.get("gradient_clip_val")
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in ("32", "32-true", "bf16-mixed"):
        raise ValueError(
            f"the plain loop mirrors trainer.precision 32-true and bf16-mixed, not {precision!r}"
        )
    # the precision plugin of seqlab's Trainer on one device, asked as configure_optimizers asks it
    plugin = BF16MixedPrecision(device.type) if precision == "bf16-mixed" else Precision()
    optimizer, scheduler = task.build_optimizer(epochs * len(loader), fusable_here=fusable(plugin, clip))
    # what the loop below does: an optimizer step on every batch, whole epochs (an int
    # limit_train_batches is a count of batches: 1 is one batch, 1.0 the whole epoch)
    limit = cfg.trainer.get("limit_train_batches")
    mirrored = {
        "accumulate_grad_batches": cfg.trainer.get("accumulate_grad_batches") in (None, 1),
        "limit_train_batches": limit is None or (isinstance(limit, float) and limit == 1.0),
    }
    for key, same in mirrored.items():
        if not same:
            raise ValueError(
                f"the plain loop steps on every batch of whole epochs, not trainer.{key}={cfg.trainer[key]}"
            )
    if clip and (cfg.trainer.get("gradient_clip_algorithm") or "norm") != "norm":
        raise ValueError(
            f"the plain loop clips by norm, not trainer.gradient_clip_algorithm="
            f"{cfg.trainer.gradient_clip_algorithm!r}"
        )
    # what Lightning clips: the optimizer's parameters, listed once (``task.parameters()`` would
    # walk every submodule, metrics included, on every step)
    clipped = [param for group in optimizer.param_groups for param in group["params"]]
    task.train()
    for epoch in range(epochs):
        _set_sampler_epoch(loader, epoch)  # as Lightning's fit loop does: each epoch its own order
        timer.epoch_start()
        batches = iter(loader)
        while True:
            fetch = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            timer.step_start()
            timer.data_wait(time.perf_counter() - fetch)
            with plugin.forward_context():  # training_step's, as Lightning enters it (autocast in bf16)
                loss = task.step_loss(move_data_to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(clipped, clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            timer.step_end()
        timer.epoch_end()
    return task


def _lower_quartile(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=4, method="inclusive")[0]


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median: the order statistics
    ``(x_(k), x_(n+1-k))`` with the largest ``k`` whose coverage, ``1 - 2 P(Binomial(n, 1/2) < k)``,
    is at least ``confidence``. ``None`` when there are too few values (fewer than 6 for 95%)."""
    ordered, n = sorted(values), len(values)
    below, k = 0.0, 0  # below = P(Binomial(n, 1/2) < k + 1)
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if 1 - 2 * below < confidence:
            break
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else None


def _alternating(runs: Sequence[Any], repeat: int) -> Sequence[Any]:
    """``runs`` in order on even repeats, reversed on odd ones: a drift of the host's speed over
    the benchmark (on the 2-core development machine whole minutes run 10-20% slow) then
    favours neither side of a comparison."""
    return runs if repeat % 2 == 0 else runs[::-1]


def _fresh_heap() -> None:
    """A full garbage collection before each timed run. Objects left by earlier runs in the same
    process pile up until the collector's oldest generation runs, on the development machine
    170-300 ms for the ~400,000 objects torch and Lightning keep, and one such pass landing in a
    timed epoch of ~60 steps adds 3-5 ms to each of them. A ``python train.py`` run does not pay
    it (no oldest-generation pass from ``fit`` to the end of a 10-epoch run: measured)."""
    gc.collect()


def bench_overhead(
    overrides: Sequence[str] = OVERHEAD_OVERRIDES, epochs: int = 2, repeats: int = 10
) -> dict[str, Any]:
    """Trainer path vs plain loop, ``repeats`` times, the two runs of a repeat one after the other
    (in alternating order, after a full garbage collection each).

    - ``ratio_paired``, the figure of record: the median over repeats of the ratio of the two
      runs of a repeat (their medians of per-epoch mean steps), with a distribution-free 95%
      interval (``ratio_paired_low``/``_high``, from 6 repeats). Each ratio compares two runs a
      few seconds apart, so a host that slows down for a minute moves both.
    - ``ratio``: the medians of all per-epoch means of each loop, pooled; ``ratio_lower_quartile``
      the same for their lower quartiles (interference from the host only ever slows an epoch
      down).
    - ``data_wait_share``: the median share of the plain loop's step time spent waiting for
      data."""
    results: dict[str, list[float]] = {"trainer": [], "plain": []}
    paired: list[float] = []
    data_shares: list[float] = []
    with tempfile.TemporaryDirectory(prefix="seqlab-overhead-") as tmp:
        for repeat in range(repeats):
            steps = {}
            for name, run in _alternating((("trainer", _trainer_run), ("plain", _plain_run)), repeat):
                timer = StepTimer()
                _fresh_heap()
                run(list(overrides), epochs, timer, Path(tmp) / f"{name}{repeat}")
                results[name].extend(timer.per_epoch_mean())
                steps[name] = statistics.median(timer.per_epoch_mean())
                data_shares.extend(timer.data_shares)
            paired.append(steps["trainer"] / steps["plain"])
    trainer_ms = statistics.median(results["trainer"]) * 1e3
    plain_ms = statistics.median(results["plain"]) * 1e3
    low, high = median_interval(paired) or (None, None)
    return {
        "overrides": list(overrides),
        "ratio_paired": statistics.median(paired),
        "ratio_paired_low": low,
        "ratio_paired_high": high,
        "trainer_step_ms": trainer_ms,
        "plain_step_ms": plain_ms,
        "ratio": trainer_ms / plain_ms,
        "ratio_lower_quartile": _lower_quartile(results["trainer"]) / _lower_quartile(results["plain"]),
        "overhead_ms_per_step": trainer_ms - plain_ms,
        "paired_ratios": paired,
        "data_wait_share": statistics.median(data_shares),
        "trainer_epoch_means_ms": [t * 1e3 for t in results["trainer"]],
        "plain_epoch_means_ms": [t * 1e3 for t in results["plain"]],
    }


@dataclasses.dataclass(frozen=True)
class Ablation:
    """A variant of the default Trainer path: extra ``train.py`` overrides, Lightning's own hook
    dispatch instead of seqlab's (``seqlab_hooks=False``), no callback or logger at all, not even
    those every run keeps (``bare=True``)."""

    overrides: tuple[str, ...] = ()
    seqlab_hooks: bool = True
    bare: bool = False


#: with ``bare=True``, a Trainer with nothing of seqlab's around the step: no callback (not even
#: RunStats, DivergenceGuard and the resume callbacks), logger, checkpointing, progress bar or
#: summary (the floor of Lightning's own loop)
_BARE = ("callbacks=none", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false")

#: what the ablation takes away from the default Trainer path, one thing at a time, and the bare
#: Lightning loop with either dispatch
OVERHEAD_ABLATIONS: dict[str, Ablation] = {
    "Lightning's hook dispatch": Ablation(seqlab_hooks=False),
    "no progress bar": Ablation(("callbacks.rich_progress_bar=null", "+trainer.enable_progress_bar=false")),
    "no per-step logging": Ablation(("trainer.log_every_n_steps=1000000",)),
    "no optional callbacks": Ablation(_BARE),
    "bare Lightning loop": Ablation(_BARE, bare=True),
    "bare Lightning loop, Lightning's dispatch": Ablation(_BARE, seqlab_hooks=False, bare=True),
}


def bench_ablation(
    overrides: Sequence[str] = OVERHEAD_OVERRIDES,
    ablations: dict[str, Ablation] = OVERHEAD_ABLATIONS,
    epochs: int = 2,
    repeats: int = 6,
) -> list[dict[str, Any]]:
    """What each part of the Trainer path costs: the plain loop, the default Trainer path and each
    ablation, ``repeats`` times (in alternating order, after a full garbage collection each); per
    variant the median step, its ratio to the plain loop's and its difference to the default
    path's, pooled over repeats and paired within each (``vs_default_ms_paired``: the median
    over repeats of the difference to that repeat's default run, with a distribution-free 95%
    interval from 6 repeats)."""
    runs: dict[str, list[float]] = {"plain loop": [], "default": [], **{name: [] for name in ablations}}
    per_repeat: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory(prefix="seqlab-ablation-") as tmp:
        for repeat in range(repeats):
            for index, name in _alternating(list(enumerate(runs)), repeat):
                timer, workdir = StepTimer(), Path(tmp) / f"{index}-{repeat}"
                _fresh_heap()
                if name == "plain loop":
                    _plain_run(list(overrides), epochs, timer, workdir)
                else:
                    ablation = ablations.get(name, Ablation())
                    _trainer_run(
                        [*overrides, *ablation.overrides], epochs, timer, workdir,
                        seqlab_hooks=ablation.seqlab_hooks, bare=ablation.bare,
                    )  # fmt: skip
                runs[name].extend(timer.per_epoch_mean())
                per_repeat[name].append(statistics.median(timer.per_epoch_mean()) * 1e3)
    medians = {name: statistics.median(values) * 1e3 for name, values in runs.items()}
    plain, default = medians["plain loop"], medians["default"]
    rows = []
    for name, ms in medians.items():
        differences = [a - b for a, b in zip(per_repeat[name], per_repeat["default"])]
        low, high = median_interval(differences) or (None, None)
        rows.append(
            {"variant": name, "step_ms": ms, "ratio_to_plain": ms / plain, "vs_default_ms": ms - default,
             "vs_default_ms_paired": statistics.median(differences), "vs_default_low_ms": low,
             "vs_default_high_ms": high, "epoch_means_ms": [t * 1e3 for t in runs[name]]}
        )  # fmt: skip
    return rows


#: one small configuration per task for the data-loading benchmark (synthetic data: no files);
#: ``--overrides data=sst2 data.data_dir=...`` benchmarks that data alone
DATA_TASKS = {
    "forecasting": ("data=timeseries",),
    "classification": ("data=sentiment_synthetic",),
    "translation": ("data=translation_synthetic",),
}


#: the data benchmark's model: the overhead benchmark's small LSTM, whose few-millisecond steps
#: make any wait for data visible
DATA_COMMON = ("model=lstm", "model.d_model=64", "model.num_layers=1", "trainer.accelerator=cpu")


def bench_data(
    tasks: dict[str, Sequence[str]] = DATA_TASKS,
    common: Sequence[str] = DATA_COMMON,
    epochs: int = 2,
    repeats: int = 1,
    extra: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Per task: the share of training-step time spent waiting for the next batch (and the
    template overhead on that task, which the same runs give). ``extra`` overrides come last;
    one choosing the data (``data=sst2``) replaces the tasks by that data alone."""
    chosen = [o.partition("=")[2] for o in extra if o.partition("=")[0] == "data"]
    if chosen:
        tasks = {chosen[-1]: ()}
    rows = []
    for task, overrides in tasks.items():
        result = bench_overhead([*common, *overrides, *extra], epochs=epochs, repeats=repeats)
        rows.append(
            {"task": task, "data_wait_share": result["data_wait_share"], "plain_step_ms": result["plain_step_ms"],
             "trainer_step_ms": result["trainer_step_ms"], "ratio": result["ratio"]}
        )  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- start-up
STARTUP_OVERRIDES = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "test=false",
    "trainer.accelerator=cpu",
)


def bench_startup(overrides: Sequence[str] = STARTUP_OVERRIDES, repeats: int = 3) -> dict[str, Any]:
    """``python train.py`` in a fresh process: seconds from process start to the first optimizer
    step (``time_to_first_step_s`` of its summary.json) and to exit."""
    first_step, total = [], []
    root = Path(project_root())
    with tempfile.TemporaryDirectory(prefix="seqlab-startup-") as tmp:
        for repeat in range(repeats):
            run_dir = Path(tmp) / str(repeat)
            command = [sys.executable, str(root / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
            start = time.perf_counter()
            done = subprocess.run(command, cwd=root, capture_output=True, text=True)
            total.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            summary = json.loads((run_dir / "summary.json").read_text())
            first_step.append(summary["time_to_first_step_s"])
    return {
        "overrides": list(overrides),
        "time_to_first_step_s": statistics.median(first_step),
        "process_wall_s": statistics.median(total),
        "runs_first_step_s": first_step,
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    from seqlab.utils.files import write_json_atomic

    write_json_atomic(path, payload)
    return path
