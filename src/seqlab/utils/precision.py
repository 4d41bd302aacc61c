"""Precision plugins seqlab gives Lightning where Lightning's own refuse what a default run asks
for: gradient clipping (``trainer.gradient_clip_val: 1.0``) with a fused optimizer under
``bf16-mixed`` (``task.optimizer.fused: auto``), and by norm under ``trainer=fsdp``.

:func:`fusable` is the one place that says whether a Trainer's precision plugin clips a fused
optimizer's gradients; the task (``configure_optimizers``) and the benchmark's plain loop ask it.
:func:`keep_measurements_precise` keeps targets and metric states out of a precision that casts
the model and its batches (``*-true``, DeepSpeed).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, MixedPrecision, Precision
from lightning.pytorch.plugins.precision import FSDPPrecision as LightningFSDPPrecision
from lightning.pytorch.utilities.enums import GradClipAlgorithmType


class BF16MixedPrecision(MixedPrecision):
    """Lightning's ``bf16-mixed`` plugin, clipping the gradients of a fused optimizer too.

    Lightning's ``MixedPrecision`` refuses to clip the gradients of any optimizer that declares
    it unscales them inside its step, as torch's fused Adam, AdamW and SGD do, ``bf16-mixed``
    included. The refusal matters only with a gradient scaler: under ``16-mixed`` the gradients
    would be clipped while still scaled. ``bf16-mixed`` has no scaler, so the gradients are the
    true ones, and clipping them before a fused step is what clipping any optimizer's is
    (Lightning's base ``Precision.clip_gradients``)."""

    def __init__(self, device: str) -> None:
        super().__init__("bf16-mixed", device)

    def clip_gradients(
        self,
        optimizer: Any,
        clip_val: float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def clip_fused_under_bf16(strategy: Any) -> None:
    """Give ``strategy`` :class:`BF16MixedPrecision` where Lightning gave it its stock
    ``bf16-mixed`` plugin (the same autocast device); any other plugin stays."""
    plugin = strategy.precision_plugin
    if type(plugin) is MixedPrecision and plugin.precision == "bf16-mixed" and plugin.scaler is None:
        strategy.precision_plugin = BF16MixedPrecision(plugin.device)


class FSDPPrecision(LightningFSDPPrecision):
    """Lightning's precision plugin for ``FSDPStrategy`` (``trainer=fsdp``), clipping gradients by
    norm, which ``trainer.gradient_clip_val`` (1.0 by default) asks for and Lightning's plugin
    refuses at the first step (Lightning-AI/pytorch-lightning#19235): the norm over every shard
    needs the root FSDP module (``FullyShardedDataParallel.clip_grad_norm_``), which the plugin
    is not given. This one reaches it through its strategy."""

    def __init__(self, precision: Any, strategy: Any) -> None:
        from lightning.fabric.connector import _convert_precision_to_unified_args

        super().__init__(_convert_precision_to_unified_args(precision) or "32-true")
        self._strategy = weakref.ref(strategy)

    @property
    def mixed_precision_config(self) -> Any:
        """Lightning's, with three changes:

        - under ``16-mixed``/``bf16-mixed`` the buffers kept in float32, as autocast keeps them
          elsewhere (Lightning casts them to the low precision too, which rounds the forecaster's
          scaler statistics, 0.4% in bfloat16, in every original-scale metric), and gradients
          reduced in float32, as DDP and FSDP2 reduce them under the same setting;
        - the batch is not cast (``cast_root_forward_inputs``): Lightning runs every step through
          the root module's forward, where FSDP cast every floating tensor of the batch, targets
          included, to the parameters' dtype (a target of 1234.567 reached the loss as 1232.0 in
          bfloat16); autocast sets the compute dtype, and ``convert_batch`` what a ``*-true``
          precision casts.
        """
        config = dataclasses.replace(super().mixed_precision_config, cast_root_forward_inputs=False)
        if str(self.precision).endswith("-mixed"):
            config = dataclasses.replace(config, buffer_dtype=torch.float32, reduce_dtype=torch.float32)
        return config

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        strategy = self._strategy()
        root = strategy.model if strategy is not None else None
        if not callable(getattr(root, "clip_grad_norm_", None)):
            raise RuntimeError(
                f"clipping by norm under FSDP needs the wrapped root module, found {type(root)}"
            )
        root.clip_grad_norm_(clip_val)


def fusable(plugin: Precision, gradient_clip_val: float | None) -> bool:
    """Whether a Trainer with precision ``plugin`` and ``gradient_clip_val`` takes a fused
    optimizer (``task.optimizer.fused: auto``). Not when it clips and:

    - ``plugin`` has a gradient scaler (``16-mixed``): a fused optimizer unscales inside its step,
      after the clipping, which would then see scaled gradients (Lightning refuses it);
    - ``plugin`` is Lightning's own ``MixedPrecision``, which refuses it even without a scaler
      (seqlab's Trainer has :class:`BF16MixedPrecision` instead);
    - ``plugin`` is DeepSpeed's or FSDP's (``trainer=fsdp``) in mixed precision: DeepSpeed clips
      inside its engine, FSDP computes with low-precision copies of flat-parameter views; a fused
      optimizer under either is not tried here (no GPU yet)."""
    if not gradient_clip_val:
        return True
    if getattr(plugin, "scaler", None) is not None:
        return False
    if isinstance(plugin, MixedPrecision):
        return isinstance(plugin, BF16MixedPrecision)
    if isinstance(plugin, DeepSpeedPrecision | LightningFSDPPrecision):
        return not str(plugin.precision).endswith("-mixed")
    return True


def _float32_if_floating(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def keep_measurements_precise(plugin: Precision, task: Any) -> None:
    """Under a precision that casts the model and its batches (``bf16-true``, ``16-true``, and
    DeepSpeed's ``bf16-mixed``, whose engine holds the weights in bf16), what is measured stays
    in float32, as under every other precision:

    - the batch is cast through ``task.convert_batch``: the forecaster casts its inputs itself,
      after normalising them in float32, so its targets and the baselines' inputs are the data's
      (Lightning's cast rounds every floating tensor of the batch, targets included);
    - torchmetrics states are float32 after the model's cast: Lightning casts with ``Module.to``,
      which torchmetrics lets through to the states, so sums over a whole split were kept in bf16.

    Called from ``SeqTask.setup`` (before the strategy casts the model); idempotent."""
    cls = type(plugin)

    def convert_input(batch: Any) -> Any:
        return task.convert_batch(batch, lambda data: cls.convert_input(plugin, data))

    def convert_module(module: torch.nn.Module) -> torch.nn.Module:
        from torchmetrics import Metric

        module = cls.convert_module(plugin, module)
        for metric in module.modules():
            if isinstance(metric, Metric):
                # torchmetrics casts its states only through an _apply it does not take for a dtype cast
                metric._apply(_float32_if_floating)
        return module

    plugin.convert_input = convert_input  # type: ignore[method-assign]
    plugin.convert_module = convert_module  # type: ignore[method-assign]


__all__ = [
    "BF16MixedPrecision",
    "FSDPPrecision",
    "clip_fused_under_bf16",
    "fusable",
    "keep_measurements_precise",
]
