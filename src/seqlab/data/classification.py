"""Text classification data: labelled texts -> a tokenizer trained on train -> cached id tensors.

``TextClassificationDataModule`` serves every dataset: GLUE SST-2 (``data=sst2``), IMDB
(``data=imdb``, the aclImdb layout or a CSV) and any user TSV / CSV / JSONL
(``data=text_classification``). ``SyntheticSentimentDataModule`` generates a small sentiment set
(template sentences with sentiment words and negations) for tests and offline runs.

``prepare_data`` reads the raw files (downloading them first when online and ``url`` is set),
maps labels to class ids, holds out a seeded validation slice of train when there is no
validation file, trains the tokenizer on the training examples only and writes everything to
``cache_dir/<name>-<key>/``. The key hashes the sources (path, size, mtime) and every setting
that changes the result, so a second run reuses the tokenizer and the ids instead of redoing
them, and a changed file or setting gets a fresh cache. Tokenization never happens in the
training loop: batches are gathered from the cached ids and padded on the right.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from seqlab.data.readers import ensure_extracted
from seqlab.data.samplers import check_batch_size, check_max_tokens
from seqlab.data.text_base import (
    BatchedTextDataModule,
    FlatSequences,
    file_fingerprint,
    generated_in_memory,
    publish,
)
from seqlab.data.text_readers import FORMATS, TSV_QUOTING, LabelledTexts, label_key, read_aclimdb, read_table
from seqlab.data.tokenization import (
    BOS_ID,
    CLS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TokenizerSpec,
    encode_counting,
    load_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)
from seqlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# 2: a text that encodes to no tokens is refused when the cache is built, so a cache of version 1
# may hold such texts and is built again
# 3: a fractional test_size is a share of all training examples (it was of those left after val);
# the truncated texts are counted
# 4: "[CLS]", "[PAD]" ... in a text are encoded as text, not as the special tokens
# 5: a JSON label that is a whole number is one class however written (1 and 1.0)
CACHE_VERSION = 5
HOLDOUTS = ("random", "sentences")


def word_spans(text: str) -> set[str]:
    """Every contiguous span of the text's whitespace-separated words, single-space joined."""
    words = text.split()
    return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}


def maximal_examples(texts: list[str]) -> list[int]:
    """Indices of the texts that are not a word span of a longer text of the list.

    In a phrase-level treebank such as SST (GLUE SST-2's train holds every phrase of every
    sentence) these are the full sentences; the others are their phrases.
    """
    known = {" ".join(text.split()) for text in texts}
    inside: set[str] = set()
    for text in texts:
        words = text.split()
        n = len(words)
        for i in range(n):
            for j in range(i + 1, n + 1 if i else n):  # every span but the whole text
                span = " ".join(words[i:j])
                if span in known:
                    inside.add(span)
    return [i for i, text in enumerate(texts) if " ".join(text.split()) not in inside]


def also_in_train(raw: dict[str, LabelledTexts]) -> dict[str, int]:
    """How many texts of val and test are, but for their spacing, texts of train: a data set with
    duplicates keeps copies on both sides of a random holdout (scraped reviews, tweets), and a
    given test file may repeat training texts."""
    seen = {" ".join(text.split()) for text in raw["train"].texts}
    return {
        split: sum(" ".join(text.split()) in seen for text in raw[split].texts) for split in ("val", "test")
    }


#: word spans ``holdout=sentences`` may enumerate: SST-2's train (67 K phrases of at most 52 words)
#: has 5.5 M; IMDB's 25 K reviews of ~230 words would have ~1,000 M (hours and tens of GB)
MAX_SPANS = 50_000_000


def check_phrase_level(train: LabelledTexts) -> None:
    """``holdout=sentences`` enumerates every word span of every text: meant for phrase-level
    treebanks (short texts); refused, with the numbers, where it would not finish."""
    lengths = [len(text.split()) for text in train.texts]
    spans = sum(n * (n + 1) // 2 for n in lengths)
    if spans > MAX_SPANS:
        raise ConfigError(
            f"data.holdout=sentences looks for every text inside the others, {spans:,} word spans of "
            f"{len(lengths):,} texts of up to {max(lengths):,} words (at most {MAX_SPANS:,}); it is "
            "meant for phrase-level treebanks such as SST-2: use data.holdout=random"
        )


class TokenizedTexts(Dataset):
    """One split as token ids (flat, with offsets), class ids and the original texts."""

    def __init__(self, ids: Tensor, offsets: Tensor, labels: Tensor, texts: list[str]) -> None:
        self.tokens = FlatSequences(ids, offsets)
        self.labels = labels
        self.texts = texts

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list[int], texts: list[str]) -> TokenizedTexts:
        flat = FlatSequences.from_lists(ids)
        return cls(flat.ids, flat.offsets, torch.tensor(labels, dtype=torch.long), texts)

    def state(self) -> dict[str, Any]:
        return {
            "ids": self.tokens.ids,
            "offsets": self.tokens.offsets,
            "labels": self.labels,
            "texts": self.texts,
        }

    @property
    def lengths(self) -> Tensor:
        return self.tokens.lengths

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int] | Tensor) -> dict[str, Tensor]:
        return self[indices]

    def __getitem__(self, indices: int | list[int] | Tensor) -> dict[str, Tensor]:
        """A right-padded batch: input_ids [B,T], pad_mask [B,T] (True = padding), labels, index."""
        return self.batches([torch.as_tensor(indices, dtype=torch.long).reshape(-1)])[0]

    def batches(self, indices: list[Tensor]) -> list[dict[str, Tensor]]:
        """Several batches (one index tensor each) gathered at once (``ResumableLoader``)."""
        padded = self.tokens.padded_batches(indices)
        labels = self.labels[torch.cat(indices)].split([len(index) for index in indices])
        return [
            {"input_ids": input_ids, "pad_mask": pad_mask, "labels": batch_labels, "index": index}
            for (input_ids, pad_mask), batch_labels, index in zip(padded, labels, indices)
        ]


def _numeric_order(label: str) -> tuple[int, float, str]:
    """Numbers by value ("2" before "10"), then the rest; ties ("1", "1.0") by the text, so the
    class ids never depend on a set's (hash-seeded) order."""
    try:
        number = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, number, label) if not math.isnan(number) else (1, 0.0, label)


class TextClassificationDataModule(BatchedTextDataModule):
    """Labelled texts from files (or ``read_split``), tokenized once and cached.

    Args:
        data_dir: directory of the raw files (read-only is fine: nothing is written there
            unless a download is needed).
        train_file, val_file, test_file: paths relative to ``data_dir``; a missing ``val_file``
            (or ``test_file``) is a seeded ``val_size`` (``test_size``) slice of train.
            With ``format=aclimdb`` they name split directories holding ``pos/`` and ``neg/``.
        text_column, label_column: column names (TSV/CSV header) or keys (JSONL).
        format: ``tsv``, ``csv``, ``jsonl`` (default: from the file suffix) or ``aclimdb``.
        quoting: how a TSV file writes its fields: ``none`` (GLUE's: quotes are ordinary
            characters) or ``minimal`` (pandas' and spreadsheets': a field holding a quote, tab
            or line break in quotes, its quotes doubled). CSV files are always read the latter way.
        classes: the label values, in class-id order; a label outside them is an error. ``null``
            takes the sorted labels found in train.
        label_names: display names of the classes (confusion matrix, tables); default the labels.
        val_size, test_size: a fraction (< 1) or a number of training examples held out.
        split_seed: seed of those slices (fixed, so runs with different seeds share them).
        holdout: ``random`` slices any training examples; ``sentences`` slices only examples
            that are not a word span of another one (the full sentences of a phrase-level set
            like SST-2) and drops from train every example that is a span of a held-out one.
            A random slice of SST-2's phrases leaks: most of a held-out phrase's words and
            sub-phrases, with their labels, stay in train, so validation accuracy runs ~8 points
            above dev accuracy and rewards overfitting; held-out sentences track dev.
        tokenizer: ``TokenizerSpec`` fields: kind word|wordpiece|bpe, vocab_size, min_frequency,
            lowercase, max_length (tokens, including [CLS]; longer texts are truncated), wrap.
        batch_size: the global batch; each of N processes gets ``batch_size / N``.
        bucketing, pool_batches: batch texts of similar length together (see ``BucketSampler``).
        max_tokens: batch by tokens instead: global batches of at most this many padded tokens
            (texts x the longest) and ``batch_size`` texts; null: ``batch_size`` texts a batch.
        cache_dir: where processed data and the tokenizer are stored.
        url, download, strip_components: where ``prepare_data`` fetches missing raw files
            (a zip or tar archive, unpacked into ``data_dir``).
    """

    #: the task whose examples this data holds (train.py refuses another ``task=``)
    TASK = "seqlab.tasks.classification.ClassificationTask"

    def __init__(
        self,
        data_dir: str | None = None,
        train_file: str = "train.tsv",
        val_file: str | None = None,
        test_file: str | None = "test.tsv",
        text_column: str = "text",
        label_column: str = "label",
        format: str | None = None,
        quoting: str = "none",
        classes: list[Any] | None = None,
        label_names: list[str] | None = None,
        val_size: float = 0.1,
        test_size: float = 0.1,
        split_seed: int = 1234,
        holdout: str = "random",
        tokenizer: dict[str, Any] | None = None,
        batch_size: int = 64,
        bucketing: bool = True,
        pool_batches: int = 50,
        max_tokens: int | None = None,
        cache_dir: str = "data/processed",
        url: str | None = None,
        download: bool = True,
        strip_components: int = 0,
        num_workers: int = 0,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self._absolute_paths()
        self.spec = TokenizerSpec.from_config(tokenizer)
        if classes is not None and len(set(map(label_key, classes))) != len(classes):
            raise ConfigError(f"data.classes={list(classes)} has duplicates")
        if label_names is not None and classes is not None and len(label_names) != len(classes):
            raise ConfigError(
                f"data.label_names has {len(label_names)} names for {len(classes)} data.classes"
            )
        for split, size in (("val", val_size), ("test", test_size)):
            if isinstance(size, float) and size >= 1 and not size.is_integer():  # 1.5 held out 1
                raise ConfigError(
                    f"data.{split}_size={size}: expected a share of the training examples (0 < x < 1) "
                    "or a number of them (an integer)"
                )
        if holdout not in HOLDOUTS:
            raise ConfigError(f"data.holdout={holdout!r}; expected one of {list(HOLDOUTS)}")
        formats = [*sorted(set(FORMATS.values())), "aclimdb"]
        if format is not None and format not in formats:
            raise ConfigError(f"data.format={format!r}; expected one of {formats} or null (from the suffix)")
        if quoting not in TSV_QUOTING:
            raise ConfigError(
                f"data.quoting={quoting!r}; expected one of {list(TSV_QUOTING)} (how a TSV quotes)"
            )
        self.classes = [str(c) for c in classes] if classes is not None else None
        self.batch_size = check_batch_size(batch_size)
        # before the run starts (the training sampler would refuse it inside fit)
        check_max_tokens(max_tokens, self.spec.max_length, "data.tokenizer.max_length")
        self.seed = seed
        self.datasets: dict[str, TokenizedTexts] = {}
        self.meta: dict[str, Any] | None = None
        #: tokenizer and classes of a trained model (``use_artifacts``): reused, never retrained
        self.fixed: dict[str, Any] | None = None

    def _absolute_paths(self) -> None:
        """Store paths absolute, so a checkpoint rebuilds its data from any working directory."""
        hp = self.hparams
        if hp.data_dir is not None:
            hp.data_dir = str(Path(hp.data_dir).expanduser().resolve())
        hp.cache_dir = str(Path(hp.cache_dir).expanduser().resolve())
        self.data_dir = Path(hp.data_dir) if hp.data_dir is not None else None
        self.cache_dir = Path(hp.cache_dir)

    # ------------------------------------------------------------------ sources
    def split_path(self, split: str) -> Path | None:
        name = {
            "train": self.hparams.train_file,
            "val": self.hparams.val_file,
            "test": self.hparams.test_file,
        }[split]
        if name is None:
            return None
        if self.data_dir is None:
            raise ConfigError(f"data.data_dir is not set; it should hold {name}")
        return self.data_dir / name

    def read_split(self, split: str) -> LabelledTexts | None:
        """The raw examples of ``split`` (None when the split is carved out of train)."""
        path = self.split_path(split)
        if path is None:
            return None
        if self.hparams.format == "aclimdb":
            return read_aclimdb(path.parent, path.name)
        hp = self.hparams
        return read_table(path, hp.text_column, hp.label_column, hp.format, hp.quoting)

    def source_fingerprint(self) -> Any:
        """Each split's file (None: carved out of train), so a file given as val or as test differ."""
        paths = {split: self.split_path(split) for split in self.splits_read()}
        return {split: file_fingerprint(path) if path is not None else None for split, path in paths.items()}

    def test_from_file(self) -> bool:
        return self.split_path("test") is not None

    @property
    def name(self) -> str:
        path = self.split_path("train")
        return path.parent.name if path is not None else type(self).__name__

    def cache_settings(self) -> dict[str, Any]:
        hp = self.hparams
        carved = [split for split in ("val", "test") if self.split_path(split) is None]
        return {
            "version": CACHE_VERSION,
            "class": type(self).__qualname__,
            "sources": self.source_fingerprint(),
            # (quoting named only where it is not GLUE's: the caches of the files read so keep their key)
            "columns": [hp.text_column, hp.label_column, hp.format]
            + ([hp.quoting] if hp.quoting != "none" else []),
            "classes": self.classes,
            # what carves the splits that have no file (settings that carve nothing leave it alone)
            "holdout": [{s: hp[f"{s}_size"] for s in carved}, hp.split_seed, hp.holdout] if carved else None,
            "tokenizer": self.spec.to_dict(),
        }

    # ------------------------------------------------------------------ preparation
    def download_raw(self) -> None:
        hp = self.hparams
        needed = [path for path in (self.split_path(s) for s in self.splits_read()) if path is not None]
        if needed:
            ensure_extracted(self.data_dir, needed, hp.url, hp.download, hp.strip_components)

    def prepare_data(self) -> None:
        self.download_raw()
        target = self.processed_dir
        if (target / "meta.json").is_file():
            log.info("processed data: %s (cached)", target)
            return
        raw = self.raw_splits()
        self.write_processed(raw, target)

    def raw_splits(self) -> dict[str, LabelledTexts]:
        """Every split read, empty splits refused, missing val/test carved out of train."""
        hp = self.hparams
        if self.only_test:  # (evaluate_only: the test file alone)
            test = self.read_split("test")
            if len(test) == 0:
                raise DataError(f"{self.split_path('test')}: the test split has no examples")
            return {"test": test}
        raw = {split: self.read_split(split) for split in SPLITS}
        train = raw["train"]
        if train is None or len(train) == 0:
            raise DataError(f"{self.split_path('train') or self.name}: the train split has no examples")
        order = list(range(len(train)))
        random.Random(hp.split_seed).shuffle(order)
        candidates = order
        if hp.holdout == "sentences" and (raw["val"] is None or raw["test"] is None):
            check_phrase_level(train)
            maximal = set(maximal_examples(train.texts))
            candidates = [i for i in order if i in maximal]
        carved: dict[str, list[int]] = {}
        total = len(candidates)  # a fraction is of all of them, for val and test alike
        of_remaining = self.fixed is not None and self.fixed.get("holdout_shares") == "of_remaining"
        for split, size in (("val", hp.val_size), ("test", hp.test_size)):
            if raw[split] is not None:
                continue
            pool = len(candidates)
            count = round(size * (pool if of_remaining else total)) if 0 < size < 1 else int(size)
            if count < 1 or count >= pool:
                what = "training examples" if hp.holdout == "random" else "sentences (data.holdout=sentences)"
                raise ConfigError(
                    f"data.{split}_size={size} holds out {count} of {pool} {what}; "
                    f"expected at least 1 and fewer than {pool} (or set data.{split}_file)"
                )
            carved[split], candidates = candidates[:count], candidates[count:]
        held = {i for indices in carved.values() for i in indices}
        keep = [i for i in order if i not in held]
        if carved and hp.holdout == "sentences":
            spans = set().union(*(word_spans(train.texts[i]) for i in held))
            before = len(keep)
            keep = [i for i in keep if " ".join(train.texts[i].split()) not in spans]
            log.info(
                "held out %s sentences; dropped %d training examples that are phrases of them",
                {split: len(indices) for split, indices in carved.items()},
                before - len(keep),
            )
        for split, indices in carved.items():
            raw[split] = train.subset(sorted(indices))
        if carved:
            raw["train"] = train.subset(sorted(keep))
        for split in ("val", "test"):
            if len(raw[split]) == 0:
                raise DataError(f"{self.split_path(split) or self.name}: the {split} split has no examples")
        return raw

    def class_list(self, raw: dict[str, LabelledTexts]) -> list[str]:
        """The classes in class-id order: a checkpoint's, ``data.classes``, or the labels of the
        train file, val/test carved out of it included (a rare class whose every example was held
        out is still a class, with a warning; it was refused as not found in train)."""
        if self.fixed is not None and "classes" in self.fixed:
            return list(self.fixed["classes"])
        if self.classes is not None:
            return self.classes
        carved = [split for split in ("val", "test") if self.split_path(split) is None]
        labels: dict[str, str] = {}  # one class a label_key (1 and 1.0), named as first sorted
        for label in sorted(
            set(raw["train"].labels).union(*(raw[split].labels for split in carved)), key=_numeric_order
        ):
            labels.setdefault(label_key(label), label)
        trained = {label_key(label) for label in raw["train"].labels}
        missing = [label for key, label in labels.items() if key not in trained]
        if missing:
            log.warning(
                "%s: every example of class %s was held out for %s (data.split_seed=%s): the model "
                "never trains on it; use a larger train file or set data.val_file/data.test_file",
                self.split_path("train"), ", ".join(map(repr, missing)), " and ".join(carved), self.hparams.split_seed,
            )  # fmt: skip
        return sorted(labels.values(), key=_numeric_order)

    def write_processed(self, raw: dict[str, LabelledTexts], target: Path) -> None:
        classes = self.class_list(raw)
        class_id = {label_key(label): i for i, label in enumerate(classes)}
        label_ids: dict[str, list[int]] = {}
        for split, examples in raw.items():
            ids = []
            for label, origin in zip(examples.labels, examples.origins):
                if label_key(label) not in class_id:
                    expected = (
                        "the checkpoint's classes"
                        if self.fixed is not None and "classes" in self.fixed
                        else "data.classes"
                        if self.classes is not None
                        else "the labels found in train"
                    )
                    raise DataError(f"{origin}: label {label!r} is not one of {classes} ({expected})")
                ids.append(class_id[label_key(label)])
            label_ids[split] = ids
        if self.fixed is not None:
            tokenizer = tokenizer_from_json(self.fixed["tokenizer"])
        else:
            log.info("training a %s tokenizer on %d texts", self.spec.kind, len(raw["train"]))
            tokenizer = train_tokenizer(raw["train"].texts, self.spec)
        splits, truncated = {}, {}
        for split, examples in raw.items():
            ids, truncated[split] = encode_counting(tokenizer, examples.texts)
            empty = [origin for seq, origin in zip(ids, examples.origins) if not seq]
            if empty:  # only without [CLS] (tokenizer.wrap=none): a model cannot read no tokens
                raise DataError(
                    f"{empty[0]}: the text encodes to no tokens ({len(empty)} such in {split}); "
                    "remove such texts, or keep data.tokenizer.wrap=cls"
                )
            splits[split] = TokenizedTexts.from_lists(ids, label_ids[split], examples.texts).state()
        in_train = also_in_train(raw) if "train" in raw else {}
        if any(in_train.values()):
            log.warning(
                "%s: texts of the evaluation splits that are also training texts (the same text, "
                "spacing aside): %s; their scores partly measure recall of training examples "
                "(counted in meta.json as also_in_train): remove the duplicates from the files to "
                "measure generalisation alone",
                self.name, {split: f"{count} of {len(raw[split])}" for split, count in in_train.items() if count},
            )  # fmt: skip
        meta = {
            "classes": classes,
            "vocab_size": tokenizer.get_vocab_size(),
            "tokenizer": self.spec.to_dict(),
            "sizes": {split: len(examples) for split, examples in raw.items()},
            "also_in_train": in_train,
            # texts cut to data.tokenizer.max_length (the checkpoint's tokenizer's, when it has one)
            "truncated": truncated,
            "class_counts": {
                split: [ids.count(c) for c in range(len(classes))] for split, ids in label_ids.items()
            },
            "sources": self.source_fingerprint(),
        }
        if any(truncated.values()):
            log.warning(
                "%s: texts longer than max_length (%s tokens) were truncated: %s",
                self.name, tokenizer.truncation["max_length"] if tokenizer.truncation else "?",
                {split: f"{count} of {len(raw[split])}" for split, count in truncated.items()},
            )  # fmt: skip

        def write(tmp: Path) -> None:
            tokenizer.save(str(tmp / "tokenizer.json"))
            torch.save(splits, tmp / "splits.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

        publish(target, write)
        log.info("processed data written to %s (%s)", target, meta["sizes"])

    # ------------------------------------------------------------------ loading
    def dataset_from_state(self, state: dict[str, Any]) -> Dataset:
        return TokenizedTexts(**state)

    def tokenizer(self):
        return load_tokenizer(self.processed_dir / "tokenizer.json")

    def task_kwargs(self) -> dict[str, Any]:
        """What the classification task takes from the data (never copied into configs by hand)."""
        meta = self.load_meta()
        return {
            "vocab_size": meta["vocab_size"],
            "num_classes": len(meta["classes"]),
            "class_names": self.class_names(),
            "pad_id": PAD_ID,
            "cls_id": CLS_ID if meta["tokenizer"]["wrap"] == "cls" else None,
            "unk_id": UNK_ID,
            "special_ids": {"none": [], "cls": [CLS_ID], "bos_eos": [BOS_ID, EOS_ID]}[
                meta["tokenizer"]["wrap"]
            ],
        }

    def artifacts(self) -> dict[str, Any]:
        """What a trained model depends on beyond the config: saved in its checkpoints."""
        meta = self.load_meta()
        tokenizer = (self.processed_dir / "tokenizer.json").read_text(encoding="utf-8")
        return {
            "tokenizer": tokenizer,
            "classes": meta["classes"],
            "class_names": self.class_names(),
            "holdout_shares": "of_all",  # how a fractional val/test size was carved (cache version 3)
        }

    def class_names(self) -> list[str]:
        """Display names of the classes, in class-id order: ``data.label_names`` (display only, not
        part of the cache key), a checkpoint's, or the labels themselves."""
        classes = self.load_meta()["classes"]
        if self.fixed is not None and "class_names" in self.fixed:
            return list(self.fixed["class_names"])
        names = self.hparams.label_names
        if names is None:
            return list(classes)
        if len(names) != len(classes):
            raise ConfigError(
                f"data.label_names has {len(names)} names ({list(names)}) for the {len(classes)} "
                f"classes {classes} found in the training data; give one name per class, in this order"
            )
        return [str(name) for name in names]

    def use_artifacts(self, artifacts: dict[str, Any]) -> None:
        """Encode with a checkpoint's tokenizer and classes (``eval.py``), whatever the files now hold."""
        self.fixed = {key: artifacts[key] for key in ("tokenizer", "classes", "class_names")}
        # a checkpoint from before cache version 3 carved a fractional test_size from what val
        # left: its test split is carved as it was, or it would hold some of its training texts
        self.fixed["holdout_shares"] = artifacts.get("holdout_shares", "of_remaining")
        self.meta = None
        self.datasets = {}
        self._processed_dir = None  # another cache entry, or the config's where it holds these

    def use_tokenizers(self, artifacts: dict[str, Any]) -> None:
        """Encode with a checkpoint's tokenizer alone (``init_from``); the classes, and the held-out
        splits, are this data's own."""
        self.use_artifacts(artifacts)
        self.fixed = {"tokenizer": self.fixed["tokenizer"], "holdout_shares": "of_all"}

    def holds_fixed(self, entry: Path) -> bool:
        fixed = self.fixed
        saved = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        return (
            fixed["holdout_shares"] == "of_all"  # how this cache version carves
            and saved["classes"] == fixed.get("classes", saved["classes"])
            and (entry / "tokenizer.json").read_text(encoding="utf-8") == fixed["tokenizer"]
        )

    def texts(self, split: str) -> list[str]:
        self.setup()
        return self.datasets[split].texts


class SyntheticSentimentDataModule(TextClassificationDataModule):
    """Template sentences with sentiment words: negative / neutral / positive, generated in memory.

    ``not`` before an adjective flips its polarity (neutral stays neutral), so word order
    matters a little; a model that learns the words and the negation scores well above 90%.
    """

    POSITIVE = ("good", "great", "wonderful", "charming", "brilliant", "moving", "funny", "delightful")
    NEGATIVE = ("bad", "awful", "boring", "dull", "terrible", "clumsy", "tedious", "painful")
    NEUTRAL = ("long", "french", "recent", "animated", "quiet", "black-and-white", "average", "ordinary")
    SUBJECTS = (
        "the film",
        "this movie",
        "the story",
        "the cast",
        "the ending",
        "the script",
        "it",
        "the plot",
    )
    VERBS = ("is", "was", "seems", "feels")
    ADVERBS = ("", "", "really", "very", "quite", "rather")
    FILLERS = ("", "", "overall", "i think", "to be honest", "in the end")

    def __init__(
        self,
        num_train: int = 3000,
        num_val: int = 300,
        num_test: int = 600,
        negation_rate: float = 0.2,
        generator_seed: int = 1234,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("label_names", ["negative", "neutral", "positive"])
        generated_in_memory(
            type(self).__name__, kwargs,
            data_dir=None, val_file=None, test_file=None, classes=["negative", "neutral", "positive"],
        )  # fmt: skip
        super().__init__(**kwargs)
        self.save_hyperparameters(logger=False)
        self._absolute_paths()

    @property
    def name(self) -> str:
        return "synthetic_sentiment"

    def split_path(self, split: str) -> Path | None:
        return None

    def source_fingerprint(self) -> list[Any]:
        hp = self.hparams
        return [hp.num_train, hp.num_val, hp.num_test, hp.negation_rate, hp.generator_seed]

    def download_raw(self) -> None:
        pass

    def sentence(self, rng: random.Random) -> tuple[str, str]:
        polarity = rng.choice(["negative", "neutral", "positive"])
        adjective = rng.choice(
            {"negative": self.NEGATIVE, "neutral": self.NEUTRAL, "positive": self.POSITIVE}[polarity]
        )
        negated = polarity != "neutral" and rng.random() < self.hparams.negation_rate
        label = {"negative": "positive", "positive": "negative"}[polarity] if negated else polarity
        words = [rng.choice(self.FILLERS), rng.choice(self.SUBJECTS), rng.choice(self.VERBS)]
        words += ["not" if negated else "", rng.choice(self.ADVERBS), adjective]
        return " ".join(w for w in words if w), label

    def raw_splits(self) -> dict[str, LabelledTexts]:
        hp = self.hparams
        rng = random.Random(hp.generator_seed)
        raw = {}
        for split, count in (("train", hp.num_train), ("val", hp.num_val), ("test", hp.num_test)):
            examples = LabelledTexts()
            for i in range(count):
                text, label = self.sentence(rng)
                examples.add(text, label, f"synthetic {split} example {i}")
            if not len(examples):
                raise ConfigError(f"data.num_{split}={count}: the {split} split has no examples")
            raw[split] = examples
        return raw


__all__ = ["SyntheticSentimentDataModule", "TextClassificationDataModule", "TokenizedTexts"]
