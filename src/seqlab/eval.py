"""Evaluation: rebuild data and model from a checkpoint alone, test, write ``summary.json``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from seqlab.errors import ConfigError
from seqlab.train import (
    REFUSALS,
    apply_extras,
    build_datamodule,
    build_loggers,
    build_trainer,
    split_baselines,
    to_plain,
    warn_partial_test,
)
from seqlab.utils.checkpoint_io import consolidate_checkpoint, data_settings, given_checkpoint, load_run_info
from seqlab.utils.distributed import check_hardware, finish_job, follow_launcher, in_multirun
from seqlab.utils.logging import route_lightning_logs_to_root
from seqlab.utils.parallel import job_resources
from seqlab.utils.resolvers import launch_id
from seqlab.utils.resume import drop_refused_run_dir
from seqlab.utils.run import (
    hydra_overrides,
    is_rank_zero,
    print_results,
    task_name,
    write_run_metadata,
    write_summary,
)
from seqlab.utils.secrets import redact, redact_text
from seqlab.utils.wandb import finish_runs, summarize_runs

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    route_lightning_logs_to_root()
    check_hardware(cfg)  # trainer=gpu on a machine without one: refused before the data is built
    follow_launcher()  # a rank the script launcher started ends with rank 0
    apply_extras(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    given = given_checkpoint(
        cfg, "eval.py", takes=("data", "task", "trainer", "logger", "callbacks", "extras", "paths")
    )
    run_dir = Path(cfg.paths.output_dir)
    if is_rank_zero():
        log.info("run directory: %s", run_dir)
    # a sharded checkpoint (FSDP, FSDP2, DeepSpeed: a directory) is gathered into one file first,
    # by rank 0: Lightning's launcher starts the other ranks after it, and they read its file (each
    # gathering the whole model again took N times its memory); started together (torchrun, srun:
    # a file there may be an earlier eval's, in a reused hydra.run.dir), each gathers its own
    consolidated = run_dir / "consolidated.ckpt"
    if given.is_dir() and not is_rank_zero() and launch_id() is None and consolidated.is_file():
        log.info("reading the checkpoint rank 0 gathered: %s", consolidated)
        ckpt_path = consolidated
    else:
        ckpt_path = consolidate_checkpoint(given, consolidated)
    info = load_run_info(ckpt_path)

    data_cfg = data_settings(info, to_plain(cfg.get("data") or {}))
    if cfg.get("data_dir"):
        data_cfg["data_dir"] = cfg.data_dir
    saved_cache = data_cfg.get("cache_dir")
    if saved_cache and "cache_dir" not in (cfg.get("data") or {}) and not Path(saved_cache).parent.exists():
        # the checkpoint came from another machine (or its data root moved): this one's cache
        data_cfg["cache_dir"] = str(Path(cfg.paths.data_dir) / "processed")
        log.info(
            "the checkpoint's data cache %s is not on this machine: using %s",
            saved_cache,
            data_cfg["cache_dir"],
        )
    datamodule = build_datamodule(data_cfg, info.get("data_artifacts"), evaluate_only=True)
    task_cls = get_class(info["task_target"])
    task = task_cls.load_from_checkpoint(
        ckpt_path, map_location="cpu", weights_only=True, **test_settings(cfg, task_cls)
    )
    if hasattr(datamodule, "follow_model"):  # the channels in the model's order
        datamodule.follow_model(task.hparams)
    check_data_fits(task, datamodule, given)
    task.adopt_data(datamodule.task_kwargs())
    if is_rank_zero():  # (a refusal above leaves no run directory: drop_refused_run_dir)
        write_run_metadata(cfg, run_dir)
    loggers = build_loggers(cfg.get("logger"), run_dir)
    # the checkpoint's backbone: FSDP wraps its layers one by one (not the whole model as one unit)
    target = backbone_target(info, task)
    backbone = OmegaConf.create({"_target_": target}) if target else None
    trainer = build_trainer(
        cfg, callbacks=[], loggers=loggers, model_cfg=backbone, batch_size=data_cfg.get("batch_size")
    )
    error: BaseException | None = None
    try:
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": redact(to_plain(cfg)), "ckpt_path": redact_text(str(given))})
        trainer.test(task, datamodule=datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        limited = warn_partial_test(trainer)
        model_metrics, baseline = split_baselines(metrics)
        summary = {
            "task": task_name(info["task_target"]),  # compare.py ranks an eval.py -m sweep by it
            "ckpt_path": str(given),
            "data": info.get("data_name"),
            "model": model_name(info, task),
            "overrides": redact(hydra_overrides()),
            "metrics": model_metrics,
            **({"test_limited": limited} if model_metrics and limited is not None else {}),
            **({"test_report": task.test_report} if getattr(task, "test_report", None) else {}),
            "baseline": baseline,
        }
        if trainer.is_global_zero:
            write_summary(run_dir, summary)
            summarize_runs(loggers, summary)
            print_results(model_metrics, baseline)
    except BaseException as raised:
        error = raised
        raise
    finally:
        ranks_error = None
        try:  # the other ranks (trainer=ddp): waited for, or killed after a failure; a sweep's next
            # job launches its own
            ranks_error = finish_job(trainer, run_dir, failed=error is not None)
        finally:  # each job of `eval.py -m ckpt_path=a,b` its own W&B run (the next one logged into it)
            finish_runs(loggers, error or ranks_error)
        if ranks_error is not None:  # only when this process finished
            raise ranks_error
    return metrics, {"datamodule": datamodule, "task": task, "trainer": trainer, "summary": summary}


def backbone_target(info: dict[str, Any], task: L.LightningModule) -> str:
    """The class path of the checkpoint's backbone ("" if nothing tells)."""
    return dict(task.hparams.get("backbone") or {}).get("_target_") or info.get("backbone_target") or ""


def model_name(info: dict[str, Any], task: L.LightningModule) -> str | None:
    """The trained model's choice (``model=gru``); for a checkpoint from before it was recorded,
    its backbone's cell (rnn, lstm, gru, mingru, minlstm) or class; None if nothing tells."""
    cell = dict(task.hparams.get("backbone") or {}).get("cell")
    return info.get("model_name") or cell or backbone_target(info, task).rsplit(".", 1)[-1] or None


def test_settings(cfg: DictConfig, task_cls: type) -> dict[str, Any]:
    """``+task.<key>=<value>``: settings of how the checkpoint's model is tested (a translation's
    beam, length penalty and limits, as fairseq-generate's ``--beam`` and ``--lenpen``), checked by
    the task's own constructor; any other task setting is the checkpoint's, and refused."""
    given = to_plain(cfg.get("task") or {})  # (+task=<option>: refused by given_checkpoint)
    allowed = getattr(task_cls, "test_settings", ())
    other = sorted(set(given) - set(allowed))
    if other:
        raise ConfigError(
            f"task.{other[0]}: not a setting eval.py changes on a trained {task_cls.__name__} (the model "
            f"and what it learned are the checkpoint's); the test settings are "
            f"{[f'task.{key}' for key in allowed] or 'none'}"
        )
    return given


def check_data_fits(task: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: Path) -> None:
    """Settings both the data and the model carry (look-back, horizon, vocabulary...) must agree:
    the model's layers were sized by them at training. The data's side is what it gives a model
    (``task_kwargs``) where it says so: the synthetic series' ``num_channels`` is what it generates,
    of which ``features=S`` forecasts one."""
    shared = set(datamodule.hparams) & set(task.hparams)
    given = getattr(datamodule, "task_kwargs", dict)()
    data = {key: given.get(key, datamodule.hparams[key]) for key in shared}
    differing = sorted(key for key in shared if data[key] != task.hparams[key])
    if differing:
        shown = ", ".join(
            f"data.{k}={data[k]!r} (the model was built for {task.hparams[k]!r})" for k in differing
        )
        raise ConfigError(
            f"{shown}: the checkpoint {str(ckpt_path)!r} cannot run on these data settings; drop the override"
        )


def run(cfg: DictConfig) -> None:
    try:
        with job_resources(cfg):  # a job of hydra/launcher=parallel: its GPUs and threads
            evaluate(cfg)
    except REFUSALS as err:
        log.error("%s: %s", type(err).__name__, err)
        if in_multirun():
            raise  # `eval.py -m ckpt_path=a,b`: the sweep records this job as failed and goes on
        if is_rank_zero():
            drop_refused_run_dir(Path(cfg.paths.output_dir))
        raise SystemExit(1) from None
