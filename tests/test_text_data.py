"""Text data: tokenizers, readers and their errors, the processed-data cache, length-bucketed batches."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from seqlab.data import classification
from seqlab.data.classification import SyntheticSentimentDataModule, TextClassificationDataModule
from seqlab.data.samplers import BucketSampler
from seqlab.data.text_base import FlatSequences, file_fingerprint
from seqlab.data.text_readers import read_aclimdb, read_table
from seqlab.data.tokenization import CLS_ID, PAD_ID, SPECIAL_TOKENS, TokenizerSpec, encode, train_tokenizer
from seqlab.errors import ConfigError, DataError

CORPUS = [
    "the film is a charming and often affecting journey",
    "unflinchingly bleak and desperate",
    "it is not a good movie but the cast is wonderful",
    "a dull , tedious and painfully long story",
] * 5


# ---------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("kind", ["word", "wordpiece", "bpe"])
def test_tokenizer_round_trips_and_keeps_special_ids(kind: str) -> None:
    tokenizer = train_tokenizer(CORPUS, TokenizerSpec(kind=kind, vocab_size=300, wrap="cls"))
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id
    ids = encode(tokenizer, CORPUS[:3])
    assert all(seq[0] == CLS_ID for seq in ids)
    decoded = [tokenizer.decode(seq).strip() for seq in ids]
    assert decoded == CORPUS[:3]


def test_byte_level_bpe_restores_raw_text_exactly() -> None:
    raw = 'Hello, it\'s a tést -- "quoted"!'
    tokenizer = train_tokenizer([raw, *CORPUS], TokenizerSpec(kind="bpe", vocab_size=300, lowercase=False))
    assert tokenizer.decode(encode(tokenizer, [raw])[0]).strip() == raw


def test_truncation_counts_the_special_token() -> None:
    tokenizer = train_tokenizer(CORPUS, TokenizerSpec(kind="word", vocab_size=300, max_length=4))
    assert [len(seq) for seq in encode(tokenizer, CORPUS[:2])] == [4, 4]


def test_bad_tokenizer_settings_are_named() -> None:
    with pytest.raises(ConfigError, match=r"data.tokenizer.kind='sentencepiece'"):
        TokenizerSpec(kind="sentencepiece")
    with pytest.raises(ConfigError, match=r"unknown keys \['vocab'\]"):
        TokenizerSpec.from_config({"vocab": 10})


# ---------------------------------------------------------------- readers and their errors
def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_tsv_csv_and_jsonl_read_the_same_examples(tmp_path: Path) -> None:
    tsv = write(tmp_path / "a.tsv", 'sentence\tlabel\nit \'s "great"\t1\nbad\t0\n')
    csv_file = write(tmp_path / "a.csv", 'sentence,label\n"it \'s ""great""",1\nbad,0\n')
    jsonl = write(
        tmp_path / "a.jsonl",
        '{"sentence": "it \'s \\"great\\"", "label": 1}\n\n{"sentence": "bad", "label": 0}\n',
    )
    for path in (tsv, csv_file, jsonl):
        examples = read_table(path, "sentence", "label")
        assert examples.texts == ['it \'s "great"', "bad"]
        assert examples.labels == ["1", "0"]
    assert read_table(tsv, "sentence", "label").origins[1] == f"{tsv}, line 3"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text\tlabel\nfine\t1\n", r"line 1: no column 'sentence' in the header \['text', 'label'\]"),
        ("sentence\tlabel\nfine\t1\n \t0\n", "line 3: empty text"),
        ("sentence\tlabel\nfine\t1\nno label\t\n", "line 3: missing label"),
        ("sentence\tlabel\nfine\t1\ttoo many\n", "line 2: 3 fields, expected 2"),
        (b"sentence\tlabel\nfine\t1\ncaf\xe9\t0\n", r"line 3: bytes b'\\xe9' are not UTF-8"),
        ("", "is empty; expected a header row"),
        ("sentence\tlabel\tlabel\nfine\t1\t0\n", r"line 1: the header names \['label'\] more than once"),
    ],
)
def test_bad_table_rows_name_file_and_line(tmp_path: Path, content, message: str) -> None:
    path = write(tmp_path / "bad.tsv", content)
    with pytest.raises(DataError, match=message) as err:
        read_table(path, "sentence", "label")
    assert str(path) in str(err.value)


def test_a_tsv_written_by_pandas_is_read_with_quoting_minimal_and_named_without(
    tmp_path: Path, caplog
) -> None:
    """pandas' ``to_csv(sep="\t")`` and spreadsheets wrap a field holding a quote in quotes and
    double the inner ones; read GLUE's way (quotes ordinary) such texts kept the wrapping and the
    doubled quotes, silently: ``data.quoting=minimal`` reads them, and without it the reader
    says which lines look so."""
    import csv

    rows = [('He said "great" film', "1"), ("plain text", "1"), ("a\ttab", "0"), ("bad", "0")]
    path = tmp_path / "pandas.tsv"
    with path.open("w", newline="") as handle:
        csv.writer(handle, delimiter="\t", lineterminator="\n").writerows([("text", "label"), *rows])
    examples = read_table(path, "text", "label", quoting="minimal")
    assert examples.texts == ['He said "great" film', "plain text", "a tab", "bad"]  # (whitespace cleaned)
    assert examples.origins[3] == f"{path}, line 5"
    # GLUE's way: the quoted tab splits its row
    with pytest.raises(DataError, match=r"line 4: 3 fields, expected 2 .*data.quoting=minimal reads one in"):
        read_table(path, "text", "label")
    path.write_text('text\tlabel\n"He said ""great"" film"\t1\n"quoted" speech\t1\n"whole"\t0\n')
    with caplog.at_level("WARNING"):
        examples = read_table(path, "text", "label")
    assert examples.texts == ['"He said ""great"" film"', '"quoted" speech', '"whole"']
    assert "1 texts (lines 2) are wrapped in quotes with their inner quotes doubled" in caplog.text
    assert "set data.quoting=minimal" in caplog.text
    with pytest.raises(ConfigError, match=r"data.quoting='csv'; expected one of \['none', 'minimal'\]"):
        TextClassificationDataModule(data_dir=str(tmp_path), quoting="csv")


def test_a_header_read_with_the_wrong_separator_says_so(tmp_path: Path) -> None:
    from seqlab.data.readers import read_series_csv

    tsv_as_csv = write(tmp_path / "reviews.csv", "review\tsentiment\ngood\t1\n")
    with pytest.raises(
        DataError, match=r"holding a tab: the file is read as comma-separated; set data.format=tsv\)$"
    ):
        read_table(tsv_as_csv, "review", "sentiment")
    semicolons = write(tmp_path / "reviews2.csv", "review;sentiment\ngood;1\n")
    with pytest.raises(
        DataError, match=r"holding a semicolon: the file is read as comma-separated; rewrite it comma"
    ):
        read_table(semicolons, "review", "sentiment")
    semicolons = write(tmp_path / "sales.csv", "date;sales\n2020-01-01 00:00:00;1\n")
    with pytest.raises(
        DataError,
        match=r"no date column 'date'.* holding a semicolon: the file is read as comma-sep.*; rewrite it",
    ):
        read_series_csv(semicolons)
    with pytest.raises(
        DataError, match=r"no column 'text' in the header \['review', 'sentiment'\]; set [^(]*$"
    ):
        read_table(write(tmp_path / "ok.tsv", "review\tsentiment\ngood\t1\n"), "text", "label")


def test_a_quoted_record_over_several_lines_is_named_by_its_first_line(tmp_path: Path) -> None:
    path = write(tmp_path / "multi.csv", 'text,label\nfine,1\n"two\nlines",\n')
    with pytest.raises(DataError, match=r"multi.csv, line 3: missing label"):
        read_table(path, "text", "label")


def test_blank_lines_before_the_header_are_skipped(tmp_path: Path) -> None:
    """A leading blank line was read as the header: "no column 'text' in the header []"."""
    for name in ("blank.tsv", "blank.csv"):
        sep = "\t" if name.endswith("tsv") else ","
        path = write(tmp_path / name, f"\n\ntext{sep}label\nfine{sep}1\n")
        examples = read_table(path, "text", "label")
        assert examples.texts == ["fine"] and examples.origins == [f"{path}, line 4"]


def test_a_whole_number_is_one_label_however_written(tmp_path: Path) -> None:
    """A float column written out (1.0) beside integers (1) made two classes of one label: a
    binary task trained as four classes. One class, in every format, with data.classes written
    either way, and with a checkpoint's classes from such a file."""
    rows = list(enumerate([1, 0, 1.0, 0.0] * 6 + [1, 0]))
    lines = [
        json.dumps({"text": f"text {i} {'good' if label else 'bad'}", "label": label}) for i, label in rows
    ]
    write(tmp_path / "raw" / "train.jsonl", "\n".join(lines) + "\n")
    write(tmp_path / "raw" / "test.jsonl", lines[0] + "\n" + lines[3] + "\n")
    assert read_table(tmp_path / "raw" / "train.jsonl", "text", "label").labels[:4] == [
        "1",
        "0",
        "1.0",
        "0.0",
    ]
    columns = {"text_column": "text", "label_column": "label"}
    dm = text_dm(
        tmp_path / "raw", tmp_path / "cache", train_file="train.jsonl", test_file="test.jsonl", **columns
    )
    dm.setup()
    assert dm.task_kwargs()["num_classes"] == 2 and dm.datasets["test"].labels.tolist() == [1, 0]
    # a TSV's float labels with data.classes given as numbers, and a checkpoint's float classes
    write(
        tmp_path / "tsv" / "train.tsv",
        "text\tlabel\n" + "".join(f"t {i}\t{float(i % 2)}\n" for i in range(30)),
    )
    write(tmp_path / "tsv" / "test.tsv", "text\tlabel\nt 1\t1.0\nt 2\t0\n")
    for classes in ([0, 1], [0.0, 1.0], ["0.0", "1.0"]):
        cache = tmp_path / f"cache-{len(str(classes))}"
        dm = text_dm(
            tmp_path / "tsv", cache, train_file="train.tsv", test_file="test.tsv", classes=classes, **columns
        )
        dm.setup()
        assert dm.datasets["test"].labels.tolist() == [1, 0], classes
    with pytest.raises(ConfigError, match="has duplicates"):
        TextClassificationDataModule(data_dir=str(tmp_path), classes=[1, 1.0])


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    """JSON lets a string hold U+2028, U+2029 and U+0085 unescaped (json.dumps(...,
    ensure_ascii=False) writes them so; scraped web text has them): lines are cut at line feeds
    only. str.splitlines cut there too, and the file was refused as broken JSON."""
    rows = [
        {"text": f"first{sep}second", "label": i % 2} for i, sep in enumerate(("\u2028", "\u2029", "\x85"))
    ]
    path = write(tmp_path / "web.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    examples = read_table(path, "text", "label")
    # the reader's whitespace clean-up makes each separator a space
    assert examples.texts == ["first second"] * 3 and examples.labels == ["0", "1", "0"]
    assert examples.origins[2] == f"{path}, line 3"


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", '{"text": "ok", "label": "a"}\n{"text": "oops"\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not a JSON object"):
        read_table(path, "text", "label")
    path = write(tmp_path / "nokey.jsonl", '{"text": "ok"}\n')
    with pytest.raises(DataError, match=r"line 1: no key 'label'"):
        read_table(path, "text", "label")
    # not text: was read as its Python repr ("['great', 'film']") and trained on
    for line, message in (('{"text": ["great", "film"], "label": 1}', r"'text' is a JSON array, expected a string"),
                          ('{"text": 0, "label": 1}', r"'text' is a JSON number, expected a string"),
                          ('{"text": "ok", "label": [1]}', r"'label' is a JSON array, expected one label")):  # fmt: skip
        path = write(tmp_path / "types.jsonl", '{"text": "fine", "label": 0}\n' + line + "\n")
        with pytest.raises(DataError, match=r"types.jsonl, line 2: " + message):
            read_table(path, "text", "label")


def test_aclimdb_layout(tmp_path: Path) -> None:
    for label, texts in {"pos": ["A great film.<br /><br />Loved it"], "neg": ["Awful.", "Dull"]}.items():
        for i, text in enumerate(texts):
            write(tmp_path / "aclImdb" / "train" / label / f"{i}_7.txt", text)
    examples = read_aclimdb(tmp_path / "aclImdb", "train")
    assert examples.labels == ["neg", "neg", "pos"]
    assert examples.texts[2] == "A great film. Loved it"
    with pytest.raises(DataError, match=r"aclImdb/test/neg is not a directory"):
        read_aclimdb(tmp_path / "aclImdb", "test")
    # a review moved to the other label keeps its size and time: the cache key still changes
    before = file_fingerprint(tmp_path / "aclImdb" / "train")
    (tmp_path / "aclImdb" / "train" / "pos" / "0_7.txt").rename(
        tmp_path / "aclImdb" / "train" / "neg" / "9_7.txt"
    )
    assert read_aclimdb(tmp_path / "aclImdb", "train").labels == ["neg"] * 3
    assert file_fingerprint(tmp_path / "aclImdb" / "train") != before


# ---------------------------------------------------------------- the datamodule
def three_class_files(root: Path) -> Path:
    rows = [("what a great film", "positive"), ("awful and dull", "negative"), ("a french film", "neutral")]
    write(
        root / "train.csv",
        "review,sentiment\n" + "".join(f"{t} {i},{s}\n" for i in range(30) for t, s in rows),
    )
    write(root / "test.csv", "review,sentiment\n" + "".join(f"{t},{s}\n" for t, s in rows))
    return root


def text_dm(root: Path, cache: Path, **kwargs) -> TextClassificationDataModule:
    settings = {
        "data_dir": str(root),
        "train_file": "train.csv",
        "test_file": "test.csv",
        "text_column": "review",
        "label_column": "sentiment",
        "val_size": 0.2,
        "tokenizer": {"kind": "wordpiece", "vocab_size": 200},
        "batch_size": 8,
        "cache_dir": str(cache),
    }
    return TextClassificationDataModule(**{**settings, **kwargs})


def test_string_labels_become_saved_class_ids_and_val_is_held_out(tmp_path: Path) -> None:
    dm = text_dm(three_class_files(tmp_path / "raw"), tmp_path / "cache")
    dm.prepare_data()
    dm.setup()
    meta = json.loads((dm.processed_dir / "meta.json").read_text())
    assert meta["classes"] == ["negative", "neutral", "positive"]
    assert meta["sizes"] == {"train": 72, "val": 18, "test": 3}
    assert dm.task_kwargs()["num_classes"] == 3
    assert set(dm.texts("val")).isdisjoint(dm.texts("train"))
    assert dm.datasets["test"].labels.tolist() == [2, 0, 1]
    # the same seed holds out the same slice
    again = text_dm(tmp_path / "raw", tmp_path / "cache2")
    again.setup()
    assert again.texts("val") == dm.texts("val")


def test_evaluation_texts_that_are_also_training_texts_are_counted(tmp_path: Path, caplog) -> None:
    """A file with duplicates keeps copies on both sides of a random holdout, and a test file may
    repeat training texts: the evaluation then partly measures recall. Counted and said."""
    dm = text_dm(three_class_files(tmp_path / "raw"), tmp_path / "cache")
    dm.prepare_data()
    assert json.loads((dm.processed_dir / "meta.json").read_text())["also_in_train"] == {"val": 0, "test": 0}
    rows = [f"review number {i % 10},{'good' if i % 2 else 'bad'}" for i in range(40)]  # each text 4 times
    write(tmp_path / "dup" / "train.csv", "review,sentiment\n" + "\n".join(rows) + "\n")
    write(tmp_path / "dup" / "test.csv", "review,sentiment\nreview  number 3,good\nunseen text,bad\n")
    dm = text_dm(tmp_path / "dup", tmp_path / "cache", val_size=8)
    with caplog.at_level("WARNING", logger="seqlab.data.classification"):
        dm.prepare_data()
    in_train = json.loads((dm.processed_dir / "meta.json").read_text())["also_in_train"]
    assert in_train["test"] == 1  # spacing aside
    assert in_train["val"] == sum(text in set(dm.texts("train")) for text in dm.texts("val")) > 0
    assert f"'val': '{in_train['val']} of 8', 'test': '1 of 2'" in caplog.text


def phrase_treebank(root: Path) -> Path:
    """An SST-like train file: every sentence and, with their own labels, its phrases."""
    lines = []
    for i in range(40):
        sentence = f"film {i} is not bad at all"
        lines.append(f"{sentence},positive")
        lines += [f"film {i},neutral", "not bad at all,positive", "bad,negative", "is not bad,positive"]
    write(root / "train.csv", "review,sentiment\n" + "\n".join(lines) + "\n")
    write(root / "test.csv", "review,sentiment\nbad film,negative\n")
    return root


def test_maximal_examples_are_the_sentences() -> None:
    texts = ["a  fine film", "fine film", "fine", "a fine", "another  story", "story", "film a"]
    assert classification.maximal_examples(texts) == [0, 4, 6]
    assert classification.word_spans("a b c") == {"a", "b", "c", "a b", "b c", "a b c"}


def test_sentence_holdout_keeps_the_held_out_phrases_out_of_train(tmp_path: Path) -> None:
    root = phrase_treebank(tmp_path / "raw")
    classes = ["negative", "neutral", "positive"]
    dm = text_dm(
        root,
        tmp_path / "cache",
        val_size=10,
        holdout="sentences",
        classes=classes,
        tokenizer={"kind": "word"},
    )
    dm.setup()
    val, train = dm.texts("val"), dm.texts("train")
    assert len(val) == 10 and all(text.startswith("film ") and text.endswith("at all") for text in val)
    spans = set().union(*(classification.word_spans(text) for text in val))
    assert not spans & set(train)
    # the 30 other sentences and their own "film N" phrases stay; the shared phrases are gone
    assert len(train) == 60 and "bad" not in train
    assert all(" ".join(text.split()[:2]) in train for text in train if text.endswith("at all"))
    # a random slice holds out phrases whose sentences stay in train: the leak this avoids
    leaky = text_dm(root, tmp_path / "cache", val_size=10, tokenizer={"kind": "word"})
    leaky.setup()
    assert any(
        span in leaky.texts("train")
        for text in leaky.texts("val")
        for span in classification.word_spans(text)
    )
    with pytest.raises(ConfigError, match=r"data.val_size=40 holds out 40 of 40 sentences"):
        text_dm(root, tmp_path / "cache", val_size=40, holdout="sentences").prepare_data()
    with pytest.raises(
        ConfigError, match=r"data.holdout='phrases'; expected one of \['random', 'sentences'\]"
    ):
        text_dm(root, tmp_path / "cache", holdout="phrases")
    with pytest.raises(  # a typo fell through to the table reader, which did not list aclimdb
        ConfigError, match=r"data.format='aclImdb'; expected one of \['csv', 'jsonl', 'tsv', 'aclimdb'\]"
    ):
        text_dm(root, tmp_path / "cache", format="aclImdb")


def test_second_run_reuses_the_tokenizer_and_changes_invalidate_it(tmp_path: Path, monkeypatch) -> None:
    root = three_class_files(tmp_path / "raw")
    first = text_dm(root, tmp_path / "cache")
    first.prepare_data()
    tokenizer_file = first.processed_dir / "tokenizer.json"
    written = tokenizer_file.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(classification, "train_tokenizer", no_training)
    second = text_dm(root, tmp_path / "cache")
    second.prepare_data()
    second.setup()
    assert second.processed_dir == first.processed_dir
    assert tokenizer_file.stat().st_mtime_ns == written
    assert len(second.datasets["train"]) == 72
    # another vocabulary size, or an edited file, is another cache entry
    with pytest.raises(AssertionError, match="trained again"):
        text_dm(root, tmp_path / "cache", tokenizer={"kind": "wordpiece", "vocab_size": 150}).prepare_data()
    write(root / "train.csv", (root / "train.csv").read_text() + "one more great film,positive\n")
    with pytest.raises(AssertionError, match="trained again"):
        text_dm(root, tmp_path / "cache").prepare_data()


def test_the_cache_entry_is_keyed_once_and_label_names_are_read_fresh(tmp_path: Path) -> None:
    """A source file replaced after prepare_data (another process's identical download) leaves
    this datamodule on its cache entry; label names are display only: changing them reuses the
    processed data, and a wrong count is named."""
    root = three_class_files(tmp_path / "raw")
    dm = text_dm(root, tmp_path / "cache")
    dm.prepare_data()
    entry = dm.processed_dir
    (root / "train.csv").write_text((root / "train.csv").read_text())  # same bytes, new mtime
    assert dm.processed_dir == entry
    dm.setup()
    assert len(dm.datasets["train"]) == 72
    assert dm.task_kwargs()["class_names"] == ["negative", "neutral", "positive"]
    named = text_dm(root, tmp_path / "cache", label_names=["bad", "meh", "good"])
    named.prepare_data()
    assert named.task_kwargs()["class_names"] == ["bad", "meh", "good"]
    assert named.artifacts()["class_names"] == ["bad", "meh", "good"]
    short = text_dm(root, tmp_path / "cache", label_names=["bad", "good"])
    short.prepare_data()
    with pytest.raises(ConfigError, match=r"data.label_names has 2 names .* for the 3 classes"):
        short.task_kwargs()


def test_a_text_of_no_tokens_is_named_and_a_batch_larger_than_train_refused(tmp_path: Path) -> None:
    """Without [CLS] a text of control characters encodes to nothing, which no backbone can
    read; a training split smaller than one batch would train no step and test the initial weights."""
    root = three_class_files(tmp_path / "raw")
    write(root / "test.csv", "review,sentiment\nfine film,positive\n\x07\x07,negative\n")
    dm = text_dm(root, tmp_path / "cache", tokenizer={"kind": "word", "wrap": "none"})
    with pytest.raises(
        DataError, match=r"test.csv, line 3: the text encodes to no tokens \(1 such in test\)"
    ):
        dm.prepare_data()
    text_dm(root, tmp_path / "cache").prepare_data()  # with [CLS]: every text has a token

    dm = text_dm(root, tmp_path / "cache", batch_size=128)
    dm.setup()
    with pytest.raises(ConfigError, match=r"data.batch_size=128 is more than the 72 training examples"):
        dm.train_dataloader()
    assert len(dm.val_dataloader()) == 1  # evaluation: one short batch


def test_tokenizer_sees_only_the_training_split(tmp_path: Path, monkeypatch) -> None:
    seen: list[str] = []
    real = classification.train_tokenizer

    def spy(texts, spec):
        texts = list(texts)
        seen.extend(texts)
        return real(texts, spec)

    monkeypatch.setattr(classification, "train_tokenizer", spy)
    dm = text_dm(three_class_files(tmp_path / "raw"), tmp_path / "cache")
    dm.setup()
    assert sorted(seen) == sorted(dm.texts("train"))


def test_labels_outside_the_classes_are_named(tmp_path: Path) -> None:
    root = three_class_files(tmp_path / "raw")
    dm = text_dm(root, tmp_path / "cache", classes=["negative", "positive"])
    with pytest.raises(
        DataError, match=r"train.csv, line 4: label 'neutral' is not one of \['negative', 'positive'\]"
    ):
        dm.prepare_data()
    write(root / "test.csv", "review,sentiment\nfine,mixed\n")
    with pytest.raises(DataError, match=r"test.csv, line 2: label 'mixed' .*labels found in train"):
        text_dm(root, tmp_path / "cache").prepare_data()
    # a checkpoint's data (eval.py, init_from): its classes, not this train file's, are the ones
    fixed = text_dm(root, tmp_path / "cache")
    fixed.use_artifacts(
        {
            "tokenizer": train_tokenizer(["fine"], fixed.spec).to_str(),
            "classes": ["0", "1"],
            "class_names": ["0", "1"],
        }
    )
    with pytest.raises(
        DataError,
        match=r"train.csv, line 2: label '\w+' is not one of \['0', '1'\] \(the checkpoint's classes\)",
    ):
        fixed.prepare_data()


def test_a_class_held_out_whole_is_still_a_class(tmp_path: Path, caplog) -> None:
    """The classes were the labels left in train after val/test were carved out of it: a rare
    class whose examples all went to val or test was refused as 'not one of the labels found in
    train', blaming a line of the train file itself, depending on data.split_seed. The classes are
    the labels of the whole train file; a class with no training example left gets a warning."""
    rows = [f"review {i},{'a' if i % 2 else 'b'}" for i in range(40)]
    write(tmp_path / "raw" / "train.csv", "review,sentiment\n" + "\n".join([*rows, "the rare one,c"]) + "\n")
    for seed in range(20):  # a seed that holds out the one 'c' example (about one in five)
        dm = text_dm(tmp_path / "raw", tmp_path / "cache", test_file=None, split_seed=seed)
        with caplog.at_level("WARNING", logger="seqlab.data.classification"):
            dm.setup()
        if "c" not in [dm.class_names()[int(y)] for y in dm.datasets["train"].labels]:
            break
    else:
        pytest.fail("no split_seed in 0..19 held out the rare example")
    assert dm.class_names() == ["a", "b", "c"] and dm.task_kwargs()["num_classes"] == 3
    held = [dm.class_names()[int(y)] for split in ("val", "test") for y in dm.datasets[split].labels]
    assert "c" in held
    assert "every example of class 'c' was held out for val and test" in caplog.text


def test_empty_splits_are_clear_errors(tmp_path: Path) -> None:
    root = three_class_files(tmp_path / "raw")
    write(root / "test.csv", "review,sentiment\n")
    with pytest.raises(DataError, match=r"test.csv: the test split has no examples"):
        text_dm(root, tmp_path / "cache").prepare_data()
    write(root / "train.csv", "review,sentiment\n")
    with pytest.raises(DataError, match=r"train.csv: the train split has no examples"):
        text_dm(root, tmp_path / "cache").prepare_data()
    with pytest.raises(ConfigError, match=r"data.val_size=0 holds out 0 of"):
        text_dm(three_class_files(tmp_path / "raw2"), tmp_path / "cache", val_size=0).prepare_data()


def test_missing_files_without_a_url_name_the_path(tmp_path: Path) -> None:
    dm = text_dm(tmp_path / "nowhere", tmp_path / "cache")
    with pytest.raises(DataError, match=r"data not found: .*nowhere/train.csv"):
        dm.prepare_data()


def test_prepare_data_downloads_and_unpacks_a_missing_archive(tmp_path: Path) -> None:
    archive = tmp_path / "SST-2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("SST-2/train.tsv", "sentence\tlabel\n" + "good\t1\nbad\t0\n" * 10)
        zf.writestr("SST-2/dev.tsv", "sentence\tlabel\ngood\t1\n")
    data_dir = tmp_path / "sst2"
    dm = TextClassificationDataModule(
        data_dir=str(data_dir),
        test_file="dev.tsv",
        text_column="sentence",
        classes=[0, 1],
        url=archive.as_uri(),
        strip_components=1,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    assert sorted(p.name for p in data_dir.iterdir()) == ["dev.tsv", "train.tsv"]
    dm.setup()
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 20


def test_an_unfinished_extraction_is_done_again(tmp_path: Path) -> None:
    """Interrupted while unpacking, the data directory holds part of the files: the next run
    extracts again instead of training on what is there (or says why it cannot)."""
    archive = tmp_path / "SST-2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("SST-2/train.tsv", "sentence\tlabel\n" + "good\t1\nbad\t0\n" * 10)
        zf.writestr("SST-2/dev.tsv", "sentence\tlabel\ngood\t1\n")
    data_dir = tmp_path / "sst2"
    data_dir.mkdir()
    (data_dir / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")  # cut short
    (data_dir / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    (data_dir / ".extracting-SST-2.zip").touch()

    def sst2(download: bool) -> TextClassificationDataModule:
        return TextClassificationDataModule(
            data_dir=str(data_dir), test_file="dev.tsv", text_column="sentence", classes=[0, 1],
            url=archive.as_uri(), strip_components=1, download=download, cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip

    with pytest.raises(DataError, match=r"an earlier extraction of .*SST-2.zip did not finish"):
        sst2(download=False).prepare_data()
    dm = sst2(download=True)
    dm.prepare_data()
    assert sorted(p.name for p in data_dir.iterdir()) == ["dev.tsv", "train.tsv"]
    dm.setup()
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 20


def test_batches_are_right_padded_with_a_mask(tmp_path: Path) -> None:
    dm = SyntheticSentimentDataModule(num_train=50, num_val=10, num_test=10, cache_dir=str(tmp_path))
    dm.setup()
    dataset = dm.datasets["train"]
    batch = dataset.__getitems__([0, 1, 2, 3])
    lengths = dataset.lengths[:4]
    assert batch["input_ids"].shape == (4, int(lengths.max()))
    assert ((~batch["pad_mask"]).sum(1) == lengths).all()
    assert (batch["input_ids"][batch["pad_mask"]] == PAD_ID).all()
    assert (batch["input_ids"][:, 0] == CLS_ID).all()
    start, end = dataset.tokens.offsets[2], dataset.tokens.offsets[3]
    assert batch["input_ids"][2, : lengths[2]].tolist() == dataset.tokens.ids[start:end].tolist()
    # what the loaders do: one index tensor in, the batch out (rows in the tensor's order)
    again = dataset[torch.tensor([2, 0])]
    assert torch.equal(again["input_ids"][0, : lengths[2]], batch["input_ids"][2, : lengths[2]])
    assert torch.equal(again["labels"], batch["labels"][[2, 0]])


def test_batches_gathered_together_equal_batches_gathered_alone() -> None:
    """``padded_batches`` (several batches in one pass, each padded to its own longest row) gives
    every batch exactly as the rows padded one by one would: empty rows, an all-empty batch, an
    empty batch, batches of different sizes; each result contiguous."""
    generator = torch.Generator().manual_seed(0)
    sequences = [
        torch.randint(4, 90, (n,), generator=generator).tolist() for n in [0, 3, 1, 7, 0, 12, 5, 2] * 5
    ]
    sequences[39] = []
    flat = FlatSequences.from_lists(sequences)
    indices = [
        torch.tensor(rows, dtype=torch.long)
        for rows in ([5, 0, 3], [1], [], [4, 0], list(range(40)), [39, 4], [7, 7, 2])
    ]
    gathered = flat.padded_batches(indices)
    assert len(gathered) == len(indices)
    for index, (ids, pad_mask) in zip(indices, gathered, strict=True):
        rows = [sequences[i] for i in index.tolist()]
        width = max(map(len, rows), default=0)
        assert ids.shape == pad_mask.shape == (len(rows), width)
        assert ids.tolist() == [row + [PAD_ID] * (width - len(row)) for row in rows]
        assert pad_mask.tolist() == [[False] * len(row) + [True] * (width - len(row)) for row in rows]
        assert ids.dtype == torch.long and ids.is_contiguous() and pad_mask.is_contiguous()
        ((alone_ids, alone_mask),) = flat.padded_batches([index])
        assert torch.equal(alone_ids, ids) and torch.equal(alone_mask, pad_mask)


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("module", ["classification", "translation"])
def test_the_training_loader_gathers_blocks_of_the_same_batches(tmp_path: Path, module: str) -> None:
    """The training loader asks the dataset for ``gather_batches`` batches at a time (13 steps in
    blocks of 5: 5, 5, 3) and hands out the batches one index tensor at a time would give, also
    when resumed in the middle of a block."""
    if module == "classification":
        dm = SyntheticSentimentDataModule(
            num_train=208, num_val=8, num_test=8, batch_size=16, cache_dir=str(tmp_path)
        )
    else:
        from seqlab.data.translation import SyntheticTranslationDataModule

        dm = SyntheticTranslationDataModule(
            num_train=208, num_val=8, num_test=8, batch_size=16, cache_dir=str(tmp_path)
        )
    dm.setup()
    dataset = dm.datasets["train"]
    calls = []
    original = dataset.batches
    dataset.batches = lambda indices: calls.append(len(indices)) or original(indices)
    loader = dm.train_dataloader()
    loader.gather_batches = 5
    loader.sampler.set_epoch(2)
    epoch = list(loader)
    assert calls == [5, 5, 3]
    loader.sampler.set_epoch(2)
    assert_same_batches(epoch, [dataset[index] for index in loader.sampler])
    resumed = dm.train_dataloader()
    resumed.gather_batches = 5
    resumed.load_state_dict({"epoch": 2, "batches": 7, "order": 3})
    resumed.sampler.set_epoch(2)
    calls.clear()
    assert_same_batches(list(resumed), epoch[7:])
    assert calls == [5, 1] and resumed.state_dict() == {"epoch": 2, "batches": 13, "order": 3, "seed": 0}


def test_gathering_leaves_the_random_state_as_the_dataloader_does(tmp_path: Path) -> None:
    """A run draws the same dropout masks (and everything else) with the gathering loader as with
    a plain ``DataLoader``, whose iterator draws one number per epoch."""
    from torch.utils.data import DataLoader

    from seqlab.data.forecasting import keep_batch

    dm = SyntheticSentimentDataModule(
        num_train=64, num_val=8, num_test=8, batch_size=16, cache_dir=str(tmp_path)
    )
    dm.setup()
    loader = dm.train_dataloader()
    plain = DataLoader(dm.datasets["train"], batch_size=None, sampler=loader.sampler, collate_fn=keep_batch)
    states = []
    for each in (loader, plain):
        torch.manual_seed(0)
        assert len(list(each)) == 4
        states.append(torch.random.get_rng_state())
    assert torch.equal(*states)


# ---------------------------------------------------------------- bucketed, distributed batches
def test_processes_share_each_global_batch() -> None:
    lengths = torch.randint(1, 60, (203,), generator=torch.Generator().manual_seed(0)).tolist()
    single = BucketSampler(lengths, batch_size=16, shuffle=True, seed=3, drop_last=True)
    ranks = [
        BucketSampler(lengths, 16, num_replicas=2, rank=r, shuffle=True, seed=3, drop_last=True)
        for r in (0, 1)
    ]
    for sampler in (single, *ranks):
        sampler.set_epoch(2)
    one = list(single)
    per_rank = [list(s) for s in ranks]
    assert len(one) == len(single) == 12 and all(len(b) == 16 for b in one)
    assert all(len(p) == len(s) == 12 for p, s in zip(per_rank, ranks))
    for step in range(12):
        assert all(len(p[step]) == 8 for p in per_rank)
        assert set(one[step].tolist()) == set(per_rank[0][step].tolist()) | set(per_rank[1][step].tolist())
    single.set_epoch(3)
    assert not all(torch.equal(a, b) for a, b in zip(single, one))  # a new order every epoch


def test_bucketing_cuts_padding_and_keeps_every_example() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (1000,), generator=generator).tolist()

    def padded(sampler: BucketSampler) -> int:
        return sum(len(b) * max(lengths[i] for i in b.tolist()) for b in sampler.global_batches())

    bucketed = BucketSampler(lengths, 32, shuffle=True, bucketing=True)
    plain = BucketSampler(lengths, 32, shuffle=True, bucketing=False)
    assert padded(bucketed) < 0.7 * padded(plain)
    evaluation = BucketSampler(lengths, 32, num_replicas=1, shuffle=False)
    assert sorted(torch.cat(list(evaluation)).tolist()) == list(range(1000))
    assert len(list(evaluation)) == len(evaluation) == 32


def test_the_examples_drop_last_leaves_out_are_drawn_at_random_not_the_longest() -> None:
    """Sorted by length within a pool, the short last batch held the last pool's longest
    examples, and drop_last (every training loader of text) dropped them: in a dataset of one
    pool the same 40 longest were never trained on, epoch after epoch."""
    lengths = list(range(1000))  # length = index: the longest are the last
    sampler = BucketSampler(lengths, 64, shuffle=True, seed=0, drop_last=True, pool_batches=50)
    seen = torch.zeros(1000, dtype=torch.long)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 15 and all(len(b) == 64 for b in batches)
        seen += torch.bincount(torch.cat(batches), minlength=1000)
    assert seen.max() <= 20 and seen[-40:].min() > 0, "every one of the longest was trained on"
    # the left-out examples are spread: the longest 100 are left out about as often as the others
    assert abs(seen[-100:].float().mean() - seen[:-100].float().mean()) < 1.5


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batches_by_tokens_hold_every_example_once_within_the_budget(world: int) -> None:
    """``max_tokens`` (fairseq's ``--max-tokens``): each epoch the examples sorted by length (ties
    mixed) are cut into global batches of at most ``max_tokens`` padded tokens and ``batch_size``
    examples, in multiples of 8 where more fit, then shuffled. Short examples share a batch by the
    dozen, long ones by a few; each process gets its share of each batch; the batches are the same
    whatever the number of processes (the budget is the global batch's), and as many every epoch."""
    lengths = torch.randint(2, 120, (997,), generator=torch.Generator().manual_seed(0)).tolist()
    budget = 1200

    def epoch(epoch: int, processes: int = world) -> list[torch.Tensor]:
        """The epoch's global batches, put together from every process's shares."""
        made = [
            BucketSampler(lengths, 96, num_replicas=processes, rank=r, shuffle=True, seed=5, drop_last=True, max_tokens=budget)
            for r in range(processes)
        ]  # fmt: skip
        for sampler in made:
            sampler.set_epoch(epoch)
        shares = [list(sampler) for sampler in made]
        assert all(len(share) == len(made[0]) for share in shares), "as many steps on every process"
        assert all(len(part) >= 1 for share in shares for part in share)
        return [torch.cat(parts) for parts in zip(*shares)]

    batches = epoch(0)
    assert sorted(torch.cat(batches).tolist()) == list(range(997)), "every example once an epoch"
    sizes = [len(batch) for batch in batches]
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch.tolist()) <= budget and len(batch) <= 96
    assert max(sizes) >= 5 * min(sizes)  # short examples by the many, long ones by a few
    assert sum(size % 8 == 0 for size in sizes) >= len(sizes) - 2 - sum(size < 8 for size in sizes)
    key = lambda batch: tuple(sorted(batch.tolist()))  # noqa: E731
    # the same batches on one process as on several; another cut and order the next epoch, as many
    assert list(map(key, epoch(0, processes=1))) == list(map(key, batches))
    again = epoch(1)
    assert len(again) == len(batches) and list(map(key, again)) != list(map(key, batches))


def test_batches_by_tokens_mix_examples_of_equal_length() -> None:
    """Ties broken by the file's order put a file sorted by label into one-label batches (IMDB's
    reader reads neg/ then pos/; truncation makes thousands of reviews equally long)."""
    sampler = BucketSampler([10] * 40, 40, shuffle=True, seed=1, drop_last=True, max_tokens=80)
    batches = [batch.tolist() for batch in sampler.global_batches()]
    assert all(len(batch) == 8 for batch in batches) and len(batches) == len(sampler) == 5
    assert sorted(i for batch in batches for i in batch) == list(range(40))
    assert not all(max(batch) - min(batch) == 7 for batch in batches), "not runs of the file's order"
    # batch_size is a cap under max_tokens: more than the examples is no refusal
    assert len(BucketSampler([10] * 40, 4096, shuffle=True, drop_last=True, max_tokens=80)) == 5


def test_a_token_budget_below_the_longest_example_is_named() -> None:
    with pytest.raises(
        ConfigError, match=r"data.max_tokens=50 is less than the longest training example's 80 tokens"
    ):
        BucketSampler([10, 80, 30], 4, drop_last=True, max_tokens=50)
    # evaluation takes such an example in a batch of its own; two processes get one each of a
    # batch of one (repeated)
    assert [b.tolist() for b in BucketSampler([10, 80, 30], 4, shuffle=False, max_tokens=60)] == [[0, 2], [1]]
    shares = [list(BucketSampler([10, 80, 30], 4, 2, r, shuffle=False, max_tokens=60)) for r in (0, 1)]
    assert [[b.tolist() for b in share] for share in shares] == [[[0], [1]], [[2], [1]]]
    # a classifier's budget below its texts' longest is refused as the data is configured, before
    # the run starts (the sampler refused it inside fit, its run directory written)
    with pytest.raises(
        ConfigError, match=r"data.max_tokens=16 is less than data.tokenizer.max_length.s 32 tokens"
    ):
        SyntheticSentimentDataModule(
            max_tokens=16, tokenizer={"kind": "word", "vocab_size": 64, "max_length": 32}
        )
    for bad in (0, -5, 2.5, True, "many"):
        with pytest.raises(
            ConfigError, match=r"data.max_tokens=.*: expected a positive number of tokens, or null"
        ):
            BucketSampler([10, 20], 2, max_tokens=bad)


@pytest.mark.parametrize(
    ("size", "batch", "world", "steps"),
    [(11, 4, 2, 3), (9, 4, 2, 2), (13, 4, 4, 3), (12, 4, 2, 3), (5, 8, 2, 1), (1, 4, 2, 1), (2, 6, 3, 1)],
)
def test_evaluation_gives_every_example_once_and_every_process_as_many_steps(
    size: int, batch: int, world: int, steps: int
) -> None:
    """No example is repeated to even the processes out (a metric reduced over them would count it
    twice), yet each process gets the same number of non-empty steps (a collective per forward
    under sharded parameters). Only a split smaller than the processes repeats examples."""
    lengths = list(range(1, size + 1))
    ranks = [BucketSampler(lengths, batch, num_replicas=world, rank=r, shuffle=False) for r in range(world)]
    batches = [list(sampler) for sampler in ranks]
    assert all(len(b) == len(sampler) == steps for b, sampler in zip(batches, ranks))
    assert all(len(one) >= 1 for b in batches for one in b)
    handed = torch.cat([torch.cat(b) for b in batches]).tolist()
    if size >= world:
        assert sorted(handed) == list(range(size))
    else:
        assert set(handed) == set(range(size)) and len(handed) == world
    for step in range(steps):  # the shares of a step differ by at most one example
        sizes = [len(b[step]) for b in batches]
        assert max(sizes) - min(sizes) <= 1


def test_an_unseeded_text_run_draws_its_own_orders_and_resumes_in_them(tmp_path: Path) -> None:
    """``seed=null`` for text (``BatchedTextDataModule``): each run's training loader orders its
    epochs by a seed of its own, which its state carries, and a resumed loader takes it back;
    evaluation orders stay fixed (``tests/test_forecasting_data.py`` checks the rest)."""

    def module() -> SyntheticSentimentDataModule:
        dm = SyntheticSentimentDataModule(
            num_train=200, num_val=10, num_test=10, batch_size=16, cache_dir=str(tmp_path), seed=None
        )
        dm.setup()
        return dm

    def order(loader) -> list[list[int]]:
        loader.sampler.set_epoch(1)
        return [batch.tolist() for batch in loader.sampler]

    first, second = module(), module()
    first_loader = first.train_dataloader()
    assert order(first_loader) != order(second.train_dataloader())
    assert first_loader.state_dict()["seed"] == first.drawn_order_seed is not None
    resumed = second.train_dataloader()
    resumed.load_state_dict(first_loader.state_dict())
    assert order(resumed) == order(first_loader) == order(second.train_dataloader())
    assert order(first.val_dataloader()) == order(second.val_dataloader())


def test_a_text_loader_resumes_mid_epoch_at_the_next_batch(tmp_path: Path) -> None:
    dm = SyntheticSentimentDataModule(
        num_train=200, num_val=10, num_test=10, batch_size=16, cache_dir=str(tmp_path)
    )
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch = [batch["index"] for batch in loader]
    assert len(epoch) == len(loader) == 12 and all(len(index) == 16 for index in epoch)
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches": 5, "order": 3})
    resumed.sampler.set_epoch(1)
    rest = iter(resumed)
    first = next(rest)["index"]
    assert resumed.state_dict() == {"epoch": 1, "batches": 6, "order": 3, "seed": 0}
    assert all(
        torch.equal(a, b) for a, b in zip([first, *(b["index"] for b in rest)], epoch[5:], strict=True)
    )


def test_a_checkpoint_from_before_the_random_left_overs_finishes_its_epoch_in_its_own_order(
    tmp_path: Path,
) -> None:
    """Bucketing with drop_last now drops an epoch's left-over examples at random before sorting
    its pools (order 3); a checkpoint taken mid-epoch before that (order 2) goes on in the order
    its epoch began in: with the new order, the batches it skips are not those it trained, and
    some examples would be trained twice in that epoch, others not at all."""
    dm = SyntheticSentimentDataModule(
        num_train=200, num_val=10, num_test=10, batch_size=16, cache_dir=str(tmp_path)
    )
    dm.setup()
    old = dm.train_dataloader()
    old.sampler.drop_last = False  # order 2 sorted every example, then dropped the short last batch
    old.sampler.set_epoch(1)
    old_run = [batch["index"] for batch in old][:12]
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches": 5, "order": 2})
    resumed.sampler.set_epoch(1)
    rest = [batch["index"] for batch in resumed]
    assert all(torch.equal(a, b) for a, b in zip(rest, old_run[5:], strict=True))
    assert resumed.state_dict()["order"] == 2  # stopped again in that epoch: still its order
    fresh = dm.train_dataloader()
    fresh.sampler.set_epoch(1)
    new_run = [batch["index"] for batch in fresh]
    assert len(new_run) == 12 and not all(torch.equal(a, b) for a, b in zip(new_run, old_run))


def test_a_checkpoint_from_before_epoch_seed_finishes_its_epoch_in_its_own_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch orders were seeded by seed + epoch until epoch_seed: a checkpoint taken mid-epoch
    then (its loader state has no 'order') goes on in that epoch's old order, so no example of
    it is seen twice or skipped; the epochs after it draw the new orders."""
    from seqlab.data import samplers

    dm = SyntheticSentimentDataModule(
        num_train=200, num_val=10, num_test=10, batch_size=16, cache_dir=str(tmp_path)
    )
    dm.setup()

    def epoch_batches(loader, epoch: int) -> list[torch.Tensor]:
        loader.sampler.set_epoch(epoch)
        return [batch["index"] for batch in loader]

    with monkeypatch.context() as old_rule:
        old_rule.setattr(samplers, "epoch_seed", lambda seed, epoch: seed + epoch)
        old_loader = dm.train_dataloader()
        old_loader.sampler.drop_last = False  # nothing dropped before the pools are sorted, then
        old_run = epoch_batches(old_loader, 1)[:-1]  # and the short last batch dropped
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches": 5})  # an old checkpoint's loader state
    rest = epoch_batches(resumed, 1)
    assert all(torch.equal(a, b) for a, b in zip(rest, old_run[5:], strict=True))
    # stopped again in that epoch (after its 8th batch): its checkpoint keeps the old order
    again = dm.train_dataloader()
    again.load_state_dict({"epoch": 1, "batches": 5})
    again.sampler.set_epoch(1)
    batches = iter(again)
    for _ in range(3):
        next(batches)
    state = again.state_dict()
    assert state == {"epoch": 1, "batches": 8, "order": 1, "seed": 0}
    once_more = dm.train_dataloader()
    once_more.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(epoch_batches(once_more, 1), old_run[8:], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch_batches(dm.train_dataloader(), 1), old_run))
    # the next epoch: the new order
    assert all(
        torch.equal(a, b)
        for a, b in zip(epoch_batches(resumed, 2), epoch_batches(dm.train_dataloader(), 2), strict=True)
    )


def test_a_file_given_as_val_or_as_test_is_another_cache_entry(tmp_path: Path) -> None:
    """The key named the files but not their splits: val_file=X (test carved out of train) after
    test_file=X (val carved) loaded the first run's cache, testing on a slice of train."""
    root = three_class_files(tmp_path / "raw")
    as_test = text_dm(root, tmp_path / "cache")  # test.csv is the test split; val is carved
    as_val = text_dm(root, tmp_path / "cache", val_file="test.csv", test_file=None, test_size=0.2)
    assert as_test.cache_key() != as_val.cache_key()
    for dm in (as_test, as_val):
        dm.prepare_data()
        dm.setup()
    assert (
        as_val.texts("val")
        == as_test.texts("test")
        == read_table(root / "test.csv", "review", "sentiment").texts
    )
    # a setting that carves nothing is not part of the key: both files given, test_size is unused
    both = text_dm(root, tmp_path / "cache", val_file="test.csv")
    assert (
        both.cache_key() == text_dm(root, tmp_path / "cache", val_file="test.csv", test_size=0.3).cache_key()
    )
    assert as_test.cache_key() != text_dm(root, tmp_path / "cache", val_size=0.3).cache_key()


def test_val_and_test_shares_are_of_all_training_examples(tmp_path: Path) -> None:
    """test_size=0.1 held out 9% (a tenth of what val left), not the documented tenth."""
    root = three_class_files(tmp_path / "raw")  # 90 training examples
    dm = text_dm(root, tmp_path / "cache", test_file=None, val_size=0.1, test_size=0.1)
    dm.prepare_data()
    meta = json.loads((dm.processed_dir / "meta.json").read_text())
    assert meta["sizes"] == {"train": 72, "val": 9, "test": 9}
    dm.setup()
    for split in ("train", "val", "test"):  # and the class balance of each split is recorded
        labels = dm.datasets[split].labels
        assert meta["class_counts"][split] == [int((labels == c).sum()) for c in range(3)]
    # a checkpoint evaluates on the test split it was trained beside: one from before this rule
    # (no holdout_shares in its artifacts) carves a tenth of what val left, 8 texts, as then
    artifacts = dm.artifacts()
    for saved, test_size in (
        (artifacts, 9),
        ({k: v for k, v in artifacts.items() if k != "holdout_shares"}, 8),
    ):
        evaluated = text_dm(root, tmp_path / "cache", test_file=None, val_size=0.1, test_size=0.1)
        evaluated.use_artifacts(saved)
        evaluated.prepare_data()
        evaluated.setup()
        assert len(evaluated.datasets["test"]) == test_size
        assert set(evaluated.texts("test")) <= set(dm.texts("test"))  # the same shuffle, cut sooner


def test_truncated_texts_are_counted_and_reported(tmp_path: Path, caplog) -> None:
    root = three_class_files(tmp_path / "raw")
    dm = text_dm(root, tmp_path / "cache", tokenizer={"kind": "word", "max_length": 5})
    with caplog.at_level("WARNING", logger="seqlab.data.classification"):
        dm.prepare_data()
    meta = json.loads((dm.processed_dir / "meta.json").read_text())
    # "what a great film <i>" is [CLS] + 5 words: cut; "awful and dull <i>" and "a french film <i>"
    # fit, as every test text does (no number)
    truncated = meta["truncated"]
    assert truncated["train"] + truncated["val"] == 30 and truncated["test"] == 0
    assert (
        f"truncated: {{'train': '{truncated['train']} of 72', 'val': '{truncated['val']} of 18', 'test': '0 of 3'}}"
        in caplog.text
    )
    untouched = text_dm(root, tmp_path / "cache", tokenizer={"kind": "word", "max_length": 8})
    untouched.prepare_data()
    assert json.loads((untouched.processed_dir / "meta.json").read_text())["truncated"] == {
        "train": 0,
        "val": 0,
        "test": 0,
    }


def test_class_ids_of_numeric_labels_do_not_depend_on_the_hash_seed() -> None:
    """Labels equal as numbers ("1", "1.0") were ordered as a set happened to hold them (its
    order changes with PYTHONHASHSEED): every order they may come in sorts to one."""
    import itertools

    from seqlab.data.classification import _numeric_order

    labels = ["1.0", "10", "1", "2", "nan", "b", "a"]
    orders = {tuple(sorted(order, key=_numeric_order)) for order in itertools.permutations(labels)}
    assert orders == {("1", "1.0", "2", "10", "a", "b", "nan")}


def test_a_cache_of_an_older_version_is_built_again(tmp_path: Path, monkeypatch) -> None:
    """CACHE_VERSION is part of the key: a cache written by an older layout is never loaded."""
    root = three_class_files(tmp_path / "raw")
    current = text_dm(root, tmp_path / "cache").processed_dir
    monkeypatch.setattr(classification, "CACHE_VERSION", classification.CACHE_VERSION - 1)
    older = text_dm(root, tmp_path / "cache")
    assert older.processed_dir != current


def test_the_processed_cache_has_an_ordinary_directorys_mode(tmp_path: Path) -> None:
    """mkdtemp's 0700 outlived the rename: another user of a shared SEQLAB_DATA_DIR could not
    read the cache."""
    import os

    previous = os.umask(0o022)
    try:
        dm = text_dm(three_class_files(tmp_path / "raw"), tmp_path / "cache")
        dm.prepare_data()
    finally:
        os.umask(previous)
    assert dm.processed_dir.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in dm.processed_dir.iterdir())


def test_the_sentence_holdout_refuses_long_texts_with_the_numbers(tmp_path: Path, monkeypatch) -> None:
    """It enumerates every word span of every text: IMDB's reviews would take hours and tens of
    GB; refused by name before it starts."""
    monkeypatch.setattr(classification, "MAX_SPANS", 1000)
    root = tmp_path / "raw"
    write(root / "train.csv", "review,sentiment\n" + "".join(f"{'word ' * 60}{i},pos\n" for i in range(5)))
    dm = text_dm(root, tmp_path / "cache", test_file=None, val_size=1, test_size=1, holdout="sentences")
    with pytest.raises(
        ConfigError,
        match=r"data.holdout=sentences .* 9,455 word spans of 5 texts of up to 61 words .*use data.holdout=random",
    ):
        dm.prepare_data()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"vocab_size": 1e4}, r"data.tokenizer.vocab_size=10000.0: expected an integer \(write 10000\)"),
        ({"vocab_size": None}, r"data.tokenizer.vocab_size=None: expected an integer$"),
        ({"min_frequency": None}, r"data.tokenizer.min_frequency=None: expected an integer$"),
        ({"max_length": "long"}, r"data.tokenizer.max_length='long': expected an integer or null"),
        ({"lowercase": "yes"}, r"data.tokenizer.lowercase='yes': expected true or false"),
    ],
)
def test_tokenizer_settings_of_the_wrong_type_are_named(setting: dict, message: str) -> None:
    """``data.tokenizer`` is a dict, whose values the config check does not reach: ``1e4`` failed
    later with Python's "'float' object cannot be interpreted as an integer", naming no key."""
    with pytest.raises(ConfigError, match=message):
        TokenizerSpec.from_config(setting)


@pytest.mark.parametrize("vocab_size", [64, 261])
def test_a_byte_level_bpe_vocabulary_too_small_for_any_merge_is_refused(vocab_size: int) -> None:
    """The byte alphabet and the special tokens take 261 ids: the trainer made that many whatever
    was asked (a vocabulary 4x the requested 64, every text read byte by byte), and said nothing."""
    spec = TokenizerSpec(kind="bpe", vocab_size=vocab_size)  # (a checkpoint's, trained so before, loads)
    with pytest.raises(
        ConfigError, match=rf"vocab_size={vocab_size} with kind=bpe: .* take 261.*more than 261"
    ):
        train_tokenizer(["the dog runs fast"] * 5, spec)
    merged = train_tokenizer(["the dog runs fast"] * 5, TokenizerSpec(kind="bpe", vocab_size=262))
    assert merged.get_vocab_size() == 262
