"""The key and value checks of a config node against the class it instantiates
(``seqlab.utils.settings``): what an annotation rules out is refused by key, value and type;
what it cannot judge is let through to the class."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from seqlab.errors import ConfigError
from seqlab.utils.settings import check_settings, describe, matches


class Settings:
    def __init__(
        self,
        width: int = 8,
        rate: float = 0.1,
        flag: bool = False,
        name: str | None = None,
        mode: Literal["sum", "mean"] = "sum",
        sizes: list[int] | None = None,
        names: typing.Sequence[str] = (),
        pair: tuple[int, str] = (1, "a"),
        path: Path | None = None,
        anything=None,
        model: typing.Any = None,
        later: NotImportedHere | None = None,  # noqa: F821 - a name for type checkers only
    ) -> None:
        pass


class Extended(Settings):
    def __init__(self, depth: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)


TARGET = f"{__name__}.Settings"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("width", 3), ("rate", 1), ("rate", 0.5), ("flag", True), ("name", None), ("name", "x"),
        ("mode", "mean"), ("sizes", [1, 2]), ("sizes", None), ("pair", [2, "b"]), ("path", "/tmp/x"),
        ("anything", "whatever"), ("model", [1]), ("later", 3), ("names", ["a"]), ("names", "ab"),
        ("width", {"_target_": "builtins.int"}),  # an object built by Hydra: the class decides
    ],
)  # fmt: skip
def test_values_the_annotations_allow_pass(key: str, value: Any) -> None:
    check_settings({"_target_": TARGET, key: value}, "model")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("width", "abc", "model.width='abc': expected an integer (Settings's width)"),
        ("width", 1.5, "model.width=1.5: expected an integer (Settings's width)"),
        ("width", 1e4, "model.width=10000.0: expected an integer (Settings's width; write 10000)"),
        ("width", True, "model.width=True: expected an integer"),  # YAML's true is not 1 here
        ("rate", "high", "model.rate='high': expected a number"),
        ("flag", "yes", "model.flag='yes': expected true or false"),
        ("name", 3, "model.name=3: expected a string or null"),
        ("mode", "max", "model.mode='max': expected one of 'sum', 'mean'"),
        ("sizes", [1, "b"], "model.sizes=[1, 'b']: expected a list (each an integer) or null"),
        ("sizes", 4, "model.sizes=4: expected a list (each an integer) or null"),
        ("pair", [1, 2], "model.pair=[1, 2]: expected a list of 2 (an integer, a string)"),
        ("pair", [1], "model.pair=[1]: expected"),
        ("path", 3, "model.path=3: expected a path or null"),
    ],
)
def test_values_the_annotations_rule_out_are_named(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        check_settings({"_target_": TARGET, key: value}, "model")


def test_keys_handed_on_through_kwargs_are_checked_against_the_base_class() -> None:
    target = f"{__name__}.Extended"
    check_settings({"_target_": target, "depth": 3, "width": 4}, "data")
    with pytest.raises(ConfigError, match=r"^data.width='4': expected an integer \(Extended's width\)"):
        check_settings({"_target_": target, "width": "4"}, "data")
    with pytest.raises(ConfigError, match=r"^data.depth=0.5: expected an integer"):
        check_settings({"_target_": target, "depth": 0.5}, "data")
    with pytest.raises(ConfigError, match=r"^data.widht: not a setting of Extended \(its settings: .*width"):
        check_settings({"_target_": target, "widht": 4}, "data")
    check_settings({"_target_": target, "widht": "x"}, "data", skip=("widht",))
    with pytest.raises(ConfigError, match=r"^data.self: not a setting of Extended"):
        check_settings({"_target_": target, "self": 1}, "data")


def test_an_annotation_in_words() -> None:
    assert describe(int | None) == "an integer or null"
    lightning_style = typing.Optional[typing.Union[Literal[16, "bf16"], Literal["32"], float]]  # noqa: UP007, UP045
    assert describe(lightning_style) == ("one of 16, 'bf16', '32' or a number or null")
    assert matches([1, 2], tuple[int, ...]) and not matches([1, "a"], tuple[int, ...])
    assert matches("x", typing.Callable) is None  # not judged: the class decides
