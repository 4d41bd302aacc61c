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
    # no GPU here, whatever the machine has (make install asks nvidia-smi, then torch)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
    return tmp_path


def run_make(checkout: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # a bare environment: `make test PYTEST_ARGS=...` (CI) exports its variables to the tests
    env = {"HOME": os.environ.get("HOME", str(checkout)), "LANG": "C.UTF-8", **(env or {})}
    env["PATH"] = f"{checkout / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"  # the stand-in nvidia-smi
    done = subprocess.run(["make", *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def make(checkout: Path, *args: str) -> list[str]:
    """Run make; -> the stand-in python's calls so far (``pip install ...`` or ``pytest``)."""
    run_make(checkout, *args)
    calls = checkout / "calls"
    return calls.read_text().splitlines() if calls.is_file() else []


#: the first pip run of a machine without an NVIDIA GPU: torch's CPU build from pip's local wheels
LOCAL_CPU_TORCH = "-m pip install --quiet --no-deps --no-index -c constraints.txt torch"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def test_make_install_is_idempotent_and_keeps_its_package_index(checkout: Path) -> None:
    index = "--index-url https://mirror.example/simple"
    calls = make(checkout, "install")
    # no GPU: torch's CPU build first (found locally: PyTorch's CPU index not asked), then the rest
    assert calls[0] == LOCAL_CPU_TORCH and len(calls) == 2 and "-e .[" in calls[1], calls
    assert len(make(checkout, "install")) == 2, "nothing changed: no second pip run"
    calls = make(checkout, "install", f"PIP_ARGS={index}")
    # a package index of one's own: no CPU build chosen for it
    assert len(calls) == 3 and index in calls[-1], "another package index installs again"
    # `make test` after `make install PIP_ARGS=...` keeps that index: no pip run without it
    calls = make(checkout, "test")
    assert calls[3:] == ["-m pytest"], calls
    (checkout / "constraints.txt").write_text((checkout / "constraints.txt").read_text() + "\n")
    calls = make(checkout, "install")
    assert len(calls) == 5 and "pip install" in calls[-1] and index in calls[-1], "new pins, the same index"
    calls = make(checkout, "install", "PIP_ARGS=")
    assert calls[5:] == [LOCAL_CPU_TORCH, calls[-1]] and index not in calls[-1], "PIP_ARGS= resets the index"


def test_a_cpu_machine_without_a_local_wheel_gets_torchs_cpu_build(checkout: Path) -> None:
    """PyPI's torch for Linux is the CUDA build (several GB): a machine without an NVIDIA GPU whose
    pip has no local torch wheel takes the CPU build from PyTorch's CPU index, before the rest."""
    python = checkout / ".venv" / "bin" / "python"
    # nothing local (the --no-index run fails), no index of pip's own (`pip config list` names none)
    python.write_text(
        f'#!/bin/sh\necho "$*" >> {checkout / "calls"}\ncase "$*" in *--no-index*) exit 1;; esac\n'
    )
    done = run_make(checkout, "install")
    calls = (checkout / "calls").read_text().splitlines()
    assert calls[0] == LOCAL_CPU_TORCH and calls[1] == "-m pip config list", calls
    assert (
        calls[2]
        == f"-m pip install --quiet --retries 1 --timeout 30 --no-deps {CPU_INDEX} -c constraints.txt torch"
    )
    assert CPU_INDEX not in calls[3] and "-e .[" in calls[3] and len(calls) == 4  # the rest as usual
    assert "no NVIDIA GPU: torch's CPU build from https://download.pytorch.org/whl/cpu" in done.stdout
    # a mirror of one's own (PIP_INDEX_URL, or an index-url in any of pip's config files, which
    # `pip config list` shows; an extra-index-url is no mirror): PyTorch's index is not asked
    for env, listed in (
        ({"PIP_INDEX_URL": "https://mirror.example/simple"}, ""),
        (
            {},
            "global.extra-index-url='file:///opt/pypi/simple'\\ninstall.index-url='https://mirror.example/simple'",
        ),
    ):
        python.write_text(
            f'#!/bin/sh\necho "$*" >> {checkout / "calls"}\n'
            f'case "$*" in *--no-index*) exit 1;; *"config list"*) printf "{listed}\\n";; esac\n'
        )
        (checkout / ".venv" / ".seqlab-installed").unlink()
        (checkout / "calls").unlink()
        done = run_make(checkout, "install", env=env)
        calls = (checkout / "calls").read_text().splitlines()
        assert calls[0] == LOCAL_CPU_TORCH and not any(CPU_INDEX in call for call in calls), (env, calls)
        assert "no NVIDIA GPU: torch from pip's own index" in done.stdout
    # only an extra index (this machine's pip.conf): PyTorch's CPU index is asked
    python.write_text(
        f'#!/bin/sh\necho "$*" >> {checkout / "calls"}\n'
        f'case "$*" in *--no-index*) exit 1;; *"config list"*) printf "global.extra-index-url=\'x\'\\n";; esac\n'
    )
    (checkout / ".venv" / ".seqlab-installed").unlink()
    run_make(checkout, "install")
    assert any(CPU_INDEX in call for call in (checkout / "calls").read_text().splitlines())


def test_a_gpu_machine_with_a_cpu_torch_is_warned(checkout: Path) -> None:
    """A GPU machine whose pip finds a local CPU wheel (find-links) would install it silently."""
    (checkout / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
    python = checkout / ".venv" / "bin" / "python"
    # the stand-in's torch has no CUDA: `-c "...sys.exit(torch.version.cuda is None)"` exits 1
    python.write_text(f'#!/bin/sh\necho "$*" >> {checkout / "calls"}\ncase "$1" in -c) exit 1;; esac\n')
    done = run_make(checkout, "install")
    assert "has an NVIDIA GPU but .venv got a CPU-only torch" in done.stdout
    assert "--no-index" not in (checkout / "calls").read_text()  # a GPU machine: PyPI's CUDA build
    assert (
        "PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null .venv/bin/python -m pip install --force-reinstall"
        in done.stdout
    )
