"""Translation: parallel data and its errors, incremental decoding, greedy and beam search, BLEU, translate.py."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from seqlab.backbones.base import Backbone
from seqlab.data.tokenization import BOS_ID, EOS_ID, PAD_ID, TokenizerSpec, decode, encode, train_tokenizer
from seqlab.data.translation import TranslationDataModule, read_parallel
from seqlab.errors import ConfigError, DataError
from seqlab.tasks.generation import beam_search, greedy_search
from seqlab.tasks.translation import TranslationTask, corpus_scores
from tests.conftest import ROOT, run_script

GERMAN = [
    "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
    "Zwei junge, weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "Ein Boston Terrier läuft über saftig-grünes Gras vor einem weißen Zaun.",
    "Mädchen   mit  „Anführungszeichen“ und Ümlauten: Äpfel, Öl, Straße!",
]

BACKBONES = {
    "rnn": {"_target_": "seqlab.backbones.rnn.RNNBackbone", "cell": "rnn", "d_model": 16, "num_layers": 2},
    "lstm": {
        "_target_": "seqlab.backbones.rnn.RNNBackbone",
        "cell": "lstm",
        "d_model": 16,
        "bidirectional": True,
    },
    "gru": {
        "_target_": "seqlab.backbones.rnn.RNNBackbone",
        "cell": "gru",
        "d_model": 16,
        "attention": "bahdanau",
    },
    "transformer": {
        "_target_": "seqlab.backbones.transformer.TransformerBackbone",
        "d_model": 16,
        "nhead": 2,
    },
    "mingru": {
        "_target_": "seqlab.backbones.minrnn.MinRNNBackbone",
        "cell": "mingru",
        "d_model": 16,
        "nhead": 2,
        "dim_feedforward": 32,
    },
}


# ---------------------------------------------------------------- tokenizers and files
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_subword_detokenisation_gives_back_the_text(kind: str) -> None:
    spec = TokenizerSpec(kind=kind, vocab_size=400, lowercase=False, max_length=None, wrap="bos_eos")
    tokenizer = train_tokenizer(GERMAN * 3, spec)
    ids = encode(tokenizer, GERMAN)
    assert all(seq[0] == BOS_ID and seq[-1] == EOS_ID for seq in ids)
    back = decode(tokenizer, ids)
    assert back == GERMAN


@pytest.mark.parametrize("kind", ["bpe", "unigram", "word"])
def test_special_token_strings_in_a_text_are_text(tmp_path: Path, kind: str) -> None:
    """The tokenizers library matched "[EOS]", "[PAD]" ... inside a text: a corpus line holding
    "[EOS]" put the control token in the target (the decoder learned to stop there), a "[PAD]" in a
    sentence to translate was id 0, padding. As trained, as saved and loaded (the setting is not in
    the JSON), and as a checkpoint's JSON string."""
    from seqlab.data.tokenization import SPECIAL_TOKENS, load_tokenizer, tokenizer_from_json

    spec = TokenizerSpec(kind=kind, vocab_size=400, lowercase=False, max_length=None, wrap="bos_eos")
    trained = train_tokenizer(GERMAN * 3 + ["the dog runs fast"], spec)
    trained.save(str(tmp_path / "tok.json"))
    text = "the dog [EOS] runs [PAD] fast [BOS] [UNK] [CLS]"
    for tokenizer in (trained, load_tokenizer(tmp_path / "tok.json"), tokenizer_from_json(trained.to_str())):
        (ids,) = encode(tokenizer, [text])
        specials = [i for i in ids if i < len(SPECIAL_TOKENS) and i != 1]  # [UNK] (1): unknown pieces
        assert specials == [BOS_ID, EOS_ID], ids  # only the post-processor's
    if kind != "word":  # subwords spell the brackets out: the text comes back whole
        assert decode(trained, encode(trained, [text])) == [text]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def parallel_files(root: Path, pairs: dict[str, list[tuple[str, str]]]) -> Path:
    for prefix, rows in pairs.items():
        write(root / f"{prefix}.en", "".join(f"{en}\n" for en, _ in rows))
        write(root / f"{prefix}.de", "".join(f"{de}\n" for _, de in rows))
    return root


PAIRS = [("A man rides a bike.", "Ein Mann fährt Fahrrad."), ("Two dogs play.", "Zwei Hunde spielen.")]


def test_line_counts_must_match_and_empty_pairs_are_dropped_and_counted(tmp_path: Path) -> None:
    write(tmp_path / "a.en", "one\ntwo\nthree\n")
    write(tmp_path / "a.de", "eins\nzwei\n")
    with pytest.raises(DataError, match=r"a.en has 3 lines but .*a.de has 2: parallel files must be aligned"):
        read_parallel(tmp_path / "a.en", tmp_path / "a.de")
    write(tmp_path / "b.en", "one\n\nthree\r\nfour\n")
    write(tmp_path / "b.de", "eins\nzwei\ndrei\r\n \n")
    pairs, empty = read_parallel(tmp_path / "b.en", tmp_path / "b.de")
    assert (pairs.sources, pairs.targets, empty) == (["one", "three"], ["eins", "drei"], 2)
    write(tmp_path / "c.en", b"fine\nbad \xff byte\n")
    write(tmp_path / "c.de", "gut\nschlecht\n")
    with pytest.raises(DataError, match=r"c.en, line 2: bytes b'\\xff' are not UTF-8"):
        read_parallel(tmp_path / "c.en", tmp_path / "c.de")


def translation_dm(root: Path, cache: Path, **kwargs) -> TranslationDataModule:
    settings = {
        "data_dir": str(root),
        "test_prefix": "test",
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "batch_size": 4,
        "cache_dir": str(cache),
    }
    return TranslationDataModule(**{**settings, **kwargs})


def test_evaluation_reads_and_encodes_the_test_files_alone(tmp_path: Path) -> None:
    """eval.py (a checkpoint's tokenizers) needs the test split alone: a run directory moved with
    its test files only was refused for want of train.en, and a large corpus's training side was
    read and encoded to be left unused. The training run's own entry, where it is, is read as is."""
    root = parallel_files(tmp_path / "raw", {"train": PAIRS * 10, "val": PAIRS, "test": PAIRS[::-1]})
    trained = translation_dm(root, tmp_path / "cache")
    trained.setup()
    artifacts = trained.artifacts()

    again = translation_dm(root, tmp_path / "cache")
    again.use_artifacts(artifacts)
    again.evaluate_only()
    assert again.processed_dir == trained.processed_dir  # (the training run's entry, as before)

    for name in ("train.en", "train.de", "val.en", "val.de"):
        (root / name).unlink()
    alone = translation_dm(root, tmp_path / "elsewhere")
    alone.use_artifacts(artifacts)
    alone.evaluate_only()
    alone.setup()
    assert set(alone.datasets) == {"test"} and alone.references("test") == trained.references("test")
    mine, theirs = alone.datasets["test"].state(), trained.datasets["test"].state()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert (
            torch.equal(mine[key], theirs[key]) if torch.is_tensor(mine[key]) else mine[key] == theirs[key]
        ), key
    without = translation_dm(root, tmp_path / "other")  # a training run needs them, and says so
    with pytest.raises(DataError, match=r"train.en"):
        without.prepare_data()


def test_long_pairs_are_filtered_in_train_and_truncated_in_evaluation(tmp_path: Path) -> None:
    long_en = " ".join(["word"] * 40)
    root = parallel_files(
        tmp_path / "raw",
        {
            "train": PAIRS * 10 + [(long_en, "Lang."), ("", "leer"), ("Short.", " ".join(["Wort"] * 30))],
            "val": [*PAIRS, (long_en, "Lang.")],
            "test": PAIRS,
        },
    )
    dm = translation_dm(root, tmp_path / "cache", max_length=24)
    dm.setup()
    meta = json.loads((dm.processed_dir / "meta.json").read_text())
    assert meta["sizes"] == {"train": 20, "val": 3, "test": 2}
    assert meta["dropped"]["train"] == {"empty": 1, "too_long_or_ratio": 2}
    assert meta["dropped"]["val"] == {"empty_kept": 0, "truncated_sources": 1}
    val = dm.datasets["val"]
    assert int(val.source.lengths.max()) == 24 and dm.references("val")[2] == "Lang."
    batch = val.__getitems__([2])
    assert batch["src_ids"][0, -1] == EOS_ID and batch["tgt_ids"][0, 0] == BOS_ID
    # the direction is a setting; the same files give German->English
    reverse = translation_dm(root, tmp_path / "cache", source_lang="de", target_lang="en", max_length=24)
    assert reverse.sources("test") == [de for _, de in PAIRS] and reverse.references("test") == [
        en for en, _ in PAIRS
    ]


def test_evaluation_splits_keep_pairs_with_an_empty_side(tmp_path: Path) -> None:
    """A blank line in test.<src> or test.<tgt> dropped its pair: test.hyp then had fewer lines
    than the test files (``sacrebleu test.de -i test.hyp`` failed or compared misaligned lines),
    and BLEU left out sentences the files' score counts. Train still drops them."""
    rows = [PAIRS[0], ("", "Leer."), PAIRS[1], ("Nothing.", "")]
    root = parallel_files(tmp_path / "raw", {"train": [*PAIRS * 5, ("", "leer")], "val": rows, "test": rows})
    dm = translation_dm(root, tmp_path / "cache")
    dm.setup()
    meta = json.loads((dm.processed_dir / "meta.json").read_text())
    assert meta["sizes"] == {"train": 10, "val": 4, "test": 4}
    assert meta["dropped"]["train"]["empty"] == 1 and meta["dropped"]["test"]["empty_kept"] == 2
    assert dm.sources("test") == [r[0] for r in rows] and dm.references("test") == [r[1] for r in rows]
    batch = dm.datasets["test"].__getitems__([1, 3])
    assert batch["src_ids"][0, 0] == EOS_ID and not batch["src_mask"][0, 0]  # the empty source: [EOS]
    assert batch["tgt_ids"][1, :2].tolist() == [BOS_ID, EOS_ID]  # the empty reference


def test_translated_sources_are_masked_by_their_lengths_and_cut_ones_reported(tmp_path: Path, caplog) -> None:
    """translate.py masked ``src == PAD_ID``: a source holding id 0 lost that token as padding
    (an RNN's packed length came out short), unlike training, whose masks come from lengths.
    Sources longer than data.max_length were cut without a word."""
    from types import SimpleNamespace

    from seqlab.translate import translate_texts

    seen = []

    def generate(src, mask, beam_size):
        seen.append((src.clone(), mask.clone()))
        return [[5] for _ in range(len(src))]

    task = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]), generate=generate)
    datamodule = SimpleNamespace(
        encode_sources=lambda texts: [[7, PAD_ID, 8, EOS_ID] if t == "a" else [9, EOS_ID] for t in texts],
        detokenize=lambda ids: ["x" for _ in ids],
    )
    assert translate_texts(task, datamodule, ["a", "", "b"]) == ["x", "", "x"]
    ((_, mask),) = seen
    assert mask.tolist() == [[False, False, True, True], [False, False, False, False]]
    root = parallel_files(tmp_path / "raw", {"train": PAIRS * 5, "val": PAIRS, "test": PAIRS})
    dm = translation_dm(root, tmp_path / "cache", max_length=12)
    dm.setup()
    with caplog.at_level("WARNING", logger="seqlab.data.translation"):
        ids = dm.encode_sources(["Two dogs play.", " ".join(["A man rides a bike."] * 3)])
    assert [len(seq) <= 12 and seq[-1] == EOS_ID for seq in ids] == [True, True]
    assert "1 of 2 sentences are longer than data.max_length=12 tokens" in caplog.text


class EncoderOnly(Backbone):
    """A user's backbone for forecasting and classification: no ``decode``."""

    def __init__(self, d_model: int = 8, with_decoder: bool = False) -> None:
        super().__init__()
        self.d_model = d_model
        self.mix = torch.nn.Linear(d_model, d_model)

    def encode(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mix(x)


def test_bad_splits_and_settings_are_named(tmp_path: Path) -> None:
    root = parallel_files(tmp_path / "raw", {"train": PAIRS, "val": PAIRS})
    # the setting that names the files too (a corpus's dev.en, newstest2014.en)
    with pytest.raises(DataError, match=r"data file not found: .*test.en; .*, or name yours with data.test_prefix "
                       r"\(now 'test': test.en and test.de, e.g. data.test_prefix=dev\)"):  # fmt: skip
        translation_dm(root, tmp_path / "cache").prepare_data()
    parallel_files(root, {"test": [("", "")]})
    with pytest.raises(DataError, match=r"test.en: the test split has no sentence pairs"):
        translation_dm(root, tmp_path / "cache").prepare_data()
    with pytest.raises(ConfigError, match=r"data.tokenizer.max_length=64: set data.max_length instead"):
        translation_dm(root, tmp_path / "cache", tokenizer={"kind": "bpe", "max_length": 64})
    with pytest.raises(ConfigError, match=r"data.tokenizer.wrap='cls': translation wraps targets"):
        translation_dm(root, tmp_path / "cache", tokenizer={"kind": "bpe", "wrap": "cls"})
    with pytest.raises(ConfigError, match=r"data.source_lang and data.target_lang are both 'en'"):
        translation_dm(root, tmp_path / "cache", target_lang="en")
    with pytest.raises(ConfigError, match=r"task.share_embeddings=true needs one vocabulary"):
        TranslationTask(BACKBONES["gru"], src_vocab_size=10, tgt_vocab_size=12, shared_vocab=False)
    # a backbone without decode: refused when the task is built (a bare NotImplementedError came at
    # the sanity check, after the tokenizers were trained)
    with pytest.raises(ConfigError, match=r"model._target_='tests.test_translation.EncoderOnly': translation decodes "
                       r"with the backbone's decode, which EncoderOnly does not implement"):  # fmt: skip
        TranslationTask(
            {"_target_": f"{__name__}.EncoderOnly"}, src_vocab_size=10, tgt_vocab_size=10, shared_vocab=True
        )
    with pytest.raises(NotImplementedError, match=r"EncoderOnly.decode: translation decodes with it"):
        EncoderOnly().decode(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))
    with pytest.raises(ConfigError, match=r"task.val_bleu_samples=-1: expected 0 \(all\) or a count"):
        TranslationTask(
            BACKBONES["gru"], src_vocab_size=10, tgt_vocab_size=10, shared_vocab=True, val_bleu_samples=-1
        )
    with pytest.raises(ConfigError, match=r"data.tokenizer.kind=wordpiece: its decoder rewrites the text"):
        translation_dm(root, tmp_path / "cache", tokenizer={"kind": "wordpiece"}).check_trainable()


def test_word_tokens_that_lose_the_references_spacing_are_reported(tmp_path: Path, caplog) -> None:
    """Word-level decoding spaces out punctuation inside words ('saftig - grünes'): BLEU then
    scores hypotheses the model cannot write as the references are written."""
    pairs = [(text, text) for text in GERMAN]
    root = parallel_files(tmp_path / "raw", {"train": pairs, "val": pairs, "test": pairs})
    word = {"kind": "word", "vocab_size": 200}
    with caplog.at_level("WARNING", logger="seqlab.data.translation"):
        translation_dm(root, tmp_path / "cache", tokenizer=word).prepare_data()
    assert re.search(
        r"kind=word: 2 of 4 validation references do not come back .*saftig - grünes", caplog.text
    )
    caplog.clear()  # plain words come back as sacreBLEU reads them (its 13a splits '.' and ',' too)
    plain = parallel_files(tmp_path / "plain", {split: PAIRS for split in ("train", "val", "test")})
    with caplog.at_level("WARNING", logger="seqlab.data.translation"):
        translation_dm(plain, tmp_path / "cache", tokenizer=word).prepare_data()
    assert "do not come back" not in caplog.text


def test_tokenizers_are_trained_once_and_separate_vocabularies_work(tmp_path: Path, monkeypatch) -> None:
    from seqlab.data import translation

    root = parallel_files(tmp_path / "raw", {"train": PAIRS * 5, "val": PAIRS, "test": PAIRS})
    first = translation_dm(root, tmp_path / "cache", shared_vocab=False)
    kwargs = first.task_kwargs()
    assert kwargs["shared_vocab"] is False and kwargs["src_vocab_size"] != kwargs["tgt_vocab_size"]

    def no_training(*args, **kwargs):
        raise AssertionError("a tokenizer was trained again")

    monkeypatch.setattr(translation, "train_tokenizer", no_training)
    again = translation_dm(root, tmp_path / "cache", shared_vocab=False)
    again.setup()
    assert again.processed_dir == first.processed_dir
    assert again.detokenize(again.encode_sources(["Two dogs play."])) != []
    # a checkpoint of these tokenizers (a resumed run, eval.py) reads this entry, encoding nothing
    # again; other tokenizers (a retrained one, its entry gone) are encoded into their own entry
    saved = first.artifacts()
    other = Tokenizer.from_str(saved["target_tokenizer"])
    other.add_tokens(["Hundewiese"])
    for artifacts, same in ((saved, True), ({**saved, "target_tokenizer": other.to_str(pretty=True)}, False)):
        resumed = translation_dm(root, tmp_path / "cache", shared_vocab=False)
        resumed.use_artifacts(artifacts)
        resumed.prepare_data()
        assert (resumed.processed_dir == first.processed_dir) is same
        assert resumed.artifacts() == artifacts


# ---------------------------------------------------------------- decoding
def tiny_task(name: str, vocab: int = 23) -> TranslationTask:
    torch.manual_seed(0)
    task = TranslationTask(BACKBONES[name], src_vocab_size=vocab, tgt_vocab_size=vocab, shared_vocab=True)
    return task.eval()


def reversal_batch(lengths: list[int], seed: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Sentences of these lengths and their reversals, padded to ``width`` target tokens."""
    generator = torch.Generator().manual_seed(seed)
    width = width if width is not None else max(lengths) + 2
    src, tgt = torch.full((len(lengths), width - 1), PAD_ID), torch.full((len(lengths), width), PAD_ID)
    for row, length in enumerate(lengths):
        words = torch.randint(5, 23, (length,), generator=generator)
        src[row, : length + 1] = torch.cat([words.flip(0), torch.tensor([EOS_ID])])
        tgt[row, : length + 2] = torch.cat([torch.tensor([BOS_ID]), words, torch.tensor([EOS_ID])])
    return {"src_ids": src, "src_mask": src == PAD_ID, "tgt_ids": tgt}


@pytest.mark.parametrize(("name", "clip"), [("gru", None), ("transformer", None), ("transformer", 0.05)])
def test_accumulated_micro_batches_weigh_every_target_token_alike(
    tmp_path: Path, name: str, clip: float | None
) -> None:
    """``trainer.accumulate_grad_batches=2`` over a micro-batch of 6 target tokens and one of 42
    takes the step one batch of both takes (a mean over its 48 tokens; clipped after): Lightning
    averaged the two micro-batches' means, weighting a short sentence's token 7 times more."""
    import lightning as L
    from torch.utils.data import DataLoader

    short, long = reversal_batch([2, 2], seed=0), reversal_batch([20, 20], seed=1)
    both = {key: torch.cat([reversal_batch([2, 2], 0, width=22)[key], long[key]]) for key in long}

    def step(batches: list[dict[str, torch.Tensor]], accumulate: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        task = TranslationTask(
            {**BACKBONES[name], "dropout": 0.0}, src_vocab_size=23, tgt_vocab_size=23, shared_vocab=True,
            embed_dropout=0.0, optimizer={"_target_": "torch.optim.SGD", "lr": 1.0}, scheduler=None,
        )  # fmt: skip
        trainer = L.Trainer(
            default_root_dir=tmp_path, max_steps=1, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
            limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", devices=1,
        )  # fmt: skip
        trainer.fit(task, train_dataloaders=DataLoader(batches, batch_size=None))
        return {key: value.clone() for key, value in task.state_dict().items()}

    one, accumulated = step([both], accumulate=1), step([short, long], accumulate=2)
    assert one.keys() == accumulated.keys()
    for key in one:
        torch.testing.assert_close(accumulated[key], one[key], atol=1e-6, rtol=1e-5, msg=key)


def source_batch(vocab: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    src = torch.randint(5, vocab, (3, 7))
    src[1, 5:] = PAD_ID
    src[2, 3:] = PAD_ID
    return src, src == PAD_ID


@pytest.mark.parametrize("name", list(BACKBONES))
def test_step_by_step_decoding_gives_the_teacher_forced_logits(name: str) -> None:
    task = tiny_task(name)
    src, src_mask = source_batch()
    tgt = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(5, 23, (3, 6))], dim=1)
    with torch.no_grad():
        full = task(src, src_mask, tgt)
        memory = task.encode(src, src_mask)
        state, steps = None, []
        for t in range(tgt.shape[1]):
            logits, state = task.decode(tgt[:, t : t + 1], memory, src_mask, state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_beam_of_one_is_greedy_and_wider_beams_score_at_least_as_well(name: str) -> None:
    task = tiny_task(name)
    src, src_mask = source_batch()
    greedy = task.generate(src, src_mask, beam_size=1)
    assert all(
        len(seq) <= task.hparams.max_len_a * n + task.hparams.max_len_b for seq, n in zip(greedy, [7, 5, 3])
    )
    beam_one = beam_search_with(task, src, src_mask, beam_size=1)
    assert beam_one == greedy
    # an untrained model's greedy output is long; the beam's best is at least as likely per token
    wide = task.generate(src, src_mask, beam_size=4)
    for g, w, row in zip(greedy, wide, range(3)):
        assert normalised_log_prob(task, src[row : row + 1], src_mask[row : row + 1], w) >= (
            normalised_log_prob(task, src[row : row + 1], src_mask[row : row + 1], g) - 1e-4
        )


@pytest.mark.parametrize("beam_size", [1, 3])
def test_task_min_len_reaches_the_search(beam_size: int) -> None:
    """A model whose first choice is always [EOS]: ``task.min_len`` (1 by default) decides whether
    its translations are empty."""
    task = tiny_task("gru")

    def eos_first(module, args, logits: torch.Tensor) -> torch.Tensor:
        return logits + 50.0 * torch.nn.functional.one_hot(torch.tensor(EOS_ID), logits.shape[-1])

    task.output.register_forward_hook(eos_first)
    src, src_mask = source_batch()
    assert all(len(seq) == 1 for seq in task.generate(src, src_mask, beam_size=beam_size))
    task.hparams.min_len = 0
    assert task.generate(src, src_mask, beam_size=beam_size) == [[], [], []]


def beam_search_with(task: TranslationTask, src, src_mask, beam_size: int) -> list[list[int]]:
    """``task.generate``'s beam search forced even for a beam of one (it picks greedy search then)."""
    memory = task.encode(src, src_mask)
    lengths = (~src_mask).sum(1)
    max_lengths = (task.hparams.max_len_a * lengths.float() + task.hparams.max_len_b).long()

    def step(tokens, state):
        logits, state = task.decode(tokens, memory, src_mask, state)
        return logits[:, -1].log_softmax(-1), state

    return beam_search(
        step, task.backbone.reorder_state, 3, beam_size, BOS_ID, EOS_ID, max_lengths, task.banned, "cpu"
    )


def normalised_log_prob(task: TranslationTask, src, src_mask, tokens: list[int]) -> float:
    tgt = torch.tensor([[BOS_ID, *tokens, EOS_ID]])
    with torch.no_grad():
        logits = task(src, src_mask, tgt[:, :-1]).log_softmax(-1)
    return (
        float(logits[0].gather(1, tgt[0, 1:, None]).sum()) / (len(tokens) + 1) ** task.hparams.length_penalty
    )


def test_a_wide_beam_finds_the_exhaustive_optimum() -> None:
    """A position-dependent bigram model over 3 tokens + [EOS], 4 steps: every sequence enumerated."""
    torch.manual_seed(3)
    vocab, steps, banned = 8, 4, [PAD_ID, BOS_ID, 1, 2]  # tokens 5, 6, 7 and [EOS]=4 remain
    table = torch.randn(steps, vocab, vocab).log_softmax(-1)  # table[t, previous token] -> next

    def step(tokens, state):
        t = 0 if state is None else state["t"]
        return table[t, tokens[:, -1]], {"t": t + 1}

    def score(sequence: tuple[int, ...], penalty: float) -> float:
        previous, total = BOS_ID, 0.0
        for t, token in enumerate(sequence):
            total += float(table[t, previous, token])
            previous = token
        return total / len(sequence) ** penalty

    for penalty, min_length in itertools.product((0.0, 1.0), (0, 1, 2)):
        candidates = [
            (*body, EOS_ID)
            for n in range(min_length, steps)
            for body in itertools.product([5, 6, 7], repeat=n)
        ]
        best = max(candidates, key=lambda seq: score(seq, penalty))
        found = beam_search(
            step,
            lambda state, rows: state,
            1,
            27,
            BOS_ID,
            EOS_ID,
            torch.tensor([steps]),
            banned,
            "cpu",
            penalty,
            min_length=min_length,
        )
        assert (*found[0], EOS_ID) == best
        assert math.isfinite(score(best, penalty))
    greedy = greedy_search(step, 1, BOS_ID, EOS_ID, torch.tensor([steps]), banned, "cpu")
    assert len(greedy[0]) <= steps - 1


@pytest.mark.parametrize("beam_size", [1, 4])
def test_an_empty_translation_is_refused_unless_allowed(beam_size: int) -> None:
    """[EOS] is the most probable first token of a model that has not learnt much (or of a source it
    cannot place): fairseq's --min-len 1 refuses it, so no hypothesis is empty unless task.min_len=0
    or the length limit comes first."""
    vocab, banned = 8, [PAD_ID, BOS_ID]
    table = torch.full((vocab, vocab), -3.0)
    table[:, EOS_ID] = 2.0  # [EOS] first, always
    table[BOS_ID, 6] = 1.0  # then the best first word

    def step(tokens, state):
        return table[tokens[:, -1]].log_softmax(-1), state

    def decode(limit: int, **kwargs) -> list[int]:
        if beam_size == 1:
            return greedy_search(step, 1, BOS_ID, EOS_ID, torch.tensor([limit]), banned, "cpu", **kwargs)[0]
        return beam_search(
            step, lambda state, rows: state, 1, beam_size, BOS_ID, EOS_ID, torch.tensor([limit]), banned,
            "cpu", **kwargs,
        )[0]  # fmt: skip

    assert decode(5) == [6]
    assert decode(5, min_length=0) == []
    assert len(decode(5, min_length=3)) == 3
    assert decode(1, min_length=3) == [], "the length limit wins over the minimum"


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_keeps_in_step_with_processes_that_need_more_steps(beam_size: int) -> None:
    """Under sharded parameters every decoder step is a collective: a process whose sentences are
    done keeps stepping (ignoring the results) while another needs more steps, and stops with it;
    its own outputs do not change."""
    torch.manual_seed(0)
    vocab, banned = 8, [PAD_ID, BOS_ID]
    table = torch.randn(vocab, vocab)
    table[5, EOS_ID] = table[6, EOS_ID] = 5.0  # sentences end after two or three tokens
    calls = []

    def step(tokens, state):
        calls.append(tokens.shape[0])
        return table[tokens[:, -1]].log_softmax(-1), state

    def decode(agree=None):
        calls.clear()
        kwargs = {} if agree is None else {"agree": agree}
        if beam_size == 1:
            return greedy_search(step, 2, BOS_ID, EOS_ID, torch.tensor([6, 4]), banned, "cpu", **kwargs)
        return beam_search(
            step, lambda state, rows: state, 2, beam_size, BOS_ID, EOS_ID, torch.tensor([6, 4]), banned, "cpu",
            **kwargs,
        )  # fmt: skip

    alone = decode()
    steps_alone = len(calls)
    assert steps_alone < 6

    agreements = []

    def other_process_needs_nine(value: int) -> int:
        """The maximum with a second process allowed 9 steps and busy for its first 8."""
        agreements.append(value)
        return max(value, 9) if len(agreements) == 1 else max(value, int(len(agreements) <= 8))

    assert decode(other_process_needs_nine) == alone
    assert len(calls) == 8, "as many steps as the slowest process"
    assert agreements[0] == 6 and agreements[1 : steps_alone + 1][-1] == 0  # its own: 6 allowed, done


def test_sacrebleu_scores_detokenised_text_with_its_signature() -> None:
    refs = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
    perfect = corpus_scores(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert "case:mixed" in perfect["bleu_signature"] and "tok:13a" in perfect["bleu_signature"]
    lower = corpus_scores([r.lower() for r in refs], refs)
    assert lower["bleu"] < 100.0  # cased
    # a lowercasing tokenizer's hypotheses are scored lowercased, and the signature says so
    lowercased = corpus_scores([r.lower() for r in refs], refs, lowercase=True)
    assert lowercased["bleu"] == pytest.approx(100.0) and "case:lc" in lowercased["bleu_signature"]
    # Chinese is scored with sacreBLEU's zh tokenizer (13a reads an unsegmented sentence as one word)
    chinese = corpus_scores(["今天天气很好"], ["今天天气不错"], target_lang="zh")
    assert chinese["bleu"] > 0 and "tok:zh" in chinese["bleu_signature"]
    assert corpus_scores(["今天天气很好"], ["今天天气不错"])["bleu"] == 0
    assert "tok:zh" in corpus_scores(["今天"], ["今天"], target_lang="zh-CN")["bleu_signature"]
    # Japanese needs MeCab (not a dependency): named when the run is set up, before training
    with pytest.raises(
        ConfigError, match=r"data.target_lang='ja': sacreBLEU's tokenizer for it is not installed"
    ):
        corpus_scores(["a"], ["a"], target_lang="ja")


def test_a_missing_bleu_tokenizer_is_named_before_the_data_is_read(tmp_path: Path, monkeypatch) -> None:
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.en").write_text("a cat\n", encoding="utf-8")
        (tmp_path / f"{split}.ja").write_text("猫\n", encoding="utf-8")
    data = TranslationDataModule(data_dir=str(tmp_path), target_lang="ja", cache_dir=str(tmp_path / "cache"))

    def read_pairs(split: str):
        raise AssertionError(f"the {split} files were read before sacreBLEU's tokenizer was checked")

    monkeypatch.setattr(data, "read_pairs", read_pairs)
    with pytest.raises(
        ConfigError, match=r"data.target_lang='ja': sacreBLEU's tokenizer for it is not installed"
    ):
        data.prepare_data()
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- training end to end
TRANSLATION_FAST = [
    "data=translation_synthetic",
    "model.d_model=64",
    "task.optimizer.lr=3e-3",
    "task.beam_size=3",
    "trainer.max_epochs=10",
    "trainer.accelerator=cpu",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]


@pytest.mark.parametrize("model", ["gru", "transformer"])
def test_synthetic_reversal_is_learned_to_near_perfect_bleu(make_cfg, tmp_path: Path, model: str) -> None:
    from seqlab.train import train

    cfg = make_cfg(*TRANSLATION_FAST, f"model={model}", f"data.cache_dir={tmp_path / 'cache'}", fast=False)
    metrics, _ = train(cfg)
    assert metrics["test/bleu"] > 90, metrics
    run_dir = Path(cfg.paths.output_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_report"]["bleu_signature"].startswith("nrefs:1|case:mixed")
    hypotheses = (run_dir / "translations" / "test.hyp").read_text().splitlines()
    assert len(hypotheses) == 200
    # beside the hypotheses, the scores with their signatures (what a paper quotes)
    report = summary["test_report"]
    assert (run_dir / "translations" / "test.signature").read_text().splitlines() == [
        f"BLEU {metrics['test/bleu']:.2f} {report['bleu_signature']}",
        f"chrF {metrics['test/chrf']:.2f} {report['chrf_signature']}",
    ]
    table = (run_dir / "tables" / "test_translations.csv").read_text().splitlines()
    assert table[0] == "index,source,reference,hypothesis" and len(table) == 21


def test_batches_by_tokens_learn_the_reversal(make_cfg, tmp_path: Path) -> None:
    """``data.max_tokens`` (fairseq's ``--max-tokens``): training batches of at most that many padded
    tokens, short pairs by the many and long ones by a few, and the model learns as with fixed
    batches (measured: test BLEU 97.3 after 10 epochs)."""
    from seqlab.train import train

    cfg = make_cfg(
        *TRANSLATION_FAST, "model=gru", "data.max_tokens=600", "data.batch_size=256",
        f"data.cache_dir={tmp_path / 'cache'}", fast=False,
    )  # fmt: skip
    metrics, objects = train(cfg)
    assert metrics["test/bleu"] > 90, metrics
    loader = objects["datamodule"].train_dataloader()
    sizes, lengths = [], loader.sampler.lengths
    for batch in loader.sampler:
        assert len(batch) * int(lengths[batch].max()) <= 600
        sizes.append(len(batch))
    assert sum(sizes) == len(lengths) and max(sizes) >= 2 * min(sizes)
    with pytest.raises(ConfigError, match=r"data.max_tokens=16 is less than data.max_length.s 32 tokens"):
        train(make_cfg(*TRANSLATION_FAST, "data.max_tokens=16", fast=False, output="refused"))


def test_validation_bleu_reads_the_first_sentences_of_the_split(make_cfg, tmp_path: Path) -> None:
    """``val_bleu_samples=N``: the split's first N sentences, whatever the batching. Validation
    batches are sorted by length (bucketing), so counting whole batches took the shortest."""
    from seqlab.train import train

    cfg = make_cfg(
        *TRANSLATION_FAST, "model=gru", "model.d_model=16", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "task.val_bleu_samples=50", f"data.cache_dir={tmp_path / 'cache'}", "+data.tokenizer.lowercase=true", fast=False,
    )  # fmt: skip
    _, objects = train(cfg)
    # a lowercasing tokenizer's hypotheses are scored lowercased (its signature says so)
    assert "|case:lc|" in objects["summary"]["test_report"]["bleu_signature"]
    task = objects["task"]
    objects["trainer"].validate(task, objects["datamodule"], verbose=False)
    split, pairs = task._scored
    assert split == "val" and [index for index, _ in pairs] == list(range(50))


@pytest.mark.slow
def test_eval_and_translate_reproduce_the_run_from_the_checkpoint_alone(make_cfg, tmp_path: Path) -> None:
    from seqlab.train import train

    cache = tmp_path / "cache"
    cfg = make_cfg(
        *TRANSLATION_FAST, "model=lstm", "trainer.max_epochs=4", f"data.cache_dir={cache}", fast=False
    )
    metrics, objects = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    hypotheses = (run_dir / "translations" / "test.hyp").read_text().splitlines()
    sources = objects["datamodule"].sources("test")
    shutil.rmtree(cache)  # nothing but the checkpoint: the processed data and tokenizers are gone
    out = tmp_path / "eval"
    result = run_script("eval.py", f"ckpt_path={ckpt}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads((out / "summary.json").read_text())["metrics"]
    assert evaluated["test/bleu"] == pytest.approx(metrics["test/bleu"], abs=1e-6)
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    shutil.rmtree(cache)  # eval.py rebuilt the test split; translate.py needs no data at all
    result = run_script(
        str(ROOT / "translate.py"), f"ckpt_path={ckpt}", f"input={tmp_path / 'in.txt'}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == hypotheses
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["eval", "in.txt", "run"])
    # from stdin, an empty line translated as an empty line (the output stays line by line)
    piped = "\n".join([sources[0], "", *sources[1:3]]) + "\n"
    result = run_script(str(ROOT / "translate.py"), f"ckpt_path={ckpt}", "input=-", cwd=tmp_path, input=piped)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [hypotheses[0], "", *hypotheses[1:3]]
    # output= a file: what stdout had, nothing printed; batches of one sentence translate alike
    written = tmp_path / "out" / "test.hyp"
    written.parent.mkdir()
    result = run_script(
        str(ROOT / "translate.py"), f"ckpt_path={ckpt}", f"input={tmp_path / 'in.txt'}", f"output={written}",
        "batch_size=1", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert written.read_text().splitlines() == hypotheses and result.stdout == ""
    # a model of another task is refused by name before anything is decoded
    other = run_dir / "other.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["seqlab"]["task_target"] = "seqlab.tasks.classification.ClassificationTask"
    torch.save(raw, other)
    result = run_script(
        str(ROOT / "translate.py"), f"ckpt_path={other}", "input=-", cwd=tmp_path, input="a\n"
    )
    assert (
        result.returncode == 1 and "a ClassificationTask checkpoint, not a translation model" in result.stderr
    )
    # no checkpoint at all: one line (OmegaConf's MissingMandatoryValue came as a traceback)
    result = run_script(str(ROOT / "translate.py"), "input=-", cwd=tmp_path, input="a\n")
    assert (
        result.returncode == 1 and "ConfigError: ckpt_path: expected the checkpoint to use" in result.stderr
    )
    assert "Traceback" not in result.stderr
    # a misspelt key, with the + Hydra asks for: it was ignored, the sentences read from stdin
    result = run_script(
        str(ROOT / "translate.py"), f"ckpt_path={ckpt}", "+inptu=in.txt", cwd=tmp_path, input="a\n"
    )
    assert result.returncode == 1 and "+inptu=in.txt: not a key of translate.py" in result.stderr
    assert result.stdout == ""

    # the same checkpoint as an FSDP2 sharded directory (what trainer=fsdp2 writes with
    # save_distributed_checkpoint): translate.py reads it too, and leaves it as it was
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    from seqlab.translate import load_translator, translate_texts

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    sharded = tmp_path / "sharded.ckpt"
    _distributed_checkpoint_save({"state_dict": checkpoint.pop("state_dict")}, sharded)
    checkpoint.pop("optimizer_states", None)
    torch.save(checkpoint, sharded / _METADATA_FILENAME)
    before = sorted(p.name for p in sharded.iterdir())
    task, datamodule = load_translator(sharded)
    assert translate_texts(task, datamodule, sources) == hypotheses
    assert sorted(p.name for p in sharded.iterdir()) == before


def test_an_input_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path, caplog) -> None:
    from omegaconf import OmegaConf

    from seqlab.translate import run

    source = write(tmp_path / "in.txt", b"a b c\ncaf\xe9\n")
    with pytest.raises(SystemExit) as exit_:
        run(
            OmegaConf.create(
                {"ckpt_path": str(tmp_path / "never-read.ckpt"), "input": str(source), "data": {}}
            )
        )
    assert exit_.value.code == 1
    assert re.search(r"in.txt, line 2: bytes b'\\xe9' are not UTF-8", caplog.text), caplog.text
    # from stdin too: the locale's decoding let the byte through, and the encoder failed with a
    # TypeError naming nothing, after the model had loaded
    import io
    from types import SimpleNamespace

    stdin = SimpleNamespace(buffer=io.BytesIO(b"a b c\ncaf\xe9\n"))
    with pytest.raises(SystemExit) as exit_, pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", stdin)
        run(OmegaConf.create({"ckpt_path": str(tmp_path / "never-read.ckpt"), "input": "-", "data": {}}))
    assert exit_.value.code == 1
    assert re.search(r"<stdin>, line 2: bytes b'\\xe9' are not UTF-8", caplog.text), caplog.text


def test_a_generated_line_break_stays_inside_its_line() -> None:
    """Byte-level BPE keeps the byte tokens of ``\\n`` and ``\\r`` (its initial alphabet), and a
    unigram model may keep U+2028: a hypothesis holding one took two lines of test.hyp and of
    translate.py's output, misaligning every later line."""
    from seqlab.data.tokenization import decode

    tokenizer = train_tokenizer(["a b c", "line one"] * 20, TokenizerSpec(kind="bpe", vocab_size=300))
    ids = [tokenizer.encode(text, add_special_tokens=False).ids for text in ("a b\nc", "a\u2028b", " a b ")]
    assert decode(tokenizer, ids) == ["a b c", "a b", "a b"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"beam_size": 0}, r"beam_size=0: expected a positive integer or null"),
        ({"batch_size": 0}, r"batch_size=0: expected a positive integer"),
        ({"batch_size": None}, r"batch_size=None: expected a positive integer$"),
        ({"output": "."}, r"output='\.' is a directory; expected a file to write"),
        ({"output": "/no/such/dir/out.de"}, r"output='/no/such/dir/out.de': its directory does not exist"),
        ({"input": "."}, r"input='\.': a directory; expected a file"),
        ({"output": "SAME"}, r"output='.*in.txt' is the input file: its sources would be replaced"),
        ({"device": "tpu"}, r"device='tpu': expected cpu, cuda or cuda:<index>"),
        ({"device": "cuda:x"}, r"device='cuda:x': expected cpu, cuda or cuda:<index>"),
        ({"device": "gpu"}, r"device='gpu': this machine has no CUDA GPU; use device=cpu"),
        ({"device": "cuda:1"}, r"device='cuda:1': this machine has no CUDA GPU"),
    ],
)
def test_translate_options_are_checked_before_the_model_loads(
    tmp_path: Path, caplog, monkeypatch, override, message
) -> None:
    """A device this machine lacks was a 20-line traceback from the checkpoint's loading."""
    from omegaconf import OmegaConf

    from seqlab.translate import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (a GPU machine too)

    (tmp_path / "in.txt").write_text("a b c\n")
    settings = {"ckpt_path": str(tmp_path / "never-read.ckpt"), "input": str(tmp_path / "in.txt"), "output": None,
                "beam_size": None, "batch_size": 64, "device": "cpu", "data": {}}  # fmt: skip
    if override.get("output") == "SAME":  # the input file again, by another path
        override = {"output": str(tmp_path / "sub" / ".." / "in.txt")}
        (tmp_path / "sub").mkdir()
    with pytest.raises(SystemExit) as exit_:
        run(OmegaConf.create({**settings, **override}))
    assert exit_.value.code == 1
    assert any(re.search(message, record.getMessage()) for record in caplog.records), caplog.text
    assert (tmp_path / "in.txt").read_text() == "a b c\n"


def test_wordpiece_is_refused_before_a_training_run_reads_anything(make_cfg, tmp_path: Path) -> None:
    """Refused when training starts (every process, a cached entry or not), not in the datamodule's
    constructor: a checkpoint trained with wordpiece tokenizers still evaluates."""
    from seqlab.train import build_datamodule, train

    cache = tmp_path / "cache"
    cfg = make_cfg(*TRANSLATION_FAST, "data.tokenizer.kind=wordpiece", f"data.cache_dir={cache}", fast=False)
    with pytest.raises(ConfigError, match=r"data.tokenizer.kind=wordpiece: its decoder rewrites the text"):
        train(cfg)
    assert not cache.exists()
    build_datamodule(cfg.data, prepare=False)  # what eval.py and translate.py build from a checkpoint


def test_the_epochs_training_loss_is_a_mean_over_target_tokens(make_cfg, tmp_path: Path) -> None:
    """Each step's loss is a mean over its batch's target tokens, and length-bucketed batches hold
    a few times more tokens than others: ``train/loss_epoch`` averaged the steps' means, weighing a
    short-sentence batch's tokens several times more than a long one's, unlike ``val/loss``."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from seqlab.train import build_datamodule, build_task

    steps: list[tuple[float, int]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            tokens = int((batch["tgt_ids"][:, 1:] != PAD_ID).sum())
            steps.append((float(outputs["loss"]), tokens))

    # a high rate: the steps' losses fall within the epoch, and the two means differ
    cfg = make_cfg(
        *TRANSLATION_FAST, "model=gru", "model.d_model=16", "task.optimizer.lr=0.03",
        f"data.cache_dir={tmp_path / 'cache'}", fast=False,
    )  # fmt: skip
    datamodule = build_datamodule(cfg.data)
    task = build_task(cfg.task, cfg.model, datamodule)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=1, limit_train_batches=6, limit_val_batches=0, callbacks=[Record()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, logger=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=datamodule)
    counts = [tokens for _, tokens in steps]
    assert len(steps) == 6 and max(counts) > 1.5 * min(counts)  # the batches differ
    by_token = sum(loss * tokens for loss, tokens in steps) / sum(counts)
    by_step = sum(loss for loss, _ in steps) / len(steps)
    logged = float(trainer.callback_metrics["train/loss_epoch"])
    assert abs(logged - by_token) < 1e-5 < 1e-3 < abs(logged - by_step), (logged, by_token, by_step)


def test_a_process_logs_its_own_mean_loss_and_steps_on_the_global_one() -> None:
    """Under N processes the step's loss is this process's token sum over the global batch's
    tokens, times N (DDP divides the gradients by N again): right for the step, but logged as
    ``train/loss`` it was the process's share of the tokens, 0.88 for a mean of 4.0 here."""
    from types import SimpleNamespace

    task = tiny_task("transformer")
    torch.manual_seed(2)

    def batch(length: int) -> dict[str, torch.Tensor]:
        src, tgt = torch.randint(5, 23, (2, 6)), torch.randint(5, 23, (2, length))
        tgt[:, 0] = BOS_ID
        return {"src_ids": src, "src_mask": src == PAD_ID, "tgt_ids": tgt}

    mine = batch(4)  # this process holds short targets (3 tokens a row), the other long ones (29)
    with torch.no_grad():
        own_mean = task.loss(mine, 0.1)
        other_tokens = 2 * 29

        class TwoProcesses:  # the other process's tokens join this one's in the reduction
            def reduce(self, tensor, reduce_op):
                assert reduce_op == "sum"
                return tensor + other_tokens

        task._trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=1, strategy=TwoProcesses())
        logged = {}
        task.log = lambda name, value, **kwargs: logged.update({name: float(value)})
        task._logging_step = lambda: True
        step = task.training_step(mine, 0)
    assert float(step) == pytest.approx(float(own_mean) * 6 * 2 / (6 + other_tokens), rel=1e-5)
    assert logged == {"train/loss": pytest.approx(float(own_mean), rel=1e-6)}
    assert float(task._train_loss["sum"]) == pytest.approx(float(own_mean) * 6 * 2, rel=1e-5)
    assert not {"step_shown", "step_weight", "step_value"} & set(task._train_loss)


def test_a_unigram_tokenizer_without_the_special_tokens_characters_is_warned_about(caplog) -> None:
    """One trained before seqlab put "[", "]" and the capitals in a unigram alphabet still reads a
    text's "[EOS]" as the special token (the unknown-character path scores lower than the
    demoted piece): said at load. A lowercasing one never meets "[EOS]" (nothing to say), and
    keeps no capital pieces it could never produce. A vocabulary too small for the alphabet is
    refused by its key."""
    import json

    from seqlab.data.tokenization import SPECIAL_TOKENS, tokenizer_from_json

    spec = TokenizerSpec(kind="unigram", vocab_size=200, lowercase=False, max_length=None, wrap="bos_eos")
    state = json.loads(train_tokenizer(GERMAN * 3, spec).to_str())
    state["model"]["vocab"] = [entry for entry in state["model"]["vocab"] if entry[0] not in ("[", "]")]
    with caplog.at_level("WARNING", logger="seqlab.data.tokenization"):
        tokenizer_from_json(json.dumps(state))
    assert "this unigram tokenizer has no pieces for ['[', ']']" in caplog.text
    caplog.clear()
    lowercase = TokenizerSpec(kind="unigram", vocab_size=200, lowercase=True, max_length=None, wrap="bos_eos")
    with caplog.at_level("WARNING", logger="seqlab.data.tokenization"):
        trained = train_tokenizer(["a small text"] * 3, lowercase)
        tokenizer_from_json(trained.to_str())
    assert "no pieces" not in caplog.text
    pieces = {piece for piece, _ in json.loads(trained.to_str())["model"]["vocab"]} - set(SPECIAL_TOKENS)
    assert {"[", "]", "e", "o"} <= pieces and not {"E", "O", "P"} & pieces
    tiny = TokenizerSpec(kind="unigram", vocab_size=12, lowercase=False, max_length=None, wrap="bos_eos")
    with pytest.raises(ConfigError, match=r"data.tokenizer.vocab_size=12 is too small for the training text"):
        train_tokenizer(GERMAN, tiny)


def test_translate_writes_only_translations_to_stdout(tmp_path: Path, capfd, monkeypatch) -> None:
    """Loading a DeepSpeed checkpoint prints its conversion (Lightning's and DeepSpeed's print()
    and logger lines): they went to stdout, above the translations."""
    import os

    from omegaconf import OmegaConf

    from seqlab import translate

    def noisy_loader(*args, **kwargs):
        os.write(1, b"Processing zero checkpoint\n")  # a logger holding the original stdout
        print("Reconstructed fp32 state dict")
        return None, None

    monkeypatch.setattr(translate, "load_translator", noisy_loader)
    monkeypatch.setattr(translate, "translate_texts", lambda task, dm, texts, *a: [t.upper() for t in texts])
    (tmp_path / "in.txt").write_text("a b\nc\n")
    translate.run(OmegaConf.create({"ckpt_path": "x", "input": str(tmp_path / "in.txt"), "output": None,
                                    "beam_size": None, "batch_size": 8, "device": "cpu", "data": {}}))  # fmt: skip
    out, err = capfd.readouterr()
    assert out == "A B\nC\n" and "Processing zero checkpoint" in err and "Reconstructed" in err


def test_an_empty_source_is_scored_with_an_empty_hypothesis() -> None:
    """Evaluation keeps pairs with an empty side (test.hyp lines up with the test files); an empty
    source was translated from its [EOS], whatever the model said to nothing, while translate.py
    leaves its line empty: the same file scored two ways. Both leave it empty now."""
    from types import SimpleNamespace

    task = tiny_task("gru")
    data = SimpleNamespace(
        sources=lambda split: ["ein Haus", "", "ein Hund"],
        references=lambda split: ["a house", "empty", "a dog"],
    )
    task._trainer = SimpleNamespace(datamodule=data)
    task._hypotheses = [(2, "a dog"), (0, "a house"), (1, "something the model said")]
    scores = task.score("test")
    assert task._scored == ("test", [(0, "a house"), (1, ""), (2, "a dog")])
    assert scores["bleu"] == pytest.approx(
        corpus_scores(["a house", "", "a dog"], ["a house", "empty", "a dog"])["bleu"]
    )


def test_eval_changes_how_a_model_is_tested_and_nothing_else(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """fairseq-generate's --beam, --lenpen and --min-len on a trained model: ``eval.py
    +task.beam_size=... +task.min_len=...``, checked as when training; a setting of the model or of
    its training is the checkpoint's, refused by name."""
    from seqlab.eval import evaluate
    from seqlab.train import train

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    train(make_cfg(*TRANSLATION_FAST, "model=gru", "model.d_model=16", "trainer.max_epochs=1",
                   "+trainer.limit_train_batches=2", "test=false", cache, fast=False))  # fmt: skip
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    import seqlab.tasks.translation as translation

    searches = []
    monkeypatch.setattr(translation, "beam_search", lambda *a, **k: searches.append(("beam", k)) or [])
    greedy = translation.greedy_search
    monkeypatch.setattr(
        translation, "greedy_search", lambda *a, **k: searches.append(("greedy", k)) or greedy(*a, **k)
    )
    _, objects = evaluate(
        make_cfg(f"ckpt_path={ckpt}", "+task.beam_size=1", "+task.min_len=0", name="eval", output="greedy")
    )
    assert objects["task"].hparams.beam_size == 1 and objects["task"].hparams.min_len == 0
    assert searches and all(kind == "greedy" and k["min_length"] == 0 for kind, k in searches)
    with pytest.raises(ConfigError, match=r"task.label_smoothing: not a setting eval.py changes on a trained "
                       r"TranslationTask .* \['task.beam_size', 'task.length_penalty'"):  # fmt: skip
        evaluate(make_cfg(f"ckpt_path={ckpt}", "+task.label_smoothing=0.2", name="eval", output="other"))
    with pytest.raises(ConfigError, match=r"task.beam_size=0, task.val_beam_size=1: expected >= 1"):
        evaluate(make_cfg(f"ckpt_path={ckpt}", "+task.beam_size=0", name="eval", output="zero"))
