"""Parallel text for translation: aligned files -> subword tokenizers trained on train -> cached ids.

``TranslationDataModule`` reads ``<prefix>.<lang>`` files, one sentence per line and the two
languages aligned line by line (Multi30k's ``train.en`` / ``train.de``; IWSLT or WMT subsets in
the same layout). ``prepare_data`` downloads missing files from ``url`` when online, drops
from train the pairs with an empty side (val and test keep them: their hypotheses line up with
their files) and pairs longer than ``max_length`` tokens or with a
length ratio above ``max_length_ratio`` (each count reported and saved in ``meta.json``), trains a
joint (``shared_vocab``) or one tokenizer per language on the training pairs only, and caches
the ids. Validation and test sources are truncated to ``max_length``; their references stay the
raw text, so BLEU is computed on detokenised output against untouched references.

Batches are dicts: ``src_ids``/``src_mask`` [B,S] (source + [EOS]), ``tgt_ids``/``tgt_mask`` [B,U]
([BOS] target [EOS]), ``index`` (row of the split, to find the reference text).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor
from torch.utils.data import Dataset

from seqlab.data.readers import ensure_file
from seqlab.data.samplers import check_batch_size, check_max_tokens
from seqlab.data.text_base import (
    BatchedTextDataModule,
    FlatSequences,
    file_fingerprint,
    generated_in_memory,
    publish,
)
from seqlab.data.text_readers import read_lines
from seqlab.data.tokenization import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TokenizerSpec,
    decode,
    encode,
    load_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)
from seqlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# 2: "[EOS]", "[PAD]" ... in a text are encoded as text, not as the special tokens; val and test
# keep their pairs with an empty side
CACHE_VERSION = 2


def sacrebleu_metrics(lowercase: bool = False, target_lang: str = "") -> tuple[Any, Any]:
    """sacreBLEU's BLEU and chrF for a target language (``zh``, ``zh-CN``, ``ja_JP``: the language
    part counts): BLEU tokenizes Chinese with its ``zh`` tokenizer and Japanese / Korean with
    MeCab (13a would count an unsegmented sentence as one word), and both compare lowercased text
    when the tokenizer lowercases the hypotheses."""
    from sacrebleu.metrics import BLEU, CHRF

    language = re.split(r"[-_]", target_lang.strip().lower(), maxsplit=1)[0]
    try:
        return BLEU(lowercase=lowercase, trg_lang=language), CHRF(lowercase=lowercase)
    except (ImportError, RuntimeError, AssertionError) as err:  # ja/ko-mecab without their packages
        raise ConfigError(
            f"data.target_lang={target_lang!r}: sacreBLEU's tokenizer for it is not installed ({err})"
        ) from None


@dataclass
class ParallelTexts:
    sources: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sources)


def read_parallel(source: Path, target: Path, keep_empty: bool = False) -> tuple[ParallelTexts, int]:
    """Aligned sentence pairs of two files, and how many pairs had an empty side: dropped, or kept
    (``keep_empty``: an evaluation split, scored line for line as sacreBLEU scores its files)."""
    sources, targets = read_lines(source), read_lines(target)
    if len(sources) != len(targets):
        raise DataError(
            f"{source} has {len(sources)} lines but {target} has {len(targets)}: "
            "parallel files must be aligned line by line"
        )
    pairs = ParallelTexts()
    empty = 0
    for src, tgt in zip(sources, targets):
        src, tgt = src.strip(), tgt.strip()
        if not src or not tgt:
            empty += 1
            if not keep_empty:
                continue
        pairs.sources.append(src)
        pairs.targets.append(tgt)
    return pairs, empty


class ParallelDataset(Dataset):
    """One split: source and target ids (flat, with offsets) and the raw texts."""

    def __init__(self, source: FlatSequences, target: FlatSequences, sources: list[str], targets: list[str]):
        self.source = source
        self.target = target
        self.sources = sources
        self.targets = targets

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ParallelDataset:
        return cls(
            FlatSequences(state["src_ids"], state["src_offsets"]),
            FlatSequences(state["tgt_ids"], state["tgt_offsets"]),
            state["sources"],
            state["targets"],
        )

    def state(self) -> dict[str, Any]:
        return {
            "src_ids": self.source.ids,
            "src_offsets": self.source.offsets,
            "tgt_ids": self.target.ids,
            "tgt_offsets": self.target.offsets,
            "sources": self.sources,
            "targets": self.targets,
        }

    @property
    def lengths(self) -> Tensor:
        """The longer side of each pair (what a batch is padded to)."""
        return torch.maximum(self.source.lengths, self.target.lengths)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitems__(self, indices: list[int] | Tensor) -> dict[str, Tensor]:
        return self[indices]

    def __getitem__(self, indices: int | list[int] | Tensor) -> dict[str, Tensor]:
        """A right-padded batch: src_ids, src_mask, tgt_ids, tgt_mask [B,T] (True = padding), index."""
        return self.batches([torch.as_tensor(indices, dtype=torch.long).reshape(-1)])[0]

    def batches(self, indices: list[Tensor]) -> list[dict[str, Tensor]]:
        """Several batches (one index tensor each) gathered at once (``ResumableLoader``)."""
        return [
            {
                "src_ids": src_ids,
                "src_mask": src_mask,
                "tgt_ids": tgt_ids,
                "tgt_mask": tgt_mask,
                "index": index,
            }
            for (src_ids, src_mask), (tgt_ids, tgt_mask), index in zip(
                self.source.padded_batches(indices), self.target.padded_batches(indices), indices
            )
        ]


class TranslationDataModule(BatchedTextDataModule):
    """Sentence pairs from ``<prefix>.<lang>`` files, tokenized once and cached.

    Args:
        data_dir: directory of the raw files (read-only is fine unless a download is needed).
        source_lang, target_lang: file suffixes of the two sides; swap them to reverse direction.
        train_prefix, val_prefix, test_prefix: file names without the language suffix.
        tokenizer: ``TokenizerSpec`` fields: kind bpe|unigram (or word: BLEU suffers where decoding loses the spacing), vocab_size,
            min_frequency, lowercase. Lengths are ``max_length`` here, not the tokenizer's.
        shared_vocab: one tokenizer for both languages (lets the task tie all embeddings), or one each.
        max_length: tokens per side, specials included: longer training pairs are dropped,
            longer validation / test sources truncated.
        max_length_ratio: training pairs whose token counts differ by more than this factor
            (misaligned lines, usually) are dropped.
        batch_size: the global batch (sentence pairs); each of N processes gets ``batch_size / N``.
        bucketing, pool_batches: batch pairs of similar length together (``BucketSampler``).
        max_tokens: batch by tokens instead (fairseq's ``--max-tokens``): global batches of at most
            this many padded tokens (pairs x the longer side of the longest, over all processes)
            and ``batch_size`` pairs; null: ``batch_size`` pairs a batch (``BucketSampler``).
        cache_dir: where the processed data and the tokenizers are stored.
        url: where ``prepare_data`` fetches a missing file; ``{name}`` is the file name
            (``train.en``); a ``.gz`` URL is decompressed.
    """

    #: the task whose examples this data holds (train.py refuses another ``task=``)
    TASK = "seqlab.tasks.translation.TranslationTask"

    def __init__(
        self,
        data_dir: str | None = None,
        source_lang: str = "en",
        target_lang: str = "de",
        train_prefix: str = "train",
        val_prefix: str = "val",
        test_prefix: str = "test",
        tokenizer: dict[str, Any] | None = None,
        shared_vocab: bool = True,
        max_length: int = 128,
        max_length_ratio: float = 3.0,
        batch_size: int = 128,
        bucketing: bool = True,
        pool_batches: int = 50,
        max_tokens: int | None = None,
        cache_dir: str = "data/processed",
        url: str | None = None,
        download: bool = True,
        num_workers: int = 0,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        settings = dict(tokenizer or {})
        if settings.get("max_length") is not None:
            raise ConfigError(
                f"data.tokenizer.max_length={settings['max_length']}: set data.max_length instead "
                "(translation filters long training pairs and truncates evaluation sources itself)"
            )
        if settings.get("wrap", "bos_eos") != "bos_eos":
            raise ConfigError(
                f"data.tokenizer.wrap={settings['wrap']!r}: translation wraps targets in [BOS] ... [EOS] "
                "itself (sources end in [EOS]); remove the key"
            )
        settings.update(max_length=None, wrap="bos_eos")
        settings.setdefault("lowercase", False)
        self.spec = TokenizerSpec.from_config(settings)
        if source_lang == target_lang:
            raise ConfigError(f"data.source_lang and data.target_lang are both {source_lang!r}")
        if max_length < 3:
            raise ConfigError(f"data.max_length={max_length} leaves no room for [BOS], a token and [EOS]")
        if max_length_ratio < 1:
            raise ConfigError(f"data.max_length_ratio={max_length_ratio}: expected at least 1")
        check_max_tokens(max_tokens, max_length, "data.max_length")
        self._absolute_paths()
        self.batch_size = check_batch_size(batch_size)
        self.seed = seed
        self.datasets: dict[str, ParallelDataset] = {}
        self.meta: dict[str, Any] | None = None
        #: tokenizers of a trained model (``use_artifacts``): reused, never retrained
        self.fixed: dict[str, str] | None = None
        self._tokenizers: dict[str, Tokenizer] = {}

    def _absolute_paths(self) -> None:
        """Store paths absolute, so a checkpoint rebuilds its data from any working directory."""
        hp = self.hparams
        if hp.data_dir is not None:
            hp.data_dir = str(Path(hp.data_dir).expanduser().resolve())
        hp.cache_dir = str(Path(hp.cache_dir).expanduser().resolve())
        self.data_dir = Path(hp.data_dir) if hp.data_dir is not None else None
        self.cache_dir = Path(hp.cache_dir)

    # ------------------------------------------------------------------ sources
    def split_files(self, split: str) -> tuple[Path, Path]:
        hp = self.hparams
        prefix = {"train": hp.train_prefix, "val": hp.val_prefix, "test": hp.test_prefix}[split]
        if self.data_dir is None:
            raise ConfigError(f"data.data_dir is not set; it should hold {prefix}.{hp.source_lang}")
        return self.data_dir / f"{prefix}.{hp.source_lang}", self.data_dir / f"{prefix}.{hp.target_lang}"

    def read_pairs(self, split: str) -> tuple[ParallelTexts, int]:
        """The split's pairs, and how many have an empty side: dropped from train; kept in val and
        test, whose hypotheses (``translations/test.hyp``) then line up with the test files, and
        whose BLEU is that of the whole files (an empty source's hypothesis is empty, as translate.py's)."""
        source, target = self.split_files(split)
        return read_parallel(source, target, keep_empty=split != "train")

    def source_fingerprint(self) -> list[Any]:
        return [file_fingerprint(path) for split in self.splits_read() for path in self.split_files(split)]

    def test_from_file(self) -> bool:
        return True

    @property
    def name(self) -> str:
        hp = self.hparams
        folder = self.data_dir.name if self.data_dir is not None else type(self).__name__
        return f"{folder}-{hp.source_lang}-{hp.target_lang}"

    def cache_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "version": CACHE_VERSION,
            "class": type(self).__qualname__,
            "sources": self.source_fingerprint(),
            "direction": [hp.source_lang, hp.target_lang],
            "tokenizer": self.spec.to_dict(),
            "shared_vocab": hp.shared_vocab,
            "filters": [hp.max_length, hp.max_length_ratio],
        }

    # ------------------------------------------------------------------ preparation
    def download_raw(self) -> None:
        hp = self.hparams
        for split in self.splits_read():
            prefix = f"{split}_prefix"
            named_by = (
                f"name yours with data.{prefix} (now {hp[prefix]!r}: {hp[prefix]}.{hp.source_lang} and "
                f"{hp[prefix]}.{hp.target_lang}, e.g. data.{prefix}=dev)"
            )
            for path in self.split_files(split):
                url = hp.url.format(name=path.name) if hp.url else None
                ensure_file(path, url, hp.download, named_by)

    def prepare_data(self) -> None:
        sacrebleu_metrics(**self.scoring())  # a missing BLEU tokenizer named before the data is processed
        self.download_raw()
        target = self.processed_dir
        if (target / "meta.json").is_file():
            log.info("processed data: %s (cached)", target)
            return
        raw, dropped = {}, {}
        for split in self.splits_read():
            pairs, empty = self.read_pairs(split)
            if not any(s and t for s, t in zip(pairs.sources, pairs.targets)):
                raise DataError(f"{self.split_files(split)[0]}: the {split} split has no sentence pairs")
            raw[split] = pairs
            # dropped from train; kept in val and test, scored as their files are
            dropped[split] = {"empty" if split == "train" else "empty_kept": empty}
            if empty:
                kept = "dropped" if split == "train" else "kept: scored as the files are"
                log.warning("%s: %d pairs with an empty side (%s)", split, empty, kept)
        self.write_processed(raw, dropped, target)

    def train_tokenizers(self, train: ParallelTexts | None) -> tuple[Tokenizer, Tokenizer]:
        if self.fixed is not None:
            return tokenizer_from_json(self.fixed["source_tokenizer"]), tokenizer_from_json(
                self.fixed["target_tokenizer"]
            )
        if self.hparams.shared_vocab:
            log.info("training a joint %s tokenizer on %d sentence pairs", self.spec.kind, len(train))
            joint = train_tokenizer(train.sources + train.targets, self.spec)
            return joint, joint
        log.info("training %s tokenizers on %d sentence pairs", self.spec.kind, len(train))
        return train_tokenizer(train.sources, self.spec), train_tokenizer(train.targets, self.spec)

    def warn_if_words_lose_text(self, tokenizer: Tokenizer, references: list[str]) -> None:
        """Word-level decoding joins words and punctuation with spaces ('T-Shirt' comes back
        'T - Shirt') and, lowercasing, drops accents: say so when that changes the validation
        references as sacreBLEU tokenizes them (words outside the vocabulary aside), for BLEU
        then scores hypotheses the model cannot write as the references are written."""
        words = sacrebleu_metrics(**self.scoring())[0].tokenizer  # as BLEU reads the target language
        lowercase = self.spec.lowercase
        ids = encode(tokenizer, references, add_special_tokens=False)
        changed = [
            (reference, back)
            for reference, back, seq in zip(references, decode(tokenizer, ids), ids)
            if UNK_ID not in seq
            and words(reference.lower() if lowercase else reference)
            != words(back.lower() if lowercase else back)
        ]
        if changed:
            log.warning(
                "data.tokenizer.kind=word: %d of %d validation references do not come back from the "
                "tokenizer as sacreBLEU reads them (%r -> %r), so BLEU is lower than the model's "
                "translations deserve; kind=bpe or unigram decode to the text itself",
                len(changed), len(references), *changed[0],
            )  # fmt: skip

    def write_processed(
        self, raw: dict[str, ParallelTexts], dropped: dict[str, dict[str, int]], target: Path
    ) -> None:
        hp = self.hparams
        source_tok, target_tok = self.train_tokenizers(raw.get("train"))
        if self.spec.kind == "word" and "val" in raw:
            self.warn_if_words_lose_text(target_tok, raw["val"].targets)
        splits = {}
        for split, pairs in raw.items():
            sources = [[*ids, EOS_ID] for ids in encode(source_tok, pairs.sources, add_special_tokens=False)]
            targets = encode(target_tok, pairs.targets)
            if split == "train":
                keep = [
                    i
                    for i, (s, t) in enumerate(zip(sources, targets))
                    if max(len(s), len(t)) <= hp.max_length
                    and max(len(s), len(t)) <= hp.max_length_ratio * min(len(s), len(t))
                ]
                dropped[split]["too_long_or_ratio"] = len(sources) - len(keep)
                if len(keep) < len(sources):
                    log.warning(
                        "train: dropped %d pairs longer than data.max_length=%d tokens or with a length "
                        "ratio above data.max_length_ratio=%g",
                        len(sources) - len(keep),
                        hp.max_length,
                        hp.max_length_ratio,
                    )
                if not keep:
                    raise DataError(
                        f"{self.split_files('train')[0]}: no training pair is within data.max_length="
                        f"{hp.max_length} and data.max_length_ratio={hp.max_length_ratio}"
                    )
                sources, targets = [sources[i] for i in keep], [targets[i] for i in keep]
                pairs = ParallelTexts([pairs.sources[i] for i in keep], [pairs.targets[i] for i in keep])
            else:
                truncated = sum(len(s) > hp.max_length for s in sources)
                dropped[split]["truncated_sources"] = truncated
                sources = [
                    s if len(s) <= hp.max_length else [*s[: hp.max_length - 1], EOS_ID] for s in sources
                ]
                targets = [
                    t if len(t) <= hp.max_length else [*t[: hp.max_length - 1], EOS_ID] for t in targets
                ]
            splits[split] = ParallelDataset(
                FlatSequences.from_lists(sources),
                FlatSequences.from_lists(targets),
                pairs.sources,
                pairs.targets,
            ).state()
        meta = {
            "source_lang": hp.source_lang,
            "target_lang": hp.target_lang,
            "source_vocab_size": source_tok.get_vocab_size(),
            "target_vocab_size": target_tok.get_vocab_size(),
            "shared_vocab": bool(hp.shared_vocab) and source_tok.to_str() == target_tok.to_str(),
            "tokenizer": self.spec.to_dict(),
            "sizes": {split: len(state["sources"]) for split, state in splits.items()},
            "dropped": dropped,
            "sources": self.source_fingerprint(),
        }

        def write(tmp: Path) -> None:
            source_tok.save(str(tmp / "source_tokenizer.json"))
            target_tok.save(str(tmp / "target_tokenizer.json"))
            torch.save(splits, tmp / "splits.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

        publish(target, write)
        log.info("processed data written to %s (%s)", target, meta["sizes"])

    # ------------------------------------------------------------------ loading
    def dataset_from_state(self, state: dict[str, Any]) -> Dataset:
        return ParallelDataset.from_state(state)

    def tokenizer(self, side: str) -> Tokenizer:
        """The ``source`` or ``target`` tokenizer (loaded once; a checkpoint's needs no data files)."""
        if side not in self._tokenizers and self.fixed is not None:
            self._tokenizers[side] = tokenizer_from_json(self.fixed[f"{side}_tokenizer"])
        if side not in self._tokenizers:
            self.load_meta()
            self._tokenizers[side] = load_tokenizer(self.processed_dir / f"{side}_tokenizer.json")
        return self._tokenizers[side]

    def task_kwargs(self) -> dict[str, Any]:
        """What the translation task takes from the data (never copied into configs by hand)."""
        meta = self.load_meta()
        return {
            "src_vocab_size": meta["source_vocab_size"],
            "tgt_vocab_size": meta["target_vocab_size"],
            "shared_vocab": meta["shared_vocab"],
            "pad_id": PAD_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
        }

    def artifacts(self) -> dict[str, Any]:
        """The tokenizers: saved in checkpoints, so ``eval.py``/``translate.py`` need nothing else."""
        self.load_meta()
        return {
            f"{side}_tokenizer": (self.processed_dir / f"{side}_tokenizer.json").read_text(encoding="utf-8")
            for side in ("source", "target")
        }

    def use_artifacts(self, artifacts: dict[str, Any]) -> None:
        self.fixed = {key: artifacts[key] for key in ("source_tokenizer", "target_tokenizer")}
        self.meta = None
        self.datasets = {}
        self._processed_dir = None  # another cache entry, or the config's where it holds these
        self._tokenizers = {}

    def holds_fixed(self, entry: Path) -> bool:
        return all(
            (entry / f"{side}_tokenizer.json").read_text(encoding="utf-8") == self.fixed[f"{side}_tokenizer"]
            for side in ("source", "target")
        )

    # ------------------------------------------------------------------ text <-> ids
    def encode_sources(self, texts: list[str]) -> list[list[int]]:
        """Source ids as the model was trained on them ([EOS] appended, truncated to max_length)."""
        limit = self.hparams.max_length
        ids = encode(self.tokenizer("source"), texts, add_special_tokens=False)
        if cut := sum(len(seq) > limit - 1 for seq in ids):
            log.warning(
                "%d of %d sentences are longer than data.max_length=%d tokens with their [EOS]: only "
                "their first %d tokens are translated", cut, len(ids), limit, limit - 1,
            )  # fmt: skip
        return [[*seq[: limit - 1], EOS_ID] for seq in ids]

    def check_trainable(self) -> None:
        """Refuse what a new training run must not use (train.py asks before it builds anything
        else; a trained checkpoint's tokenizers still evaluate): wordpiece, whose decoder
        rewrites the text."""
        if self.spec.kind == "wordpiece" and self.fixed is None:
            raise ConfigError(
                "data.tokenizer.kind=wordpiece: its decoder rewrites the text (' do not' becomes \" don't\", "
                "'saftig-grünes' comes back 'saftig - grünes'), and BLEU would score that against the raw "
                "references; use kind=bpe or unigram, which decode to the text itself"
            )

    def scoring(self) -> dict[str, Any]:
        """How sacreBLEU reads this data's translations: its target language (the tokenizer of
        Chinese, Japanese, Korean) and lowercased when the tokenizer lowercases them."""
        return {"lowercase": self.spec.lowercase, "target_lang": self.hparams.target_lang}

    def detokenize(self, ids: list[list[int]]) -> list[str]:
        """Plain target-language text of generated ids."""
        return decode(self.tokenizer("target"), ids)

    def references(self, split: str) -> list[str]:
        self.setup()
        return self.datasets[split].targets

    def sources(self, split: str) -> list[str]:
        self.setup()
        return self.datasets[split].sources


class SyntheticTranslationDataModule(TranslationDataModule):
    """A generated task for tests and smoke runs: translate word by word, reversed.

    Sources are ``num_words``-word sentences (``a0 a1 ...``); the target is the sentence reversed
    with every ``aN`` written ``bN``. Solving it needs attention to the right source position,
    and a working model reaches BLEU near 100 within seconds.
    """

    def __init__(
        self,
        num_train: int = 4000,
        num_val: int = 200,
        num_test: int = 200,
        vocab: int = 16,
        min_words: int = 3,
        max_words: int = 8,
        generator_seed: int = 1234,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("tokenizer", {"kind": "word", "vocab_size": 64})
        generated_in_memory(
            type(self).__name__, kwargs, data_dir=None, url=None, source_lang="src", target_lang="tgt"
        )
        super().__init__(**kwargs)
        self.save_hyperparameters(logger=False)
        self._absolute_paths()

    @property
    def name(self) -> str:
        return "synthetic_reverse"

    def source_fingerprint(self) -> list[Any]:
        hp = self.hparams
        return [
            hp.num_train,
            hp.num_val,
            hp.num_test,
            hp.vocab,
            hp.min_words,
            hp.max_words,
            hp.generator_seed,
        ]

    def download_raw(self) -> None:
        pass

    def test_from_file(self) -> bool:
        return False  # (generated with the others)

    def split_files(self, split: str) -> tuple[Path, Path]:
        return Path(f"synthetic/{split}.src"), Path(f"synthetic/{split}.tgt")

    def read_pairs(self, split: str) -> tuple[ParallelTexts, int]:
        hp = self.hparams
        count = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}[split]
        rng = random.Random(f"{hp.generator_seed}-{split}")
        pairs = ParallelTexts()
        for _ in range(count):
            words = [rng.randrange(hp.vocab) for _ in range(rng.randint(hp.min_words, hp.max_words))]
            pairs.sources.append(" ".join(f"a{w}" for w in words))
            pairs.targets.append(" ".join(f"b{w}" for w in reversed(words)))
        return pairs, 0


__all__ = [
    "ParallelDataset",
    "ParallelTexts",
    "SyntheticTranslationDataModule",
    "TranslationDataModule",
    "read_parallel",
]
