"""Distributed-aware training batches: global batches cut into per-process shares, length bucketing.

``GlobalBatchSampler`` is a ``DistributedSampler`` (so Lightning keeps it under DDP instead of
injecting its own) that forms *global* batches and hands each process its share of every one, as
one index tensor per step: the set of examples in a step is the same whatever the number of
processes, and the loader makes no per-example Python call. ``BucketSampler`` adds length
bucketing for text: examples are shuffled, cut into pools of ``pool_batches`` global batches,
sorted by length inside each pool, batched, and the batches shuffled again: similar lengths
share a batch, so little compute goes to padding, while every epoch still mixes the data.
Evaluation orders are deterministic (sorted by length when bucketing).

``ResumableLoader`` over a ``GlobalBatchSampler`` makes training resumable *mid-epoch*: Lightning
stores the loader's ``state_dict`` (epoch, batches handed out, the seed of its orders) in every
checkpoint and it is given back on resume (``seqlab.callbacks.resume.give_back_loader_states``);
the sampler then starts that epoch after those batches (skipped, nothing loaded). Epoch orders
are seeded by (seed, epoch), so the resumed run sees exactly the batches the uninterrupted run
saw; an unseeded run's drawn seed (``OrderSeed``) comes back with the position.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from seqlab.errors import ConfigError

log = logging.getLogger(__name__)


def epoch_seed(seed: int | None, epoch: int) -> int:
    """The seed of one epoch's order, its own for every (seed, epoch) pair, the same on every
    process, machine and Python version. ``DistributedSampler``'s ``seed + epoch`` gave seed s at
    epoch e + 1 the order of seed s + 1 at epoch e: runs of consecutive seeds (a seed study)
    shared most of their epoch orders, and their spread understated the noise of the data order."""
    digest = hashlib.sha256(f"seqlab epoch order {seed} {epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class OrderSeed:
    """The seed a data module's training epochs are ordered by (a mixin, before
    ``LightningDataModule``): ``seed`` (``data.seed``, ``${seed}``) when given. An unseeded run
    (``seed=null``) draws one for itself on rank 0, broadcast to every process so that all cut
    the same global batches; before, every unseeded run had the same epoch orders
    (``epoch_seed(None, e)``). The training loader keeps a drawn seed in every checkpoint with
    its position and hands it back on resume (``ResumableLoader``), so a resumed run goes on in
    the orders of the run it resumes."""

    seed: int | None
    trainer: Any
    _order_seed: int | None = None
    _order_seed_set = False

    def order_seed(self, shuffled: bool = True) -> int | None:
        """The seed of the training loader's orders; nothing is drawn for one that does not
        shuffle (``overfit_batches``)."""
        if self.seed is not None or not shuffled:
            return self.seed
        if not self._order_seed_set:
            drawn = secrets.randbits(63)
            if self.trainer is not None and self.trainer.world_size > 1:
                drawn = self.trainer.strategy.broadcast(drawn, src=0)
            self.adopt_order_seed(int(drawn))
            log.info("seed=null: this run's training epochs are ordered by seed %d, drawn for it", drawn)
        return self._order_seed

    @property
    def drawn_order_seed(self) -> int | None:
        """The seed an unseeded run's epochs are ordered by (drawn, or its checkpoint's), once its
        training loader is built; None for a seeded run (its ``seed`` orders them)."""
        return self._order_seed if self.seed is None else None

    def adopt_order_seed(self, seed: int | None) -> None:
        """The orders of the checkpoint a run resumes (None: a checkpoint of an unseeded run from
        before seeds were drawn, ordered by ``epoch_seed(None, e)``), for every later loader."""
        self._order_seed, self._order_seed_set = seed, True


def replicas(trainer) -> tuple[int, int]:
    """(world size, global rank) of a datamodule's trainer; (1, 0) without one."""
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


def shuffles(trainer) -> bool:
    """Whether training batches are shuffled: not under ``trainer.overfit_batches`` (``debug=overfit``),
    which trains on the same first batches every epoch."""
    return not (trainer is not None and trainer.overfit_batches)


def check_batch_size(batch_size: Any) -> int:
    """``data.batch_size``, refused by name unless a positive integer (0 divided by zero in the
    sampler's length, a negative one failed inside the DataLoader)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"data.batch_size={batch_size!r}: expected a positive integer (the global batch)")
    return batch_size


#: under ``max_tokens``, batches hold a multiple of this many examples where more fit (fairseq's
#: ``required_batch_size_multiple``): 2, 4 or 8 processes then get equal shares of each
BATCH_MULTIPLE = 8


def check_max_tokens(max_tokens: Any, longest: int | None = None, what: str = "") -> int | None:
    """``data.max_tokens``: null, or a positive integer (tokens a global batch holds at most), and
    at least ``longest``, the longest example's tokens (``what`` says where that comes from)."""
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ConfigError(f"data.max_tokens={max_tokens!r}: expected a positive number of tokens, or null")
    if max_tokens is not None and longest is not None and max_tokens < longest:
        raise ConfigError(
            f"data.max_tokens={max_tokens} is less than {what or 'the longest example'}'s {longest} tokens: "
            f"it would fit in no batch; give data.max_tokens >= {longest}"
        )
    return max_tokens


def per_replica_batch_size(batch_size: int, trainer) -> int:
    """Each process's share of the global ``data.batch_size``."""
    world, _ = replicas(trainer)
    if batch_size % world:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch and must divide by the {world} processes of this run"
        )
    return batch_size // world


#: how epochs are ordered, saved with a training loader's position: 1, by ``seed + epoch``; 2, by
#: ``epoch_seed``; 3, with bucketing and ``drop_last``, the left-over examples dropped at random
#: before the pools are sorted (in 2, the last pool's longest). An epoch resumed from an older
#: checkpoint goes on in the order it began in.
ORDER = 3


class ResumableLoader(DataLoader):
    """A training ``DataLoader(batch_size=None)`` over a ``GlobalBatchSampler`` that resumes where
    a checkpoint was taken, mid-epoch included (Lightning calls ``state_dict``/``load_state_dict``).

    Loading in the training process (``num_workers=0``) from a dataset with a ``batches`` method
    (index tensors in, batches out), it gathers ``gather_batches`` batches in one call instead of
    one ``__getitem__`` per step: for millisecond steps the fixed cost of a dozen small tensor ops
    per batch, and of the ``DataLoader`` iterator, is a visible share of the step
    (``scripts/benchmark.py data``). The batches are the same.
    """

    def __init__(
        self, *args: Any, gather_batches: int = 32, seed_owner: OrderSeed | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.gather_batches = gather_batches
        #: an unseeded data module (``seed=None``) whose drawn seed orders this loader's epochs:
        #: the seed goes into the checkpoint with the position, and a resumed run takes it back
        #: (the states come back after ``configure_optimizers`` has built this loader, with a new
        #: draw: ``seqlab.callbacks.resume.give_back_loader_states``)
        self.seed_owner = seed_owner if seed_owner is not None and seed_owner.seed is None else None
        if not isinstance(self.sampler, GlobalBatchSampler) or self.batch_size is not None:
            raise TypeError("ResumableLoader needs a GlobalBatchSampler and batch_size=None")
        self.batches_done = 0
        self.resume_at: tuple[int, int] | None = None
        #: how the checkpoint resumed from ordered its epochs (``ORDER``: its ``order`` entry)
        self.resumed_order = ORDER

    def __iter__(self) -> Iterator[Any]:
        epoch = self.sampler.epoch
        skip, order = 0, ORDER
        if self.resume_at is not None and self.resume_at[0] == epoch:
            skip = min(self.resume_at[1], len(self))
            order = self.resumed_order
        self.resume_at = None
        self.sampler.skip = skip
        # the interrupted epoch of an older seqlab's checkpoint goes on in the order it began in
        self.sampler.legacy = (epoch, order) if order < ORDER else None
        self.batches_done = skip
        gathered = self.num_workers == 0 and not self.pin_memory and hasattr(self.dataset, "batches")
        if not gathered and self.persistent_workers and self._iterator is not None:
            # a persistent iterator is reused and draws nothing: one draw every epoch, as a new
            # iterator makes, so a run resumed from an epoch's end (whose loader starts a new
            # one) goes on in the random state (dropout) of the run that was not interrupted
            self._draw_like_a_new_iterator()
        for batch in self._gathered() if gathered else super().__iter__():
            self.batches_done += 1
            yield batch

    def _draw_like_a_new_iterator(self) -> None:
        """The draw of DataLoader's own iterator (its workers' base seed), from the global random
        state where no ``generator`` is given."""
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)

    def _gathered(self) -> Iterator[Any]:
        # the global random state, and with it dropout and whatever else a run draws, stays that
        # of the DataLoader path
        self._draw_like_a_new_iterator()
        indices = iter(self.sampler)
        while chunk := list(itertools.islice(indices, self.gather_batches)):
            yield from map(self.collate_fn, self.dataset.batches(chunk))

    def state_dict(self) -> dict[str, Any]:
        # how this epoch is ordered (``ORDER``; an older checkpoint's epoch, resumed and not
        # finished, stopped again goes on in that order again)
        return {
            "epoch": self.sampler.epoch,
            "batches": self.batches_done,
            "order": self.sampler.order_version(),
            "seed": self.sampler.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_at = (int(state["epoch"]), int(state["batches"]))
        self.resumed_order = int(state.get("order", 1))
        # (no "seed": a checkpoint from before seeds were drawn; "own_seed": another run's checkpoint)
        if self.seed_owner is not None and not state.get("own_seed"):
            self.sampler.seed = state.get("seed")
            self.seed_owner.adopt_order_seed(self.sampler.seed)
            log.info(
                "seed=null: this run's epochs are ordered by seed %s, its checkpoint's", self.sampler.seed
            )


class GlobalBatchSampler(DistributedSampler, SequentialSampler):
    """This process's share of each global batch, one index tensor per step: a *batch* sampler,
    for a ``DataLoader(batch_size=None)`` over a dataset whose ``__getitem__`` takes an index
    tensor and returns the batch (no per-example Python loop, no ``BatchSampler``, no collate).

    The epoch order is ``randperm(size)`` seeded by ``epoch_seed(seed, epoch)``, cut into global
    batches of ``batch_size``; process ``rank`` of ``num_replicas`` takes every
    ``num_replicas``-th example of each. So the examples of a step are the same whatever the
    number of processes, and (in training) exactly those of ``DistributedSampler`` +
    ``BatchSampler`` given that epoch's seed.

    Also a ``SequentialSampler`` to Lightning, whose ``overfit_batches`` would otherwise replace it
    by a per-example one that seqlab's whole-batch loaders cannot take (the datamodules turn
    shuffling off themselves there, ``shuffles``).

    Args:
        size: number of examples.
        batch_size: the global batch size; it must divide by ``num_replicas``.
        shuffle: reshuffle every epoch (``set_epoch``, called by Lightning), seeded by ``seed``.
        drop_last: drop the last incomplete global batch (training). Otherwise (evaluation) every
            example is handed out once: a last batch that does not divide by the processes gives
            some of them one example fewer, and one with fewer examples than processes joins the
            batch before it, so every process still gets the same number of steps (a collective
            per forward under sharded parameters) and a metric reduced over the processes counts
            each example once. Only a split smaller than the processes repeats examples.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int | None = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            range(size),  # only its length is used
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        if batch_size % num_replicas:
            raise ValueError(f"global batch size {batch_size} does not divide by {num_replicas} processes")
        if drop_last and size < batch_size:  # training would run no step and test the initial weights
            raise ConfigError(
                f"data.batch_size={batch_size} is more than the {size} training examples: an epoch "
                "has no full batch to train on; lower data.batch_size"
            )
        self.size = size
        self.batch_size = batch_size
        #: batches the next epoch starts after (a mid-epoch resume), then back to 0
        self.skip = 0
        #: (epoch, order version) of an epoch resumed from an older seqlab's checkpoint (``ORDER``)
        self.legacy: tuple[int, int] | None = None

    def order_version(self) -> int:
        """How this epoch is ordered: ``ORDER``, or the older order of an epoch resumed in it."""
        return self.legacy[1] if self.legacy is not None and self.legacy[0] == self.epoch else ORDER

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """The epoch's order of the examples."""
        return torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)

    def arrange(self, batches: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """The epoch's order of the batches."""
        return batches

    def global_batches(self) -> list[torch.Tensor]:
        """This epoch's global batches (identical on every process)."""
        generator = torch.Generator().manual_seed(
            (self.seed or 0) + self.epoch if self.order_version() < 2 else epoch_seed(self.seed, self.epoch)
        )
        order = self.order(generator)
        batches = list(order.split(self.batch_size))
        if batches and len(batches[-1]) < self.batch_size:
            if self.drop_last:
                batches.pop()
            elif len(batches[-1]) < self.num_replicas:
                if len(batches) > 1:
                    batches[-2:] = [torch.cat(batches[-2:])]
                else:  # fewer examples than processes: each gets one, some of them repeated
                    batches[-1] = order.repeat(self.num_replicas)[: self.num_replicas]
        return self.arrange(batches, generator)

    def __iter__(self) -> Iterator[torch.Tensor]:
        skip, self.skip = self.skip, 0
        for batch in itertools.islice(self.global_batches(), skip, None):
            # strided, so each process gets lengths from across a (sorted) global batch
            yield batch[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        """Steps per epoch (the same on every process)."""
        full, rest = divmod(self.size, self.batch_size)
        if self.drop_last or not rest:
            return full
        return full + (rest >= self.num_replicas or not full)  # a short last batch may join the one before


class BucketSampler(GlobalBatchSampler):
    """A ``GlobalBatchSampler`` for variable-length examples. With ``bucketing``, examples are
    shuffled, cut into pools of ``pool_batches`` global batches, sorted by length inside each pool,
    batched, and the batches shuffled again: similar lengths share a batch, so little compute goes
    to padding, while every epoch still mixes the data. Evaluation orders (``shuffle=False``) are
    sorted by length when bucketing.

    Args:
        lengths: length (tokens) of every example.
        bucketing: group examples of similar length into batches.
        pool_batches: how many global batches are sorted together (larger: less padding, less mixing).
        max_tokens: batches by tokens instead (fairseq's ``--max-tokens``): each epoch the examples,
            sorted by length (ties in the epoch's random order), are cut into global batches of at
            most ``max_tokens`` padded tokens (examples x the longest, over all processes: each
            gets about ``max_tokens / N``) and ``batch_size`` examples, in multiples of
            ``BATCH_MULTIPLE`` examples where more fit (fairseq's ``required_batch_size_multiple``:
            2, 4 or 8 processes get equal shares), and the batches are shuffled. Short examples
            then share a batch by the hundred, long ones by a few, and every step holds about as
            many tokens. The cut does not depend on the number of processes (a run resumed on
            another device count goes on in the same batches); a batch with fewer examples than
            processes repeats some so that each gets one. ``bucketing`` and ``pool_batches`` do
            not apply, and nothing is dropped.
        batch_size, num_replicas, rank, shuffle, seed, drop_last: as for ``GlobalBatchSampler``.
    """

    def __init__(
        self,
        lengths: Sequence[int] | torch.Tensor,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int | None = 0,
        drop_last: bool = False,
        bucketing: bool = True,
        pool_batches: int = 50,
        max_tokens: int | None = None,
    ) -> None:
        # (under max_tokens batch_size is a cap, not a batch every epoch must fill)
        full_batches = drop_last and max_tokens is None
        super().__init__(len(lengths), batch_size, num_replicas, rank, shuffle, seed, full_batches)
        self.lengths = torch.as_tensor(lengths)
        self.bucketing = bucketing
        self.pool_batches = max(1, pool_batches)
        # (training: evaluation batches an example over the budget alone)
        longest = int(self.lengths.max()) if drop_last and len(self.lengths) else None
        self.max_tokens = check_max_tokens(max_tokens, longest, "the longest training example")
        #: batches an epoch of ``max_tokens`` has (the same every epoch: the lengths decide it)
        self.token_steps = 0
        if max_tokens is not None:
            self.token_steps = len(self.cut_by_tokens(torch.argsort(self.lengths, stable=True).tolist()))

    def cut_by_tokens(self, order: list[int]) -> list[list[int]]:
        """``order`` (ascending lengths) cut into global batches of at most ``max_tokens`` padded
        tokens and ``batch_size`` examples: a full batch keeps the largest multiple of
        ``BATCH_MULTIPLE`` it holds (all of it where fewer fit) and hands the rest on."""
        lengths = self.lengths.tolist()
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            length = lengths[index]  # ascending: the newcomer is the longest
            while current and (
                (len(current) + 1) * length > self.max_tokens or len(current) + 1 > self.batch_size
            ):
                keep = (
                    len(current) - len(current) % BATCH_MULTIPLE
                    if len(current) >= BATCH_MULTIPLE
                    else len(current)
                )
                batches.append(current[:keep])
                current = current[keep:]
            current.append(index)
        if current:
            batches.append(current)
        return batches

    def global_batches(self) -> list[torch.Tensor]:
        if self.max_tokens is None:
            return super().global_batches()
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        mixed = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        order = mixed[torch.argsort(self.lengths[mixed], stable=True)]  # by length, ties mixed
        batches = [torch.tensor(batch, dtype=torch.int64) for batch in self.cut_by_tokens(order.tolist())]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        world = self.num_replicas
        # fewer examples than processes (the longest, where fewer fit): each process gets one
        return [
            batch if len(batch) >= world else batch.repeat(-(-world // len(batch)))[:world]
            for batch in batches
        ]

    def __len__(self) -> int:
        return self.token_steps if self.max_tokens is not None else super().__len__()

    def order(self, generator: torch.Generator) -> torch.Tensor:
        order = super().order(generator)
        if not self.bucketing:
            return order
        if self.shuffle and self.drop_last and self.order_version() >= 3:
            # the examples left over by whole batches, dropped at random: once sorted, the short
            # last batch was the last pool's longest examples, and were never trained on
            order = order[: len(order) - len(order) % self.batch_size]
        pool = self.pool_batches * self.batch_size if self.shuffle else max(self.size, 1)
        pieces = [chunk[torch.argsort(self.lengths[chunk], stable=True)] for chunk in order.split(pool)]
        return torch.cat(pieces) if pieces else order

    def arrange(self, batches: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        if not (self.shuffle and self.bucketing):
            return batches
        # a short last batch stays last: loaders cut batches in order
        full = len(batches) - (len(batches[-1]) < self.batch_size if batches else 0)
        return [batches[i] for i in torch.randperm(full, generator=generator)] + batches[full:]


__all__ = [
    "BucketSampler",
    "EvalShardSampler",
    "GlobalBatchSampler",
    "OrderSeed",
    "ResumableLoader",
    "epoch_seed",
    "shuffles",
]


class EvalShardSampler(DistributedSampler, SequentialSampler):
    """Evaluation order for one process of N: every N-th example, in order, **without** the
    padding of ``DistributedSampler`` (which repeats examples so that every process gets as many),
    so the metrics gathered over the processes are those of the whole split, each example once:
    a 2-process test equals a 1-process test.

    With ``batch_size`` it hands out index tensors of at most ``batch_size`` examples (for a
    ``DataLoader(batch_size=None)`` over a dataset that gathers a batch from one), and **as many
    batches on every process**: under sharded parameters (FSDP, FSDP2, ZeRO-3) every forward is a
    collective, and a process with one batch fewer left the others waiting for ever (``trainer=
    fsdp2`` hung at the first validation of the default series: 289 and 288 windows, 10 and 9
    batches of 32). A process that would have a batch fewer splits its last batch in two. Only a
    split with fewer examples than processes x batches cannot be evened out."""

    def __init__(
        self, dataset_size: int, num_replicas: int = 1, rank: int = 0, batch_size: int | None = None
    ) -> None:
        self.size = dataset_size
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.epoch = False, 0
        self.batch_size = batch_size

    def batches(self) -> list[torch.Tensor]:
        """This process's batches (index tensors)."""
        mine = torch.tensor(range(self.rank, self.size, self.num_replicas), dtype=torch.int64)
        batches = list(mine.split(self.batch_size or max(1, len(mine)))) if len(mine) else []
        first = len(range(0, self.size, self.num_replicas))  # the first process's share, the largest
        most = -(-first // (self.batch_size or 1))  # its number of batches
        while len(batches) < most and batches and len(batches[-1]) > 1:
            last = batches.pop()
            batches += list(last.split((len(last) + 1) // 2))
        return batches

    def evaluated(self, batches: int | None = None) -> list[int]:
        """The examples every process evaluates, in order: all, or those of each process's first
        ``batches`` batches (``limit_test_batches``; a split last batch holds fewer)."""
        if batches is None or self.batch_size is None:
            return list(range(self.size))
        shares = (
            EvalShardSampler(self.size, self.num_replicas, r, self.batch_size)
            for r in range(self.num_replicas)
        )
        return sorted(int(i) for share in shares for batch in share.batches()[:batches] for i in batch)

    def __iter__(self) -> Iterator[Any]:
        if self.batch_size is None:
            return iter(range(self.rank, self.size, self.num_replicas))
        return iter(self.batches())

    def __len__(self) -> int:
        if self.batch_size is None:
            return len(range(self.rank, self.size, self.num_replicas))
        return len(self.batches())
