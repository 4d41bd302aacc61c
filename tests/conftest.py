"""Shared fixtures: compose the real configs (as `python train.py` would) into a temporary run dir."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import seqlab  # noqa: F401  (registers resolvers)
from seqlab.utils.run import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_DATA = ROOT.parent / "shared" / "data"

# A process the tests start (a script, a rank, a spawned worker) that dies of a signal prints the
# Python stack of each thread, so a crash in C++ (gloo, an abort at exit) says where it was.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

# small and fast, but enough for every backbone to learn the synthetic series
FAST = [
    "data.num_steps=2400",
    "data.lookback=48",
    "data.horizon=12",
    "data.batch_size=32",
    "task.patch_len=8",
    "task.patch_stride=8",
    "model.d_model=32",
    "trainer.max_epochs=3",
    "trainer.accelerator=cpu",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("seqlab")
    group.addoption(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="run the backbone contract tests (tests/test_backbones.py) on configs/model/NAME.yaml "
        "instead of the built-in backbones (repeatable)",
    )
    group.addoption(
        "--model-arg",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="a Hydra override for those models (model.d_model=64; repeatable)",
    )


@pytest.fixture(autouse=True, scope="session")
def data_dir_of_the_session(tmp_path_factory) -> Iterator[Path]:
    """Generated datasets and processed caches (``paths.data_dir``) go to a directory of the test
    session, in-process and in the scripts the tests start, not into the checkout's ``data/``."""
    path = tmp_path_factory.mktemp("data")
    previous = os.environ.get("SEQLAB_DATA_DIR")
    os.environ["SEQLAB_DATA_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SEQLAB_DATA_DIR", None)
    else:
        os.environ["SEQLAB_DATA_DIR"] = previous


@pytest.fixture(autouse=True)
def lightning_dispatch_after_each_test() -> Iterator[None]:
    """Every Trainer train.py builds installs seqlab's hook dispatch process-wide: put Lightning's
    back after each test, so a test with a Trainer of its own runs under the same dispatch
    whatever ran before it."""
    yield
    from seqlab.utils import hooks

    hooks.uninstall()


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, name="train")``: a composed config writing into ``tmp_path/run``."""

    def make(*overrides: str, name: str = "train", fast: bool = True, output: str = "run") -> DictConfig:
        extra = FAST if fast and name == "train" else []
        return compose_config(name, [*extra, *overrides], tmp_path / output)

    yield make
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # no test sees another's run (its mode, overrides, choices)


@pytest.fixture
def ett_dir() -> Path:
    path = SHARED_DATA / "ett"
    if not (path / "ETTh1.csv").is_file():
        pytest.skip("../shared/data/ett/ETTh1.csv is not available")
    return path


@pytest.fixture
def sst2_dir() -> Path:
    path = SHARED_DATA / "sst2"
    if not (path / "train.tsv").is_file():
        pytest.skip("../shared/data/sst2/train.tsv is not available")
    return path


@pytest.fixture
def multi30k_dir() -> Path:
    path = SHARED_DATA / "multi30k"
    if not (path / "train.en").is_file():
        pytest.skip("../shared/data/multi30k/train.en is not available")
    return path


@pytest.fixture(scope="session")
def tiny_parallel(tmp_path_factory) -> Path:
    """A few German-English pairs as train/valid/test .de/.en files."""
    root = tmp_path_factory.mktemp("parallel")
    pairs = [
        ("Ein Mann fährt Fahrrad.", "A man rides a bike."),
        ("Zwei Hunde spielen im Schnee.", "Two dogs play in the snow."),
        ("Eine Frau liest ein Buch.", "A woman reads a book."),
        ("Kinder laufen über die Straße.", "Children run across the street."),
    ]
    for prefix, count in (("train", 6), ("valid", 1), ("test", 1)):
        rows = pairs * count
        (root / f"{prefix}.de").write_text("".join(f"{de}\n" for de, _ in rows), encoding="utf-8")
        (root / f"{prefix}.en").write_text("".join(f"{en}\n" for _, en in rows), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def text_cache(tmp_path_factory) -> Path:
    """One processed-data cache for the whole session (tokenizers are trained once per setting)."""
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="session")
def tiny_imdb(tmp_path_factory) -> Path:
    """A few reviews in the aclImdb layout."""
    root = tmp_path_factory.mktemp("imdb")
    reviews = {
        "pos": ["A great, moving film.<br />Loved it.", "Wonderful cast"],
        "neg": ["Dull and awful.", "Boring"],
    }
    for split in ("train", "test"):
        for label, texts in reviews.items():
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i, text in enumerate(texts * 5):
                (folder / f"{i}_5.txt").write_text(f"{text} ({i})")
    return root


def run_script(
    *args: str, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run an entry point the way a user does, with no stdin (or ``input`` piped in) and no W&B key."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full_env.update({"PYTHONUNBUFFERED": "1", "SEQLAB_ROOT": str(ROOT)})
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=full_env,
        **({"stdin": subprocess.DEVNULL} if input is None else {"input": input}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def why_failed(result: subprocess.CompletedProcess, limit: int = 3000) -> str:
    """What a failed run printed that says why: its first traceback and the end of stderr. Under
    DDP the last traceback is often only the consequence (the other rank's "Connection closed by
    peer"); the first one is the process that failed. A crash in C++ counts as a traceback
    (``PYTHONFAULTHANDLER`` prints "Fatal Python error" and the stack)."""
    err = result.stderr
    starts = [
        at for at in map(err.find, ("Traceback (most recent call last)", "Fatal Python error")) if at >= 0
    ]
    first = min(starts, default=-1)
    if len(err) <= 2 * limit or first < 0 or first >= len(err) - limit:
        return err[-2 * limit :]
    return f"{err[first : first + limit]}\n[...]\n{err[-limit:]}"
