"""Training: compose -> instantiate data, task (with the backbone) and trainer -> fit -> test -> summary.

``train(cfg)`` is what the entry point and the tests call; it returns the metrics and the objects
it built. The top-level ``train.py`` is only the Hydra entry point.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf

from seqlab.callbacks import DivergenceGuard, ExactResume, RunStats, SaveOnSigterm
from seqlab.callbacks.run_stats import start_job
from seqlab.errors import ConfigError, SeqlabError, instantiate
from seqlab.tasks.base import check_monitor, check_optimizer
from seqlab.utils import hooks
from seqlab.utils.checkpoint_io import (
    AtomicCheckpointIO,
    check_init_from,
    check_same_tokenizer,
    check_weights_fit,
    init_patterns,
    load_initial_weights,
)
from seqlab.utils.csv_logger import CSVLogger
from seqlab.utils.distributed import (
    STOPPED_BY_SIGTERM,
    build_strategy,
    check_hardware,
    finish_job,
    follow_launcher,
    in_multirun,
    use_script_launcher,
    use_spawn_launcher,
)
from seqlab.utils.files import write_text_atomic
from seqlab.utils.logging import route_lightning_logs_to_root
from seqlab.utils.parallel import job_resources, side_by_side, trainer_kwargs, without_progress_bars
from seqlab.utils.precision import clip_fused_under_bf16
from seqlab.utils.resume import (
    check_checkpoint_fits,
    check_same_data_dir,
    drop_refused_run_dir,
    finished_job,
    forget_failed_setup,
    mark_running,
    mark_stopped,
    newest_checkpoint,
    own_checkpoint,
    resume_checkpoint,
    same_command,
)
from seqlab.utils.run import (
    hardware,
    hydra_choice,
    hydra_overrides,
    is_rank_zero,
    print_config_tree,
    print_results,
    task_name,
    versions,
    write_run_metadata,
    write_summary,
)
from seqlab.utils.secrets import redact
from seqlab.utils.settings import check_settings, matches, target_object, to_plain
from seqlab.utils.wandb import finish_runs, summarize_runs

log = logging.getLogger(__name__)


def missing_keys(cfg: DictConfig) -> list[str]:
    """The dotted keys whose value is OmegaConf's ``???`` (Hydra's own settings aside), found
    without resolving anything (an interpolation that fails has its own error, where it is read)."""

    def walk(node: Any, prefix: str) -> Iterator[str]:
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            elif value == "???":
                yield f"{prefix}{key}"

    plain = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    return list(walk({key: value for key, value in plain.items() if key != "hydra"}, ""))


def check_choices(cfg: DictConfig) -> None:
    """What the config alone decides, refused before any data is read, downloaded or tokenized
    (an SST-2 download and tokenizer training came first): a ``task=`` of another kind than the
    data's examples, a ``model.*`` key the backbone does not take (an experiment's ``model.nhead``
    under ``model=gru``), a value that the annotations of the class it configures rule out
    (``seqlab.utils.settings``), ``task.optimizer`` settings out of range, a seed that is not an integer, or a value the config leaves to
    be given (``???``: ``data=csv``'s file)."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: expected a value on the command line (the config leaves it to be "
            f"given: {' '.join(f'{key}=...' for key in missing)})"
        )
    data_cls, task_cls = target_object(cfg.data._target_, "data"), target_object(cfg.task._target_, "task")
    wanted = getattr(data_cls, "TASK", None)
    if wanted and not issubclass(task_cls, get_class(wanted)):
        raise ConfigError(
            f"task={hydra_choice('task') or cfg.task._target_} ({task_cls.__name__}) cannot train on "
            f"data={hydra_choice('data') or cfg.data._target_}, whose examples are for a "
            f"{wanted.rsplit('.', 1)[-1]}: the data config chooses the task; drop task="
        )
    seed = cfg.get("seed")
    if not matches(seed, int | None):
        hint = (
            " (from an environment variable: seed='${oc.decode:${oc.env:SEED}}')"
            if isinstance(seed, str)
            else ""
        )
        raise ConfigError(f"seed={seed!r}: expected an integer, or null for an unseeded run{hint}")
    check_settings(cfg.data, "data")
    check_settings(cfg.model, "model", skip=("size", "compile"))  # build_backbone's, not the class's
    given = [o for o in hydra_overrides() if o.lstrip("+~").partition("=")[0] == "model.d_model"]
    if cfg.model.get("size") is not None and given:
        raise ConfigError(
            f"model.size={cfg.model.size} solves the width itself, and {given[-1]} would be ignored (the "
            "run's records would show it): give one of them (model.size=null for a width of your own)"
        )
    if "monitor" in cfg.task:
        check_monitor(cfg.task.monitor, cfg.task.get("monitor_mode"))
    check_settings(cfg.task, "task")
    check_optimizer(cfg.task.get("optimizer"))
    check_settings(cfg.trainer, "trainer", skip=("strategy",))  # build_strategy's
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, dict | DictConfig) and "_target_" in node:
                check_settings(node, f"{group}.{name}")
                if group == "callbacks":
                    check_top_k_names(name, node)


def without_weight_averaging(trainer: L.Trainer) -> None:
    """Drop the weight-averaging callbacks (``callbacks.ema``: Lightning's ``WeightAveraging``)
    before testing. Validation and ``best.ckpt``'s ``state_dict`` hold the averaged weights, but a
    callback that averaged during fit, loading the best checkpoint for the test, puts the raw
    weights of that step (``current_model_state``) back into the model: train.py tested other
    weights than those it selected and eval.py tests."""
    from lightning.pytorch.callbacks import WeightAveraging

    kept = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
    if len(kept) < len(trainer.callbacks):  # dropped on purpose: Lightning's "please add" says otherwise
        warnings.filterwarnings("ignore", r"Be aware that when using `ckpt_path`, callbacks used to create")
    trainer.callbacks = kept


def quiet_weight_averaging(trainer: L.Trainer) -> None:
    """Lightning warns that weight averaging "doesn't support sharding" for any module overriding
    ``configure_model``, as every seqlab task does for FSDP2 alone: said under every strategy
    but that one (in the job's warning filters, ``extras_restored``)."""
    from lightning.pytorch.callbacks import WeightAveraging

    from seqlab.utils.distributed import strategy_kind

    averaging = any(isinstance(c, WeightAveraging) for c in trainer.callbacks)
    if averaging and strategy_kind(trainer.strategy) != "ModelParallelStrategy":
        warnings.filterwarnings(
            "ignore", r"You're using the WeightAveraging callback with a model that overrides"
        )


def build_datamodule(
    data_cfg: DictConfig | dict,
    artifacts: dict[str, Any] | None = None,
    prepare: bool = True,
    check_trainable: bool = False,
    tokenizers: dict[str, Any] | None = None,
    evaluate_only: bool = False,
) -> L.LightningDataModule:
    """Instantiate and prepare the data; ``artifacts`` (a checkpoint's tokenizer...) are reused, not
    rebuilt. ``prepare=False``: no data files are read or written (what needs only the artifacts).
    ``check_trainable``: the datamodule's own refusals for a new training run, before any file
    is read (and on every process). ``tokenizers``: a checkpoint's artifacts whose tokenizers alone
    are reused (``init_from``), the rest built from the data. ``evaluate_only``: with
    ``artifacts``, the test split alone is read where it has files of its own (eval.py)."""
    check_settings(data_cfg, "data")
    datamodule = instantiate(data_cfg, _convert_="all")
    if check_trainable and hasattr(datamodule, "check_trainable"):
        datamodule.check_trainable()
    if artifacts and hasattr(datamodule, "use_artifacts"):
        datamodule.use_artifacts(artifacts)
        if evaluate_only and hasattr(datamodule, "evaluate_only"):
            datamodule.evaluate_only()
    elif tokenizers and hasattr(datamodule, "use_tokenizers"):
        datamodule.use_tokenizers(tokenizers)
    if prepare:
        datamodule.prepare_data()  # every process: downloads are atomic, and no process group exists yet
    return datamodule


def datamodule_config(datamodule: L.LightningDataModule) -> dict[str, Any]:
    """Plain config that rebuilds ``datamodule`` (its hyperparameters, with absolute paths)."""
    cls = type(datamodule)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **to_plain(dict(datamodule.hparams))}


def build_task(task_cfg: DictConfig, model_cfg: DictConfig, datamodule: L.LightningDataModule):
    """The task LightningModule, with the backbone config and the sizes the data dictates."""
    task_kwargs = to_plain(task_cfg)
    task_cls = get_class(task_kwargs.pop("_target_"))
    return task_cls(backbone=to_plain(model_cfg), **task_kwargs, **datamodule.task_kwargs())


def check_top_k_names(name: str, node: DictConfig) -> None:
    """A ModelCheckpoint keeping several checkpoints (``save_top_k`` -1 or above 1) must name
    each: with one fixed ``filename`` (``best``) and no version counter, every checkpoint of the
    top k is written to that one file, a worse one over the best, which the test, eval.py and
    compare.py then read as the best weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cls = target_object(node._target_, f"callbacks.{name}")
    if not (isinstance(cls, type) and issubclass(cls, ModelCheckpoint)):
        return
    top_k, filename = node.get("save_top_k", 1), node.get("filename")
    if top_k in (0, 1) or not node.get("monitor") or filename is None or "{" in str(filename):
        return
    if not node.get("enable_version_counter", True):
        raise ConfigError(
            f"callbacks.{name}.save_top_k={top_k} with callbacks.{name}.filename={filename!r}: "
            f"each of the top checkpoints would be written to {filename}.ckpt, a worse one over the best; "
            f"give each its own name, e.g. callbacks.{name}.filename='best-{{epoch:03d}}-{{step}}' "
            "(the test and summary.json's best checkpoint then follow the best of them)"
        )


def build_callbacks(callbacks_cfg: DictConfig | None) -> list[L.Callback]:
    """The configured callbacks, plus those every run keeps (throughput, NaN guard, what resuming
    needs)."""
    for name, node in (callbacks_cfg or {}).items():
        if node is not None and "_target_" not in node and is_rank_zero():
            # settings of a callback that is not there (callbacks=none left it out): said, not
            # silently dropped (an experiment's early_stopping.patience under callbacks=none too)
            log.warning(
                "callbacks.%s has settings (%s) but no _target_: no callback is built from them "
                "(callbacks=none leaves the default callbacks out); give callbacks.%s._target_ to have it",
                name, ", ".join(map(str, node)), name,
            )  # fmt: skip
    callbacks = [instantiate(c) for c in (callbacks_cfg or {}).values() if c is not None and "_target_" in c]
    callbacks = without_progress_bars(callbacks)  # a job of a parallel sweep: one terminal for all
    for required in (RunStats, DivergenceGuard, ExactResume, SaveOnSigterm):
        if not any(isinstance(c, required) for c in callbacks):
            callbacks.append(required())
    return callbacks


def without_early_stopping(callbacks: list[L.Callback], trainer_cfg: DictConfig) -> list[L.Callback]:
    """``trainer.limit_val_batches=0`` (Lightning's way to skip validation) leaves early stopping
    no metric to follow: it raised at the first epoch's end, a traceback and no checkpoint. Left
    out, said once; the run then tests its last weights (no best checkpoint either)."""
    from lightning.pytorch.callbacks import EarlyStopping

    limit = trainer_cfg.get("limit_val_batches")
    if limit is None or float(limit) != 0 or not any(isinstance(c, EarlyStopping) for c in callbacks):
        return callbacks
    log.warning(
        "trainer.limit_val_batches=%s: no validation, so no early stopping (left out) and no best "
        "checkpoint; the last weights are tested",
        limit,
    )
    return [c for c in callbacks if not isinstance(c, EarlyStopping)]


def record_interruption(run_dir: Path, stop: SystemExit) -> None:
    """A sweep job stopped by Ctrl-C (Lightning ends it with ``SystemExit(1)``) or by SIGTERM
    (``SIGTERMException``, a ``SystemExit`` too, after ``SaveOnSigterm``'s checkpoint): either ends
    the sweep before Hydra records the job, and its table called it killed ("out of memory, a
    time limit?"). Its ``error.txt`` says what stopped it (a SIGTERM was called a Ctrl-C)."""
    from seqlab.utils.hydra_callbacks import ERROR_FILE

    what = (
        "SIGTERMException: stopped by SIGTERM at a step boundary, its checkpoint saved"
        if isinstance(stop, SIGTERMException)
        else "KeyboardInterrupt: stopped by Ctrl-C (SIGINT)"
    )
    write_text_atomic(
        run_dir / ERROR_FILE, f"{what}; the sweep run again with its hydra.sweep.dir resumes it\n"
    )


def build_loggers(logger_cfg: DictConfig | None, run_dir: Path) -> list[Logger]:
    """The configured loggers, plus a CSV logger (``metrics.csv``) that every run keeps."""
    loggers = [instantiate(c) for c in (logger_cfg or {}).values() if c is not None and "_target_" in c]
    if not any(isinstance(lg, LightningCSVLogger) for lg in loggers):
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))
    return loggers


def build_trainer(
    cfg: DictConfig,
    callbacks: list[L.Callback],
    loggers: list[Logger],
    model_cfg: DictConfig | None = None,
    batch_size: int | None = None,
) -> L.Trainer:
    """The Trainer of ``cfg.trainer``; ``model_cfg`` and ``batch_size`` (the backbone, which FSDP
    wraps layer by layer, and the global batch) where ``cfg`` has no ``model`` or ``data`` of its
    own (eval.py: the checkpoint's)."""
    hooks.install()  # callbacks are called only for the hooks they implement
    model_cfg = model_cfg if model_cfg is not None else cfg.get("model")
    batch_size = batch_size if batch_size is not None else (cfg.get("data") or {}).get("batch_size")
    strategy = build_strategy(cfg.trainer, model_cfg, batch_size)
    trainer = instantiate(
        cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()],
        **trainer_kwargs(),  # a job of a parallel sweep: its GPUs, no progress bar
    )  # fmt: skip
    clip_fused_under_bf16(trainer.strategy)  # bf16-mixed clips a fused optimizer's gradients too
    use_script_launcher(trainer)
    use_spawn_launcher(trainer)
    return trainer


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config") and is_rank_zero() and not side_by_side():  # (one terminal for all)
        print_config_tree(cfg)
    if extras.get("matmul_precision"):
        torch.set_float32_matmul_precision(extras.matmul_precision)


@contextlib.contextmanager
def extras_restored() -> Iterator[None]:
    """The process-wide settings ``apply_extras`` changes (warning filters, float32 matmul
    precision) put back when a job ends: the next job of a multirun in this process (Hydra's basic
    launcher, a reused joblib worker) asking for the defaults got the earlier job's."""
    precision = torch.get_float32_matmul_precision()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint by a metric: not one of those that keep the latest epochs or steps
    (``callbacks.recent_checkpoints``, monitor ``epoch``), which Lightning's ``checkpoint_callback``
    (its first) is without ``callbacks.model_checkpoint``."""
    callback = next(
        (c for c in trainer.checkpoint_callbacks if c.monitor not in (None, "epoch", "step")), None
    )
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path if path and Path(path).exists() else None  # a file, or a sharded checkpoint's directory


def warn_partial_test(trainer: L.Trainer) -> int | float | None:
    """``trainer.limit_test_batches`` where the test just run left batches out, with a warning
    (summary.json's ``test_limited``), else None. ``1`` (an int) is one batch, ``1.0`` all of them:
    both compare equal to 1.0, and a one-batch test read as the whole set."""
    limit = trainer.limit_test_batches
    if trainer.fast_dev_run or (isinstance(limit, float) and limit >= 1.0):
        return None
    loaders = trainer.test_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    try:
        total = sum(len(loader) for loader in loaders)
    except TypeError:  # a loader without a length: the limit is taken as cutting it
        total = math.inf
    if sum(trainer.num_test_batches) >= total:
        return None
    log.warning(
        "trainer.limit_test_batches=%s: the test metrics are of %d of the test set's %s batches, not "
        "comparable with a whole test set's (summary.json: test_limited)",
        limit, sum(trainer.num_test_batches), total,
    )  # fmt: skip
    return limit


def split_baselines(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``test/baseline_<name>_<metric>`` keys -> {name: {metric: value}}; the rest stay metrics."""
    model, baseline = {}, {}
    for key, value in metrics.items():
        if key.startswith("test/baseline_"):
            name, _, metric = key.removeprefix("test/baseline_").partition("_")
            baseline.setdefault(name, {})[metric] = value
        else:
            model[key] = value
    return model, baseline


def start_from_weights(
    task: L.LightningModule,
    datamodule: L.LightningDataModule,
    path: Path,
    info: dict[str, Any],
    exclude: list[str],
) -> None:
    """``init_from``: the task starts from the weights of the checkpoint ``path`` (``info``: its run
    information), those matching ``exclude`` left at their initialisation; a classifier's classes
    that differ from the checkpoint's are named (its head's rows are taken by position)."""
    kept = load_initial_weights(path, task, exclude)
    shown = ", ".join(kept[:4]) + (", ..." if len(kept) > 4 else "")
    log.info(
        "init_from=%s: %s", path,
        f"weights taken from it, {len(kept)} left at their initialisation ({shown})" if kept
        else "every weight taken from it",
    )  # fmt: skip
    before = (info.get("data_artifacts") or {}).get("classes")
    now = datamodule.artifacts().get("classes") if before and hasattr(datamodule, "artifacts") else None
    if before and now and before != now and not any(name.startswith("head.") for name in kept):
        log.warning(
            "init_from=%s was trained on the classes %s, this data has %s: its head's rows are "
            "taken by position (class %r starts as its %r); init_exclude=[head.*] starts the head afresh",
            path, before, now, now[0], before[0],
        )  # fmt: skip


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train and test one configuration; returns (metrics, objects)."""
    start = time.perf_counter()
    start_job()
    route_lightning_logs_to_root()
    check_hardware(cfg)
    follow_launcher()  # a rank the script launcher started ends with rank 0
    check_choices(cfg)
    run_dir = Path(cfg.paths.output_dir)
    kept = finished_job(cfg, run_dir)
    if kept is not None:  # a sweep run again: this job finished with this configuration earlier
        log.info("%s finished earlier with this configuration (summary.json): kept, not run again", run_dir)
        return {**kept.get("best", {}), **kept.get("metrics", {})}, {"cfg": cfg, "summary": kept}
    apply_extras(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    else:  # not an earlier job's seed, which the strategies (and the processes they start) re-seed from
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
            os.environ.pop(key, None)
    if cfg.get("init_from") and cfg.get("ckpt_path"):
        raise ConfigError(
            f"init_from={cfg.init_from!r} and ckpt_path={cfg.ckpt_path!r}: ckpt_path trains on from a "
            "checkpoint (its weights, optimizer, schedule and epoch), init_from starts a new run from "
            "a checkpoint's weights alone; give one"
        )
    exclude = init_patterns(cfg.get("init_exclude"))
    if exclude and not cfg.get("init_from"):
        raise ConfigError(f"init_exclude={exclude}: without init_from there are no weights to leave out")
    ckpt_path = resume_checkpoint(cfg, run_dir)  # refuses a directory it must not write into
    saved = check_checkpoint_fits(ckpt_path, cfg) if ckpt_path else None
    init = None
    if cfg.get("init_from") and ckpt_path:  # its own interrupted run, resumed
        log.info(
            "init_from=%s: its weights started this run, which resumes from %s", cfg.init_from, ckpt_path
        )
    elif cfg.get("init_from"):
        init = check_init_from(cfg)
    # a resumed run encodes with the checkpoint's tokenizers: trained again (its cache entry
    # gone, or keyed anew by a data file's new modification time) they may number the tokens
    # otherwise, under the trained embeddings (WordPiece and Unigram training is not deterministic)
    if saved:
        check_same_tokenizer(
            saved, to_plain(cfg.data), f"training on from it keeps them: give data={saved.get('data_name')} "
            "and its tokenizer settings, or leave ckpt_path unset for a model of its own",
        )  # fmt: skip
    if saved and own_checkpoint(ckpt_path, run_dir):
        check_same_data_dir(saved, cfg.data, ckpt_path)
    if ckpt_path and own_checkpoint(ckpt_path, run_dir):  # (in the job's warnings context: extras_restored)
        # a resumed run writes on into its own checkpoint directory: nothing to warn of
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # (refused above, a run directory is left as it was: nothing is written before this line)
    if is_rank_zero():
        mark_running(run_dir)  # claimed before anything is written into it
    try:  # a run refused while it is set up leaves no marker naming this (in a sweep, live) process
        git = write_run_metadata(cfg, run_dir) if is_rank_zero() else {}

        log.info("data <%s>", cfg.data._target_)
        datamodule = build_datamodule(
            cfg.data,
            (saved or {}).get("data_artifacts"),
            check_trainable=True,
            tokenizers=init[1].get("data_artifacts") if init else None,
        )
        log.info("task <%s>, backbone <%s>", cfg.task._target_, cfg.model._target_)
        task = build_task(cfg.task, cfg.model, datamodule)
        task.check_trainable()
        if ckpt_path:
            check_weights_fit(ckpt_path, task, resumed=own_checkpoint(ckpt_path, run_dir))
        if init:
            start_from_weights(task, datamodule, *init, exclude)
        num_params = task.num_parameters  # before any sharding strategy splits the parameters
        backbone_params = sum(p.numel() for p in task.backbone.parameters())
        # the data's settings, credentials redacted (a mirror's URL password): eval.py and a
        # resumed run take the data from these, given again on their command line where needed
        task.run_info = {
            "data": redact(datamodule_config(datamodule)),
            "data_name": hydra_choice("data"),
            "model_name": hydra_choice("model"),
            # which run the weights are of (a resumed run's too): checkpoints of one run average
            "run_dir": str(run_dir),
        }
        if hasattr(datamodule, "artifacts"):  # e.g. the tokenizer: eval needs it from the checkpoint alone
            task.run_info["data_artifacts"] = datamodule.artifacts()
        callbacks = without_early_stopping(build_callbacks(cfg.get("callbacks")), cfg.trainer)
        loggers = build_loggers(cfg.get("logger"), run_dir)
        trainer = build_trainer(cfg, callbacks, loggers)
        quiet_weight_averaging(trainer)
    except BaseException:
        if is_rank_zero():
            forget_failed_setup(run_dir)
        mark_stopped(run_dir)
        raise
    objects = {"cfg": cfg, "datamodule": datamodule, "task": task, "trainer": trainer}

    error: BaseException | None = None
    try:
        for logger in trainer.loggers:  # fast_dev_run: Lightning's DummyLogger, no W&B run opened
            logger.log_hyperparams({"config": redact(to_plain(cfg)), "num_params": num_params})
        stats = next(c for c in trainer.callbacks if isinstance(c, RunStats))
        fit_s = None
        if cfg.get("train"):
            fit_start = time.perf_counter()
            try:
                trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            except SystemExit as stop:
                if trainer.interrupted and in_multirun() and is_rank_zero():
                    record_interruption(run_dir, stop)
                raise
            # a resumed run: its earlier attempts' time up to the checkpoint it continued from too
            fit_s = round(stats.earlier_fit_s + time.perf_counter() - fit_start, 2)
        train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best_key = f"{cfg.task.monitor}_best"
        if best_key not in train_metrics and task.restored_best is not None:
            # resumed after its training had ended (stopped while testing): fit had nothing left to log
            train_metrics[best_key] = float(task.restored_best)

        test_metrics: dict[str, float] = {}
        limited = None  # trainer.limit_test_batches where the test left batches out
        if cfg.get("test"):
            # train=false tests the given checkpoint (it used to test freshly initialised weights)
            ckpt = best_checkpoint(trainer) if cfg.get("train") else ckpt_path
            if ckpt is None:
                # a warning unless the run saves none by design (debug=fdr, debug=overfit)
                saves = trainer.checkpoint_callback is not None and not trainer.fast_dev_run
                (log.warning if saves or not (cfg.get("train") or init) else log.info)(
                    "no best checkpoint was saved; testing the current weights"
                    if cfg.get("train")
                    else "train=false without ckpt_path: testing freshly initialised weights"
                    if not init
                    else f"train=false: testing the weights of init_from={cfg.init_from}"
                )
            log.info("testing %s", ckpt or "the current weights")
            without_weight_averaging(trainer)
            trainer.test(task, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, verbose=False)
            test_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            limited = warn_partial_test(trainer)

        metrics, baseline = split_baselines(test_metrics)
        memory = stats.peak_memory()
        order_seed = getattr(datamodule, "drawn_order_seed", None)  # seed=null: the orders' drawn seed
        summary = {
            "task": hydra_choice("task") or task_name(cfg.task._target_),
            "data": hydra_choice("data") or cfg.data._target_.rsplit(".", 1)[-1],
            "model": hydra_choice("model") or cfg.model._target_.rsplit(".", 1)[-1],
            "trainer": {
                "strategy": type(trainer.strategy).__name__,
                "accelerator": type(trainer.accelerator).__name__,
                "world_size": trainer.world_size,
                "precision": str(trainer.precision),
            },
            "seed": cfg.get("seed"),
            **({"order_seed": order_seed} if order_seed is not None else {}),
            "overrides": redact(hydra_overrides()),
            "metrics": metrics,
            **({"test_limited": limited} if metrics and limited is not None else {}),
            **({"test_report": task.test_report} if getattr(task, "test_report", None) else {}),
            "baseline": baseline,
            "best": {k: v for k, v in train_metrics.items() if k.endswith("_best")},
            "best_checkpoint": best_checkpoint(trainer),
            # the whole job (data preparation and test included) and training alone (with validation),
            # each with a resumed run's earlier attempts up to the checkpoint it continued from
            "wall_s": round(stats.earlier_wall_s + time.perf_counter() - start, 2),
            "fit_s": fit_s,
            **stats.summary(trainer.world_size),
            "peak_memory_mb": memory.get("peak_gpu_memory_mb", memory["peak_host_memory_mb"]),
            **memory,
            "num_params": num_params,
            "backbone_params": backbone_params,
            # the width it was built with: model.size's solved one, not the config's d_model
            **(
                {"d_model": task.backbone.built_from["d_model"]}
                if "d_model" in task.backbone.built_from
                else {}
            ),
            "parameters_per_rank": stats.parameters_per_rank,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "git": git,
            "versions": versions(),
            "hardware": hardware(),
        }
        if trainer.is_global_zero:
            write_summary(run_dir, summary)
            summarize_runs(loggers, summary)
            if metrics:
                print_results(metrics, baseline)
            log.info("run directory: %s", run_dir)
    except BaseException as raised:
        error = raised
        raise
    finally:
        ranks_error = None
        try:  # first: after a failure, the watch over the other ranks is waiting on it
            ranks_error = finish_job(trainer, run_dir, failed=error is not None)
        finally:
            finish_runs(loggers, error or ranks_error)
            mark_stopped(run_dir)
        if ranks_error is not None:  # only when this process finished
            raise ranks_error
    return {**train_metrics, **test_metrics}, {**objects, "summary": summary}


def objective(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises; a name that was never logged is an error for a sweeper that
    optimises it (not a silent None), and a warning otherwise: a finished single run whose
    validation never ran (``check_val_every_n_epoch`` beyond ``max_epochs``) still succeeds."""
    if not name:
        return None
    if name not in metrics:
        message = f"optimized_metric={name!r} was never logged; logged metrics are {sorted(metrics)}"
        if optimising_sweep():
            raise ConfigError(message)
        log.warning("%s", message)
        return None
    return metrics[name]


def optimising_sweep() -> bool:
    """Whether this job runs under a sweeper that optimises its return value (Optuna...), not
    Hydra's basic sweeper, which only runs the grid."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return False
    sweeper = HydraConfig.get().sweeper.get("_target_", "")
    return not str(sweeper).endswith("BasicSweeper")


#: what a command refuses with one line and exit code 1: seqlab's errors, and Lightning's refusals
#: of its settings (``trainer.limit_test_batches=0.5`` of a one-batch test set was a 44-line traceback)
REFUSALS = (SeqlabError, MisconfigurationException)


def run(cfg: DictConfig) -> float | None:
    """Entry-point body: train, and turn seqlab's own errors into one clear line and exit code 1."""
    try:
        # a job of hydra/launcher=parallel: its GPUs and threads; extras for this job only
        with job_resources(cfg), extras_restored():
            metrics, _ = train(cfg)
        # nothing to optimise in a test-only run (train=false logs no validation best)
        return objective(metrics, cfg.get("optimized_metric") if cfg.get("train") else None)
    except REFUSALS as err:
        log.error("%s: %s", type(err).__name__, err)
        if in_multirun():
            raise  # the sweep records this job as failed and goes on
        if is_rank_zero():
            drop_refused_run_dir(Path(cfg.paths.output_dir))
        raise SystemExit(1) from None
    except SIGTERMException:
        # SaveOnSigterm wrote last.ckpt; 128 + SIGTERM, as a shell reports a terminated process
        if newest_checkpoint(Path(cfg.paths.output_dir)) is None:  # callbacks=none: none saved, ever
            log.warning(
                "stopped by SIGTERM, with no checkpoint saved (no checkpoint callback: callbacks=none, "
                "callbacks.epoch_checkpoint=null ...): %s starts this run over",
                same_command(),
            )
        else:
            log.warning("stopped by SIGTERM; %s resumes this run (resume=auto)", same_command())
        raise SystemExit(STOPPED_BY_SIGTERM) from None
