"""Sequence classification: token ids -> embeddings -> ``backbone.encode`` -> pooling -> classes.

Padding never changes a prediction: RNN-family backbones run packed sequences, the Transformer
masks padded keys, and every pooling ignores padded steps. ``last`` pooling of a bidirectional
encoder takes the forward half at the last real token and the backward half at the first (each
direction's final state). ``first`` pools the ``[CLS]`` token the tokenizer puts in front.

Metrics (torchmetrics, reduced across processes): accuracy and macro-F1 per split, ``val/acc_best``;
at test time a confusion matrix image and the most confident mistakes as a table, saved in the
run directory and sent to the loggers that take images and tables (W&B, TensorBoard).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from seqlab.backbones.base import POOLINGS
from seqlab.errors import ConfigError
from seqlab.tasks.base import SeqTask, build_backbone, check_probability, check_range, mean_loss
from seqlab.utils.distributed import gather_indexed
from seqlab.utils.figures import log_figure, log_table


def metric_set(prefix: str, num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )


def most_confident(mistakes: list[tuple[int, tuple[float, float, float]]], n: int) -> list:
    """The ``n`` mistakes ``(index, (label, predicted, confidence))`` of highest confidence, ties
    by index: the same rows whether taken from all mistakes or from each process's own ``n``."""
    return sorted(mistakes, key=lambda m: (-m[1][2], m[0]))[:n]


#: the most classes whose confusion matrix gets a number in every cell; the most with tick labels
ANNOTATED_CLASSES = 30
MAX_TICK_LABELS = 100
MAX_FIGURE_INCHES = 20.0


class ClassificationTask(SeqTask):
    """Text (or any token sequence) classifier around any backbone's ``encode``.

    Args:
        backbone: the backbone's plain config (``_target_`` and arguments), from ``model=``.
        vocab_size, num_classes, class_names, pad_id, cls_id, unk_id, special_ids (the
            tokenizer's wrap, kept by word dropout): from the datamodule
            (``task_kwargs()``), never set by hand.
        pooling: ``mean``, ``max``, ``last`` or ``first`` (the [CLS] token).
        embed_dropout: dropout on the token embeddings (a Transformer backbone drops them again,
            with the positions added, at its own ``dropout``).
        word_dropout: while training, the probability that a text token is replaced by the
            unknown token (Bowman et al. 2016), so the model cannot lean on single rare words.
        head_hidden: width of a tanh hidden layer before the output layer (0: a linear head).
        head_dropout: dropout before the head.
        label_smoothing: of the cross-entropy loss.
        misclassified_samples: rows of the test table of the most confident mistakes.
    """

    test_settings = ("misclassified_samples",)

    def __init__(
        self,
        backbone: dict[str, Any],
        vocab_size: int,
        num_classes: int,
        class_names: list[str] | None = None,
        pad_id: int = 0,
        cls_id: int | None = None,
        unk_id: int | None = None,
        special_ids: list[int] | None = None,
        pooling: str = "mean",
        embed_dropout: float = 0.1,
        word_dropout: float = 0.0,
        head_hidden: int = 0,
        head_dropout: float = 0.1,
        label_smoothing: float = 0.0,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        monitor: str = "val/acc",
        monitor_mode: str | None = "max",
        misclassified_samples: int = 50,
    ) -> None:
        super().__init__(monitor=monitor, monitor_mode=monitor_mode)
        self.save_hyperparameters(logger=False)
        for key in ("embed_dropout", "word_dropout", "head_dropout", "label_smoothing"):
            check_probability(f"task.{key}", self.hparams[key])
        check_range("task.misclassified_samples", misclassified_samples, lambda v: v >= 0, "a row count >= 0")
        if pooling not in POOLINGS:
            raise ConfigError(f"task.pooling={pooling!r}: expected one of {list(POOLINGS)}")
        if pooling == "first" and cls_id is None:
            raise ConfigError("task.pooling=first pools the [CLS] token: set data.tokenizer.wrap=cls")
        if word_dropout and unk_id is None:
            raise ConfigError(
                "task.word_dropout needs the data's unknown-token id (unk_id); this data has none"
            )
        if num_classes < 2:
            raise ConfigError(f"the data has {num_classes} class(es); classification needs at least 2")
        self.backbone = build_backbone(backbone, padded=True)
        if pooling == "first" and self.backbone.causal:
            raise ConfigError(
                "task.pooling=first reads the [CLS] token, which a causal (left-to-right) backbone "
                "encodes before any text: every input would get one prediction; use pooling=last, "
                "mean or max, or a bidirectional / non-causal backbone"
            )
        width = self.backbone.d_model
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.embed_dropout = nn.Dropout(embed_dropout)
        layers: list[nn.Module] = [nn.Dropout(head_dropout)]
        if head_hidden:
            layers += [nn.Linear(width, head_hidden), nn.Tanh(), nn.Dropout(head_dropout)]
        layers.append(nn.Linear(head_hidden or width, num_classes))
        self.head = nn.Sequential(*layers)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.val_loss = mean_loss()
        self.val_metrics = metric_set("val/", num_classes)
        self.test_metrics = metric_set("test/", num_classes)
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self._mistakes: list[Tensor] = []

    # ------------------------------------------------------------------ model
    def forward(self, input_ids: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """input_ids [B,T] (right-padded), pad_mask [B,T] (True = padding) -> logits [B,C]."""
        x = self.embed_dropout(self.embed(input_ids))
        states = self.backbone.encode(x, pad_mask)
        pooled = self.backbone.pool(states, pad_mask, self.hparams.pooling)
        return self.head(pooled)

    def drop_words(self, input_ids: Tensor, pad_mask: Tensor) -> Tensor:
        """Replace text tokens by the unknown token with probability ``word_dropout`` (training only)."""
        rate = self.hparams.word_dropout
        if not (self.training and rate):
            return input_ids
        drop = (torch.rand(input_ids.shape, device=input_ids.device) < rate) & ~pad_mask
        # the wrap's tokens ([CLS], or [BOS] ... [EOS]) stay: they are not words
        for kept in {self.hparams.cls_id, *(self.hparams.get("special_ids") or ())} - {None}:
            drop &= input_ids != kept
        return input_ids.masked_fill(drop, self.hparams.unk_id)

    def _logits_and_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self(self.drop_words(batch["input_ids"], batch["pad_mask"]), batch["pad_mask"])
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.hparams.label_smoothing)
        return logits, loss

    # ------------------------------------------------------------------ steps
    def step_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self._logits_and_loss(batch)[1]

    def batch_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        return (~batch["pad_mask"]).sum()

    def batch_positions(self, batch: dict[str, Tensor]) -> int:
        return batch["pad_mask"].numel()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["pad_mask"])
        labels = batch["labels"]
        # plain cross-entropy (no label smoothing), the mean over examples however they are batched
        self.val_loss.update(F.cross_entropy(logits.float(), labels), weight=len(labels))
        self.val_metrics.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        values = {"val/loss": self.val_loss.compute(), **self.val_metrics.compute()}
        self.log_dict(values, prog_bar=True, sync_dist=True)  # already reduced: silences Lightning's hint
        self.val_loss.reset()
        self.val_metrics.reset()
        self.log_monitor_best(values)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["pad_mask"])
        labels = batch["labels"]
        self.test_metrics.update(logits, labels)
        self.confusion.update(logits, labels)
        probs = logits.float().softmax(dim=-1)
        confidence, preds = probs.max(dim=-1)
        wrong = preds != labels
        if bool(wrong.any()):
            # on the host: float64 (exact indices) is not on every accelerator (MPS)
            rows = torch.stack([batch["index"][wrong], labels[wrong], preds[wrong]], dim=1).cpu().double()
            self._mistakes.append(torch.cat([rows, confidence[wrong, None].cpu().double()], dim=1))

    def on_test_epoch_start(self) -> None:
        self._mistakes = []

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()
        confusion = self.confusion.compute()  # summed over processes
        self.confusion.reset()
        rows = torch.cat(self._mistakes).tolist() if self._mistakes else []
        # each process's most confident mistakes, then all processes': (index, (label, predicted,
        # confidence)), each example once
        mine = [(int(row[0]), tuple(row[1:])) for row in rows]
        mistakes = gather_indexed(most_confident(mine, self.hparams.misclassified_samples))
        if self.trainer.is_global_zero:
            self.report_confusion(confusion)
            self.report_mistakes(mistakes)
        self._mistakes = []

    # ------------------------------------------------------------------ reports
    def report_confusion(self, confusion: Tensor) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        classes = len(self.class_names)
        # a cell of text per pair of classes: 280 classes took 133 s to draw, into a 10 MB image;
        # past ANNOTATED_CLASSES the matrix is drawn as an image alone, in a figure of bounded size
        annotated = classes <= ANNOTATED_CLASSES
        size = max(4.0, 0.6 * classes + 2) if annotated else MAX_FIGURE_INCHES
        fig, ax = plt.subplots(figsize=(size, size))
        self.confusion.plot(
            val=confusion.cpu(),
            ax=ax,
            add_text=annotated,
            labels=self.class_names if classes <= MAX_TICK_LABELS else None,
        )
        ax.set_title("test confusion matrix", fontsize=10)
        fig.tight_layout()
        log_figure(self.trainer, fig, "test/confusion_matrix")

    def report_mistakes(self, mistakes: list[tuple[int, tuple[float, float, float]]]) -> None:
        """The most confident test mistakes of all processes as a table."""
        if not mistakes:
            return
        mistakes = most_confident(mistakes, self.hparams.misclassified_samples)
        datamodule = getattr(self.trainer, "datamodule", None)
        texts = datamodule.texts("test") if hasattr(datamodule, "texts") else None
        table = [
            [
                index,
                texts[index] if texts is not None else "",
                self.class_names[int(label)],
                self.class_names[int(pred)],
                round(float(confidence), 4),
            ]
            for index, (label, pred, confidence) in mistakes
        ]
        log_table(
            self.trainer, "test/misclassified", ["index", "text", "label", "predicted", "confidence"], table
        )
