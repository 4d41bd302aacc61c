"""Tokenizers trained on a training split with the ``tokenizers`` library, saved and reloaded.

Four kinds, chosen by ``data.tokenizer.kind``:

- ``word``: whole words and punctuation (BERT pre-tokenization), the ``vocab_size`` most
  frequent seen at least ``min_frequency`` times, the rest ``[UNK]`` (``min_frequency`` applies to
  every kind but ``unigram``);
- ``wordpiece``: BERT's subwords (``##`` continuations);
- ``bpe``: byte-level BPE (GPT-2 style): no unknown tokens, and decoding restores the text exactly;
- ``unigram``: the unigram language model of SentencePiece (Kudo 2018) over ``▁``-marked words;
  decoding restores the (NFC-normalised) text.

Special tokens have fixed ids, the same for every kind: ``[PAD]=0, [UNK]=1, [CLS]=2, [BOS]=3,
[EOS]=4``. The post-processor adds ``[CLS]`` in front (classification, for first-token pooling)
or ``[BOS] ... [EOS]`` (translation targets) as asked, and truncates to ``max_length`` tokens
including them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from seqlab.errors import ConfigError

PAD, UNK, CLS, BOS, EOS = "[PAD]", "[UNK]", "[CLS]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, CLS, BOS, EOS]
PAD_ID, UNK_ID, CLS_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
KINDS = ("word", "wordpiece", "bpe", "unigram")
#: the tokens a byte-level BPE starts from, before any merge
BYTE_ALPHABET = 256
WRAPS = ("none", "cls", "bos_eos")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerSpec:
    """What ``data.tokenizer`` configures; part of the processed-data cache key."""

    kind: str = "word"
    vocab_size: int = 30000
    min_frequency: int = 1
    #: ``word`` and ``wordpiece`` also strip accents when they lowercase (BERT's uncased
    #: normaliser: "Résumé über" reads as "resume uber"); ``bpe`` and ``unigram`` only lowercase
    lowercase: bool = True
    max_length: int | None = 128
    #: ``cls`` prepends [CLS]; ``bos_eos`` wraps in [BOS] ... [EOS]; ``none`` adds nothing
    wrap: str = "cls"

    def __post_init__(self) -> None:
        # a dict's values: the config check does not reach them
        for key, nullable in (("vocab_size", False), ("min_frequency", False), ("max_length", True)):
            value = getattr(self, key)
            if (value is None and nullable) or (isinstance(value, int) and not isinstance(value, bool)):
                continue
            hint = f" (write {int(value)})" if isinstance(value, float) and value.is_integer() else ""
            expected = "an integer or null" if nullable else "an integer"
            raise ConfigError(f"data.tokenizer.{key}={value!r}: expected {expected}{hint}")
        if self.min_frequency < 0:  # the Rust trainer's "can't convert negative int to unsigned"
            raise ConfigError(
                f"data.tokenizer.min_frequency={self.min_frequency}: expected a count >= 0 (how often a "
                "token must occur in the training texts to enter the vocabulary)"
            )
        if not isinstance(self.lowercase, bool):
            raise ConfigError(f"data.tokenizer.lowercase={self.lowercase!r}: expected true or false")
        if self.kind not in KINDS:
            raise ConfigError(f"data.tokenizer.kind={self.kind!r}: expected one of {list(KINDS)}")
        if self.wrap not in WRAPS:
            raise ConfigError(f"data.tokenizer.wrap={self.wrap!r}: expected one of {list(WRAPS)}")
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ConfigError(
                f"data.tokenizer.vocab_size={self.vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens"
            )
        if self.kind == "unigram" and self.min_frequency != 1:  # a warning: kind may be swept
            log.warning(
                "data.tokenizer.min_frequency=%d has no effect with kind=unigram (the unigram model "
                "keeps pieces by likelihood, not by count)",
                self.min_frequency,
            )
        specials = {"none": 0, "cls": 1, "bos_eos": 2}[self.wrap]
        if self.max_length is not None and self.max_length <= specials:
            raise ConfigError(f"data.tokenizer.max_length={self.max_length} leaves no room for text tokens")

    @classmethod
    def from_config(cls, config: dict[str, Any] | TokenizerSpec | None) -> TokenizerSpec:
        if isinstance(config, TokenizerSpec):
            return config
        config = dict(config or {})
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"data.tokenizer has unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _untrained(spec: TokenizerSpec) -> tuple[Tokenizer, Any]:
    if spec.kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), *([normalizers.Lowercase()] if spec.lowercase else [])]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        return tokenizer, trainer
    if spec.kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), *([normalizers.Lowercase()] if spec.lowercase else [])]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        # the special tokens' characters (as normalised: a lowercasing tokenizer never sees their
        # capitals) are pieces, so that a text's "[EOS]" spells out (plain_text)
        trainer = trainers.UnigramTrainer(
            vocab_size=spec.vocab_size,
            special_tokens=SPECIAL_TOKENS,
            unk_token=UNK,
            initial_alphabet=sorted(set(tokenizer.normalizer.normalize_str("".join(SPECIAL_TOKENS)))),
            show_progress=False,
        )
        return tokenizer, trainer
    if spec.kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            show_progress=False,
        )
    else:
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            show_progress=False,
        )
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=spec.lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer, trainer


def _configure(tokenizer: Tokenizer, spec: TokenizerSpec) -> Tokenizer:
    if spec.wrap == "cls":
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A", special_tokens=[(CLS, CLS_ID)]
        )
    elif spec.wrap == "bos_eos":
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
        )
    if spec.max_length is not None:
        tokenizer.enable_truncation(spec.max_length)
    return plain_text(tokenizer)


#: how far below the least likely piece a unigram model's special tokens are put
UNIGRAM_SPECIAL_PENALTY = 1000.0


def plain_text(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer``, reading "[EOS]", "[PAD]" ... in a text as the text they are, not as the
    special tokens (which only the post-processor and the model's batches put in): a corpus line
    holding "[EOS]" taught the decoder to stop mid-sentence, a "[PAD]" in a sentence to translate
    was masked as padding. The added-token matching is turned off (the setting is not saved in the
    JSON, nor kept by pickle or deepcopy: every load sets it, and the data is encoded where it is
    loaded); a unigram model also holds the special tokens as pieces of probability 1 (score 0),
    which its segmentation then prefers: they are given the least likely score of any piece, so
    that a text spells "[EOS]" out of its characters' pieces (``train_tokenizer`` puts them in the
    alphabet). A unigram tokenizer trained before that, without them, still takes such a text
    for the special token (its unknown-character path scores lower still): warned about."""
    import json

    if isinstance(tokenizer.model, models.Unigram):  # (read from its JSON: no accessor for scores)
        state = json.loads(tokenizer.to_str())
        model = state["model"]
        scores = [score for piece, score in model["vocab"] if piece not in SPECIAL_TOKENS]
        floor = min(scores, default=0.0) - UNIGRAM_SPECIAL_PENALTY
        if any(piece in SPECIAL_TOKENS and score > floor for piece, score in model["vocab"]):
            model["vocab"] = [
                [piece, floor if piece in SPECIAL_TOKENS else score] for piece, score in model["vocab"]
            ]
            tokenizer = Tokenizer.from_str(json.dumps(state, ensure_ascii=False))
        pieces = {piece for piece, _ in model["vocab"]}
        normalized = tokenizer.normalizer.normalize_str if tokenizer.normalizer else str
        # those a text can still spell after normalisation (a lowercasing one never meets "[EOS]")
        reachable = [token for token in SPECIAL_TOKENS if normalized(token) == token]
        missing = sorted(set("".join(reachable)) - pieces)
        if missing:
            log.warning(
                "this unigram tokenizer has no pieces for %s (trained before seqlab put them in its "
                "alphabet): a text's literal %s is still encoded as the special token; train it "
                "again to read such texts as text", missing, SPECIAL_TOKENS,
            )  # fmt: skip
    tokenizer.encode_special_tokens = True
    return tokenizer


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec) -> Tokenizer:
    """A tokenizer of ``spec.kind`` trained on ``texts`` (the training split only)."""
    byte_tokens = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if spec.kind == "bpe" and spec.vocab_size <= byte_tokens:  # the trainer made 261 anyway
        # (checked where a tokenizer is trained: a checkpoint's or cache's, trained so before, still loads)
        raise ConfigError(
            f"data.tokenizer.vocab_size={spec.vocab_size} with kind=bpe: the byte alphabet ({BYTE_ALPHABET}) "
            f"and the {len(SPECIAL_TOKENS)} special tokens already take {byte_tokens}, which leaves no "
            f"merges (a text would be read byte by byte); give more than {byte_tokens}, or kind=word, "
            "wordpiece or unigram for a smaller vocabulary"
        )
    tokenizer, trainer = _untrained(spec)
    try:
        tokenizer.train_from_iterator(texts, trainer=trainer)
    except Exception as error:  # the library's words, with the setting that decides it
        if "not large enough" not in str(error):
            raise
        raise ConfigError(
            f"data.tokenizer.vocab_size={spec.vocab_size} is too small for the training text's "
            f"characters and the special tokens ({error}); raise it"
        ) from None
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, f"special token {token} did not get id {token_id}"
    return _configure(tokenizer, spec)


def load_tokenizer(path: Path | str) -> Tokenizer:
    """The tokenizer saved at ``path`` (JSON, as ``Tokenizer.save`` writes it)."""
    return tokenizer_from_json(Path(path).read_text(encoding="utf-8"))


def tokenizer_from_json(text: str) -> Tokenizer:
    """The tokenizer a JSON string holds (a checkpoint's), as ``train_tokenizer`` made it."""
    return plain_text(Tokenizer.from_str(text))


def encode(tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of every text, batched in Rust (the only place text becomes ids).

    ``add_special_tokens=False`` skips the post-processor's [CLS] / [BOS] ... [EOS] (truncation
    to ``max_length`` still applies).
    """
    return encode_counting(tokenizer, texts, add_special_tokens)[0]


def encode_counting(
    tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool = True
) -> tuple[list[list[int]], int]:
    """``encode``, and how many of the texts were cut to the tokenizer's ``max_length``."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    return [encoding.ids for encoding in encodings], sum(bool(encoding.overflowing) for encoding in encodings)


def decode(tokenizer: Tokenizer, ids: list[list[int]]) -> list[str]:
    """Plain text of every id sequence: special tokens dropped, subwords joined (detokenised), on
    one line (a generated line break, byte-level BPE's ``Ċ`` or a U+2028, becomes a space: one
    hypothesis a line in ``test.hyp`` and translate.py's output)."""
    texts = tokenizer.decode_batch(ids, skip_special_tokens=True)
    return [" ".join(part.strip() for part in text.splitlines() if part.strip()) for text in texts]


__all__ = [
    "BOS_ID",
    "CLS_ID",
    "EOS_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "TokenizerSpec",
    "decode",
    "encode",
    "encode_counting",
    "load_tokenizer",
    "plain_text",
    "tokenizer_from_json",
    "train_tokenizer",
]
