"""Credentials never reach what a run writes (issue: reliability, secrets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from seqlab.utils.secrets import REDACTED, redact, redact_text
from tests.conftest import why_failed

FAKE_WANDB_KEY = "fake-wandb-key-0123456789abcdef0123"
FAKE_TOKEN = "hf_fakeTokenValue987654321"
LITERAL = "literal-secret-from-the-command-line-42"


def test_credential_keys_are_redacted_and_ordinary_keys_kept(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    config = {
        "logger": {"wandb": {"api_key": "abc123", "project": "seqlab", "entity": None}},
        "data": {"tokenizer": {"kind": "bpe", "unk_token": "[UNK]"}, "max_tokens": 5, "cache_key": "k1"},
        "storage": {"aws_secret_access_key": "s3cr3t", "hf_token": "hf_x", "password": "pw", "token": None},
        "note": f"key is {FAKE_WANDB_KEY}",
        "overrides": ["+logger.wandb.api_key=abc123", "model=gru", "data.tokenizer.kind=bpe"],
    }
    cleaned = redact(config)
    assert cleaned["logger"]["wandb"] == {"api_key": REDACTED, "project": "seqlab", "entity": None}
    assert cleaned["data"] == config["data"]  # tokenizers, token counts and cache keys are not credentials
    assert cleaned["storage"] == {
        "aws_secret_access_key": REDACTED, "hf_token": REDACTED, "password": REDACTED, "token": None
    }  # fmt: skip
    assert cleaned["note"] == f"key is {REDACTED}"
    assert cleaned["overrides"] == [
        f"+logger.wandb.api_key={REDACTED}",
        "model=gru",
        "data.tokenizer.kind=bpe",
    ]
    assert (
        redact_text(f"python train.py hf_token={FAKE_TOKEN} model=gru")
        == f"python train.py hf_token={REDACTED} model=gru"
    )
    # quoted values (the shell's quotes kept, Hydra's quoting of values with symbols)
    assert redact_text('+extras.api_key=\'sk-123\' x="y" token="t0k"') == (
        f'+extras.api_key=\'{REDACTED}\' x="y" token="{REDACTED}"'
    )
    assert redact_text("password=pa)s]s{x} next") == f"password={REDACTED} next"  # brackets are the secret's
    # YAML and JSON mappings (an untracked config copied into git.diff); not unk_token or a count
    assert redact_text('+  api_key: abc123\n+"password": "hunter2", "max_tokens": 5\n+unk_token: [UNK]') == (
        f'+  api_key: {REDACTED}\n+"password": "{REDACTED}", "max_tokens": 5\n+unk_token: [UNK]'
    )
    # a URL's password (an Optuna storage), not its user, host or port
    assert (
        redact_text("storage=postgresql+psycopg2://bob:pa55word@db.example:5432/optuna, http://host:8080/x")
        == f"storage=postgresql+psycopg2://bob:{REDACTED}@db.example:5432/optuna, http://host:8080/x"
    )


def test_log_records_are_redacted(monkeypatch) -> None:
    import logging

    from seqlab.utils.secrets import RedactFilter

    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "#%d : %s", (0, ["logger.wandb.api_key=abc123"]), None
    )
    assert RedactFilter().filter(record)
    assert record.getMessage() == f"#0 : ['logger.wandb.api_key={REDACTED}']"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s", (FAKE_WANDB_KEY,), None)
    assert RedactFilter().filter(record) and record.getMessage() == f"key {REDACTED}"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "step %d of %d", (3, 10), None)
    assert RedactFilter().filter(record) and (record.msg, record.args) == ("step %d of %d", (3, 10))
    # a malformed call is let through to the handler, which reports it as logging does
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d items", ("many",), None)
    assert RedactFilter().filter(record) and record.args == ("many",)


@pytest.mark.slow
def test_no_secret_in_any_file_of_the_run_directory(tmp_path: Path) -> None:
    """A fake W&B key and token in the environment appear in no file of the run directory
    (configs, .hydra, logs, metrics, summary, checkpoints, the offline W&B run). A credential
    passed on the command line is redacted everywhere seqlab and Hydra write; W&B's own run
    record keeps the raw command line (its ``args`` metadata), so credentials belong in the
    environment, as the README says."""
    from tests.conftest import FAST, run_script

    run_dir = tmp_path / "run"
    done = run_script(
        "train.py", "logger=wandb", "logger.wandb.mode=offline", *FAST, "trainer.max_epochs=1",
        f"+extras.api_key={LITERAL}", f"hydra.run.dir={run_dir}",
        env={"WANDB_API_KEY": FAKE_WANDB_KEY, "HF_TOKEN": FAKE_TOKEN},
    )  # fmt: skip
    assert done.returncode == 0, why_failed(done)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.name == "summary.json" for p in files)
    leaks = {
        str(p.relative_to(run_dir)): secret
        for p in files
        for secret in (FAKE_WANDB_KEY, FAKE_TOKEN, LITERAL)
        if secret.encode() in p.read_bytes() and not (secret == LITERAL and p.suffix == ".wandb")
    }
    assert not leaks, leaks
    assert f"api_key: '{REDACTED}'" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_no_secret_in_a_refused_run_or_a_sweep(tmp_path: Path) -> None:
    """Hydra writes .hydra/ (and a sweep's multirun.yaml) before the job starts: a run refused
    before it trains left the credential there, a sweep in multirun.yaml, and a failed job's row
    of the sweep table took it from its overrides."""
    from tests.conftest import FAST, run_script

    refused = run_script(
        "train.py",
        "trainer.devices=999",
        f"+extras.api_key={LITERAL}",
        f"hydra.run.dir={tmp_path / 'refused'}",
    )  # refused on any machine, before training
    assert (
        refused.returncode == 1
        and "trainer.devices=999 but this machine has" in refused.stdout + refused.stderr
    )
    sweep = tmp_path / "sweep"
    done = run_script(
        "train.py", "-m", *FAST, "trainer.max_epochs=1", "extras.print_config=true", f"+extras.api_key={LITERAL}",
        "model.nhead=3,4",
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    # the printed config tree, and Hydra's own lines that repeat each job's overrides (its first
    # job's through Hydra's log config, the next through the first job's)
    assert LITERAL not in done.stdout + done.stderr and f"api_key: '{REDACTED}'" in done.stdout
    assert "model.nhead=3" in done.stdout and "model.nhead=4" in done.stdout
    assert f"+extras.api_key={REDACTED} model.nhead=4" in done.stdout
    files = [p for root in (tmp_path / "refused", sweep) for p in root.rglob("*") if p.is_file()]
    assert {"overrides.yaml", "multirun.yaml", "sweep_summary.csv"} <= {p.name for p in files}
    leaks = [str(p.relative_to(tmp_path)) for p in files if LITERAL.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_env_file_sets_missing_variables_only(tmp_path: Path, monkeypatch) -> None:
    from seqlab.utils.resolvers import project_root
    from seqlab.utils.secrets import load_env_file

    env = tmp_path / ".env"
    env.write_text("SEQLAB_TEST_TOKEN=from-the-file\nSEQLAB_TEST_SET=from-the-file\n# a comment\n")
    monkeypatch.setenv("SEQLAB_TEST_TOKEN", "")  # so that the teardown removes what the file sets
    monkeypatch.delenv("SEQLAB_TEST_TOKEN")
    monkeypatch.setenv("SEQLAB_TEST_SET", "from-the-environment")
    assert load_env_file(env) == ["SEQLAB_TEST_TOKEN"]
    assert os.environ["SEQLAB_TEST_TOKEN"] == "from-the-file"
    assert os.environ["SEQLAB_TEST_SET"] == "from-the-environment"  # the environment wins
    assert load_env_file(tmp_path / "missing.env") == []
    monkeypatch.delenv("SEQLAB_TEST_TOKEN")
    # the project's own .env is never committed
    ignored = (Path(project_root()) / ".gitignore").read_text().splitlines()
    assert ".env" in ignored


def test_a_data_urls_password_reaches_no_file(tmp_path: Path) -> None:
    """A private mirror's URL (``data.url``, its password from the environment) went, in clear,
    into hparams.yaml, the W&B run's config and every checkpoint: Lightning logged and saved the
    data module's arguments itself, and the checkpoint's data settings were not redacted."""
    import uuid

    from tests.conftest import run_script
    from tests.test_forecasting_data import write_csv

    password = f"pw-{uuid.uuid4().hex}"  # drawn: a literal would be in git.diff of a dirty checkout
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "x.csv", 600)
    run_dir, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    done = run_script(
        "train.py", "data=ett", f"data.data_dir={tmp_path / 'data'}", "data.file=x.csv", "data.split=ratio",
        "data.download=false", "data.url=${oc.env:MIRROR_URL}", "data.lookback=24", "data.horizon=12",
        "data.batch_size=32", "task.patch_len=8", "task.patch_stride=8", "model.d_model=16", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", "extras.print_config=false", "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null", "logger=wandb", f"hydra.run.dir={run_dir}",
        env={"MIRROR_URL": f"https://alice:{password}@mirror.example.org/x.csv", "HOME": str(home),
             "NETRC": str(home / ".netrc")},
    )  # fmt: skip
    assert done.returncode == 0, why_failed(done)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"hparams.yaml", "best.ckpt"} <= {p.name for p in files} and list(run_dir.rglob("*.wandb"))
    leaks = [str(p.relative_to(run_dir)) for p in files if password.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert f"https://alice:{REDACTED}@mirror.example.org/x.csv" in (run_dir / "config.yaml").read_text()
