"""Hook dispatch without per-call overhead: a hook whose body is empty (``Callback``'s no-ops,
most of ``LightningModule``'s defaults) is not called, and no profiler context is opened when
there is no profiler.

Lightning's ``_call_callback_hooks`` calls every callback for every hook, each call wrapped in
``trainer.profiler.profile(f"[Callback]{callback.state_key}.{hook}")``: with the default
(pass-through) profiler and a dozen callbacks that is ~25 us of Python per hook and six hooks per
training step, although most callbacks implement none of them (``scripts/benchmark.py overhead``).
Its ``_call_lightning_module_hook`` and ``_call_strategy_hook`` (about twenty calls per training
step: the step, backward, optimizer step, zero_grad, clipping, the batch transfer and the no-op
``on_before_backward``-style hooks) each format a debug message and open a profiler context too;
right after the forward or backward pass, with the caches cold, that is ~5 us a call.
The training loop also inspects ``training_step``'s signature on every step (~25 us);
seqlab's check remembers the answer per function. The batch transfer asks, for each of its three
data hooks on every batch, whether the datamodule or the module overrides it (``is_overridden``,
twice per hook); seqlab's selector remembers the answer per fit. And the optimisation loop
divides the loss by the number of accumulated batches even when that is 1 (a division and its
backward node per step); seqlab's closure result skips the division by 1. And every dispatcher
sets and restores the module's ``_current_fx_name`` without ``nn.Module.__setattr__``
(``set_fx_name``).
``install()`` replaces the three dispatchers (and the check, the selector and the closure result)
with versions that call the same functions in the same order with the same arguments and
``_current_fx_name`` set the same way, minus the per-call overhead, and fall back to Lightning's
own whenever a profiler is configured (so ``debug=profiler`` still times every hook).
"""

from __future__ import annotations

import dis
import functools
from typing import Any

from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.loops import training_epoch_loop
from lightning.pytorch.loops.optimization.automatic import ClosureResult, _AutomaticOptimization
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.connectors.data_connector import _DataHookSelector
from torch import Tensor, nn

_lightning_dispatch = call._call_callback_hooks
_lightning_module_hook = call._call_lightning_module_hook
_lightning_strategy_hook = call._call_strategy_hook
_lightning_signature_check = training_epoch_loop.is_param_in_hook_signature
_lightning_data_hook_owner = _DataHookSelector.get_instance
_lightning_closure_result = _AutomaticOptimization.output_result_cls
_module_setattr = nn.Module.__setattr__
#: module class -> whether assigning ``_current_fx_name`` only stores it in the instance ``__dict__``
_plain_fx_name: dict[type, bool] = {}
#: (class, hook name) -> whether the class's hook does anything
_implemented: dict[tuple[type, str], bool] = {}
#: what an empty body (docstring and/or ``pass``) compiles to: Python 3.11 / 3.12+
_EMPTY_BODIES = ([("LOAD_CONST", None), ("RETURN_VALUE", None)], [("RETURN_CONST", None)])


def is_empty(fn: Any) -> bool:
    """Whether calling ``fn`` does nothing and returns None: a plain function whose body is only a
    docstring or ``pass`` (the hooks of ``Callback`` and most of ``LightningModule``'s)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    body = [
        (op.opname, op.argval)
        for op in dis.get_instructions(code)
        if op.opname not in ("RESUME", "NOP", "CACHE")
    ]
    return body in _EMPTY_BODIES


def implements(obj: Any, hook_name: str) -> bool:
    """Whether calling hook ``hook_name`` of ``obj`` (a callback or a LightningModule) can do
    anything: set on the instance, or a class method with a body (an override of ``Callback``'s
    no-op, a module's own ``on_after_backward``...). A hook the class lacks counts as implemented
    (the call fails as it would in Lightning)."""
    if hook_name in vars(obj):
        return True
    key = (type(obj), hook_name)
    found = _implemented.get(key)
    if found is None:
        found = _implemented[key] = not is_empty(getattr(type(obj), hook_name, None))
    return found


def set_fx_name(pl_module: Any, name: str | None) -> None:
    """``pl_module._current_fx_name = name`` (the hook ``self.log`` attributes its values to)
    without ``nn.Module.__setattr__``: for a string or None that method only checks that the value
    is no parameter, buffer or module (~2-3 us with its Python ``isinstance`` checks; the
    dispatchers set and restore the name ~34 times per training step) before storing it in the
    instance's ``__dict__``, which this does directly. A class that overrides ``__setattr__`` or
    defines ``_current_fx_name`` itself (a property) gets the assignment as before."""
    cls = type(pl_module)
    plain = _plain_fx_name.get(cls)
    if plain is None:
        plain = _plain_fx_name[cls] = cls.__setattr__ is _module_setattr and not any(
            "_current_fx_name" in vars(base) for base in cls.__mro__
        )
    if plain and "_current_fx_name" in pl_module.__dict__:
        pl_module.__dict__["_current_fx_name"] = name
    else:
        pl_module._current_fx_name = name


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
        set_fx_name(pl_module, hook_name)
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
        set_fx_name(pl_module, prev_fx_name)


def call_lightning_module_hook(
    trainer: Any, hook_name: str, *args: Any, pl_module: Any = None, **kwargs: Any
) -> Any:
    """``lightning.pytorch.trainer.call._call_lightning_module_hook`` without the debug message
    and the profiler context, and without calling a hook whose body is empty (Lightning's own with
    a profiler)."""
    if type(trainer.profiler) is not PassThroughProfiler:
        return _lightning_module_hook(trainer, hook_name, *args, pl_module=pl_module, **kwargs)
    pl_module = pl_module or trainer.lightning_module
    if pl_module is None:
        raise TypeError("No `LightningModule` is available to call hooks on.")
    if not implements(pl_module, hook_name):
        return None
    fn = getattr(pl_module, hook_name)
    if not callable(fn):
        return None
    prev_fx_name = pl_module._current_fx_name
    set_fx_name(pl_module, hook_name)
    output = fn(*args, **kwargs)
    set_fx_name(pl_module, prev_fx_name)
    return output


def call_strategy_hook(trainer: Any, hook_name: str, *args: Any, **kwargs: Any) -> Any:
    """``lightning.pytorch.trainer.call._call_strategy_hook`` without the debug message and the
    profiler context (Lightning's own with a profiler)."""
    if type(trainer.profiler) is not PassThroughProfiler:
        return _lightning_strategy_hook(trainer, hook_name, *args, **kwargs)
    pl_module = trainer.lightning_module
    prev_fx_name = pl_module._current_fx_name
    set_fx_name(pl_module, hook_name)
    fn = getattr(trainer.strategy, hook_name)
    if not callable(fn):
        return None
    output = fn(*args, **kwargs)
    set_fx_name(pl_module, prev_fx_name)
    return output


@functools.lru_cache(maxsize=256)
def _signature_check(fn: Any, param: str, explicit: bool, min_args: int | None) -> bool:
    return _lightning_signature_check(fn, param, explicit=explicit, min_args=min_args)


def is_param_in_hook_signature(
    hook_fx: Any, param: str, explicit: bool = False, min_args: int | None = None
) -> bool:
    """Lightning's ``is_param_in_hook_signature``, remembered per function: the training loop
    asks it whether ``training_step`` takes ``batch_idx`` on every step (``inspect.getfullargspec``,
    ~25 us). Keyed by the function under a bound method (the same argument list, ``self``
    included), so no module is kept alive by the cache."""
    fn = getattr(hook_fx, "__func__", hook_fx)
    try:
        return _signature_check(fn, param, explicit, min_args)
    except TypeError:  # an unhashable callable
        return _lightning_signature_check(hook_fx, param, explicit=explicit, min_args=min_args)


def data_hook_owner(selector: _DataHookSelector, hook_name: str) -> Any:
    """Lightning's ``_DataHookSelector.get_instance`` (whether the datamodule or the module runs
    the data hook ``hook_name``), remembered per selector: Lightning makes a new one for every
    ``fit``/``validate``/``test`` call, and the answer (which class overrides the hook) does not
    change within one."""
    owners = selector.__dict__.setdefault("_seqlab_owners", {})
    owner = owners.get(hook_name)
    if owner is None:
        owner = owners[hook_name] = _lightning_data_hook_owner(selector, hook_name)
    return owner


class ClosureResultUndivided(ClosureResult):
    """Lightning's ``ClosureResult`` without dividing the loss by 1 when no gradients are
    accumulated and ``training_step`` returns a tensor, as seqlab's tasks do (the same value,
    gradients and outputs: ``x / 1 == x`` exactly); dict outputs go Lightning's way."""

    @classmethod
    def from_training_step_output(cls, training_step_output: Any, normalize: int = 1) -> ClosureResult:
        if normalize == 1 and isinstance(training_step_output, Tensor):
            return cls(training_step_output)
        return super().from_training_step_output(training_step_output, normalize)


def install() -> None:
    """Use seqlab's dispatch for every Trainer of this process (idempotent). Lightning's loops
    look the functions up on ``lightning.pytorch.trainer.call`` (and the signature check on the
    training loop's module) at each call."""
    call._call_callback_hooks = call_callback_hooks
    call._call_lightning_module_hook = call_lightning_module_hook
    call._call_strategy_hook = call_strategy_hook
    training_epoch_loop.is_param_in_hook_signature = is_param_in_hook_signature
    _DataHookSelector.get_instance = data_hook_owner
    _AutomaticOptimization.output_result_cls = ClosureResultUndivided


def uninstall() -> None:
    call._call_callback_hooks = _lightning_dispatch
    call._call_lightning_module_hook = _lightning_module_hook
    call._call_strategy_hook = _lightning_strategy_hook
    training_epoch_loop.is_param_in_hook_signature = _lightning_signature_check
    _DataHookSelector.get_instance = _lightning_data_hook_owner
    _AutomaticOptimization.output_result_cls = _lightning_closure_result


__all__ = [
    "ClosureResultUndivided",
    "call_callback_hooks",
    "call_lightning_module_hook",
    "call_strategy_hook",
    "data_hook_owner",
    "implements",
    "install",
    "is_param_in_hook_signature",
    "set_fx_name",
    "uninstall",
]
