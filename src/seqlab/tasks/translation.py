"""Translation: source ids -> ``backbone.encode`` -> stateful ``backbone.decode`` -> target tokens.

Training is teacher forcing with label-smoothed cross-entropy. Evaluation generates step by step
with the backbone's state (``tasks.generation``): greedy or beam search with a length penalty,
each sentence limited to ``max_len_a * source length + max_len_b`` tokens. Hypotheses are
detokenised by the datamodule's target tokenizer and scored against the raw references with
sacreBLEU (BLEU with its signature, and chrF): on validation every epoch (the first
``val_bleu_samples`` sentences, 0 = all) and on the whole test set, which also writes
``translations/test.hyp`` (one line per test sentence, in order) and a table of samples
(source, reference, hypothesis) to the run directory and to table-capable loggers.

Embeddings are initialised N(0, d^-1/2) and scaled by sqrt(d) (unit variance inputs for every
backbone); the output layer shares the target embedding's weights (``tie_output``) and, with a
joint vocabulary, the source embedding is the same table (``share_embeddings``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from seqlab.data.tokenization import CLS_ID
from seqlab.data.translation import sacrebleu_metrics
from seqlab.errors import ConfigError
from seqlab.tasks.base import SeqTask, build_backbone, check_probability, check_range, mean_loss
from seqlab.tasks.generation import Agree, alone, beam_search, greedy_search
from seqlab.utils.distributed import gather_indexed, shards_parameters
from seqlab.utils.figures import log_table
from seqlab.utils.files import write_text_atomic


def corpus_scores(
    hypotheses: list[str], references: list[str], lowercase: bool = False, target_lang: str = ""
) -> dict[str, Any]:
    """sacreBLEU BLEU and chrF of detokenised hypotheses against one reference each."""
    bleu, chrf = sacrebleu_metrics(lowercase, target_lang)
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


class TranslationTask(SeqTask):
    """Encoder-decoder translation around any backbone with a decoder.

    Args:
        backbone: the backbone's plain config; the task builds it with ``with_decoder=True``.
        src_vocab_size, tgt_vocab_size, shared_vocab, pad_id, bos_id, eos_id: from the datamodule.
        share_embeddings: one table for source and target tokens (needs a joint vocabulary).
        tie_output: the output layer reuses the target embedding (Press & Wolf 2017).
        embed_dropout: dropout on the (scaled) embeddings (a Transformer backbone drops them
            again, with the positions added, at its own ``dropout``).
        label_smoothing: of the training cross-entropy (0.1 in Vaswani et al. 2017).
        beam_size, length_penalty, max_len_a, max_len_b: test-time search (beam 1 = greedy).
        min_len: [EOS] is refused before this many target tokens (fairseq's ``--min-len``).
        val_beam_size: search used for the validation BLEU (1: greedy, cheap).
        val_bleu_samples: the first N validation sentences (in the split's order) translated each
            epoch for ``val/bleu`` (0: all).
        sample_translations: rows of the test table of sample translations.
    """

    forward_methods = ("generate",)
    test_settings = (
        "beam_size",
        "length_penalty",
        "max_len_a",
        "max_len_b",
        "min_len",
        "sample_translations",
    )

    def __init__(
        self,
        backbone: dict[str, Any],
        src_vocab_size: int,
        tgt_vocab_size: int,
        shared_vocab: bool = False,
        pad_id: int = 0,
        bos_id: int = 3,
        eos_id: int = 4,
        share_embeddings: bool = True,
        tie_output: bool = True,
        embed_dropout: float = 0.1,
        label_smoothing: float = 0.1,
        beam_size: int = 5,
        length_penalty: float = 1.0,
        max_len_a: float = 1.5,
        max_len_b: int = 10,
        min_len: int = 1,
        val_beam_size: int = 1,
        val_bleu_samples: int = 0,
        sample_translations: int = 20,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        monitor: str = "val/bleu",
        monitor_mode: str | None = "max",
    ) -> None:
        super().__init__(monitor=monitor, monitor_mode=monitor_mode)
        self.save_hyperparameters(logger=False)
        for key in ("embed_dropout", "label_smoothing"):
            check_probability(f"task.{key}", self.hparams[key])
        if beam_size < 1 or val_beam_size < 1:
            raise ConfigError(
                f"task.beam_size={beam_size}, task.val_beam_size={val_beam_size}: expected >= 1"
            )
        if val_bleu_samples < 0:
            raise ConfigError(f"task.val_bleu_samples={val_bleu_samples}: expected 0 (all) or a count")
        # negative limits made every hypothesis empty (EOS forced at the first step): BLEU 0, unsaid
        check_range(
            "task.max_len_a",
            max_len_a,
            lambda v: 0 <= v < math.inf,
            "a number >= 0 (tokens per source token)",
        )
        check_range("task.max_len_b", max_len_b, lambda v: v >= 0, "a number >= 0 (tokens besides)")
        check_range("task.min_len", min_len, lambda v: v >= 0, "a token count >= 0")
        check_range("task.sample_translations", sample_translations, lambda v: v >= 0, "a row count >= 0")
        if share_embeddings and not shared_vocab:
            raise ConfigError(
                "task.share_embeddings=true needs one vocabulary for both languages: set "
                "data.shared_vocab=true, or task.share_embeddings=false"
            )
        self.backbone = build_backbone(backbone, padded=True, with_decoder=True)
        if not self.backbone.decodes():  # (it failed at the sanity check, a bare NotImplementedError)
            raise ConfigError(
                f"model._target_={backbone.get('_target_')!r}: translation decodes with the backbone's "
                f"decode, which {type(self.backbone).__name__} does not implement (seqlab.backbones.base); "
                "forecasting and classification need encode only"
            )
        width = self.backbone.d_model
        self.scale = math.sqrt(width)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, width, padding_idx=pad_id)
        self.src_embed = (
            self.tgt_embed if share_embeddings else nn.Embedding(src_vocab_size, width, padding_idx=pad_id)
        )
        for table in {id(m): m for m in (self.src_embed, self.tgt_embed)}.values():
            nn.init.normal_(table.weight, std=width**-0.5)
            nn.init.zeros_(table.weight[pad_id])
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.output = nn.Linear(width, tgt_vocab_size, bias=False)
        if tie_output:
            self.output.weight = self.tgt_embed.weight
        self.val_loss = mean_loss()
        # never a target token: [CLS] too (forced past a refused [EOS], it detokenised to nothing)
        self.banned = sorted({pad_id, bos_id, CLS_ID})
        self._hypotheses: list[tuple[int, str]] = []
        #: extra test results for summary.json (the sacreBLEU signatures)
        self.test_report: dict[str, Any] = {}
        #: the optimizer step's micro-batches under gradient accumulation (``loss``)
        self._window: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ model
    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        return self.backbone.encode(self.embed_dropout(self.src_embed(src_ids) * self.scale), src_mask)

    def decode(
        self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor, state: Any = None
    ) -> tuple[Tensor, Any]:
        """Logits [B,U,V] of the next tokens after ``tgt_in`` [B,U], and the decoding state."""
        y = self.embed_dropout(self.tgt_embed(tgt_in) * self.scale)
        out, state = self.backbone.decode(y, memory, src_mask, state)
        return self.output(out), state

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: logits [B,U,V] for every target position at once."""
        logits, _ = self.decode(tgt_in, self.encode(src_ids, src_mask), src_mask)
        return logits

    def loss(self, batch: dict[str, Tensor], label_smoothing: float, global_mean: bool = False) -> Tensor:
        """Cross-entropy per target token.

        ``global_mean`` divides by the target tokens of the whole global batch (summed over
        processes, times the world size that DDP's gradient averaging divides by again), so N
        processes take exactly the step one process takes on the same global batch; a per-process
        mean would weight a process's tokens by how many its share happened to hold. With
        ``trainer.accumulate_grad_batches`` k > 1 the global batch is the k micro-batches of an
        optimizer step, whose tokens are counted only once all have run: each micro-batch's sum
        is divided by one constant of the window (k times its first micro-batch's tokens; times
        k again for Lightning's division by k), and ``on_before_optimizer_step`` rescales the
        gradients by that constant over the window's tokens, as fairseq's ``--update-freq``
        does. (Each micro-batch's own mean, Lightning's way, weighted a token of a short
        micro-batch by how few tokens it held: length bucketing makes them differ tenfold.)
        Under DeepSpeed, whose gradients live in its own buffers, each micro-batch keeps its
        own mean.
        """
        tgt = batch["tgt_ids"]
        labels = tgt[:, 1:]
        logits = self(batch["src_ids"], batch["src_mask"], tgt[:, :-1])
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=self.hparams.pad_id,
            label_smoothing=label_smoothing,
            reduction="sum",
        )
        tokens = (labels != self.hparams.pad_id).sum().float()
        world = self.trainer.world_size if self._trainer is not None else 1
        accumulate = self._accumulated_window() if global_mean else 1
        if global_mean and (world > 1 or accumulate > 1):
            # train/loss shows this process's mean, as the other tasks' (not its scaled share)
            self._train_loss["step_shown"] = total.detach() / tokens.clamp_min(1.0)
            if world > 1:
                tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
            self._train_loss["step_weight"] = tokens  # the epoch's loss: a mean over tokens too
            self._train_loss["step_value"] = total.detach() * world / tokens.clamp_min(1.0)
            if accumulate == 1:
                return total * world / tokens
            window = self._window  # (a dict kept: a module attribute assigned costs ~2-3 us a step)
            if not window:  # the first micro-batch of an optimizer step
                window.update(scale=accumulate * tokens.clamp_min(1.0), tokens=tokens * 0)
            window["tokens"] = window["tokens"] + tokens
            return total * world * accumulate / window["scale"]
        if global_mean:
            self._train_loss["step_weight"] = tokens
        return total / tokens.clamp_min(1.0)

    def _accumulated_window(self) -> int:
        """k of ``trainer.accumulate_grad_batches`` where ``loss`` weights the k micro-batches'
        tokens alike (every strategy whose gradients are the parameters' ``.grad``), else 1."""
        if self._trainer is None or self.trainer.accumulate_grad_batches == 1:
            return 1
        names = {cls.__name__ for cls in type(self.trainer.strategy).__mro__}
        return 1 if "DeepSpeedStrategy" in names else self.trainer.accumulate_grad_batches

    def on_train_epoch_start(self) -> None:
        self._window.clear()  # (a window never spans epochs: Lightning steps at an epoch's end)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """The accumulated gradients, each micro-batch's sum over the window's constant, made
        the mean over the window's target tokens (``loss``); before Lightning clips them."""
        window = self._window
        if not window:
            return
        from torch.distributed.tensor import DTensor

        factor = window.pop("scale") / window.pop("tokens").clamp_min(1.0)
        with torch.no_grad():
            for param in self.parameters():
                if param.grad is not None:  # a sharding strategy's local shard, in place
                    (param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad).mul_(factor)

    @torch.no_grad()
    def generate(self, src_ids: Tensor, src_mask: Tensor, beam_size: int | None = None) -> list[list[int]]:
        """Target ids (without [BOS]/[EOS]) for a batch of sources, step by step with state."""
        hp = self.hparams
        beam_size = hp.beam_size if beam_size is None else beam_size
        memory = self.encode(src_ids, src_mask)
        src_lengths = (~src_mask).sum(dim=1)
        max_lengths = (hp.max_len_a * src_lengths.float() + hp.max_len_b).long().clamp_min(1)
        if beam_size > 1:  # every sentence's beams side by side
            memory = memory.repeat_interleave(beam_size, dim=0)
            src_mask = src_mask.repeat_interleave(beam_size, dim=0)

        def step(tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
            logits, state = self.decode(tokens, memory, src_mask, state)
            return logits[:, -1].float().log_softmax(dim=-1), state

        common = {
            "bos_id": hp.bos_id,
            "eos_id": hp.eos_id,
            "banned": self.banned,
            "device": src_ids.device,
            "agree": self._decoding_agreement(),
            "min_length": hp.min_len,
        }
        if beam_size == 1:
            return greedy_search(step, src_ids.shape[0], max_lengths=max_lengths, **common)
        return beam_search(
            step,
            self.backbone.reorder_beams,  # (its rows stay among each sentence's beams)
            src_ids.shape[0],
            beam_size,
            max_lengths=max_lengths,
            length_penalty=hp.length_penalty,
            **common,
        )

    # ------------------------------------------------------------------ steps
    def step_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.loss(batch, self.hparams.label_smoothing, global_mean=True)

    def _decoding_agreement(self) -> Agree:
        """How the processes agree on the number of decoder steps: under sharded parameters every
        step is a collective, so all take as many (the maximum); otherwise each decodes alone."""
        if (
            self._trainer is None
            or self.trainer.world_size == 1
            or not shards_parameters(self.trainer.strategy)
        ):
            return alone
        device = self.device

        def agree(value: int) -> int:
            value = torch.tensor(value, device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            return int(value)

        return agree

    def batch_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """Source tokens read by the encoder plus target tokens fed to the decoder."""
        return (~batch["src_mask"]).sum() + (batch["tgt_ids"][:, :-1] != self.hparams.pad_id).sum()

    def batch_positions(self, batch: dict[str, Tensor]) -> int:
        return batch["src_mask"].numel() + batch["tgt_ids"][:, :-1].numel()

    def _translate_batch(self, batch: dict[str, Tensor], beam_size: int) -> None:
        datamodule = self.trainer.datamodule
        texts = datamodule.detokenize(self.generate(batch["src_ids"], batch["src_mask"], beam_size))
        self._hypotheses.extend(zip(batch["index"].tolist(), texts))

    def on_validation_epoch_start(self) -> None:
        self._hypotheses = []

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "scoring"):
            sacrebleu_metrics(**datamodule.scoring())  # a missing tokenizer named before training

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.loss(batch, 0.0)  # plain cross-entropy: perplexity is comparable across settings
        self.val_loss.update(loss, weight=(~batch["tgt_mask"][:, 1:]).sum())
        limit = self.hparams.val_bleu_samples
        if not limit:
            self._translate_batch(batch, self.hparams.val_beam_size)
            return
        # the first ``limit`` sentences of the split, however the sampler batches them (bucketing
        # sorts validation by length: whole batches up to a count were the shortest sentences)
        rows = (batch["index"] < limit).nonzero().flatten()
        if self._decoding_agreement() is not alone:  # every decoder step is a collective
            wanted = torch.tensor(len(rows), device=self.device)
            dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
            if not wanted:
                return
            if not len(rows):  # the others translate: decode one sentence in step, and drop it
                self.generate(batch["src_ids"][:1], batch["src_mask"][:1], self.hparams.val_beam_size)
                return
        if len(rows):
            self._translate_batch(
                {key: batch[key][rows] for key in ("src_ids", "src_mask", "index")},
                self.hparams.val_beam_size,
            )

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        scores = self.score("val")
        values = {
            "val/loss": loss,
            "val/ppl": loss.exp(),
            # on the module's device: NCCL cannot reduce CPU tensors (sync_dist)
            "val/bleu": torch.tensor(scores["bleu"], device=self.device),
            "val/chrf": torch.tensor(scores["chrf"], device=self.device),
        }
        self.log_dict(values, prog_bar=True, sync_dist=True)  # already identical on every process
        self.log_monitor_best(values)

    def on_test_epoch_start(self) -> None:
        self._hypotheses = []

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._translate_batch(batch, self.hparams.beam_size)

    def on_test_epoch_end(self) -> None:
        scores = self.score("test")
        self.log_dict({"test/bleu": scores["bleu"], "test/chrf": scores["chrf"]}, sync_dist=True)
        if self.trainer.is_global_zero:
            self.test_report = {
                "bleu_signature": scores["bleu_signature"],
                "chrf_signature": scores["chrf_signature"],
            }
            self.report_translations(scores)

    # ------------------------------------------------------------------ scores and reports
    def score(self, split: str) -> dict[str, Any]:
        """sacreBLEU over this split's translated sentences (all processes' shares)."""
        pairs = gather_indexed(self._hypotheses)
        datamodule = self.trainer.datamodule
        if pairs and hasattr(datamodule, "sources"):  # an empty source's translation is empty, as
            sources = datamodule.sources(split)  # translate.py's (not what the model says to [EOS])
            pairs = [(i, hyp if sources[i] else "") for i, hyp in pairs]
        self._scored = (split, pairs)
        if not pairs:
            return {"bleu": 0.0, "chrf": 0.0, "bleu_signature": "", "chrf_signature": ""}
        references = datamodule.references(split)
        return corpus_scores(
            [hyp for _, hyp in pairs],
            [references[i] for i, _ in pairs],
            **getattr(datamodule, "scoring", dict)(),
        )

    def report_translations(self, scores: dict[str, Any]) -> None:
        split, pairs = self._scored
        datamodule = self.trainer.datamodule
        run_dir = Path(self.trainer.default_root_dir) / "translations"
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / f"{split}.hyp", "".join(f"{hyp}\n" for _, hyp in pairs))
        write_text_atomic(
            run_dir / f"{split}.signature",
            f"BLEU {scores['bleu']:.2f} {scores['bleu_signature']}\nchrF {scores['chrf']:.2f} {scores['chrf_signature']}\n",
        )
        sources, references = datamodule.sources(split), datamodule.references(split)
        rows = [[i, sources[i], references[i], hyp] for i, hyp in pairs[: self.hparams.sample_translations]]
        log_table(self.trainer, f"{split}/translations", ["index", "source", "reference", "hypothesis"], rows)
