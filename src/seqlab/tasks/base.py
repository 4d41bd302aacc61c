"""What every task LightningModule shares: backbone construction, optimisation, best-metric tracking.

A task receives its backbone as a plain config dict (``_target_`` plus arguments) and builds it,
so checkpoints hold only plain hyperparameters and ``load_from_checkpoint`` rebuilds the model
alone. Sizes that come from the data are constructor arguments, passed by the training script.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric, MinMetric

from seqlab.backbones.base import Backbone
from seqlab.errors import ConfigError, instantiate
from seqlab.utils.distributed import offloads_optimizer
from seqlab.utils.precision import fusable, keep_measurements_precise
from seqlab.utils.resolvers import METRIC_MODES, metric_mode
from seqlab.utils.resume import resumes_own_run

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine", "linear", "inverse_sqrt")


#: backbone parameter budgets of ``model.size`` (the width that comes closest is solved per
#: backbone and task, so every backbone of a comparison has about the same count)
SIZES = {"tiny": 50_000, "small": 500_000, "base": 5_000_000}


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a backbone config, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        module = instantiate(config, _convert_="all")
    return sum(p.numel() for p in module.parameters())


def sized(config: dict[str, Any], size: str) -> dict[str, Any]:
    """``config`` with ``d_model`` (and ``dim_feedforward`` in proportion) chosen so that the
    backbone has about ``SIZES[size]`` parameters; depth and the rest are kept."""
    if size not in SIZES:
        raise ConfigError(
            f"model.size={size!r}: expected one of {list(SIZES)} (or null to keep model.d_model)"
        )
    step = math.lcm(int(config.get("nhead") or 1), 2 if config.get("bidirectional") else 1, 4)
    ratio = config["dim_feedforward"] / config["d_model"] if config.get("dim_feedforward") else None

    def with_width(width: int) -> dict[str, Any]:
        scaled = {**config, "d_model": width}
        if ratio is not None:
            scaled["dim_feedforward"] = max(1, round(ratio * width))
        return scaled

    low, high = 1, 4096 // step  # parameters grow with the width: bisect on multiples of step
    while low < high:
        middle = (low + high) // 2
        if count_parameters(with_width(middle * step)) < SIZES[size]:
            low = middle + 1
        else:
            high = middle
    candidates = [k * step for k in (low - 1, low) if k >= 1]
    best = min(candidates, key=lambda w: abs(count_parameters(with_width(w)) - SIZES[size]))
    return with_width(best)


#: ranges of the backbone arguments seqlab's backbones share (any backbone that takes one, a
#: user's included): key -> (is valid, what is expected). PyTorch accepts some out-of-range values
#: silently (no layers: an embedding-to-head linear model) and names no key for the others
_BACKBONE_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "d_model": (lambda v: v >= 1, "a width >= 1"),
    "num_layers": (lambda v: v >= 1, "at least 1 layer"),
    "num_decoder_layers": (lambda v: v >= 1, "at least 1 layer, or null (num_layers)"),
    "dim_feedforward": (lambda v: v >= 1, "a width >= 1"),
    "nhead": (lambda v: v >= 1, "at least 1 head"),
    "expansion": (lambda v: v > 0, "a width factor > 0"),
    "dropout": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
}


def check_range(key: str, value: Any, valid: Callable[[Any], bool], expected: str) -> None:
    """ConfigError naming ``key`` unless ``value`` is a number that ``valid`` accepts; None is the
    backbone's to read (an optional setting: null derives it)."""
    if value is None:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not valid(value):
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def check_probability(key: str, value: Any) -> None:
    """A dropout-like rate: ConfigError naming ``key`` outside [0, 1] (or null)."""
    expected = "a probability in [0, 1]"
    if value is None:
        raise ConfigError(f"{key}=None: expected {expected}")
    check_range(key, value, lambda v: 0 <= v <= 1, expected)


def check_optimizer(config: Any) -> None:
    """``task.optimizer`` refused by name before a run starts: a key its class does not take
    (``weight_decy``), a value its signature rules out, and the rates every torch optimizer reads
    out of range. torch's own checks failed at the first step (``'<=' not supported between
    'float' and 'list'`` for ``lr=[0.001,0.01]``) or inside the fused kernel (``weight_decay=[0.1]``)."""
    from seqlab.utils.settings import check_settings, to_plain

    config = to_plain(config) or {}
    if not config.get("_target_"):
        return
    check_settings(config, "task.optimizer", skip=("fused",))  # (fused: auto is seqlab's to read)
    finite = "a finite number"
    check_range("task.optimizer.lr", config.get("lr"), lambda v: 0 <= v < math.inf, f"{finite} >= 0")
    check_range(
        "task.optimizer.weight_decay",
        config.get("weight_decay"),
        lambda v: 0 <= v < math.inf,
        f"{finite} >= 0",
    )
    if not isinstance(config.get("eps"), list | tuple):  # (Adafactor's is a pair: its class's to check)
        check_range("task.optimizer.eps", config.get("eps"), lambda v: 0 <= v < math.inf, f"{finite} >= 0")
    betas = config.get("betas")
    if betas is not None and not (isinstance(betas, list | tuple) and len(betas) == 2):
        raise ConfigError(f"task.optimizer.betas={betas!r}: expected two numbers in [0, 1), [beta1, beta2]")
    for i, beta in enumerate(betas or []):
        check_range(f"task.optimizer.betas[{i}]", beta, lambda v: 0 <= v < 1, "a number in [0, 1)")


def mean_loss() -> MeanMetric:
    """A validation loss's mean over the epoch (weighted by examples or tokens). NaN batches
    count: torchmetrics' default drops them with a warning, and a model that overflowed on some
    batches (float16) showed a finite ``val/loss`` better than its own. (A NaN is replaced by
    NaN: torchmetrics 1.9's ``nan_strategy="disable"`` also drops the weights.)"""
    return MeanMetric(nan_strategy=float("nan"))


def build_backbone(config: dict[str, Any], padded: bool = False, **task_requirements: Any) -> Backbone:
    """Instantiate a backbone from its plain config; the task adds what it needs (e.g. a decoder).
    ``size`` (tiny | small | base) replaces ``d_model`` with the width of that parameter budget;
    ``compile: true`` compiles each repeated block (``Backbone.layer_classes``) with
    ``torch.compile`` in place, so ``encode`` and ``decode`` both use the compiled blocks and the
    state dict keeps its names (no ``_orig_mod.`` prefixes in checkpoints). ``padded``: the task's
    sequences are padded (text), which truncated BPTT cannot take."""
    config = {**config, **task_requirements}
    if padded and config.get("tbptt_steps") is not None:  # before the sanity check runs in eval mode
        raise ConfigError(
            f"model.tbptt_steps={config['tbptt_steps']} truncates unpadded series (forecasting); this "
            "task pads its sequences: set model.tbptt_steps=null"
        )
    size = config.pop("size", None)
    compile_layers = config.pop("compile", False)
    for key, (valid, expected) in _BACKBONE_RANGES.items():
        if key in config and not (key == "d_model" and size is not None):  # size solves d_model
            check_range(f"model.{key}", config[key], valid, expected)
    if size is not None:
        config = sized(config, size)
        log.info(
            "model.size=%s: d_model %s (the width of that parameter budget)", size, config.get("d_model")
        )
    backbone = instantiate(config, _convert_="all")
    if not isinstance(backbone, Backbone):
        raise ConfigError(f"model._target_={config.get('_target_')!r} is not a seqlab Backbone")
    #: the config that rebuilds these shapes (the solved width, not ``size``): what checkpoints keep
    backbone.built_from = {
        **{key: value for key, value in config.items() if key not in task_requirements},
        **({"compile": compile_layers} if compile_layers else {}),
    }
    if compile_layers:
        for module in backbone.modules():
            if backbone.layer_classes and isinstance(module, backbone.layer_classes):
                module.compile(dynamic=None)
    return backbone


def warmup_schedule(name: str, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Learning-rate multiplier per optimizer step: linear warm-up, then constant, cosine or linear
    decay to ``min_lr_ratio`` at ``total_steps``, or fairseq's ``inverse_sqrt`` (the warm-up's end
    times ``sqrt(warmup / step)``, open-ended; ``min_lr_ratio`` its floor)."""
    if name not in SCHEDULES:
        raise ConfigError(f"task.scheduler.name={name!r}: expected one of {list(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        if name == "inverse_sqrt":
            return max(min_lr_ratio, math.sqrt(max(1, warmup_steps) / (step + 1)))
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return factor


def warmup_steps(schedule: dict[str, Any], total_steps: int) -> int:
    """The warm-up's optimizer steps: ``task.scheduler.warmup_steps`` where set (it wins over the
    configs' ``warmup_ratio``), else ``warmup_ratio`` of ``total_steps``."""
    steps, ratio = schedule.get("warmup_steps"), schedule.get("warmup_ratio")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(
                f"task.scheduler.warmup_steps={steps!r}: expected a whole number of optimizer steps "
                ">= 0, or null (task.scheduler.warmup_ratio of the run's steps)"
            )
        if steps > total_steps:
            log.warning(
                "task.scheduler.warmup_steps=%d is more than the run's %d optimizer steps: the learning "
                "rate never reaches task.optimizer.lr", steps, total_steps,
            )  # fmt: skip
        return steps
    ratio = 0.0 if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise ConfigError(f"task.scheduler.warmup_ratio={ratio!r}: expected a share of the steps in [0, 1]")
    return int(ratio * total_steps)


#: optimizers whose fused kernel ``task.optimizer.fused: auto`` picks, on the devices where torch
#: has one for them (torch >= 2.5). Measured on the 2-core development CPU (AdamW step, medians of
#: 5): the default Transformer forecaster's 34 parameter tensors 1.47 ms in torch's default
#: per-tensor loop, 0.97 ms ``foreach``, 0.31 ms fused; the small LSTM's 8 tensors 0.45 / 0.44 /
#: 0.15 ms. On CUDA torch's default is ``foreach``; torchtitan defaults to fused there (not yet
#: measured here).
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
FUSED_DEVICE_TYPES = ("cpu", "cuda")


def fused_by_default(optimizer_cls: type, groups: list[dict[str, Any]], config: dict[str, Any]) -> bool:
    """Whether ``fused: auto`` takes the fused kernel: a known optimizer over floating-point
    parameters on one device type that has the kernel, and no ``foreach``/``differentiable``
    asked for (torch takes neither with ``fused``). Anything else keeps torch's default."""
    params = [param for group in groups for param in group["params"]]
    device_types = {param.device.type for param in params}
    return (
        optimizer_cls in FUSED_OPTIMIZERS
        and len(device_types) == 1
        and device_types <= set(FUSED_DEVICE_TYPES)
        and all(param.is_floating_point() for param in params)
        and not config.get("foreach")
        and not config.get("differentiable")
    )


def keep_settings_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Restoring an optimizer's state replaces its parameter groups' settings with the saved ones:
    a run continued from another run's checkpoint (``ckpt_path=``, ``task.optimizer.lr=1e-4``)
    trained at that run's learning rate and weight decay while its config.yaml recorded this one's,
    and a checkpoint saved before ``fused: auto`` (or with another setting) silently switched the
    kernel. The settings the optimizer holds when the state is loaded (this run's config, and the
    schedule's first rate) stay, its moments and step counts are the checkpoint's (fairseq's
    ``--restore-file``); a saved schedule then sets the rate of its position
    (``ConfiguredLambdaLR``). A run resuming its own checkpoint has the same settings (resume=auto
    refuses others). For a fused optimizer each parameter's ``step`` counter
    goes where that kernel wants it (float32, on the parameter's device), as torch places it when
    the saved state is fused: a state saved unfused keeps it on the CPU, and a fused CUDA step
    would fail on it."""
    fused = optimizer.defaults.get("fused")
    held: list[dict[str, Any]] = []

    def remember(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        held[:] = [
            {key: value for key, value in group.items() if key != "params"} for group in opt.param_groups
        ]

    def restore(opt: torch.optim.Optimizer) -> None:
        for group, settings in zip(opt.param_groups, held, strict=True):
            group.update(settings)
            if not fused:
                continue
            for param in group["params"]:
                step = opt.state.get(param, {}).get("step")
                if isinstance(step, Tensor):
                    opt.state[param]["step"] = step.to(dtype=torch.float32, device=param.device)

    optimizer.register_load_state_dict_pre_hook(remember)
    optimizer.register_load_state_dict_post_hook(restore)


def check_monitor(monitor: str, monitor_mode: str | None, trained: bool = True) -> None:
    """``task.monitor_mode`` must say which way ``task.monitor`` improves: its default follows a
    known metric (``${monitor_mode:${task.monitor}}``: ``min`` for ``val/loss``), and a mode
    against a known metric's direction is refused for a run to be trained (the best checkpoint
    and early stopping would keep the worst epochs: ``task.monitor=val/loss`` under
    classification's ``max``); a checkpoint trained so still loads (``trained=False``)."""
    known = metric_mode(monitor)
    if monitor_mode is None and known is not None:  # task.monitor_mode=null, ~task.monitor_mode
        raise ConfigError(
            f"task.monitor_mode is null: expected min or max ({monitor} is best at its "
            f"{'lowest' if known == 'min' else 'highest'}: {known}; the configs' default follows task.monitor)"
        )
    if monitor_mode is None:  # the default, for a metric of another name
        names = ", ".join(f"val/{name}" for name in sorted(METRIC_MODES))
        raise ConfigError(
            f"task.monitor={monitor!r} is none of the tasks' metrics ({names}), so which way it "
            "improves is not known: give task.monitor_mode=min or max for a metric of your own"
        )
    if monitor_mode not in ("min", "max"):
        raise ConfigError(f"task.monitor_mode={monitor_mode!r}: expected 'min' or 'max'")
    if trained and known is not None and known != monitor_mode:
        raise ConfigError(
            f"task.monitor_mode={monitor_mode} for task.monitor={monitor}, whose best is its "
            f"{'lowest' if known == 'min' else 'highest'} value: the best checkpoint and early stopping "
            f"would keep the worst epochs; give task.monitor_mode={known} (or leave it out: it follows "
            "task.monitor). An interrupted run trained so cannot go on: start it afresh in another directory"
        )


class ConfiguredLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose restored state keeps the peak learning rates it was built with (this
    run's ``task.optimizer.lr``): the position in the schedule is the checkpoint's, the rate at
    each step this run's schedule of this run's rate. Restoring a plain ``LambdaLR`` put back the
    saved run's ``base_lrs``. Its own run's checkpoint gives back the very rates it saved."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        peaks = list(self.base_lrs)
        super().load_state_dict(state_dict)
        self.base_lrs = peaks
        for group, peak, factor in zip(self.optimizer.param_groups, peaks, self.lr_lambdas, strict=True):
            group["initial_lr"] = peak
            group["lr"] = peak * factor(self.last_epoch)  # LambdaLR.get_lr's own product
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class SeqTask(L.LightningModule):
    """Base of the task modules. Subclasses call ``save_hyperparameters(logger=False)`` (the run
    logs its whole config, credentials redacted, once: Lightning's own logging of the task's and
    the data's arguments put a data URL's password in W&B and hparams.yaml) and define the steps.

    ``monitor`` names the validation metric that selects checkpoints and is the sweep objective;
    ``{monitor}_best`` is logged every validation epoch.
    """

    #: methods that run the model without ``forward`` (e.g. generation); under FSDP2 they
    #: all-gather the sharded weights as ``forward`` does
    forward_methods: tuple[str, ...] = ()
    #: settings eval.py may change on a trained model (``+task.<key>=``): how it is tested, not
    #: what it learned (a translation's search, a report's length)
    test_settings: tuple[str, ...] = ()

    def __init__(self, monitor: str, monitor_mode: str | None) -> None:
        super().__init__()
        check_monitor(monitor, monitor_mode, trained=False)  # train.py refuses a mode against the metric
        self.monitor_best = MinMetric() if monitor_mode == "min" else MaxMetric()
        # the epoch's summed training loss and step count: one tensor add per step (a torchmetrics
        # MeanMetric.update costs ~20 us of Python per step, ~0.3% of a small model's step),
        # updated in place (assigning a module attribute goes through nn.Module.__setattr__, ~3 us)
        # (a ``step_loss`` that is a mean over a varying count, a batch's target tokens, puts that
        # count in "step_weight": the epoch's mean is then over those, not over steps)
        self._train_loss: dict[str, Any] = {"sum": None, "weight": 0}
        #: plain-data description of the run (data config, etc.) stored in every checkpoint
        self.run_info: dict[str, Any] = {}
        #: ``{monitor}_best`` of the run's own checkpoint it resumed from (None on a fresh start)
        self.restored_best: Tensor | None = None
        #: every process's (loss sum, weight) of the epoch so far, from a mid-epoch checkpoint of
        #: this run: taken back as training starts (``on_train_start``)
        self._restored_train_loss: list[list[float]] | None = None

    # ----------------------------------------------------------------- precision
    def setup(self, stage: str) -> None:
        keep_measurements_precise(self.trainer.precision_plugin, self)
        self.remember_parameter_ranks()

    def remember_parameter_ranks(self) -> None:
        """Each parameter's rank before a strategy wraps the model (``setup`` runs first), kept on
        the parameter itself: FSDP (``use_orig_params``) makes every parameter a 1-d view of its
        shard before ``configure_optimizers``, where no weight was then decayed. A parameter a
        strategy replaces (FSDP2's DTensors) has none, and its own rank is the global one."""
        for param in self.parameters():
            if not hasattr(param, "_seqlab_ndim"):
                param._seqlab_ndim = param.ndim

    def adopt_data(self, data: dict[str, Any]) -> None:
        """Take what describes the data rather than the model (``task_kwargs()``: a scaler, names)
        when a checkpoint is evaluated on data other than its training's (``eval.py``)."""

    def check_trainable(self) -> None:
        """Refuse, by name, settings a checkpoint may hold but a new training run must not use
        (``train.py`` asks before it starts the loggers; loading a checkpoint does not)."""

    def convert_batch(self, batch: Any, convert: Callable[[Any], Any]) -> Any:
        """The batch as a precision that casts the model's inputs (``*-true``, DeepSpeed) hands it to
        the step; ``convert`` is that cast. By default all of it: text batches hold token ids
        and masks, which it leaves alone. A task whose batch holds floating targets casts only
        the inputs, or none (``ForecastingTask`` casts them itself, in ``forward``)."""
        return convert(batch)

    # ----------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """``trainer=fsdp2`` (Lightning's ModelParallelStrategy): FSDP2 ``fully_shard`` over the
        data-parallel mesh, one unit per backbone layer (``Backbone.layer_classes``), then the
        rest of the task (embeddings, heads) as the root unit. No-op under every other strategy.
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        if isinstance(self, FSDPModule):  # fit, then test: shard once
            return
        if mesh["tensor_parallel"].size() != 1:
            raise ConfigError(
                "trainer.strategy.tensor_parallel_size must be 1: seqlab's backbones have no "
                "tensor-parallel plan (FSDP2 shards over data_parallel_size processes)"
            )
        data_parallel = mesh["data_parallel"]
        layer_classes = self.backbone.layer_classes
        for module in list(self.backbone.modules()):
            if layer_classes and isinstance(module, layer_classes):
                fully_shard(module, mesh=data_parallel)
        fully_shard(self, mesh=data_parallel)
        for name in self.forward_methods:  # entry points besides forward gather the root's weights too
            register_fsdp_forward_method(self, name)

    # ----------------------------------------------------------------- best metric
    def on_train_start(self) -> None:
        self.monitor_best.reset()  # forget values from the sanity check
        if self.restored_best is not None:  # a resumed run: the best of the epochs before it too
            self.monitor_best.update(self.restored_best.to(self.device))
        # a run resumed mid-epoch: the epoch's training loss so far (its train/loss_epoch was the
        # mean over the steps since the resume only); not at an epoch's end (the next epoch starts
        # afresh), nor from a checkpoint of another number of processes
        restored, self._restored_train_loss = self._restored_train_loss, None
        if restored is None:
            return
        # (processed, not completed: a step checkpoint is saved in on_train_batch_end, before
        # Lightning counts its batch completed)
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        mid_epoch = 0 < done < self.trainer.num_training_batches
        if mid_epoch and len(restored) == self.trainer.world_size:
            total, weight = restored[self.global_rank]
            # (summed in float32, as the uninterrupted run does: the saved value is exact in it)
            self._train_loss.update(
                sum=torch.tensor(total, dtype=torch.float32, device=self.device), weight=weight
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only when resuming this run (a checkpoint in its own directory), and for the same metric:
        # a run started from another run's checkpoint has not yet seen a validation of its own
        saved = checkpoint.get("seqlab_monitor_best")
        own = resumes_own_run(self._trainer)  # no trainer under load_from_checkpoint (eval.py, translate.py)
        if own and isinstance(saved, dict) and saved.get("monitor") == self.hparams.monitor:
            self.restored_best = saved["value"]
        train_loss = checkpoint.get("seqlab_train_loss")
        self._restored_train_loss = train_loss if own and isinstance(train_loss, list) else None
        info = checkpoint.get("seqlab") or {}
        if self.backbone.summary_at_ends and info and "summary_at_ends" not in info:
            # saved before a bidirectional min-RNN's last/first pooling read both ends (2026-11-26):
            # the model computes what it was trained to (its last step alone)
            self.backbone.summary_at_ends = False
            if self.hparams.get("pooling", self.hparams.get("head")) in ("last", "first"):
                log.warning(
                    "the checkpoint's bidirectional %s pools its last or first step alone, as it was "
                    "trained (saved before pooling read both directions' summaries)",
                    type(self.backbone).__name__,
                )

    def log_monitor_best(self, values: dict[str, torch.Tensor]) -> None:
        """Log ``{monitor}_best`` from the epoch's validation ``values`` (already reduced)."""
        if self.hparams.monitor not in values:  # at the sanity check, before any training
            raise ConfigError(f"task.monitor={self.hparams.monitor!r}: expected one of {sorted(values)}")
        if self.trainer.sanity_checking:
            return
        self.monitor_best.update(values[self.hparams.monitor])
        self.log(f"{self.hparams.monitor}_best", self.monitor_best.compute(), sync_dist=True)

    # ----------------------------------------------------------------- training step
    def step_loss(self, batch: Any) -> Tensor:
        """The training loss of ``batch``, without logging (``training_step`` logs it; FLOP
        counting and the plain-loop benchmark call it alone)."""
        raise NotImplementedError

    def batch_tokens(self, batch: Any) -> int | Tensor:
        """Sequence positions the backbone processes for ``batch`` (padding excluded): the unit
        of tokens/s (and of MFU: computing padding is not useful work)."""
        raise NotImplementedError

    def batch_positions(self, batch: Any) -> int | Tensor:
        """Sequence positions of ``batch``, padding included: what a FLOP count of the batch is
        divided by for the FLOPs of one token. Unpadded batches: ``batch_tokens``."""
        return self.batch_tokens(batch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The loss of ``step_loss``. ``train/loss`` is logged at Lightning's logging steps only,
        the only steps its loggers write: a ``self.log`` call costs ~0.5 ms of Python on every
        step it is made (measured by ``scripts/benchmark.py overhead``). Not with
        ``prog_bar=True``: Lightning converts the last logged progress-bar value to a number
        after *every* step (``.item()``, a device synchronisation on a GPU); seqlab's progress
        bar shows it from the callback metrics when it redraws. ``train/loss_epoch`` is the mean
        over the epoch (over its steps, or the count each step's loss averages, ``step_weight``),
        reduced once at its end. A ``step_loss`` scaled for the gradient (translation's share of
        the global batch's tokens) leaves the step's own mean to show in ``step_shown``, and the
        value the epoch's mean weighs by ``step_weight`` in ``step_value`` where that is not the
        loss returned."""
        loss = self.step_loss(batch)
        epoch = self._train_loss
        weight = epoch.pop("step_weight", None)
        shown = epoch.pop("step_shown", loss)
        # summed in float32: a bf16 model's loss is bf16, whose sum stops growing past 128
        detached = epoch.pop("step_value", loss).detach().float()
        if weight is not None:
            detached = detached * weight
        epoch["sum"] = detached if epoch["sum"] is None else epoch["sum"] + detached
        epoch["weight"] = epoch["weight"] + (1 if weight is None else weight)
        if self._logging_step():
            self.log("train/loss", shown, on_step=True, on_epoch=False)
        return loss

    def _logging_step(self) -> bool:
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_epoch_end(self) -> None:
        epoch = self._train_loss
        if epoch["sum"] is not None:
            # every process ran as many steps, each weighed alike on every process (a step's
            # weight is global): the mean over processes of their means is the epoch's mean
            self.log("train/loss_epoch", epoch["sum"] / epoch["weight"], sync_dist=True)
        epoch["sum"], epoch["weight"] = None, 0

    # ----------------------------------------------------------------- optimisation
    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Weight decay on every matrix (weights and embedding tables, as in Hugging Face's and
        nanoGPT's defaults); none on 1-d parameters (biases, norm scales and shifts). The rank is
        the parameter's before any sharding strategy flattened it (``setup``)."""
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if getattr(param, "_seqlab_ndim", param.ndim) >= 2 else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> Any:
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if self.hparams.get("scheduler") and (math.isinf(total) or total < 0):
            raise ConfigError(
                f"task.scheduler needs the run's number of optimizer steps, and it is {total} "
                "(trainer.max_epochs=-1 without trainer.max_steps, or an endless loader): set "
                "trainer.max_steps, or task.scheduler=null for a constant learning rate"
            )
        optimizer, scheduler = self.build_optimizer(
            int(total) if math.isfinite(total) else 0,
            offload=offloads_optimizer(trainer.strategy),
            fusable_here=fusable(trainer.precision_plugin, trainer.gradient_clip_val),
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def build_optimizer(
        self, total_steps: int, offload: bool = False, fusable_here: bool = True
    ) -> tuple[Any, Any]:
        """``task.optimizer`` over the parameter groups, and the per-step warm-up/decay schedule
        over ``total_steps`` (None without ``task.scheduler``). ``offload``: ZeRO-Offload steps on
        the CPU with DeepSpeed's vectorised Adam (same update rule). ``fused: auto`` (the default
        configs): torch's fused kernel where :func:`fused_by_default` says it has one, unless
        ``fusable_here`` is False (see :func:`fusable`)."""
        config = dict(self.hparams.optimizer)
        optimizer_cls = get_class(config.pop("_target_"))
        groups = self.parameter_groups(config.pop("weight_decay", 0.0))
        fused = config.get("fused", False)
        if fused not in ("auto", True, False, None):
            raise ConfigError(f"task.optimizer.fused must be auto, true or false, got {fused!r}")
        if offload and optimizer_cls in (torch.optim.Adam, torch.optim.AdamW):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            config.pop("fused", None)  # DeepSpeed's CPU Adam is vectorised already
            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=optimizer_cls is torch.optim.AdamW, **config)
        else:
            if fused is True and not fusable_here:
                raise ConfigError(
                    "task.optimizer.fused=true: gradient clipping is not done with a fused optimizer under "
                    "16-mixed (the gradients are still scaled when clipped) nor under mixed precision with "
                    "trainer=fsdp or deepspeed (not tried); set trainer.gradient_clip_val=null, another "
                    "trainer.precision, or task.optimizer.fused=auto"
                )
            if fused == "auto":
                if fusable_here and fused_by_default(optimizer_cls, groups, config):
                    config["fused"] = True
                else:
                    del config["fused"]  # torch's own choice (foreach on CUDA, a loop elsewhere)
            optimizer = optimizer_cls(groups, **config)
        schedule = self.hparams.get("scheduler")
        keep_settings_on_load(optimizer)
        if not schedule:
            return optimizer, None
        floor = schedule.get("min_lr_ratio") or 0.0
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 <= floor <= 1:
            raise ConfigError(
                f"task.scheduler.min_lr_ratio={floor!r}: expected the final share of the learning rate, in [0, 1]"
            )
        warmup = warmup_steps(schedule, total_steps)
        factor = warmup_schedule(schedule["name"], total_steps, max(warmup, 1), floor)
        return optimizer, ConfiguredLambdaLR(optimizer, factor)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = self.task_class()
        checkpoint["seqlab"] = {"task_target": f"{cls.__module__}.{cls.__qualname__}"}
        checkpoint["seqlab"].update(self.run_info)
        checkpoint["seqlab"]["summary_at_ends"] = self.backbone.summary_at_ends
        if checkpoint.get("datamodule_hyper_parameters"):  # Lightning's copy of the data's arguments
            from seqlab.utils.secrets import redact

            checkpoint["datamodule_hyper_parameters"] = redact(
                dict(checkpoint["datamodule_hyper_parameters"])
            )
        # the backbone as built: a model.size run reloads with its solved width, not by solving again
        saved = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if saved is not None and "backbone" in saved and hasattr(self.backbone, "built_from"):
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {
                **saved,
                "backbone": dict(self.backbone.built_from),
            }
        # torchmetrics states are not saved: without this a resumed run's ``{monitor}_best`` (the
        # sweep objective) would be the best of the epochs since the resume
        if self.monitor_best.update_count:  # its state, not compute(): no collective inside a save
            (best,) = self.monitor_best.metric_state.values()  # updated with reduced values only
            checkpoint["seqlab_monitor_best"] = {
                "monitor": self.hparams.monitor,
                "value": best.detach().float().cpu(),
            }

        # during an epoch (a step checkpoint, SIGTERM; best.ckpt at the epoch's validation too):
        # the epoch's training loss so far, every process's (a collective: every process saves a
        # checkpoint together, Lightning's rule)
        if self._train_loss["sum"] is not None:
            checkpoint["seqlab_train_loss"] = self.train_loss_so_far()

    def train_loss_so_far(self) -> list[list[float]]:
        """(loss sum, weight) of the epoch so far, one pair per process (float32: no float64 on
        every device, MPS's; exact for the weight's step or token counts below 2**24)."""
        total = self._train_loss["sum"].detach().float()
        mine = torch.stack([total, torch.as_tensor(self._train_loss["weight"], device=total.device).float()])
        gathered = self.all_gather(mine) if self.trainer.world_size > 1 else mine[None]
        return gathered.cpu().tolist()

    def task_class(self) -> type[SeqTask]:
        """The task's own class: FSDP2 swaps in a generated subclass (FSDP<Task>) when it shards."""
        return next(c for c in type(self).__mro__ if not c.__module__.startswith("torch."))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
