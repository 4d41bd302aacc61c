"""The comparison report of a sweep: backbones side by side, seeds aggregated, noise marked.

``python scripts/compare.py <sweep dir>`` (or ``experiment=compare_<task>``, which runs the
backbones and then this) reads every job's ``summary.json`` and ``metrics.csv`` and writes into
the sweep directory; ``python scripts/compare.py <dir> <dir> ... --out <dir>`` compares the jobs of
several sweeps (a backbone swept later, on its own) and single runs (``logs/<task>/runs/<time>``)
as one sweep, and writes into ``--out``:

- ``report.md``: per backbone, parameters, the test metrics (mean and standard deviation over
  seeds), training wall time (``fit_s``: ``trainer.fit``, validation included, a resumed run's
  earlier attempts too) and the job's (``wall_s``: this process's, data preparation and test
  too), training samples/s and peak memory; whether the gap to the best
  backbone on the task's main metric exceeds seed noise; the plots below;
- ``report_curves.png``: training and validation loss against the optimizer step, overlaid;
- ``report_metric_vs_time.png``: the main test metric against training wall time, one point per job;
- ``report_predictions.png`` (forecasting): truth and every backbone's forecast over the first
  test windows (``tables/test_first_predictions.csv`` of each job), a panel per series forecast;
- ``report.csv``: the aggregated table;
- ``report.html``: ``report.md`` as one self-contained page (plots embedded), to open or send.
"""

from __future__ import annotations

import base64
import csv
import html
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seqlab.errors import ConfigError
from seqlab.utils.files import write_text_atomic
from seqlab.utils.run import SELF, markdown_table, read_summaries, table_columns

log = logging.getLogger(__name__)

#: the metric that ranks backbones, and whether higher is better
MAIN_METRIC = {"forecasting": ("mse", False), "classification": ("acc", True), "translation": ("bleu", True)}
COSTS = ("num_params", "backbone_params", "fit_s", "wall_s", "train_samples_per_s", "peak_memory_mb")
PREDICTIONS_TABLE = Path("tables") / "test_first_predictions.csv"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


#: the family-wise error rate of the verdicts "beyond seed noise" of one report
ALPHA = 0.05


def welch_p_value(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test that two seed samples have one mean (variances not
    assumed equal; Welch-Satterthwaite degrees of freedom: with 3 seeds a side, 2 to 4, where
    "twice the standard error" was a 12% test, not 5%; 18% with 2 seeds); None with a single seed on either
    side, or with every seed alike on both sides (no spread to measure the noise by: two equal
    accuracies of a small test set a side are no proof of a gap, which ``p = 0`` called beyond noise)."""
    import mpmath  # torch's own dependency (through sympy): Student's t without scipy

    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    gap = abs(statistics.fmean(a) - statistics.fmean(b))
    if va + vb == 0:  # every seed alike on both sides: the noise is unknown
        return None if gap > 0 else 1.0
    t = gap / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    # P(|T| > t) for Student's t with df degrees of freedom: a regularised incomplete beta
    return float(mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True))


def beyond_noise(p_values: dict[str, float | None], alpha: float = ALPHA) -> dict[str, bool | None]:
    """Which backbones' gaps to the best are beyond seed noise: Holm's step-down procedure over
    the comparisons with the best (with several backbones some gap would pass a 5% test by
    chance), which bounds the chance of calling any equal-mean backbone worse by ``alpha`` for
    fixed comparisons; the best is chosen by the same data, so that is approximate (measured:
    4.0% of 20,000 simulated sweeps of 4 equal backbones x 3 seeds; twice the standard error: 35%). None
    where a p-value is None."""
    verdicts: dict[str, bool | None] = {name: None for name, p in p_values.items() if p is None}
    known = sorted((p, name) for name, p in p_values.items() if p is not None)
    rejecting = True
    for i, (p, name) in enumerate(known):
        rejecting = rejecting and p <= alpha / (len(known) - i)
        verdicts[name] = rejecting
    return verdicts


def described(metric: str) -> str:
    """``test mse``, or ``val/mse_best (the best validation; these jobs ran no test)``."""
    return (
        f"{metric} (the best validation; these jobs ran no test)"
        if metric.startswith("val/")
        else f"test {metric}"
    )


def is_run(directory: Path) -> bool:
    """A single run's directory (its own ``summary.json``), not a sweep's."""
    return (Path(directory) / "summary.json").is_file()


def job_summaries(sources: Sequence[Path]) -> list[tuple[Path, str, dict[str, Any]]]:
    """The jobs of several sources, in their order, each with the name the report gives it: a
    sweep directory's jobs (``<sweep>/<job>``), or a run directory as one job (``<run>``). Each
    source must hold a result: a run that wrote none (it failed, or still runs) or a directory of
    neither kind is named."""
    found = []
    names = source_names(sources)
    for source in sources:
        name = names[Path(source)]
        if is_run(source):
            own = [(source, name, summary) for _, summary in read_summaries(source, SELF)]
            if not own:
                raise ConfigError(f"{source}/summary.json cannot be read (the warning above says why)")
            found += own
            continue
        jobs = [(job_dir, f"{name}/{job_dir.name}", summary) for job_dir, summary in read_summaries(source)]
        if not jobs:
            raise ConfigError(
                f"{source}: neither a run with a summary.json nor a sweep with jobs that wrote one "
                "(a run that failed or is still running has none: nothing to compare from it)"
            )
        found += jobs
    return found


def source_names(sources: Sequence[Path]) -> dict[Path, str]:
    """Each source's name in the report: its directory's name, with as many parent directories as
    tell it apart from the others' (two sweeps of one time under two task names, jobs ``0`` of
    several sweeps)."""
    paths = [Path(source) for source in sources]
    for depth in range(1, max(len(p.resolve().parts) for p in paths) + 1):
        names = {path: "/".join(path.resolve().parts[-depth:]) for path in paths}
        if len(set(names.values())) == len(paths):
            return names
    return {path: str(path) for path in paths}


def read_jobs(sources: Path | Sequence[Path]) -> list[dict[str, Any]]:
    """The jobs of a sweep directory, or of several sources (``job_summaries``) together."""
    several = not isinstance(sources, (str, Path))
    sweep_dir = None if several else Path(sources)
    jobs = []
    found = (
        job_summaries(sources)
        if several
        else [(job_dir, job_dir.name, summary) for job_dir, summary in read_summaries(sweep_dir)]
    )
    for job_dir, name, summary in found:
        metrics = {k.removeprefix("test/"): v for k, v in summary.get("metrics", {}).items()}
        if not metrics:  # a search's trials run no test: their validation bests (val/mse_best)
            metrics = dict(summary.get("best") or {})
        broken = sorted(
            k for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)
        )
        if broken:  # a diverged run's NaN would make every mean and ranking NaN
            log.warning("%s: leaving out its non-finite metrics %s", job_dir, broken)
            metrics = {k: v for k, v in metrics.items() if k not in broken}
        jobs.append(
            {
                "dir": job_dir,
                "name": name,
                "summary": summary,
                "metrics": metrics,
                "model": summary.get("model"),
            }
        )
    if not jobs:
        if sweep_dir is not None and is_run(sweep_dir):
            raise ConfigError(
                f"{sweep_dir} is one run (its own summary.json), not a sweep: give the directory of a "
                "sweep (logs/<task_name>/multiruns/<time>), whose jobs compare.py compares, or runs and "
                "sweeps to compare together with --out <dir>"
            )
        raise ConfigError(f"{sweep_dir}: no job of the sweep wrote a summary.json (nothing to compare)")
    for job in jobs:  # an eval.py summary from before it named its task: known by its main metric
        if job["summary"].get("task") is None:
            named = [task for task, (metric, _) in MAIN_METRIC.items() if metric in job["metrics"]]
            job["summary"]["task"] = named[0] if len(named) == 1 else None
    tasks = {job["summary"].get("task") for job in jobs}
    if len(tasks) > 1:
        where = ", ".join(f"{job['dir']}: {job['summary'].get('task')}" for job in unlike(jobs, "task"))
        raise ConfigError(
            f"{sweep_dir or 'these directories'}: jobs of different tasks {sorted(map(str, tasks))} "
            f"cannot be compared ({where})"
        )
    label_settings(jobs)
    return without_repeated_seeds(jobs)


def unlike(jobs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The first job of each value of summary ``key``."""
    return list({str(job["summary"].get(key)): job for job in reversed(jobs)}.values())[::-1]


def without_repeated_seeds(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One job per seed of a contender (``model``, after ``label_settings``): a later job of the
    same seed is the same experiment run again (its overrides differ in what changes no run:
    ``tags=``, ``logger=``), and averaged as another seed it narrowed the noise the verdicts rest
    on. It is left out, named in the first job's ``repeats`` (the report lists them); unseeded jobs
    (``seed=null``) are each their own draw."""
    first: dict[tuple[str, Any], dict[str, Any]] = {}
    kept = []
    for job in jobs:
        seed = job["summary"].get("seed")
        earlier = first.get((str(job["model"]), seed)) if seed is not None else None
        if earlier is None:
            first[(str(job["model"]), seed)] = job
            kept.append(job)
            continue
        earlier.setdefault("repeats", []).append(job["name"])
        log.warning(
            "%s: %s with seed=%s again (as %s): a seed counts once",
            job["dir"],
            job["model"],
            seed,
            earlier["dir"],
        )
    return kept


def repeats_note(jobs: list[dict[str, Any]]) -> str | None:
    repeated = [
        f"{job['model']} seed={job['summary'].get('seed')}: {job['name']} (kept), "
        + ", ".join(job["repeats"])
        for job in jobs
        if job.get("repeats")
    ]
    if not repeated:
        return None
    return "Seeds run more than once, counted once (the first job's result): " + "; ".join(repeated) + "."


#: overrides that change the question rather than the contender: the data (the set, its files,
#: horizon, look-back, lengths) and the hardware; backbones are ranked against the best of their
#: setting only. How the data is fed (``DATA_PROCEDURE``) and every other key (``model.*``,
#: ``task.*``, ``trainer.precision``, ``trainer.max_epochs``...) make contenders of one ranking.
SETTING_KEYS = (
    "data",
    "trainer",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
)
DATA_PROCEDURE = (
    "data.batch_size", "data.max_tokens", "data.num_workers", "data.pool_batches", "data.bucketing", "data.cache_dir",
    "data.download", "data.url", "data.seed", "data.tokenizer",
)  # fmt: skip
#: overrides that tell no jobs apart: how a run is shown, logged or resumed (what a resumed job
#: may add: ``tags=``, ``logger=wandb``)
PRESENTATION_KEYS = (
    "hydra", "resume", "paths.work_dir", "logger", "tags", "callbacks.rich_progress_bar",
    "callbacks.model_summary", "callbacks.recent_checkpoints", "extras.print_config", "extras.ignore_warnings",
)  # fmt: skip


def is_setting(key: str) -> bool:
    from seqlab.utils.resume import under

    return key in SETTING_KEYS or (key.startswith("data.") and not under(key, DATA_PROCEDURE))


def short_values(values: list[str]) -> dict[str, str]:
    """Each value as a label shows it: floats to 4 significant digits (a search's sampled
    ``model.dropout=0.13015249665719064``; ``short_floats``, as W&B run names), where that still
    tells every value apart; else as given."""
    from seqlab.utils.resolvers import short_floats

    distinct = set(values)
    shorts = {value: short_floats(f"_={value}").removeprefix("_=") for value in distinct}
    return shorts if len(set(shorts.values())) == len(distinct) else {value: value for value in distinct}


def label_settings(jobs: list[dict[str, Any]]) -> None:
    """Jobs are averaged as seeds of one setting only when nothing but ``seed`` tells them apart:
    any other override that differs between the jobs (``data.horizon=24,96``, a data set) joins
    the backbone's name in ``job["model"]``, the key the report groups and plots by; those under
    ``is_setting`` also go into ``job["setting"]``, within which ``aggregate`` ranks. What a
    resumed run may add (``tags=``, ``logger=``: ``PRESENTATION_KEYS``) tells no jobs apart."""
    from seqlab.utils.resume import override_key, under

    def parse(override: str) -> tuple[str, str]:  # ~key (a deletion) has no value
        key, equals, value = override.lstrip("+~").partition("=")
        return key, value if equals else "<deleted>"

    overrides = [
        dict(
            parse(o)
            for o in job["summary"].get("overrides") or []
            if not under(override_key(o), PRESENTATION_KEYS)
        )
        for job in jobs
    ]
    keys = sorted(set().union(*overrides) - {"seed", "model"})
    models = {str(job["model"]) for job in jobs}
    # a key that varies within a backbone's jobs (one that follows the backbone, as the seeds'
    # study's +study_backbone, says nothing the name does not)
    varying = [
        k for k in keys if len({(str(j["model"]), o.get(k)) for j, o in zip(jobs, overrides)}) > len(models)
    ]
    shown = {key: short_values([o[key] for o in overrides if key in o]) for key in varying}
    # a test of part of the test set (summary.json's test_limited: debug=limit,
    # trainer.limit_test_batches) is another test set: a setting of its own, whatever set it
    tested = [tested_on(job) for job in jobs]
    partial = len({(str(j["model"]), t) for j, t in zip(jobs, tested)}) > len(models)
    for job, given, test in zip(jobs, overrides, tested):
        extra = " ".join(
            [f"{k}={shown[k][given[k]]}" for k in varying if k in given]
            + ([f"test={test}"] if partial else [])
        )
        job["model"] = f"{job['model']} ({extra})" if extra else job["model"]
        job["setting"] = tuple(f"{k}={given.get(k, '<default>')}" for k in varying if is_setting(k))
        if len(set(tested)) > 1:
            job["setting"] += (f"test={test}",)


def tested_on(job: dict[str, Any]) -> str:
    """``whole`` or how much of the test set a job's test read (``2 batches``, ``25%``)."""
    limited = job["summary"].get("test_limited")
    if limited is None:
        return "whole"
    return f"{limited} batches" if isinstance(limited, int) else f"{float(limited):.0%}"


def partial_test_note(jobs: list[dict[str, Any]]) -> str | None:
    """Which jobs were tested on part of the test set (their metrics are not a whole test set's)."""
    partial = sorted({f"{job['model']}: {tested_on(job)}" for job in jobs if tested_on(job) != "whole"})
    if not partial:
        return None
    return (
        "Tested on part of the test set (trainer.limit_test_batches, debug=limit), not comparable with "
        f"a whole test set's figures: {'; '.join(partial)}."
    )


def aggregate(jobs: list[dict[str, Any]], task: str) -> tuple[list[dict[str, Any]], str]:
    """One row per backbone (jobs grouped by ``model``), best first within each setting (settings
    in the order of their first job); and the main metric's name."""
    metric, higher = MAIN_METRIC.get(task, (next(iter(jobs[0]["metrics"]), ""), True))
    if not any(metric in j["metrics"] for j in jobs) and any(
        f"val/{metric}_best" in j["metrics"] for j in jobs
    ):
        metric = f"val/{metric}_best"  # (an Optuna search: no test)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        groups[str(job["model"])].append(job)
    samples = {
        name: [j["metrics"][metric] for j in group if metric in j["metrics"]]
        for name, group in groups.items()
    }
    setting_of = {name: group[0].get("setting", ()) for name, group in groups.items()}
    settings = list(dict.fromkeys(setting_of.values()))

    def rank(name: str) -> tuple[int, float]:  # by setting; best first; a backbone without the metric last
        if not samples[name]:
            return settings.index(setting_of[name]), math.inf
        mean = statistics.fmean(samples[name])
        return settings.index(setting_of[name]), -mean if higher else mean

    ranked = sorted(groups, key=rank)
    best = {setting: next(n for n in ranked if setting_of[n] == setting) for setting in settings}
    rows = []
    for name in ranked:
        group = groups[name]
        row: dict[str, Any] = {"backbone": name, "seeds": len(group)}
        if len(samples[name]) < len(group):  # its mean and verdict rest on fewer seeds
            row["seeds"] = f"{len(samples[name])} of {len(group)} ({metric} missing in the others)"
        for key in sorted({k for j in group for k in j["metrics"] if not k.startswith("baseline")}):
            mean, std = mean_std([j["metrics"][key] for j in group if key in j["metrics"]])
            row[key] = mean
            if std is not None:
                row[f"{key}_std"] = std
        for key in COSTS:
            values = [j["summary"][key] for j in group if j["summary"].get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
        rows.append(row)
    p_values: dict[str, float | None] = {}
    verdicts: dict[str, bool | None] = {}
    for setting, top in best.items():  # Holm's correction over the comparisons of one setting
        within = {
            n: welch_p_value(samples[n], samples[top])
            for n in ranked
            if setting_of[n] == setting and n != top
        }
        p_values.update(within)
        verdicts.update(beyond_noise(within))
    for row in rows:
        name = row["backbone"]
        top = best[setting_of[name]]
        if name == top and len(settings) > 1 and list(setting_of.values()).count(setting_of[name]) == 1:
            verdict = "alone in its setting" if samples[name] else f"no {metric}"
        elif name == top:
            verdict = "best" if samples[name] else f"no {metric}"
        elif verdicts[name] is not None:
            p = f"p={p_values[name]:.2g}"
            few = min(len(samples[name]), len(samples[top]))
            if verdicts[name]:
                verdict = f"worse (beyond seed noise, {p})"
            elif few < 3:  # a t-test of 2 against 2 has 1-2 degrees of freedom: only large gaps show
                verdict = f"within seed noise ({p}; {few} seeds: not told apart, not shown equal)"
            else:
                verdict = f"within seed noise ({p})"
        elif not samples[name]:
            verdict = f"no {metric}"
        elif len(samples[name]) < 2:
            verdict = "one seed: noise unknown"
        elif len(samples[top]) >= 2:
            verdict = "every seed alike on both sides: noise unknown"
        else:
            verdict = "the best has one seed: noise unknown"
        row[f"vs best {metric}"] = verdict
    return rows, metric


def read_curves(job_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """train/loss (per logged step; per epoch when fewer than 3 steps were logged) and val/loss
    against the optimizer step, from the job's metrics.csv."""
    keys = ("train/loss", "train/loss_epoch", "val/loss")
    # step -> value: a run resumed after a kill logs again the steps since its checkpoint, and
    # the later row of a step is the one the run continued from
    points: dict[str, dict[int, float]] = {key: {} for key in keys}
    path = job_dir / "metrics.csv"
    if path.is_file():
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                for key, by_step in points.items():
                    if row.get(key):
                        by_step[int(row["step"])] = float(row[key])
    curves = {
        key: (sorted(by_step), [by_step[s] for s in sorted(by_step)]) for key, by_step in points.items()
    }
    per_epoch = curves.pop("train/loss_epoch")
    if len(curves["train/loss"][0]) < 3:
        curves["train/loss"] = per_epoch
    return curves


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def legend(fig: Any, axes: Any) -> None:
    """A legend in each plot; where the labels are many or long (a search's trials, several
    settings), one below the plots instead, which it would cover (and be cut off by)."""
    axes = list(getattr(axes, "flat", axes))
    labelled: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if len(labelled) <= 6 and max(map(len, labelled), default=0) <= 40:
        for ax in axes:
            ax.legend(fontsize=8)
        return
    wide = max(map(len, labelled)) > 60
    fig.legend(labelled.values(), labelled.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=1 if wide else 2, fontsize=7, frameon=False)  # fmt: skip


def save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # (a legend below the plots included)
    plt.close(fig)
    return path


def plot_curves(jobs: list[dict[str, Any]], path: Path) -> Path:
    fig, axes = subplots(1, 2, figsize=(11, 4))
    colors = color_map(jobs)
    labelled = set()
    for job in jobs:
        curves = read_curves(job["dir"])
        for ax, key in zip(axes, ("train/loss", "val/loss")):
            steps, values = curves[key]
            label = job["model"] if (job["model"], key) not in labelled else None
            labelled.add((job["model"], key))
            ax.plot(steps, values, color=colors[job["model"]], alpha=0.8, label=label, marker=".")
    for ax, key in zip(axes, ("training loss", "validation loss")):
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
    legend(fig, axes)
    return save(fig, path)


def plot_metric_vs_time(jobs: list[dict[str, Any]], metric: str, path: Path) -> Path:
    fig, ax = subplots(figsize=(6, 4))
    colors = color_map(jobs)
    # training time (trainer.fit, validation included); a sweep from before fit_s: the job's time
    key = "fit_s" if all(j["summary"].get("fit_s") is not None for j in jobs) else "wall_s"
    for model in colors:
        points = [(j["summary"].get(key), j["metrics"].get(metric)) for j in jobs if j["model"] == model]
        points = [(t, m) for t, m in points if t is not None and m is not None]
        if points:
            ax.scatter(*zip(*points), color=colors[model], label=model)
    ax.set_xlabel(
        "training wall time, validation included (s)"
        if key == "fit_s"
        else "job wall time, data and test included (s)"
    )
    ax.set_ylabel(described(metric))
    legend(fig, [ax])
    return save(fig, path)


def plot_predictions(jobs: list[dict[str, Any]], path: Path) -> Path | None:
    """Truth and each backbone's forecast (first seed) for the first test windows; one panel per
    truth when the settings forecast different series (``data=...`` or ``data.target=...``)."""
    panels: dict[tuple[float, ...], dict[str, list[float]]] = {}  # truth -> {backbone: forecast}
    for job in jobs:
        table = job["dir"] / PREDICTIONS_TABLE
        if any(job["model"] in forecasts for forecasts in panels.values()) or not table.is_file():
            continue
        with table.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        truth = tuple(float(r["truth"]) for r in rows)
        panels.setdefault(truth, {})[job["model"]] = [float(r["prediction"]) for r in rows]
    if not panels:
        return None
    fig, axes = subplots(len(panels), 1, figsize=(10, 4 * len(panels)), squeeze=False)
    colors = color_map(jobs)
    for ax, (truth, forecasts) in zip(axes[:, 0], panels.items()):
        ax.plot(truth, color="black", linewidth=2, label="truth")
        for model, values in forecasts.items():
            ax.plot(values, color=colors[model], label=model)
        ax.set_xlabel("test window")
        ax.set_ylabel("first forecast step (target, original scale)")
    legend(fig, axes)
    return save(fig, path)


def color_map(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    models = list(dict.fromkeys(str(j["model"]) for j in jobs))
    return {model: palette(i % 10) for i, model in enumerate(models)}


def publish_to_wandb(report_dir: Path, rows: list[dict[str, Any]], plots: list[Path], **init: Any) -> None:
    """The report's table and plots as one W&B run (job type ``compare``) in the sweep's group."""
    import wandb

    from seqlab.utils.wandb import resolve_mode

    mode, _ = resolve_mode(init.pop("mode", "auto"))
    columns = table_columns(rows)
    with wandb.init(dir=str(report_dir), job_type="compare", mode=mode, **init) as run:
        run.log(
            {"comparison": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])}
        )
        run.log({f"comparison/{path.stem}": wandb.Image(str(path)) for path in plots})


def write_html(markdown: Path, path: Path, title: str) -> Path:
    """``markdown`` rendered to one HTML page, its PNG images embedded as data URIs."""
    from markdown_it import MarkdownIt

    # html=False: an error text's "<absent>" is text, not a tag the browser hides
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown.read_text())
    for image in sorted(markdown.parent.glob("*.png")):
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        body = body.replace(f'src="{image.name}"', f'src="data:image/png;base64,{data}"')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse;font-size:.9rem}th,td{border:1px solid #ccc;padding:.25rem .5rem}"
        "th{background:#f3f3f3}img{max-width:100%}"
    )
    page = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n{body}</body></html>\n"
    )
    write_text_atomic(path, page)
    return path


def failed_jobs(sweep_dir: Path, prefix: str = "") -> tuple[list[str], list[str]]:
    """A markdown line per job of the sweep without a result (failed: its ``error.txt``; killed
    without one: out of memory, a time limit), with its overrides; and one per job that failed
    after its ``summary.json`` was written (in a later attempt, ``FAILED_AGAIN``, or in the same
    one), whose result the table has. The statuses are the sweep table's (``sweep_rows``); each
    job is named ``prefix`` + its number. A run directory (``is_run``) has none."""
    from seqlab.utils.hydra_callbacks import FAILED_AFTER_SUMMARY, FAILED_AGAIN, job_overrides, sweep_rows

    unfinished, with_result = [], []
    if is_run(sweep_dir):
        return unfinished, with_result
    for row in sweep_rows(sweep_dir):
        if row["status"] == "ok":
            continue
        job = f"{prefix}{row['job']}"
        if row["status"] in (FAILED_AGAIN, FAILED_AFTER_SUMMARY):  # the overrides of the attempt that failed
            overrides = job_overrides(sweep_dir / row["job"])
            with_result.append(f"- job {job} ({row['status']}, `{overrides}`): {row['error']}")
        else:
            unfinished.append(f"- job {job} ({row['status']}, `{row['overrides']}`): {row['error']}")
    return unfinished, with_result


#: the spread of one backbone's training time over its seeds (the same work) above which the
#: report says the timings measured the machine's load rather than the backbone
TIMING_SPREAD = 1.5


def timing_note(jobs: list[dict[str, Any]]) -> str | None:
    """A warning where one backbone's seeds took very different times (a busy or shared machine:
    two jobs of one configuration ran at 357 and 2,464 samples/s), else None."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        groups[str(job["model"])].append(job)
    worst = None
    for name, group in groups.items():
        for key in ("train_samples_per_s", "fit_s"):
            values = [j["summary"][key] for j in group if (j["summary"].get(key) or 0) > 0]
            if len(values) > 1 and max(values) / min(values) > (worst[0] if worst else TIMING_SPREAD):
                worst = (max(values) / min(values), name, key, min(values), max(values))
    if worst is None:
        return None
    ratio, name, key, low, high = worst
    return (
        f"**The timings are not a measurement of the backbones**: {name}'s seeds, the same work, differ "
        f"by {ratio:.1f}x in `{key}` ({low:,.4g} to {high:,.4g}): the machine was busy or shared while "
        "they ran. Time them on an otherwise idle machine, one thread per process "
        "(`OMP_NUM_THREADS=1 python train.py -m ...`), before reading the cost columns."
    )


UNRECORDED = "not recorded (summaries from before 2026-11-26)"


def hardware_line(jobs: list[dict[str, Any]]) -> str:
    """Where the jobs' costs were measured (summary.json's ``hardware``)."""

    def described(found: dict[str, Any] | None) -> str:
        if not found:
            return UNRECORDED
        parts = [str(found.get("cpu")), f"{found.get('threads')} thread(s) of {found.get('cpu_cores')} cores"]
        parts += [f"{len(found['gpus'])}x {found['gpus'][0]}"] if found.get("gpus") else []
        return ", ".join(parts) + f" ({found.get('host')})"

    seen = list(dict.fromkeys(described(j["summary"].get("hardware")) for j in jobs))
    if seen == [UNRECORDED]:
        return f"Hardware {UNRECORDED}."
    if len(seen) == 1:
        return f"Measured on {seen[0]}."
    return (
        "Measured on different hardware, so the costs compare machines as much as backbones: "
        + "; ".join(seen)
        + "."
    )


def memory_meaning(jobs: list[dict[str, Any]]) -> str:
    """What ``peak_memory_mb`` measures in these jobs: a GPU's peak allocated memory where they
    trained on one, else the process's peak resident memory (interpreter and libraries included,
    so backbones of very different size read alike)."""
    on_gpu = {"peak_gpu_memory_mb" in j["summary"] for j in jobs}
    gpu = "the GPU memory allocated at the peak (`peak_gpu_reserved_mb` in summary.json: what the allocator held)"
    host = (
        "the process's peak resident memory (the interpreter and libraries included; a multirun's "
        "jobs share one process, so a job's peak includes what earlier jobs left allocated)"
    )
    if on_gpu == {True}:
        return gpu
    if on_gpu == {False}:
        return host
    return f"{gpu} for jobs trained on a GPU, {host} for the others: not comparable between them"


def report_sources(sources: Path | Sequence[Path], out: Path | None) -> tuple[list[Path], Path, str]:
    """The directories to read, the one to write into, and how the report names its jobs' origin.
    One sweep directory is read and written into; several sources (sweeps or runs) need ``out``."""
    several = not isinstance(sources, (str, Path))
    paths = [Path(p) for p in sources] if several else [Path(sources)]
    if not paths:
        raise ConfigError("no sweep or run directory given to compare")
    for path in paths:
        if not path.is_dir():
            raise ConfigError(f"{path}: no such sweep or run directory")
    if len(set(map(Path.resolve, paths))) < len(paths):
        raise ConfigError(
            f"{[str(p) for p in paths]}: a directory is given twice (its jobs would count twice)"
        )
    if len(paths) == 1 and out is None:
        return paths, paths[0], f"Sweep `{paths[0]}`"
    if out is None:
        raise ConfigError(
            f"{len(paths)} directories compared together: give the directory the report goes to "
            "(--out <dir>; it is created), as the report belongs to none of them"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a directory")
    if any(out.resolve() == path.resolve() or path.resolve() in out.resolve().parents for path in paths):
        raise ConfigError(
            f"--out {out}: inside a compared directory; a report there would be read as one of its jobs' "
            "neighbours and overwrite its own report: give a directory outside them"
        )  # (a sweep's own report is written with one directory and no --out)
    if out.is_dir() and (is_run(out) or read_summaries(out)):
        raise ConfigError(
            f"--out {out}: a run's or a sweep's directory, whose own report this one would replace: "
            "give a directory of its own"
        )
    kinds = {"run" if is_run(path) else "sweep" for path in paths}
    origin = {frozenset({"run"}): "Runs", frozenset({"sweep"}): "Sweeps"}.get(
        frozenset(kinds), "Runs and sweeps"
    )
    return paths, out, f"{origin} " + ", ".join(f"`{p}`" for p in paths)


def compare(
    sources: Path | Sequence[Path], wandb_init: dict[str, Any] | None = None, out: Path | None = None
) -> Path:
    """Write the report of a sweep directory (into it), or of several sweeps' and runs' jobs
    together (into ``out``); returns the path of ``report.md``. With ``wandb_init`` (``project``,
    ``group``, ``mode``...), the table and plots also go to W&B."""
    paths, report_dir, origin = report_sources(sources, out)
    jobs = read_jobs(paths if len(paths) > 1 or out is not None else paths[0])
    report_dir.mkdir(parents=True, exist_ok=True)  # (--out, once its sources are read)
    task = str(jobs[0]["summary"].get("task"))
    rows, metric = aggregate(jobs, task)
    columns = table_columns(rows)
    with (report_dir / "report.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plots = [plot_curves(jobs, report_dir / "report_curves.png")]
    plots.append(plot_metric_vs_time(jobs, metric, report_dir / "report_metric_vs_time.png"))
    if task == "forecasting":
        plots.append(plot_predictions(jobs, report_dir / "report_predictions.png"))
    lines = [
        f"# {task}: {', '.join(r['backbone'] for r in rows)}",
        "",
        f"{origin}, {len(jobs)} jobs. Means over seeds (`_std`: standard deviation); "
        f"ranked by {described(metric)} ({'higher' if MAIN_METRIC.get(task, ('', True))[1] else 'lower'} is better). "
        "A gap to the best counts as beyond seed noise when Welch's t-test rejects equal means, "
        f"Holm-corrected over the comparisons with the best at {ALPHA:.0%} (p: the test's own "
        "p-value; needs two seeds or more per backbone)."
        + (
            f" Jobs of different settings ({', '.join(sorted({k.partition('=')[0] for j in jobs for k in j['setting']}))}) "
            "are ranked and compared within their setting only."
            if len({j["setting"] for j in jobs}) > 1
            else ""
        ),
        "",
        "Costs: `fit_s` is `trainer.fit` (validation included: a translation model's decoding of "
        "the validation set too), `wall_s` the whole job (data preparation and test too: the first job "
        "of a data setting also prepares and caches the data the others read), `train_samples_per_s` "
        "the training steps alone (validation and the steps up to the first optimizer step left "
        "out), `num_params` the whole model (embeddings and heads too) and `backbone_params` the "
        f"backbone alone (what `model.size` equalises), `peak_memory_mb` {memory_meaning(jobs)}, "
        "in MiB. " + hardware_line(jobs),
        "",
        *([note, ""] if (note := timing_note(jobs)) else []),
        *([repeats, ""] if (repeats := repeats_note(jobs)) else []),
        *([limited, ""] if (limited := partial_test_note(jobs)) else []),
        markdown_table(rows, columns),
        "",
    ]
    failed, again = [], []
    names = source_names(paths)
    for path in paths:
        more = failed_jobs(path, f"{names[path]}/" if len(paths) > 1 else "")
        failed, again = failed + more[0], again + more[1]
    if failed:
        lines += [f"Jobs without a result, not in the table ({len(failed)}):", "", *failed, ""]
    if again:
        lines += [
            f"Jobs that failed after writing a result, which the table has ({len(again)}):",
            "",
            *again,
            "",
        ]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    report = report_dir / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    write_html(report, report_dir / "report.html", title=lines[0].removeprefix("# "))
    if wandb_init is not None:
        publish_to_wandb(report_dir, rows, [p for p in plots if p is not None], **wandb_init)
    return report
