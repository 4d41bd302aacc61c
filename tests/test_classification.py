"""The classification task: padding changes nothing, every backbone learns, eval reproduces, reports exist."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from seqlab.backbones.base import pool
from seqlab.data import classification
from seqlab.errors import ConfigError
from seqlab.eval import evaluate
from seqlab.tasks.classification import ClassificationTask, most_confident
from seqlab.train import train
from tests.conftest import SHARED_DATA, run_script, why_failed
from tests.faults import initial_weights

BACKBONES = {
    "rnn": {"_target_": "seqlab.backbones.rnn.RNNBackbone", "cell": "rnn", "d_model": 16, "num_layers": 2},
    "lstm": {"_target_": "seqlab.backbones.rnn.RNNBackbone", "cell": "lstm", "d_model": 16, "num_layers": 2},
    "bilstm": {
        "_target_": "seqlab.backbones.rnn.RNNBackbone",
        "cell": "lstm",
        "d_model": 16,
        "num_layers": 2,
        "bidirectional": True,
    },
    "gru": {"_target_": "seqlab.backbones.rnn.RNNBackbone", "cell": "gru", "d_model": 16, "num_layers": 1},
    "transformer": {
        "_target_": "seqlab.backbones.transformer.TransformerBackbone",
        "d_model": 16,
        "nhead": 2,
        "num_layers": 2,
        "dim_feedforward": 32,
    },
    "biminlstm": {
        "_target_": "seqlab.backbones.minrnn.MinRNNBackbone",
        "cell": "minlstm",
        "d_model": 16,
        "dim_feedforward": 32,
        "bidirectional": True,
    },
}


CAUSAL = {"rnn", "lstm", "gru"}  # first pooling of these is refused (test_bad_task_settings_are_named)


@pytest.mark.parametrize(
    ("backbone", "pooling"),
    [
        (backbone, pooling)
        for backbone in sorted(BACKBONES)
        for pooling in ("mean", "max", "last", "first")
        if not (pooling == "first" and backbone in CAUSAL)
    ],
)
def test_padding_changes_no_logit(backbone: str, pooling: str) -> None:
    torch.manual_seed(0)
    task = ClassificationTask(
        BACKBONES[backbone], vocab_size=50, num_classes=3, cls_id=2, pooling=pooling
    ).eval()
    lengths = [7, 3, 1, 5]
    seqs = [torch.randint(5, 50, (n,)) for n in lengths]
    ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = seq
    pad_mask = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        batched = task(ids, pad_mask)
        one_by_one = torch.cat([task(seq[None], torch.zeros(1, len(seq), dtype=torch.bool)) for seq in seqs])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


def test_last_pooling_of_a_bidirectional_encoder_takes_each_direction_final_state() -> None:
    states = torch.arange(2 * 4 * 4, dtype=torch.float).view(2, 4, 4)
    pad_mask = torch.tensor([[False, False, False, True], [False, False, False, False]])
    pooled = pool(states, pad_mask, "last", reversed_half=True)
    assert pooled[0].tolist() == [*states[0, 2, :2].tolist(), *states[0, 0, 2:].tolist()]
    assert pooled[1].tolist() == [*states[1, 3, :2].tolist(), *states[1, 0, 2:].tolist()]
    # the [CLS] step's forward half has read only [CLS]: "first" takes the same final states
    assert torch.equal(pool(states, pad_mask, "first", reversed_half=True), pooled)
    assert torch.equal(pool(states, pad_mask, "first"), states[:, 0])


@pytest.mark.parametrize("how", ["last", "first"])
def test_end_pooling_of_a_bidirectional_min_rnn_reads_both_directions_summaries(how: str) -> None:
    # one layer, the direction that has read the whole text at the pooled step silenced: what is
    # left there has read only that step's token (the other direction's summary is at the other end)
    torch.manual_seed(0)
    task = ClassificationTask(
        {**BACKBONES["biminlstm"], "num_layers": 1, "dropout": 0.0}, vocab_size=50, num_classes=3,
        cls_id=2, pooling=how, embed_dropout=0.0,
    ).eval()  # fmt: skip
    rnn = task.backbone.encoder_layers[0].rnn
    with torch.no_grad():
        silenced = slice(None, rnn.hidden) if how == "last" else slice(rnn.hidden, None)
        rnn.out.weight[:, silenced] = 0
    ids = torch.randint(5, 50, (1, 9))
    ids[0, 0] = 2
    changed = ids.clone()
    changed[0, 1:-1] = torch.randint(5, 50, (7,))  # the [CLS] and the last token kept
    with torch.no_grad():
        logits, changed_logits = task(ids, None), task(changed, None)
    # the other end's summary reaches the pooled features: the middle tokens count
    assert (logits - changed_logits).abs().max() > 1e-3


def test_word_dropout_replaces_only_text_tokens_and_only_in_training() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(
        BACKBONES["gru"], vocab_size=50, num_classes=2, cls_id=2, unk_id=1, word_dropout=0.5
    )
    ids = torch.randint(5, 50, (64, 40))
    ids[:, 0] = 2
    pad_mask = torch.zeros_like(ids, dtype=torch.bool)
    pad_mask[:, 30:] = True
    dropped = task.train().drop_words(ids, pad_mask)
    changed = dropped != ids
    assert (dropped[changed] == 1).all()
    assert not changed[:, 0].any() and not changed[pad_mask].any()
    assert 0.45 < changed[:, 1:30].float().mean() < 0.55
    assert torch.equal(task.eval().drop_words(ids, pad_mask), ids)


def test_each_process_sends_only_its_most_confident_mistakes() -> None:
    """The mistakes table is the same whether every process sends all its mistakes or only its
    own top N (what crosses the processes), ties in confidence included."""
    generator = torch.Generator().manual_seed(0)
    confidence = (torch.rand(200, generator=generator) * 8).round() / 8  # many ties
    mistakes = [(i, (0.0, 1.0, float(c))) for i, c in enumerate(confidence)]
    shares = [mistakes[rank::3] for rank in range(3)]  # process r holds examples r, r + 3, ...
    merged = [m for share in shares for m in most_confident(share, 10)]
    top = most_confident(merged, 10)
    assert top == most_confident(mistakes, 10)
    assert [c for _, (_, _, c) in top] == sorted((float(c) for c in confidence), reverse=True)[:10]
    assert top == sorted(top, key=lambda m: (-m[1][2], m[0]))


def test_the_validation_loss_is_plain_cross_entropy_over_examples() -> None:
    """However the examples are batched, and whatever label smoothing training uses."""
    torch.manual_seed(0)
    task = ClassificationTask(BACKBONES["gru"], vocab_size=50, num_classes=3, label_smoothing=0.2).eval()
    ids = torch.randint(5, 50, (4, 6))
    pad_mask = torch.zeros_like(ids, dtype=torch.bool)
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        for rows in (slice(0, 3), slice(3, 4)):  # a batch of 3, then a batch of 1
            batch = {"input_ids": ids[rows], "pad_mask": pad_mask[rows], "labels": labels[rows]}
            task.validation_step(batch, 0)
        expected = torch.nn.functional.cross_entropy(task(ids, pad_mask), labels)
    torch.testing.assert_close(task.val_loss.compute(), expected)


def test_a_validation_batch_whose_loss_is_nan_makes_the_validation_loss_nan() -> None:
    """torchmetrics' mean dropped NaN values with a warning: a model overflowing on some batches
    (float16) reported the finite mean of the others, a better val/loss than its own."""
    torch.manual_seed(0)
    task = ClassificationTask(BACKBONES["gru"], vocab_size=50, num_classes=3).eval()
    ids, labels = torch.randint(5, 50, (4, 6)), torch.tensor([0, 1, 2, 1])
    batch = {"input_ids": ids, "pad_mask": torch.zeros_like(ids, dtype=torch.bool), "labels": labels}
    with torch.no_grad():
        task.validation_step(batch, 0)
        assert torch.isfinite(task.val_loss.compute())
        next(task.backbone.parameters()).fill_(float("nan"))  # the next batch's forward overflows
        task.validation_step(batch, 1)
    assert torch.isnan(task.val_loss.compute())


def test_bad_task_settings_are_named() -> None:
    from seqlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"task.pooling='attention'"):
        ClassificationTask(BACKBONES["gru"], vocab_size=10, num_classes=2, pooling="attention")
    with pytest.raises(ConfigError, match=r"data.tokenizer.wrap=cls"):
        ClassificationTask(BACKBONES["gru"], vocab_size=10, num_classes=2, pooling="first", cls_id=None)
    # a causal backbone encodes [CLS] before any text: every input would get one prediction
    for causal in sorted(CAUSAL):
        with pytest.raises(ConfigError, match=r"task.pooling=first reads the \[CLS\] token, which a causal"):
            ClassificationTask(BACKBONES[causal], vocab_size=10, num_classes=2, pooling="first", cls_id=2)
    causal_transformer = {**BACKBONES["transformer"], "causal": True}
    with pytest.raises(ConfigError, match=r"task.pooling=first"):
        ClassificationTask(causal_transformer, vocab_size=10, num_classes=2, pooling="first", cls_id=2)
    ClassificationTask(BACKBONES["bilstm"], vocab_size=10, num_classes=2, pooling="first", cls_id=2)
    # truncated BPTT needs unpadded series: refused when the task is built, not at the first step
    with pytest.raises(ConfigError, match=r"model.tbptt_steps=4 truncates unpadded series"):
        ClassificationTask({**BACKBONES["gru"], "tbptt_steps": 4}, vocab_size=10, num_classes=2)


TEXT_FAST = [
    "data=sentiment_synthetic",
    "model.d_model=32",
    "task.optimizer.lr=3e-3",
    "trainer.max_epochs=5",
    "trainer.accelerator=cpu",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]


@pytest.fixture
def text_cfg(make_cfg, tmp_path: Path):
    def make(*overrides: str, **kwargs):
        return make_cfg(*TEXT_FAST, f"data.cache_dir={tmp_path / 'cache'}", *overrides, fast=False, **kwargs)

    return make


@pytest.mark.parametrize("model", ["rnn", "lstm", "gru", "transformer", "mingru", "minlstm"])
def test_every_backbone_learns_synthetic_sentiment(text_cfg, model: str) -> None:
    metrics, objects = train(text_cfg(f"model={model}"))
    assert metrics["test/acc"] > 0.9, metrics
    assert metrics["test/f1"] > 0.85, metrics
    assert metrics["val/acc_best"] >= metrics["val/acc"] - 1e-6
    assert objects["summary"]["task"] == "classification"


def test_bf16_mixed_rnn_learns_synthetic_sentiment_on_cpu(text_cfg) -> None:
    """bf16-mixed with an LSTM on CPU: the embeddings hand the recurrence float32 inputs, for which
    oneDNN mostly has no bf16 kernel (this used to be refused); the recurrence runs in float32 and
    the rest in bfloat16, and it learns as in float32."""
    metrics, objects = train(text_cfg("model=lstm", "trainer.precision=bf16-mixed"))
    assert objects["trainer"].precision == "bf16-mixed"
    assert metrics["test/acc"] > 0.9, metrics


def test_reports_and_eval_reproduce_the_test_accuracy(
    text_cfg, make_cfg, tmp_path: Path, monkeypatch
) -> None:
    metrics, objects = train(text_cfg("model=gru", "trainer.max_epochs=2"))
    run_dir = tmp_path / "run"
    assert (run_dir / "plots" / "test_confusion_matrix.png").stat().st_size > 1000
    with open(run_dir / "tables" / "test_misclassified.csv") as f:
        rows = list(csv.DictReader(f))
    test_texts = objects["datamodule"].texts("test")
    wrong = round((1 - metrics["test/acc"]) * len(test_texts))
    assert wrong > 0, "no mistakes: the table's rows would go unchecked"
    assert len(rows) == min(wrong, 50)
    for row in rows:
        assert row["label"] != row["predicted"]
        assert row["text"] == test_texts[int(row["index"])]
    ckpt = objects["summary"]["best_checkpoint"]
    # from the checkpoint alone: no processed data left, and no tokenizer may be trained again
    shutil.rmtree(tmp_path / "cache")

    def no_training(*args, **kwargs):
        raise AssertionError("eval trained a new tokenizer instead of the checkpoint's")

    monkeypatch.setattr(classification, "train_tokenizer", no_training)
    eval_metrics, _ = evaluate(
        make_cfg(f"ckpt_path={ckpt}", "extras.print_config=false", name="eval", output="eval")
    )
    for key in ("test/acc", "test/f1"):
        assert eval_metrics[key] == pytest.approx(metrics[key], abs=1e-6), key
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["metrics"]["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_eval_reads_moved_data_from_data_dir(make_cfg, tmp_path: Path) -> None:
    """``eval.py ckpt_path=... data_dir=<new place>``: the data moved after training is read from
    there, with the checkpoint's tokenizer, and gives the run's test metrics; without it, the
    missing file is named."""
    from seqlab.errors import DataError

    rows = [f"{'good fine nice' if i % 2 else 'bad awful dull'} film {i}\t{i % 2}" for i in range(200)]
    trained_on = tmp_path / "data"
    trained_on.mkdir()
    (trained_on / "train.tsv").write_text("text\tlabel\n" + "\n".join(rows[:160]) + "\n")
    (trained_on / "test.tsv").write_text("text\tlabel\n" + "\n".join(rows[160:]) + "\n")
    trained = [
        "data=text_classification", f"data.data_dir={trained_on}", "data.test_file=test.tsv", "data.tokenizer.kind=word",
        f"data.cache_dir={tmp_path / 'machine' / 'cache'}", "model=gru", "model.d_model=16", "trainer.max_epochs=2",
        "data.batch_size=16", "extras.print_config=false", "callbacks.rich_progress_bar=null",
    ]  # fmt: skip
    metrics, objects = train(make_cfg(*trained, fast=False))
    ckpt = objects["summary"]["best_checkpoint"]
    moved = tmp_path / "moved"
    trained_on.rename(moved)
    shutil.rmtree(tmp_path / "machine")  # as on another machine: the saved cache's place is not there
    with pytest.raises(DataError, match=r"data/test.tsv"):  # (the test split alone is read)
        evaluate(make_cfg(f"ckpt_path={ckpt}", "extras.print_config=false", name="eval", output="nowhere"))
    (moved / "train.tsv").unlink()  # a run directory sent with its test file alone: that is all eval reads
    cfg = make_cfg(
        f"ckpt_path={ckpt}", f"data_dir={moved}", "extras.print_config=false", name="eval", output="eval"
    )
    evaluated, objects = evaluate(cfg)
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    # processed into this machine's data root, not into the trained run's (gone) one
    assert Path(objects["datamodule"].processed_dir).is_relative_to(Path(cfg.paths.data_dir) / "processed")
    assert not (tmp_path / "machine").exists()
    assert set(objects["datamodule"].datasets) == {"test"}


def test_with_weight_averaging_train_tests_the_averaged_weights_it_selected(
    text_cfg, make_cfg, tmp_path: Path
) -> None:
    """callbacks.ema (the sst2_* recipes): validation and best.ckpt hold the averaged weights, but
    the test after fit ran on the raw weights of the best step (the callback put them back when
    the checkpoint was loaded): train.py reported 0.94 where eval.py of its best.ckpt gave 0.47."""
    import warnings

    ema = "+callbacks.ema={_target_: lightning.pytorch.callbacks.EMAWeightAveraging, decay: 0.999}"
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        metrics, objects = train(text_cfg("model=gru", "trainer.max_epochs=2", ema))
    # nor Lightning's warnings that read as errors: no sharding here, and dropped on purpose
    said = "\n".join(str(w.message) for w in warned)
    assert (
        "overrides the configure_model" not in said and "callbacks used to create the checkpoint" not in said
    )
    ckpt = objects["summary"]["best_checkpoint"]
    eval_metrics, _ = evaluate(
        make_cfg(f"ckpt_path={ckpt}", "extras.print_config=false", name="eval", output="eval")
    )
    for key in ("test/acc", "test/f1"):
        assert metrics[key] == pytest.approx(eval_metrics[key], abs=1e-6), key


def test_a_resumed_run_encodes_with_the_checkpoints_tokenizer(text_cfg, tmp_path: Path, monkeypatch) -> None:
    """Resuming rebuilt the data from the config: with its cache entry gone (cleaned up, another
    node, a data file copied anew with a new modification time), the tokenizer was trained again,
    and WordPiece/Unigram training numbers the tokens otherwise each time, under the trained
    embeddings. The resumed run encodes with the tokenizer saved in the checkpoint."""
    _, objects = train(text_cfg("model=gru", "trainer.max_epochs=1"))
    saved = objects["datamodule"].artifacts()["tokenizer"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"

    def no_training(*args, **kwargs):
        raise AssertionError("the resumed run trained a new tokenizer instead of the checkpoint's")

    def no_encoding(*args, **kwargs):
        raise AssertionError("the resumed run encoded its data again beside the entry it trained on")

    # with the run's cache entry in place, the resumed run reads it: no second entry
    entries = sorted((tmp_path / "cache").iterdir())
    with monkeypatch.context() as patched:
        patched.setattr(classification, "encode_counting", no_encoding)
        _, read = train(text_cfg("model=gru", "trainer.max_epochs=2", f"ckpt_path={last}", output="read"))
    assert read["trainer"].current_epoch == 2 and sorted((tmp_path / "cache").iterdir()) == entries

    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setattr(classification, "train_tokenizer", no_training)
    # other tokenizer settings would be recorded and ignored: refused by name
    with pytest.raises(ConfigError, match=r"data.tokenizer.lowercase=False \(trained with True\)"):
        train(text_cfg("model=gru", f"ckpt_path={last}", "data.tokenizer.lowercase=false", output="refused"))
    metrics, resumed = train(
        text_cfg("model=gru", "trainer.max_epochs=2", f"ckpt_path={last}", output="onward")
    )
    assert resumed["trainer"].current_epoch == 2 and metrics["test/acc"] > 0.5
    assert resumed["datamodule"].artifacts()["tokenizer"] == saved


def test_processes_with_different_tokenizers_are_refused(text_cfg) -> None:
    """Each process reads the cache entry of its own data.cache_dir: one per node on node-local
    disks, each with a tokenizer trained there (WordPiece and Unigram training is not the same
    twice). Every process compares its tokenizer with process 0's and all stop together."""
    from types import SimpleNamespace

    from seqlab.errors import DataError
    from seqlab.train import build_datamodule

    datamodule = build_datamodule(text_cfg().data)

    def process(rank: int, first: str | None) -> SimpleNamespace:
        strategy = SimpleNamespace(
            broadcast=lambda mine: first or mine, reduce_boolean_decision=lambda differs, all: differs
        )
        return SimpleNamespace(world_size=2, global_rank=rank, strategy=strategy)

    datamodule.trainer = process(1, first="the digest of another tokenizer")
    with pytest.raises(
        DataError, match=r"different tokenizers \(process 1 read .*cache.*give data.cache_dir one"
    ):
        datamodule.setup("fit")
    datamodule.trainer = process(1, first=None)  # process 0's is this one
    datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) > 0


def test_checkpoint_reloads_to_the_same_logits(text_cfg) -> None:
    """The best checkpoint rebuilds the model tested (its logits), not the weights fit started from."""
    probe = "+callbacks.initial._target_=tests.faults.RecordInitialWeights"
    _, objects = train(text_cfg("model=transformer", "trainer.max_epochs=1", probe))
    ckpt = objects["summary"]["best_checkpoint"]
    restored = ClassificationTask.load_from_checkpoint(ckpt, weights_only=True).eval()
    trained = objects["task"].eval()  # trainer.test loaded the best checkpoint's weights into it
    batch = objects["datamodule"].datasets["test"].__getitems__(list(range(16)))
    with torch.no_grad():
        logits = restored(batch["input_ids"], batch["pad_mask"])
        torch.testing.assert_close(logits, trained(batch["input_ids"], batch["pad_mask"]))
        untrained = ClassificationTask(**restored.hparams).eval()
        untrained.load_state_dict(initial_weights(objects["trainer"]))  # what fit started from
        assert not torch.allclose(logits, untrained(batch["input_ids"], batch["pad_mask"]), atol=1e-3)
    assert restored.hparams.vocab_size == objects["task"].hparams.vocab_size


@pytest.mark.slow
def test_sst2_from_the_shared_files_learns(tmp_path: Path) -> None:
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip("../shared/data/sst2 is not available")
    result = run_script(
        "train.py",
        "data=sst2",
        f"data.data_dir={SHARED_DATA / 'sst2'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model=gru",
        "model.d_model=64",
        "model.num_layers=1",
        "task.optimizer.lr=3e-3",
        "trainer.limit_train_batches=700",
        "trainer.max_epochs=1",
        "extras.print_config=false",
        "callbacks.rich_progress_bar=null",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, why_failed(result)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"] == "sst2"
    assert summary["metrics"]["test/acc"] > 0.7, summary["metrics"]


@pytest.mark.parametrize("wrap, kept", [("bos_eos", (3, 4)), ("cls", (2,))])
def test_word_dropout_replaces_words_only(text_cfg, wrap: str, kept: tuple[int, ...]) -> None:
    """Word dropout keeps the tokenizer's wrap ([CLS], or [BOS] ... [EOS]: with pooling=last the
    pooled position is [EOS] in evaluation) and padding; every word becomes [UNK] at rate 1."""
    from seqlab.data.tokenization import BOS_ID, CLS_ID, EOS_ID, PAD_ID, UNK_ID
    from seqlab.train import build_datamodule, build_task

    cfg = text_cfg(f"data.tokenizer.wrap={wrap}", "task.word_dropout=1.0", "task.pooling=mean")
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    task = build_task(cfg.task, cfg.model, datamodule).train()
    assert (BOS_ID, EOS_ID, CLS_ID) == (3, 4, 2)
    batch = datamodule.datasets["train"].__getitems__(list(range(8)))
    ids, pad = batch["input_ids"], batch["pad_mask"]
    dropped = task.drop_words(ids, pad)
    special = torch.zeros_like(ids, dtype=torch.bool)
    for token in kept:
        special |= ids == token
    assert special.sum() == len(kept) * 8  # each text wrapped once
    assert torch.equal(dropped[special | pad], ids[special | pad])
    assert (dropped[~special & ~pad] == UNK_ID).all() and (ids[pad] == PAD_ID).all()


def test_a_bidirectional_min_rnn_checkpoint_from_before_both_ends_pools_as_it_was_trained(caplog) -> None:
    """Checkpoints saved before last/first pooling read both ends evaluate the function they were
    trained to compute (no key changed, so nothing else would have told them apart)."""
    task = ClassificationTask(BACKBONES["biminlstm"], vocab_size=50, num_classes=3, cls_id=2, pooling="last")
    saved: dict = {}
    task.on_save_checkpoint(saved)
    assert saved["seqlab"]["summary_at_ends"] is True
    task.on_load_checkpoint(saved)
    assert task.backbone.summary_at_ends and not caplog.text
    del saved["seqlab"]["summary_at_ends"]
    with caplog.at_level("WARNING", logger="seqlab.tasks.base"):
        task.on_load_checkpoint(saved)
    assert not task.backbone.summary_at_ends
    assert "bidirectional MinRNNBackbone pools its last or first step alone, as it was trained" in caplog.text


@pytest.mark.parametrize("classes", [3, 280])
def test_the_confusion_matrix_of_many_classes_is_drawn_without_a_number_per_cell(
    classes: int, monkeypatch
) -> None:
    """280 classes (a float label column read as classes) took 133 s to draw, a number in each of
    78,400 cells, into a 10 MB image, in every train and eval."""
    import seqlab.tasks.classification as classification

    drawn = {}
    monkeypatch.setattr(classification, "log_figure", lambda trainer, fig, name: drawn.update(fig=fig))
    task = ClassificationTask(
        {"_target_": "seqlab.backbones.RNNBackbone", "cell": "gru", "d_model": 8},
        vocab_size=20, num_classes=classes, class_names=[f"c{i}" for i in range(classes)],
    )  # fmt: skip
    task._trainer = object()  # (log_figure is stubbed)
    task.report_confusion(torch.randint(0, 5, (classes, classes)))
    fig = drawn["fig"]
    assert len(fig.axes[0].texts) == (9 if classes == 3 else 0)
    assert max(fig.get_size_inches()) <= classification.MAX_FIGURE_INCHES
