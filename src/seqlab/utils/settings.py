"""A config node's keys and values against the signature of the class it instantiates.

``check_settings`` refuses, before any data is read or process started, a key the ``_target_``
class does not take and a value its annotation rules out (``model.d_model=abc``,
``trainer.max_epochs=1.5``): instantiate would raise a ``TypeError`` deep inside the class, or a
Hydra traceback, or, for a value that happens to work, train something else than was asked.
Only what the annotation says for certain is refused: a parameter without one, or with a type
this check does not know (a tensor, a callable, an object config with ``_target_``), accepts
anything, as the class itself decides.
"""

from __future__ import annotations

import collections.abc
import inspect
import logging
import os
import sys
import types
import typing
from pathlib import PurePath
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from seqlab.errors import ConfigError

#: the answer for an annotation this check cannot judge: the value is let through
UNKNOWN = None


def to_plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def signature_of(target: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters of ``target(...)`` (a class's followed through ``**kwargs`` handed
    on to its base classes' ``__init__``), annotations evaluated; and whether it takes any key."""
    if isinstance(target, type):
        owners = [(owner, owner.__init__) for owner in target.__mro__[:-1] if "__init__" in vars(owner)]
    else:  # a function that builds the object
        owners = [(target, target)]
    parameters: dict[str, inspect.Parameter] = {}
    for owner, function in owners:
        signature = inspect.signature(function).parameters
        for name, parameter in signature.items():
            if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                parameters.setdefault(name, parameter.replace(annotation=annotation(owner, parameter)))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
            return parameters, False
    return parameters, True  # **kwargs all the way to object's


def annotation(owner: Any, parameter: inspect.Parameter) -> Any:
    """A parameter's annotation as a type (a string one evaluated in its module, as
    ``typing.get_type_hints`` does for one parameter at a time); ``Any`` where it cannot be."""
    hint = parameter.annotation
    if hint is inspect.Parameter.empty:
        return Any
    if isinstance(hint, str):
        module = sys.modules.get(owner.__module__)
        try:
            return eval(hint, vars(module) if module else {})
        except Exception:  # a name imported only for type checkers
            return Any
    return hint


def matches(value: Any, hint: Any) -> bool | None:
    """Whether a config value (a plain YAML value: None, bool, int, float, str, list, dict) can be
    ``hint``; ``UNKNOWN`` for a type this check does not judge."""
    if hint is Any or isinstance(hint, typing.TypeVar):
        return UNKNOWN
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        answers = [matches(value, arg) for arg in args]
        return True if True in answers else (UNKNOWN if UNKNOWN in answers else False)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if isinstance(value, dict) and "_target_" in value:
        return UNKNOWN  # an object the class is given built
    if origin is typing.Annotated:
        return matches(value, args[0])
    cls = origin or hint
    if not isinstance(cls, type):
        return UNKNOWN
    if cls is bool:
        return isinstance(value, bool)
    if cls is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if cls is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if cls is str:
        return isinstance(value, str)
    if issubclass(cls, PurePath) or cls is os.PathLike:
        return isinstance(value, str | PurePath)
    if cls in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, list | tuple):
            # a string is a sequence (of characters) and a mapping iterable: the class decides
            generic = cls in (collections.abc.Sequence, collections.abc.Iterable)
            return UNKNOWN if generic and isinstance(value, str | dict) else False
        if cls is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):  # tuple[int, str]
            if len(value) != len(args):
                return False
            pairs = zip(value, args, strict=True)
        else:  # list[int], tuple[int, ...]
            pairs = ((item, args[0] if args else Any) for item in value)
        answers = [matches(item, item_hint) for item, item_hint in pairs]
        return False if False in answers else (UNKNOWN if UNKNOWN in answers else True)
    if cls in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if isinstance(value, cls):
        return True
    return UNKNOWN


def describe(hint: Any) -> str:
    """An annotation in YAML's words: ``an integer or null``, ``one of 'sum', 'mean'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is None or hint is type(None):
        return "null"
    if origin is typing.Union or origin is types.UnionType or origin is typing.Literal:
        literals, others = [], []
        for arg in args if origin is not typing.Literal else [hint]:
            if typing.get_origin(arg) is typing.Literal:
                literals += [value for value in typing.get_args(arg) if value not in literals]
            else:
                others.append(describe(arg))
        if literals:
            others.insert(0, "one of " + ", ".join(repr(value) for value in literals))
        return " or ".join(dict.fromkeys(others))
    if origin is typing.Annotated:
        return describe(args[0])
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {len(args)} ({', '.join(describe(arg) for arg in args)})"
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable) and args:
        return f"a list (each {describe(args[0])})"
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return "a path"
    name = getattr(origin or hint, "__name__", None)
    words = {
        "float": "a number",
        "int": "an integer",
        "bool": "true or false",
        "str": "a string",
        "list": "a list",
    }
    return words.get(name, name or str(hint))


def target_object(target: str, prefix: str) -> Any:
    """What ``{prefix}._target_`` names, imported; a ConfigError naming the key where it cannot be
    (Hydra's three chained tracebacks named none)."""
    hydra_log = logging.getLogger("hydra.utils")  # which logs the error it raises, on its own lines
    hydra_log.disabled, was = True, hydra_log.disabled
    try:
        return get_object(target)
    except Exception as err:  # Hydra's ImportError, chained over the module's own errors
        cause = err.__cause__ or err
        raise ConfigError(
            f"{prefix}._target_={target!r} cannot be imported ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else cause!r}): expected a class on the Python "
            "path, as package.module.Class (your own: a package under src/, or one on PYTHONPATH)"
        ) from None
    finally:
        hydra_log.disabled = was


def check_settings(node: DictConfig | dict, prefix: str, skip: tuple[str, ...] = ()) -> None:
    """Refuse, by name, a key the ``_target_`` class does not take (``+data.data_dir=`` for
    synthetic data) and a value its annotation rules out (``model.d_model=abc``); ``skip``: keys
    given to the class otherwise than from this node. An object config inside the node
    (``task.optimizer``) is the class's to check: seqlab reads some of its keys first
    (``fused: auto``)."""
    settings = to_plain(node)
    target = settings.get("_target_")
    if not target:
        return
    name = target.rsplit(".", 1)[-1]
    parameters, takes_any = signature_of(target_object(target, prefix))
    given = {k: v for k, v in settings.items() if not k.startswith("_") and k not in skip}
    unknown = sorted(k for k in given if k not in parameters)
    if unknown and not takes_any:
        known = sorted(parameters)
        raise ConfigError(
            f"{', '.join(f'{prefix}.{k}' for k in unknown)}: not a setting of {name} "
            f"(its settings: {', '.join(known)})"
        )
    for key, value in given.items():
        parameter = parameters.get(key)
        if parameter is not None and matches(value, parameter.annotation) is False:
            hint = ""
            if isinstance(value, float) and value.is_integer() and matches(int(value), parameter.annotation):
                hint = f"; write {int(value)}"  # 1e4 is a float to YAML and Hydra
            raise ConfigError(
                f"{prefix}.{key}={value!r}: expected {describe(parameter.annotation)} ({name}'s {key}{hint})"
            )
