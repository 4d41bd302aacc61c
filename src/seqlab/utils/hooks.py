"""Callback hook dispatch without per-call overhead for hooks a callback does not implement.

Lightning's ``_call_callback_hooks`` calls every callback for every hook, each call wrapped in
``trainer.profiler.profile(f"[Callback]{callback.state_key}.{hook}")``: with the default
(pass-through) profiler and a dozen callbacks that is ~25 us of Python per hook and six hooks per
training step, although most callbacks implement none of them (``scripts/benchmark.py overhead``).
``install()`` replaces it with a dispatch that calls only the callbacks overriding the hook, in
the same order with the same arguments, and falls back to Lightning's own function whenever a
profiler is configured (so ``debug=profiler`` still times every callback).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer import call

_lightning_dispatch = call._call_callback_hooks
#: (callback class, hook name) -> whether the class overrides the hook
_overrides: dict[tuple[type, str], bool] = {}


def implements(callback: Callback, hook_name: str) -> bool:
    """Whether ``callback`` does anything in ``hook_name``: its class or the instance overrides
    ``Callback``'s no-op (or the hook is not a ``Callback`` hook at all)."""
    if hook_name in vars(callback):
        return True
    key = (type(callback), hook_name)
    found = _overrides.get(key)
    if found is None:
        base = getattr(Callback, hook_name, None)
        found = _overrides[key] = base is None or getattr(type(callback), hook_name, None) is not base
    return found


def call_callback_hooks(
    trainer: Any, hook_name: str, *args: Any, monitoring_callbacks: bool | None = None, **kwargs: Any
) -> None:
    """``lightning.pytorch.trainer.call._call_callback_hooks``, skipping callbacks that do not
    implement the hook (their call does nothing)."""
    if type(trainer.profiler) is not PassThroughProfiler:
        _lightning_dispatch(trainer, hook_name, *args, monitoring_callbacks=monitoring_callbacks, **kwargs)
        return
    pl_module = trainer.lightning_module
    if pl_module:
        prev_fx_name = pl_module._current_fx_name
        pl_module._current_fx_name = hook_name
    for callback in trainer.callbacks:
        if (
            monitoring_callbacks is not None
            and isinstance(callback, (EarlyStopping, Checkpoint)) != monitoring_callbacks
        ):
            continue
        if implements(callback, hook_name):
            fn = getattr(callback, hook_name)
            if callable(fn):
                fn(trainer, trainer.lightning_module, *args, **kwargs)
    if pl_module:
        pl_module._current_fx_name = prev_fx_name


def install() -> None:
    """Use ``call_callback_hooks`` for every Trainer of this process (idempotent). Lightning's
    loops look the function up on ``lightning.pytorch.trainer.call`` at each call."""
    call._call_callback_hooks = call_callback_hooks


def uninstall() -> None:
    call._call_callback_hooks = _lightning_dispatch


__all__ = ["call_callback_hooks", "implements", "install", "uninstall"]
