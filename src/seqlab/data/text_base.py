"""What every tokenized-text datamodule shares: flat id storage, padded batches, the cache, loaders.

Text splits are stored as one flat ``int32`` tensor of token ids per split plus offsets
(``FlatSequences``), gathered into right-padded batches by the datasets' ``batches`` (index
tensors in, batches out; the training loader asks for 32 at a time) and ``__getitem__`` (one);
processed data is written to ``cache_dir/<name>-<key>/`` atomically (``publish``); loaders cut
each global batch into per-process slices with ``BucketSampler``, which hands each step's
indices over as one tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from seqlab.data.forecasting import keep_batch
from seqlab.data.samplers import (
    BucketSampler,
    OrderSeed,
    ResumableLoader,
    per_replica_batch_size,
    replicas,
    shuffles,
)
from seqlab.data.tokenization import PAD_ID
from seqlab.errors import ConfigError, DataError
from seqlab.utils.files import current_umask

log = logging.getLogger(__name__)


class FlatSequences:
    """Variable-length id sequences in one flat tensor with offsets (compact, fast to save and load)."""

    def __init__(self, ids: Tensor, offsets: Tensor) -> None:
        self.ids = ids
        self.offsets = offsets
        self.lengths = offsets[1:] - offsets[:-1]

    @classmethod
    def from_lists(cls, sequences: list[list[int]]) -> FlatSequences:
        lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
        offsets = torch.zeros(len(sequences) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        return cls(torch.tensor([token for seq in sequences for token in seq], dtype=torch.int32), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def padded_batches(self, indices: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Batches of rows (one index tensor each), each right-padded to its own longest row:
        ids [B,T] (``PAD_ID`` in the padding) and pad_mask [B,T] (True = pad).

        One pass of a few ops over all of them: the batches are laid out one after the other in
        one flat buffer (batch k: its rows x its width), so every batch's ids and mask are
        contiguous views of it, and the per-op cost (which dominates for small batches) is paid
        once per call instead of once per batch."""
        index = torch.cat(indices)
        sizes = [len(rows) for rows in indices]
        lengths = self.lengths[index]
        batch_of_row = torch.repeat_interleave(torch.arange(len(indices)), torch.tensor(sizes))
        widths = torch.zeros(len(indices), dtype=lengths.dtype)
        widths.scatter_reduce_(0, batch_of_row, lengths, "amax", include_self=False)
        row_width = widths[batch_of_row]
        row_end = row_width.cumsum(0)
        total = int(row_end[-1]) if len(row_end) else 0
        row = torch.repeat_interleave(row_width, output_size=total)  # the row of each element
        column = torch.arange(total) - (row_end - row_width)[row]
        pad_mask = column >= lengths[row]
        positions = (self.offsets[index][row] + column).masked_fill_(pad_mask, 0)
        ids = self.ids.take(positions).long().masked_fill_(pad_mask, PAD_ID)
        shapes = list(zip(sizes, widths.tolist()))
        counts = [rows * width for rows, width in shapes]
        return [
            (batch_ids.view(shape), batch_mask.view(shape))
            for batch_ids, batch_mask, shape in zip(ids.split(counts), pad_mask.split(counts), shapes)
        ]


def generated_in_memory(owner: str, settings: dict[str, Any], **fixed: Any) -> None:
    """Set a generated dataset's fixed settings (no files to read) in ``settings``, refusing by
    name a value given for one of them (``+data.data_dir=`` was silently ignored). The fixed
    value itself passes: a checkpoint's saved hyperparameters hand it back."""
    given = {key: settings[key] for key in fixed if key in settings and settings[key] != fixed[key]}
    if given:
        raise ConfigError(
            f"{', '.join(f'data.{key}={value!r}' for key, value in given.items())}: {owner} generates its "
            "data in memory and reads no files; leave it out, or choose a file dataset (data=sst2, multi30k ...)"
        )
    settings.update(fixed)


def file_fingerprint(path: Path) -> list[Any]:
    """Identity of a file or directory tree for the cache key: path, sizes and modification times;
    for a tree, every file's relative path too (aclImdb's label is its folder: a review moved from
    ``pos/`` to ``neg/`` keeps its size and time)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for file in files:
            stat = file.stat()
            digest.update(
                f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
            )
        return [str(path), len(files), digest.hexdigest()]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def publish(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh directory with ``write(tmp)`` and rename it to ``target``.

    Concurrent processes (DDP) or an interrupted run never leave a half-written cache behind:
    whoever renames first wins and the others discard their copy. The files are on disk before
    the directory gets its name (a crash of the machine leaves no named entry with a truncated
    file), and the directory has an ordinary directory's mode (mkdtemp's 0700 would lock other
    users out of a shared ``SEQLAB_DATA_DIR``).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BatchedTextDataModule(OrderSeed, L.LightningDataModule):
    """Loaders over ``self.datasets``: datasets with ``lengths`` whose ``__getitem__`` takes an
    index tensor and returns the padded batch, and whose ``batches`` does so for several.

    ``batch_size`` is the global batch: each of N processes gets ``batch_size / N`` of it, so
    results compare whatever the device count.
    """

    batch_size: int
    seed: int | None
    #: eval.py: the test split alone is read and encoded (``evaluate_only``)
    only_test: bool = False
    datasets: dict[str, Dataset]
    #: contents of the processed directory's meta.json, once read
    meta: dict[str, Any] | None
    cache_dir: Path
    name: str

    def dataset_from_state(self, state: dict[str, Any]) -> Dataset:
        """One split's dataset from its saved state (an entry of splits.pt)."""
        raise NotImplementedError

    def cache_settings(self) -> dict[str, Any]:
        """Every setting and source file (its fingerprint) that changes the processed data, but the
        tokenizers a checkpoint brings (``fixed``)."""
        raise NotImplementedError

    def cache_key(self, fixed: dict[str, Any] | None = None) -> str:
        """The cache entry's key: the settings, and the checkpoint's tokenizers ``fixed`` encodes
        with (none: those the entry trains itself); an entry of the test split alone (``only_test``)
        has a key of its own."""
        settings = self.cache_settings()
        settings["fixed"] = (
            hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest() if fixed else None
        )
        if self.only_test:
            settings["only"] = "test"
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def test_from_file(self) -> bool:
        """Whether the test split is read from files of its own (not carved out of train, nor
        generated with the others)."""
        return False

    def splits_read(self) -> tuple[str, ...]:
        """The splits ``prepare_data`` reads and encodes."""
        return ("test",) if self.only_test else ("train", "val", "test")

    def evaluate_only(self) -> None:
        """Read and encode the test split alone (eval.py, with a checkpoint's tokenizers and
        classes), where it comes from files of its own: a run directory moved to another machine
        may come without the training files, and a large corpus's training side was read and
        encoded only to be left unused. The entry the training run built, where it is here, is
        read as before."""
        if getattr(self, "fixed", None) is None or not self.test_from_file():
            return
        self.only_test = True
        self.meta, self.datasets, self._processed_dir = None, {}, None

    @property
    def processed_dir(self) -> Path:
        """Where prepare_data writes meta.json, splits.pt and the tokenizers: the cache entry of
        these settings and files, keyed once (the files are not fingerprinted again at every access,
        and a file another process replaces meanwhile does not move this datamodule's entry)."""
        if getattr(self, "_processed_dir", None) is None:
            fixed = getattr(self, "fixed", None)
            self._processed_dir = (
                self.entry_built_alike() or self.cache_dir / f"{self.name}-{self.cache_key(fixed)}"
            )
        return self._processed_dir

    def entry_built_alike(self) -> Path | None:
        """With a checkpoint's tokenizers (``use_artifacts``): the entry these settings built from
        the config, where it holds those very tokenizers (and classes), as it does for the run that
        trained the checkpoint. Its data is what the checkpoint's tokenizers would encode, so a
        resumed run or ``eval.py`` reads it instead of encoding everything into a second entry."""
        if getattr(self, "fixed", None) is None:
            return None
        only_test, self.only_test = self.only_test, False  # the entry of every split
        try:
            entry = self.cache_dir / f"{self.name}-{self.cache_key()}"
        except OSError:  # its files are not all here (eval.py of the test split alone)
            return None
        finally:
            self.only_test = only_test
        if (entry / "meta.json").is_file() and self.holds_fixed(entry):
            log.info("processed data: %s (built with the checkpoint's tokenizer)", entry)
            return entry
        return None

    def holds_fixed(self, entry: Path) -> bool:
        """Whether the cache entry ``entry`` holds the tokenizers (and classes) in ``self.fixed``."""
        raise NotImplementedError

    def use_artifacts(self, artifacts: dict[str, Any]) -> None:
        """Encode as a checkpoint's model was trained (its ``artifacts()``: a resumed run, eval.py)."""
        raise NotImplementedError

    def use_tokenizers(self, artifacts: dict[str, Any]) -> None:
        """Encode with a checkpoint's tokenizers alone (``init_from``: its embeddings are of their
        tokens), everything else this data's own; a translation model's artifacts are its tokenizers."""
        self.use_artifacts(artifacts)

    # ------------------------------------------------------------------ loading
    def load_meta(self) -> dict[str, Any]:
        if self.meta is None:
            path = self.processed_dir / "meta.json"
            if not path.is_file():
                self.prepare_data()
            self.meta = json.loads(path.read_text(encoding="utf-8"))
        return self.meta

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.load_meta()
        self.check_one_tokenizer_everywhere()
        splits = torch.load(self.processed_dir / "splits.pt", weights_only=True)
        self.datasets = {split: self.dataset_from_state(state) for split, state in splits.items()}

    def check_one_tokenizer_everywhere(self) -> None:
        """Every process of a run must encode with the same tokenizer and classes. Each process
        reads its cache entry from ``cache_dir``; where that is not one directory for all of them
        (a node-local disk, data staged to each node with new modification times), each node
        trains its own tokenizer, and WordPiece and Unigram training is not deterministic: the
        processes would average gradients for rows that stand for different tokens. Refused by
        every process together (one collective), naming the directory."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return
        digest = hashlib.sha256(json.dumps(self.load_meta().get("classes")).encode())
        for path in sorted(self.processed_dir.glob("*tokenizer.json")):
            digest.update(path.name.encode() + path.read_bytes())
        mine = digest.hexdigest()
        first = trainer.strategy.broadcast(mine)
        if trainer.strategy.reduce_boolean_decision(mine != first, all=False):
            raise DataError(
                f"the processes of this run encode with different tokenizers (process "
                f"{trainer.global_rank} read {self.processed_dir}): each node built its own cache entry, "
                "and tokenizer training is not the same twice; give data.cache_dir one directory "
                "every node reads (a shared filesystem)"
            )

    def per_device_batch_size(self) -> int:
        return per_replica_batch_size(self.batch_size, self.trainer)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.datasets[split]
        world, rank = replicas(self.trainer)
        self.per_device_batch_size()  # the global batch must divide by the processes
        shuffle = train and shuffles(self.trainer)
        sampler = BucketSampler(
            dataset.lengths,
            batch_size=self.batch_size,
            num_replicas=world,
            rank=rank,
            shuffle=shuffle,
            seed=self.order_seed(shuffle),
            drop_last=train,
            bucketing=self.hparams.bucketing,
            pool_batches=self.hparams.pool_batches,
            # (training: evaluation batches, no gradients kept, stay data.batch_size examples)
            max_tokens=self.hparams.get("max_tokens") if train else None,
        )
        owner = {"seed_owner": self} if train else {}
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=None,  # the sampler hands out this process's batches as index tensors
            sampler=sampler,
            collate_fn=keep_batch,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            **owner,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


__all__ = ["BatchedTextDataModule", "FlatSequences", "file_fingerprint", "publish"]
