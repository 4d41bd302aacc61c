"""``init_from``: a new run (fine-tuning, transfer) starts from another run's weights alone; the
optimizer, its schedule, the epoch count and the RNG are its own, and a text model encodes with
the checkpoint's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from seqlab.errors import ConfigError
from seqlab.train import train
from seqlab.utils.resume import config_differences

QUIET = ["test=false", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A forecasting GRU trained one epoch: ``<dir>/run/checkpoints/last.ckpt``."""
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import FAST, compose_config

    root = tmp_path_factory.mktemp("pretrained")
    cfg = compose_config("train", [*FAST, *QUIET, "model=gru", "trainer.max_epochs=1"], root / "run")
    train(cfg)
    GlobalHydra.instance().clear()
    return root / "run" / "checkpoints" / "last.ckpt"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_a_run_starts_from_the_weights_alone(make_cfg, pretrained: Path) -> None:
    """The task starts with the checkpoint's weights (tested before any training step: train=false
    tests them), but trains with a fresh optimizer and schedule of its own settings, from epoch 0."""
    saved = torch.load(pretrained, map_location="cpu", weights_only=True)
    _, objects = train(make_cfg("model=gru", f"init_from={pretrained}", "train=false", *QUIET, output="same"))
    for name, value in objects["task"].state_dict().items():
        torch.testing.assert_close(value, saved["state_dict"][name], msg=name)

    cfg = make_cfg(
        "model=gru", f"init_from={pretrained}", "trainer.max_epochs=1", "task.optimizer.lr=2e-4",
        "task.scheduler.name=constant", *QUIET, output="tuned",
    )  # fmt: skip
    _, tuned = train(cfg)
    trainer = tuned["trainer"]
    assert trainer.global_step == saved["global_step"]  # one epoch of its own, counted from 0
    assert [group["lr"] for group in trainer.optimizers[0].param_groups] == [2e-4, 2e-4]
    state = trainer.optimizers[0].state.values()
    assert all(int(entry["step"]) == trainer.global_step for entry in state)  # fresh moments
    assert tuned["summary"]["epochs"] == 1
    changed = weights(Path(tuned["summary"]["best_checkpoint"]))
    assert any(not torch.equal(changed[name], value) for name, value in saved["state_dict"].items())


def test_a_new_head_starts_afresh_where_init_exclude_names_it(make_cfg, pretrained: Path) -> None:
    """Another forecast horizon changes the head's shape: refused, naming the weights and the
    init_exclude that starts them afresh; with it, every other weight is the checkpoint's."""
    other = ("model=gru", f"init_from={pretrained}", "data.horizon=6", "train=false", *QUIET)
    with pytest.raises(
        ConfigError, match=r"head\.1\.weight: \[12, \d+\] in the checkpoint, \[6, \d+\] here"
    ) as err:
        train(make_cfg(*other, output="refused"))
    assert "init_exclude=[head.1.*]" in str(err.value)
    assert not (Path(make_cfg(output="refused").paths.output_dir) / "config.yaml").exists()

    _, objects = train(make_cfg(*other, "init_exclude=[head.1.*]", output="new_head"))
    saved = weights(pretrained)
    for name, value in objects["task"].state_dict().items():
        if name.startswith("head.1."):
            assert value.shape[0] == 6
        else:
            torch.testing.assert_close(value, saved[name], msg=name)


def test_a_sharded_checkpoint_directory_initialises_as_its_file(
    make_cfg, pretrained: Path, tmp_path: Path
) -> None:
    """An FSDP2 run's checkpoint is a directory of shards: its weights are gathered."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    checkpoint = torch.load(pretrained, map_location="cpu", weights_only=True)
    sharded = tmp_path / "sharded.ckpt"
    _distributed_checkpoint_save({"state_dict": checkpoint.pop("state_dict")}, sharded)
    checkpoint.pop("optimizer_states")
    torch.save(checkpoint, sharded / _METADATA_FILENAME)
    _, objects = train(make_cfg("model=gru", f"init_from={sharded}", "train=false", *QUIET))
    for name, value in objects["task"].state_dict().items():
        torch.testing.assert_close(value, weights(pretrained)[name], msg=name)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=transformer"], r"holds a ForecastingTask with a RNNBackbone \(cell=gru\) backbone, but this run trains a ForecastingTask with a TransformerBackbone"),
        (["model=lstm"], r"RNNBackbone \(cell=gru\) backbone, but this run trains a ForecastingTask with a RNNBackbone \(cell=lstm\)"),
        (["init_exclude=[haed.*]"], r"init_exclude: 'haed\.\*' matches no weight of this model or of init_from's, whose weights are named .*head\.\*"),
        (["init_exclude=[1]"], r"init_exclude: 1 is not a pattern"),
        (["ckpt_path=PRETRAINED"], r"init_from=.* and ckpt_path=.*: .* give one"),
        (["model.d_model=16"], r"holds weights that do not fit this run's model: .*The other model settings must be"),
    ],
)  # fmt: skip
def test_what_cannot_start_a_run_is_refused_by_name(
    make_cfg, pretrained: Path, overrides: list[str], expected: str
) -> None:
    given = [o.replace("PRETRAINED", str(pretrained)) for o in overrides]
    cfg = make_cfg("model=gru", f"init_from={pretrained}", *given, *QUIET)
    with pytest.raises(ConfigError, match=expected):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "config.yaml").exists()  # the fixed command runs there


def test_refusals_without_a_checkpoint_to_start_from(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"init_exclude=\['head\.\*'\]: without init_from"):
        train(make_cfg("init_exclude=[head.*]", *QUIET))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ConfigError, match=r"init_from='.*foreign.ckpt' was not written by seqlab"):
        train(make_cfg(f"init_from={foreign}", *QUIET))
    with pytest.raises(ConfigError, match=r"init_from='.*missing.ckpt': no such file"):
        train(make_cfg(f"init_from={tmp_path / 'missing.ckpt'}", *QUIET))


def test_an_interrupted_fine_tuning_run_resumes_its_own_checkpoint(
    make_cfg, pretrained: Path, tmp_path: Path
) -> None:
    """The same command continues the run from its own newest checkpoint; the checkpoint it
    started from is not read again (here: gone)."""
    start = tmp_path / "start.ckpt"
    shutil.copy(pretrained, start)
    first = ("model=gru", f"init_from={start}", *QUIET)
    cfg = make_cfg(*first, "trainer.max_epochs=1")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / "summary.json").unlink()  # as if it stopped before it finished
    start.unlink()
    # the epoch count is its own (1 epoch done): a second epoch, not restarted from init_from
    _, objects = train(make_cfg(*first, "trainer.max_epochs=1"))
    assert objects["trainer"].global_step == torch.load(pretrained, weights_only=True)["global_step"]


def test_runs_saved_before_init_from_existed_still_resume() -> None:
    saved = {"seed": 1, "ckpt_path": None}
    assert config_differences(saved, {**saved, "init_from": None, "init_exclude": []}, ignores=()) == []
    assert config_differences(saved, {**saved, "init_from": "a.ckpt", "init_exclude": []}, ignores=()) == [
        "init_from: None -> 'a.ckpt'"
    ]


def write_texts(directory: Path, labels: tuple[str, str, str] | tuple[str, str], words: str) -> Path:
    directory.mkdir(parents=True)
    rows = [
        f"{words} {'good fine nice' if i % 2 else 'bad awful dull'} {i}\t{labels[i % len(labels)]}"
        for i in range(120)
    ]
    (directory / "train.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return directory


def test_a_text_model_is_fine_tuned_with_its_tokenizer_on_data_of_other_classes(
    make_cfg, tmp_path: Path, caplog
) -> None:
    """The embeddings are of the checkpoint's tokens: the new data is encoded with its tokenizer
    (not one trained on the new texts); the classes are the new data's, a head of another size
    starting afresh, one of the same size taking the checkpoint's rows by position (said)."""
    text = [
        "data=text_classification", "data.tokenizer.kind=word", "data.tokenizer.min_frequency=1",
        f"data.cache_dir={tmp_path / 'cache'}", "model=gru", "model.d_model=16", "data.batch_size=16",
        "trainer.max_epochs=1", *QUIET,
    ]  # fmt: skip
    source = write_texts(tmp_path / "source", ("0", "1"), "film movie")
    _, objects = train(make_cfg(*text, f"data.data_dir={source}", fast=False, output="source_run"))
    checkpoint = Path(objects["summary"]["best_checkpoint"])
    tokenizer = torch.load(checkpoint, weights_only=True)["seqlab"]["data_artifacts"]["tokenizer"]

    three = write_texts(tmp_path / "three", ("neg", "neu", "pos"), "book novel")
    tuned = [*text, f"data.data_dir={three}", f"init_from={checkpoint}", "train=false"]
    with pytest.raises(ConfigError, match=r"head\.1\.weight: \[2, 16\] in the checkpoint, \[3, 16\] here"):
        train(make_cfg(*tuned, fast=False, output="three_refused"))
    _, objects = train(make_cfg(*tuned, "init_exclude=[head.*]", fast=False, output="three"))
    assert objects["datamodule"].artifacts()["tokenizer"] == tokenizer
    assert objects["datamodule"].artifacts()["classes"] == ["neg", "neu", "pos"]

    two = write_texts(tmp_path / "two", ("neg", "pos"), "book novel")
    with caplog.at_level("WARNING", logger="seqlab.train"):
        _, objects = train(
            make_cfg(
                *text,
                f"data.data_dir={two}",
                f"init_from={checkpoint}",
                "train=false",
                fast=False,
                output="two",
            )
        )
    assert "was trained on the classes ['0', '1'], this data has ['neg', 'pos']" in caplog.text
    torch.testing.assert_close(
        objects["task"].state_dict()["head.1.weight"], weights(checkpoint)["head.1.weight"]
    )

    with pytest.raises(ConfigError, match=r"data.tokenizer.kind='bpe' \(trained with 'word'\).*init_from="):
        train(make_cfg(*tuned, "data.tokenizer.kind=bpe", fast=False, output="bpe"))


def test_init_exclude_leaves_out_the_checkpoints_extra_weights_and_never_splits_tied_ones(
    tmp_path: Path,
) -> None:
    """A pattern also drops weights the checkpoint alone has (a head with a hidden layer before,
    none now: it was refused, with no remedy); excluding one name of a tied tensor (translation's
    output layer, which is the target embedding) was defeated by loading the other."""
    from torch import nn

    from seqlab.utils.checkpoint_io import load_initial_weights

    def model(hidden: bool) -> nn.Module:
        torch.manual_seed(0)
        net = nn.Module()
        net.embed = nn.Embedding(10, 4)
        net.head = (
            nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
            if hidden
            else nn.Sequential(nn.Linear(4, 3))
        )
        net.output = nn.Linear(4, 10, bias=False)
        net.output.weight = net.embed.weight  # tied
        return net

    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": {k: v + 1 for k, v in model(hidden=True).state_dict().items()}}, path)
    with pytest.raises(
        ConfigError,
        match=r"2 not in this model \(first head.2.bias\).*init_exclude=\[head\.0\.\*,head\.2\.\*\]",
    ):
        load_initial_weights(path, model(hidden=False), [])
    fresh = model(hidden=False)
    kept = load_initial_weights(path, fresh, ["head.2.*", "head.0.*"])
    assert kept == ["head.0.bias", "head.0.weight"]
    torch.testing.assert_close(fresh.embed.weight, model(hidden=True).embed.weight + 1)
    torch.testing.assert_close(fresh.head[0].weight, model(hidden=False).head[0].weight)  # its own
    with pytest.raises(ConfigError, match=r"init_exclude: output.weight is one tensor with embed.weight"):
        load_initial_weights(path, model(hidden=False), ["output.*", "head.2.*"])
    with pytest.raises(ConfigError, match=r"'tail.\*' matches no weight of this model or of init_from's"):
        load_initial_weights(path, model(hidden=False), ["tail.*"])
