"""W&B never prompts or hangs: no key -> offline files in the run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqlab.utils import wandb as wandb_utils
from tests.conftest import why_failed


@pytest.fixture
def no_key(monkeypatch, tmp_path: Path) -> None:
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
               "NO_PROXY", "no_proxy", "WANDB_HTTP_PROXY", "WANDB_HTTPS_PROXY")  # fmt: skip
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", wandb_utils.GIVEN_MODE, *proxies):
        # set first, so that the teardown also removes what the code under test sets (a delenv
        # of an absent variable records nothing to undo)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))


def test_no_key_means_offline(no_key) -> None:
    assert wandb_utils.resolve_mode("auto")[0] == "offline"
    assert "no W&B API key" in wandb_utils.resolve_mode("online")[1]


def test_key_without_network_means_offline_quickly(no_key, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: refused at once
    mode, reason = wandb_utils.resolve_mode("auto")
    assert mode == "offline" and "not reachable" in reason


def test_online_and_proxied_runs_skip_the_direct_probe(no_key, monkeypatch) -> None:
    """mode=online asks for no probe, and behind a proxy for the server's scheme (which wandb
    uses) a direct connection says nothing: neither goes offline for an unanswered direct
    connection."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")
    assert wandb_utils.resolve_mode("online") == ("online", None)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert wandb_utils.resolve_mode("auto") == ("online", None)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # an http server: HTTP_PROXY's
    assert wandb_utils.resolve_mode("auto")[0] == "offline"
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert wandb_utils.resolve_mode("auto") == ("online", None)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")  # reached directly: probed again
    assert wandb_utils.resolve_mode("auto")[0] == "offline"
    monkeypatch.setenv("NO_PROXY", "127.0.0.0/8")  # a network, as requests reads it
    assert wandb_utils.resolve_mode("auto")[0] == "offline"
    monkeypatch.setenv("WANDB_HTTP_PROXY", "http://proxy.example:3128")  # wandb's own setting
    assert wandb_utils.resolve_mode("auto") == ("online", None)


def test_a_self_hosted_server_is_probed_on_its_own_port(no_key, monkeypatch) -> None:
    """``wandb server`` on http://localhost:8080: the probe went to port 443, found nothing, and
    every run was written offline."""
    import socket

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        assert wandb_utils.resolve_mode("auto") == ("online", None)
    assert (wandb_utils.wandb_host(), wandb_utils.wandb_port()) == ("127.0.0.1", port)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_utils.wandb_port() == 443


def test_log_model_offline_is_dropped_not_refused(no_key, tmp_path: Path) -> None:
    """Lightning's WandbLogger raises for log_model when offline (no key, no network): the run
    goes on, its checkpoints kept in the run directory."""
    logger = wandb_utils.wandb_logger(str(tmp_path), mode="auto", log_model=True, project="p")
    assert logger._offline and logger._log_model is False


def test_a_run_directory_keeps_its_wandb_run_and_jobs_keep_the_users_mode(
    no_key, tmp_path: Path, monkeypatch
) -> None:
    """The W&B run id is drawn once per run directory (a requeued run continues its W&B run), and
    the WANDB_MODE a job sets does not become the next job's starting point in a multirun."""
    first = wandb_utils.run_id(tmp_path)
    assert wandb_utils.run_id(tmp_path) == first and len(first) >= 8
    assert wandb_utils.run_id(tmp_path / "other") != first
    logger = wandb_utils.wandb_logger(str(tmp_path), mode="auto", project="p")  # no key: offline
    assert logger._wandb_init["id"] == first and logger._wandb_init["resume"] == "allow"
    assert wandb_utils.os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # reachable as far as auto knows
    assert wandb_utils.resolve_mode("auto") == ("online", None), "not the previous job's offline"


def test_netrc_key_is_found(no_key, tmp_path: Path) -> None:
    netrc = tmp_path / "home" / ".netrc"
    netrc.parent.mkdir(parents=True)
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_utils.has_api_key()


def test_explicit_modes_are_respected(no_key) -> None:
    assert wandb_utils.resolve_mode("disabled") == ("disabled", None)
    assert wandb_utils.resolve_mode("offline") == ("offline", None)
    with pytest.raises(ValueError, match=r"logger\.wandb\.mode='sometimes'"):
        wandb_utils.resolve_mode("sometimes")


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["wandb", "many"])
def test_training_with_wandb_and_no_key_writes_offline_run(tmp_path: Path, logger: str) -> None:
    """logger=many: CSV, TensorBoard and W&B at once."""
    from tests.conftest import FAST, run_script

    home = tmp_path / "home"
    home.mkdir()
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py", f"logger={logger}", *FAST, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}",
        env={"HOME": str(home), "NETRC": str(home / ".netrc")}, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    if logger == "many":
        assert list(run_dir.rglob("events.out.tfevents.*")), "TensorBoard's event file"
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs, "an offline W&B run directory"
    assert list(offline_runs[0].glob("*.wandb")), "the run's data file"
    assert "wandb sync" in result.stdout + result.stderr
    # Lightning passed anonymous=None, which W&B warned of on every run; nor Lightning's adverts
    assert (
        "anonymous setting" not in result.stdout + result.stderr
        and "Tip:" not in result.stdout + result.stderr
    )
    assert (run_dir / "metrics.csv").is_file(), "CSV stays on beside W&B"
    # the run's W&B id is kept with it: a resumed run continues the same W&B run
    assert offline_runs[0].name.endswith("-" + (run_dir / wandb_utils.RUN_ID_FILE).read_text().strip())


@pytest.mark.slow
def test_classification_sends_its_confusion_matrix_and_mistakes_table_to_wandb(tmp_path: Path) -> None:
    from tests.conftest import run_script

    home = tmp_path / "home"
    home.mkdir()
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py", "logger=wandb", "data=sentiment_synthetic", "data.num_train=600", "model=gru",
        "model.d_model=16", "trainer.max_epochs=1", f"data.cache_dir={tmp_path / 'cache'}",
        "extras.print_config=false", "callbacks.rich_progress_bar=null", f"hydra.run.dir={run_dir}",
        env={"HOME": str(home), "NETRC": str(home / ".netrc")}, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    media = offline / "files" / "media"
    tables = list(media.rglob("*misclassified*.table.json"))
    assert tables, f"a W&B table of mistakes under {media}"
    assert '"predicted"' in tables[0].read_text()
    assert list(media.rglob("*confusion_matrix*.png")), "the confusion matrix image"
    assert (run_dir / "tables" / "test_misclassified.csv").is_file()


@pytest.mark.slow
def test_runs_of_one_sweep_are_separate_wandb_runs_in_one_group(tmp_path: Path) -> None:
    """Each job of a multirun gets its own W&B run (Lightning leaves a run open, and the next job
    in the same process used to log into it), grouped by the sweep; the comparison report joins
    the group."""
    from tests.conftest import FAST, run_script

    home = tmp_path / "home"
    home.mkdir()
    sweep = tmp_path / "sweep-7f3a"
    result = run_script(
        "train.py", "-m", "model=rnn,gru", "logger=wandb", *FAST, "trainer.max_epochs=1", "task_name=ett_pair",
        "+hydra.callbacks.compare_report._target_=seqlab.utils.hydra_callbacks.CompareReport",
        f"hydra.sweep.dir={sweep}", env={"HOME": str(home), "NETRC": str(home / ".netrc")}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    runs = [list((sweep / job / "wandb").glob("offline-run-*/*.wandb")) for job in ("0", "1")]
    assert all(len(found) == 1 for found in runs), runs
    (first,), (second,) = runs
    assert first.parent.name != second.parent.name, "two W&B runs, not one reused"
    for data in (first.read_bytes(), second.read_bytes()):
        # <task_name>-<sweep dir name>: two tasks' sweeps started in one second got one group
        assert b"ett_pair-sweep-7f3a" in data, "the sweep's group is recorded in the run"
    # the comparison report went to the same group, as a run of its own with the table and plots
    (report_run,) = list((sweep / "wandb").glob("offline-run-*/*.wandb"))
    assert b"ett_pair-sweep-7f3a" in report_run.read_bytes() and b"compare" in report_run.read_bytes()
    media = report_run.parent / "files" / "media"
    assert list(media.rglob("comparison*.table.json")) and list(media.rglob("*report_curves*.png"))
    assert (sweep / "report.md").is_file()


def test_the_wandb_sweep_file_drives_train_py_with_hydra_overrides(make_cfg) -> None:
    """The agent runs `python train.py logger=wandb ... key=value ...`: every swept key must be a
    valid Hydra override of train.py, and the metric one that train.py logs."""
    import yaml

    from tests.conftest import ROOT

    sweep = yaml.safe_load((ROOT / "scripts" / "wandb_sweep_forecasting.yaml").read_text())
    assert sweep["program"] == "train.py" and "${args_no_hyphens}" in sweep["command"]
    fixed = [arg for arg in sweep["command"] if "=" in arg]
    for key, spec in sweep["parameters"].items():
        value = spec["values"][-1] if "values" in spec else spec["min"]
        cfg = make_cfg(*fixed, f"{key}={value}", fast=False)
        node = cfg
        for part in key.split(".")[:-1]:
            node = node[part]
        if key == "model":
            assert cfg.model._target_.endswith("TransformerBackbone")
        else:
            assert node[key.split(".")[-1]] == value
    assert cfg.logger.wandb.mode == "online"
    assert sweep["metric"]["name"] == cfg.optimized_metric and sweep["metric"]["goal"] == "minimize"


@pytest.mark.slow
def test_a_failed_run_closes_its_wandb_run_as_failed(no_key, make_cfg, monkeypatch, tmp_path: Path) -> None:
    """Lightning leaves the W&B run open; seqlab closes it with exit code 1 when the job failed
    (the W&B page shows it failed), 0 when it finished, and marked preempting with 143 when
    SIGTERM stopped it (SLURM's pre-emption or requeue: it was shown failed, and the same command
    resumes it into this W&B run)."""
    import wandb
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from seqlab.train import train

    codes, preempting = [], []
    real = wandb.finish
    monkeypatch.setattr(
        wandb, "finish", lambda exit_code=None, **kw: codes.append(exit_code) or real(exit_code, **kw)
    )
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "mark_preempting", lambda self: preempting.append(self.id))
    failing = [
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0", "+callbacks.fault.step=3",
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match="injected failure"):
        train(make_cfg("logger=wandb", "trainer.max_epochs=1", *failing))
    assert codes == [1] and wandb.run is None
    train(make_cfg("logger=wandb", "trainer.max_epochs=1", output="finished"))
    assert codes == [1, 0] and wandb.run is None and not preempting
    stopping = ["+callbacks.sigterm._target_=tests.faults.SigtermFlagAtStep", "+callbacks.sigterm.step=2"]
    with pytest.raises(SIGTERMException):
        train(make_cfg("logger=wandb", "trainer.max_epochs=1", *stopping, output="stopped"))
    assert codes == [1, 0, 143] and len(preempting) == 1 and wandb.run is None


def test_a_sweeps_wandb_runs_are_named_by_their_overrides(make_cfg, monkeypatch, tmp_path: Path) -> None:
    """The jobs of a sweep's W&B group had W&B's random names; they are named by what they
    override (credentials redacted), the job's number without any. A single run keeps W&B's name."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from seqlab.utils.resolvers import sweep_job_name
    from seqlab.utils.secrets import REDACTED

    assert make_cfg("logger=wandb").logger.wandb.name is None

    def job(
        mode: RunMode, overrides: str, task: list[str] | None = None, sweep: Path | None = None
    ) -> str | None:
        cfg = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf)})
        cfg.hydra.mode, cfg.hydra.job.override_dirname, cfg.hydra.job.num = mode, overrides, 3
        cfg.hydra.overrides.task = task or []
        cfg.hydra.sweep.dir = str(sweep or tmp_path / "no_sweep")
        HydraConfig.instance().set_config(cfg)
        return sweep_job_name()

    # an Optuna trial: its fixed overrides (as on the command line) left out, its floats short
    monkeypatch.setattr(
        "sys.argv",
        ["train.py", "hparams_search=classification_optuna", "experiment=sst2_gru", "data.data_dir=/d"],
    )
    trial = ["data.data_dir=/d", "experiment=sst2_gru", "hparams_search=classification_optuna",
             "model.d_model=256", "task.optimizer.lr=0.0012345678901", "task.pooling=mean"]  # fmt: skip
    assert (
        job(RunMode.MULTIRUN, ",".join(trial), trial)
        == "model.d_model=256,task.optimizer.lr=0.001235,task.pooling=mean"
    )
    monkeypatch.setattr("sys.argv", ["train.py", "-m", "model=gru,lstm", "seed=1"])
    assert job(RunMode.MULTIRUN, "model=gru,seed=1", ["model=gru", "seed=1"]) == "model=gru"
    # a SLURM job runs in submitit's process, with submitit's command line: the sweep's own is
    # read from its multirun.yaml (it was named by every override, the shared ones too)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save(
        {"hydra": {"overrides": {"task": ["model=gru,lstm", "data.data_dir=/d"]}}}, sweep / "multirun.yaml"
    )
    monkeypatch.setattr("sys.argv", ["-m", "submitit.core._submit", "/sweep/.submitit/1"])
    task = ["model=gru", "data.data_dir=/d"]
    assert job(RunMode.MULTIRUN, "data.data_dir=/d,model=gru", task, sweep) == "model=gru"
    # a shared credential, redacted in multirun.yaml by the time the job reads it, stays out too
    OmegaConf.save({"hydra": {"overrides": {"task": ["model=gru,lstm", f"+extras.api_key={REDACTED}"]}}}, sweep / "multirun.yaml")  # fmt: skip
    assert job(RunMode.MULTIRUN, "", ["model=gru", "+extras.api_key=abc123"], sweep) == "model=gru"
    assert job(RunMode.MULTIRUN, "data.data_dir=/d,model=gru", task) == "data.data_dir=/d,model=gru"

    assert (
        job(RunMode.MULTIRUN, "+extras.api_key=abc123,model=gru") == f"+extras.api_key={REDACTED},model=gru"
    )
    assert job(RunMode.MULTIRUN, "") == "job 3"
    assert job(RunMode.RUN, "model=gru") is None
    # W&B refuses names over 128 characters (an Optuna trial's floats, long paths): cut, kept apart
    long = ",".join(f"task.optimizer.lr={0.000123456789 * i}" for i in range(1, 12))
    names = {job(RunMode.MULTIRUN, long + f",seed={seed}") for seed in (1, 2)}
    assert len(names) == 2 and all(
        len(name) == 128 and name.startswith("task.optimizer.lr=") for name in names
    )


@pytest.mark.slow
def test_each_job_of_an_eval_multirun_is_its_own_wandb_run(tmp_path: Path) -> None:
    """``eval.py -m ckpt_path=a,b logger=wandb``: the first job's W&B run was left open and the
    next job logged into it (one run, the last checkpoint's config and metrics); the summary's
    figures go into each run's summary."""
    from tests.conftest import FAST, run_script

    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "NETRC": str(home / ".netrc")}
    run_dir = tmp_path / "run"
    trained = run_script("train.py", *FAST, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", env=env)
    assert trained.returncode == 0, why_failed(trained)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    sweep = tmp_path / "evals"
    result = run_script(
        "eval.py", "-m", f"ckpt_path={ckpt},{run_dir / 'checkpoints' / 'last.ckpt'}", "logger=wandb",
        f"hydra.sweep.dir={sweep}", env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    runs = [list((sweep / job / "wandb").glob("offline-run-*/*.wandb")) for job in ("0", "1")]
    assert all(len(found) == 1 for found in runs), runs
    assert runs[0][0].parent.name != runs[1][0].parent.name, "two W&B runs, not one reused"
    for (found,) in runs:
        assert b"baseline/last/mse" in found.read_bytes(), "summary.json's figures in the run's summary"
