"""`make install` is idempotent and keeps a machine's package index (a stand-in python records calls)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls"}\n')
    python.chmod(0o755)
    return tmp_path


def make(checkout: Path, *args: str) -> list[str]:
    """Run make; -> the stand-in python's calls so far (``pip install ...`` or ``pytest``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_ARGS", "MAKEFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = checkout / "calls"
    return calls.read_text().splitlines() if calls.is_file() else []


def test_make_install_is_idempotent_and_keeps_its_package_index(checkout: Path) -> None:
    index = "--index-url https://download.pytorch.org/whl/cpu"
    assert len(make(checkout, "install")) == 1
    assert len(make(checkout, "install")) == 1, "nothing changed: no second pip run"
    calls = make(checkout, "install", f"PIP_ARGS={index}")
    assert len(calls) == 2 and index in calls[-1], "another package index installs again"
    # `make test` after `make install PIP_ARGS=...` keeps that index: no pip run without it
    calls = make(checkout, "test")
    assert calls[2:] == ["-m pytest"], calls
    (checkout / "constraints.txt").write_text((checkout / "constraints.txt").read_text() + "\n")
    calls = make(checkout, "install")
    assert len(calls) == 4 and "pip install" in calls[-1] and index in calls[-1], "new pins, the same index"
    calls = make(checkout, "install", "PIP_ARGS=")
    assert len(calls) == 5 and index not in calls[-1], "PIP_ARGS= resets the index"
