"""Translate text with a trained checkpoint: ``python translate.py ckpt_path=... input=in.txt``.

Everything comes from the checkpoint alone (a file, or the directory of a sharded FSDP, FSDP2 or
DeepSpeed checkpoint): the model, its data settings and its tokenizers.
One sentence per input line (``input=-`` or unset: stdin); one translation per output line
(``output=`` a file, or stdout), in input order. Empty lines stay empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from seqlab.data.text_base import FlatSequences
from seqlab.data.text_readers import decode_utf8, split_lines
from seqlab.errors import ConfigError, SeqlabError
from seqlab.train import build_datamodule, to_plain
from seqlab.utils.checkpoint_io import consolidate_checkpoint, data_settings, given_checkpoint, load_run_info
from seqlab.utils.files import write_text_atomic

log = logging.getLogger(__name__)


def load_translator(ckpt_path: str | Path, data_overrides: dict[str, Any] | None = None, device: str = "cpu"):
    """(task, datamodule) rebuilt from a translation checkpoint, a file or a sharded directory
    (FSDP, FSDP2, DeepSpeed: gathered into a temporary file, removed once loaded); the datamodule
    holds its tokenizers."""
    given = Path(ckpt_path).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="seqlab-translate-") as scratch:
        ckpt_path = consolidate_checkpoint(given, Path(scratch) / "consolidated.ckpt")
        info = load_run_info(ckpt_path)
        task_cls = get_class(info["task_target"])
        if not hasattr(task_cls, "generate"):
            raise ConfigError(
                f"ckpt_path={str(given)!r} is a {task_cls.__name__} checkpoint, not a translation model"
            )
        # the tokenizers come from the checkpoint: no corpus is read, downloaded or tokenized
        data, artifacts = data_settings(info, data_overrides or {}), info.get("data_artifacts")
        datamodule = build_datamodule(data, artifacts, prepare=not artifacts)
        task = task_cls.load_from_checkpoint(ckpt_path, map_location=device, weights_only=True)
    return task.eval(), datamodule


def translate_texts(
    task, datamodule, texts: list[str], beam_size: int | None = None, batch_size: int = 64
) -> list[str]:
    """Translations of ``texts`` in order, batched by length (beam search unless ``beam_size=1``)."""
    outputs = [""] * len(texts)
    todo = [i for i, text in enumerate(texts) if text.strip()]
    if not todo:
        return outputs
    ids = datamodule.encode_sources([texts[i].strip() for i in todo])
    by_length = torch.tensor(sorted(range(len(todo)), key=lambda k: len(ids[k])))
    batches = list(by_length.split(batch_size))
    device = next(task.parameters()).device
    # padded and masked as training's batches are (the mask from the lengths, not the ids)
    for rows, (src, padding) in zip(batches, FlatSequences.from_lists(ids).padded_batches(batches)):
        generated = task.generate(src.to(device), padding.to(device), beam_size)
        for k, text in zip(rows.tolist(), datamodule.detokenize(generated)):
            outputs[todo[k]] = text
    return outputs


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 onto 2 for the block (a logger holding the original stdout stream too),
    and ``sys.stdout`` onto ``sys.stderr`` (where it is not fd 1's writer), then back."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def checked_device(value: Any) -> str:
    """``device=``: cpu, cuda (or gpu), cuda:<index>; null: cuda where there is one, else cpu."""
    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    expected = "expected cpu, cuda or cuda:<index> (null: cuda where there is one, else cpu)"
    try:
        device = torch.device("cuda" if str(value) == "gpu" else str(value))
    except RuntimeError:
        raise ConfigError(f"device={value!r}: {expected}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device={value!r}: this machine has no CUDA GPU; use device=cpu (or leave it unset)"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device={value!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    return str(device)


def input_path(source: str) -> Path:
    """``input=``'s file (a pipe too: ``input=<(command)``), refused by name where there is none."""
    path = Path(source).expanduser()
    if not path.exists() or path.is_dir():
        raise ConfigError(
            f"input={source!r}: " + ("a directory; expected a file" if path.is_dir() else "no such file")
        )
    return path


def read_input_lines(source: str | None) -> list[str]:
    """The lines of ``input=`` (null or ``-``: stdin), read as UTF-8 bytes (the locale's decoding
    let bad bytes through as surrogates); a byte that is not UTF-8 is named by its line."""
    if source in (None, "-"):
        return split_lines(decode_utf8(sys.stdin.buffer.read(), "<stdin>"))
    path = input_path(source)
    return split_lines(decode_utf8(path.read_bytes(), str(path)))


def check_output(output: str | None, source: str | None, lost: str) -> None:
    """``output=``: a file in an existing directory, not the input file (``lost``: what writing
    over it would lose)."""
    if not output:
        return
    path = Path(output).expanduser()
    if path.is_dir():
        raise ConfigError(f"output={output!r} is a directory; expected a file to write")
    if not path.parent.is_dir():
        raise ConfigError(f"output={output!r}: its directory does not exist")
    if source not in (None, "-") and path.exists() and path.samefile(Path(source).expanduser()):
        raise ConfigError(f"output={output!r} is the input file: {lost}; write to another file")


def run(cfg: DictConfig) -> None:
    try:
        ckpt_path = given_checkpoint(cfg, "translate.py")  # (its refusals before stdin is read)
        source = cfg.get("input")
        lines = read_input_lines(source)
        for key, nullable in (("beam_size", True), ("batch_size", False)):  # before the model loads
            value = cfg.get(key)
            if value is None and nullable:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{key}={value!r}: expected a positive integer" + (" or null" if nullable else "")
                )
        check_output(cfg.get("output"), source, "its sources would be replaced by their translations")
        device = checked_device(cfg.get("device"))
        # the translations alone on stdout: what loading prints (DeepSpeed's checkpoint
        # conversion, its logger) goes to stderr
        with stdout_to_stderr() if not cfg.get("output") else contextlib.nullcontext():
            task, datamodule = load_translator(ckpt_path, to_plain(cfg.get("data") or {}), device)
        translations = translate_texts(task, datamodule, lines, cfg.get("beam_size"), int(cfg.batch_size))
        text = "".join(f"{line}\n" for line in translations)
        if cfg.get("output"):
            write_text_atomic(Path(cfg.output).expanduser(), text)
            log.info("%d translations written to %s", len(translations), cfg.output)
        else:
            sys.stdout.write(text)
    except SeqlabError as err:
        log.error("%s: %s", type(err).__name__, err)
        raise SystemExit(1) from None
