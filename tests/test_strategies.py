"""``trainer=`` choices: every strategy config composes and builds its strategy object, and what
this machine cannot run is refused before anything is prepared or spawned."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from seqlab.backbones.transformer import DecoderLayer, EncoderLayer
from seqlab.errors import ConfigError
from seqlab.train import build_datamodule, build_trainer, train
from seqlab.utils.distributed import build_strategy, check_hardware, offloads_optimizer
from tests.conftest import run_script


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process sees no CUDA GPU, as on a CPU-only machine (on a GPU machine too, where these
    refusals were skipped); returns the environment that hides them from a child process."""
    from lightning.fabric.accelerators import cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(cuda, "num_cuda_devices", lambda: 0)
    return {"CUDA_VISIBLE_DEVICES": ""}


TRAINERS = ["default", "cpu", "gpu", "ddp", "ddp_spawn", "fsdp", "fsdp2"]
DEEPSPEED = ["deepspeed", "deepspeed_stage_3", "deepspeed_offload"]


@pytest.mark.parametrize("name", TRAINERS + DEEPSPEED)
def test_every_trainer_config_builds_its_strategy(make_cfg, name: str) -> None:
    if name in DEEPSPEED:
        pytest.importorskip("deepspeed", reason="the optional deepspeed extra is not installed")
    cfg = make_cfg(f"trainer={name}", "trainer.devices=4", "trainer.num_nodes=2", "model=lstm")
    assert cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2  # overrides win over every file
    strategy = build_strategy(cfg.trainer, cfg.model, cfg.data.batch_size)
    expected = {
        "ddp": "ddp",
        "ddp_spawn": "ddp_spawn",
        "fsdp": FSDPStrategy,
        "fsdp2": ModelParallelStrategy,
        "deepspeed": DeepSpeedStrategy,
        "deepspeed_stage_3": DeepSpeedStrategy,
        "deepspeed_offload": DeepSpeedStrategy,
    }.get(name, "auto")
    if isinstance(expected, type):
        assert isinstance(strategy, expected)
    else:
        assert strategy == expected
    if name.startswith("deepspeed"):
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == (3 if name == "deepspeed_stage_3" else 2)
        assert bool(zero.get("offload_optimizer")) == (name == "deepspeed_offload")
        assert offloads_optimizer(strategy) == (name == "deepspeed_offload")
        # each process's share of the global batch (8 processes), not Lightning's "auto", which
        # reads the loader's batch sampler: seqlab's loaders have none
        assert strategy.config["train_micro_batch_size_per_gpu"] == cfg.data.batch_size // 8
        datamodule = build_datamodule(cfg.data)
        datamodule.setup("fit")
        assert datamodule.train_dataloader().batch_sampler is None
    if name == "fsdp2":  # shards over every process: 4 devices x 2 nodes
        assert strategy._data_parallel_size == 8 and strategy._tensor_parallel_size == 1


@pytest.mark.parametrize(
    ("devices", "expected"),
    [("3", 3), ("[0,2]", 2), ("'0,1,2'", 3), ("auto", 1)],
)
def test_fsdp2_shards_over_every_process_however_devices_are_given(
    make_cfg, devices: str, expected: int
) -> None:
    """Lightning's mesh needs data x tensor parallel = world size: ``${trainer.devices}`` was -1
    for ``devices=-1`` and a node's count under several nodes, which failed once the job started."""
    cfg = make_cfg(
        "trainer=fsdp2", "trainer.accelerator=cpu", f"trainer.devices={devices}", "trainer.num_nodes=2"
    )
    strategy = build_strategy(cfg.trainer, cfg.model)
    assert strategy._data_parallel_size == 2 * expected and strategy._tensor_parallel_size == 1


def test_fsdp_wraps_and_checkpoints_the_backbone_layers(make_cfg) -> None:
    cfg = make_cfg("trainer=fsdp", "model=transformer", "trainer.strategy.checkpoint_layers=true")
    strategy = build_strategy(cfg.trainer, cfg.model)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {EncoderLayer, DecoderLayer}
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    policy = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert policy._module_classes == {EncoderLayer, DecoderLayer}
    # RNN-family backbones: the fused recurrence modules are the units
    lstm = build_strategy(make_cfg("trainer=fsdp", "model=lstm").trainer, make_cfg("model=lstm").model)
    assert lstm.kwargs["auto_wrap_policy"]._module_classes == {nn.RNNBase}


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true", "16-mixed"])
def test_fsdp_clips_gradients_by_norm_through_the_root_module(make_cfg, precision: str) -> None:
    """trainer=fsdp keeps the default gradient clipping: Lightning's FSDP precision plugin refuses
    to clip by norm at the first step (it has no handle on the root module); seqlab's clips
    through the strategy's wrapped root (FSDP1 cannot run on CPU, so a stand-in root here)."""
    from lightning.pytorch.plugins.precision import FSDPPrecision as LightningFSDPPrecision
    from lightning.pytorch.utilities.enums import GradClipAlgorithmType
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    cfg = make_cfg("trainer=fsdp", f"trainer.precision={precision}", "model=lstm")
    assert cfg.trainer.gradient_clip_val == 1.0
    strategy = build_strategy(cfg.trainer, cfg.model)
    plugin = strategy.precision_plugin
    assert isinstance(plugin, LightningFSDPPrecision) and plugin.precision == precision
    assert (plugin.scaler is not None) == (precision == "16-mixed")
    mixed = plugin.mixed_precision_config  # buffers (the forecaster's scaler statistics) in float32
    assert mixed.buffer_dtype == torch.float32 and mixed.cast_root_forward_inputs is False
    assert mixed.reduce_dtype == torch.float32  # as DDP and FSDP2 reduce under bf16-mixed
    assert mixed.param_dtype == {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(
        precision, torch.float32
    )

    class Root(nn.Linear):
        def clip_grad_norm_(self, max_norm: float) -> None:
            clipped.append(max_norm)

    clipped: list[float] = []
    strategy.model = Root(2, 2)
    optimizer = torch.optim.SGD(strategy.model.parameters(), lr=0.1)
    plugin.clip_gradients(optimizer, 1.0, GradClipAlgorithmType.NORM)
    assert clipped == [1.0]
    with pytest.raises(MisconfigurationException, match="'norm'` is currently not supported"):
        LightningFSDPPrecision(precision).clip_gradients(optimizer, 1.0, GradClipAlgorithmType.NORM)


@pytest.mark.parametrize("name", ["fsdp", "fsdp_cpu_offload", "deepspeed_stage_2"])
def test_lightnings_own_fsdp_and_deepspeed_names_are_refused(make_cfg, name: str) -> None:
    """trainer.strategy=fsdp (Lightning's registry entry, not trainer=fsdp) built Lightning's
    plugin, which refuses to clip by norm at the first step (gradient_clip_val is 1.0)."""
    cfg = make_cfg("model=lstm", f"+trainer.strategy={name}")
    with pytest.raises(ConfigError, match=rf"trainer.strategy={name}: Lightning's own .* choose trainer="):
        build_strategy(cfg.trainer, cfg.model)


@pytest.mark.parametrize("name", ["fsdp", "deepspeed", "deepspeed_stage_3", "deepspeed_offload", "gpu"])
def test_gpu_only_choices_fail_fast_naming_what_works(make_cfg, tmp_path: Path, cpu_only, name: str) -> None:
    cfg = make_cfg(f"trainer={name}", fast=False)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "GPU" in message and "trainer=ddp" in message and "trainer=fsdp2" in message
    assert not (tmp_path / "run").exists(), "refused before anything was written"


@pytest.mark.parametrize(
    "overrides", [["trainer=fsdp", "debug=limit"], ["trainer=deepspeed", "trainer.accelerator=cpu"]]
)
def test_gpu_only_strategies_are_refused_on_the_cpu_of_a_gpu_machine(
    make_cfg, monkeypatch, overrides
) -> None:
    """On a GPU machine, FSDP1 or DeepSpeed with ``trainer.accelerator=cpu`` (which ``debug=*`` and
    the ``*_cpu`` recipes set) passed the check: DeepSpeed then failed in ``fit`` after the run
    directory was written, and FSDP1 ran an untested path on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(ConfigError, match=r"needs CUDA GPUs, but trainer.accelerator='cpu'.*trainer=ddp"):
        check_hardware(make_cfg(*overrides, fast=False))


def test_more_gpus_than_exist_and_cpu_devices(make_cfg, cpu_only) -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        check_hardware(make_cfg("trainer=gpu", "trainer.devices=8", fast=False))
    cfg = make_cfg("trainer=ddp")  # on a CPU-only machine: 2 gloo processes
    assert cfg.trainer.devices == 2
    check_hardware(cfg)
    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2


def test_the_refusal_comes_before_any_process_or_file(tmp_path: Path, cpu_only) -> None:
    """As a user sees it: one line, exit code 1, nothing spawned, no run directory."""
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py", "trainer=deepspeed", f"hydra.run.dir={run_dir}", timeout=120, env=cpu_only
    )
    assert result.returncode == 1
    assert "ConfigError: trainer.strategy: DeepSpeed needs CUDA GPUs" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert "Seed set" not in result.stdout + result.stderr
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "summary.json").exists()


def test_slurm_launcher_submits_one_multi_gpu_job_per_sweep_job(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    """``hydra/launcher=slurm``: the submitit plugin loads, and the sbatch script of each sweep job
    asks for num_nodes x devices tasks (one per GPU) and submitit's SIGUSR2 before the time limit."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional slurm extra")
    import submitit
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"  # submitit looks for srun before it builds a SLURM executor
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    cfg = make_cfg(
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}", fast=False,
    )  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"  # Hydra's plugin loader imports it on its own
    assert launcher.params["nodes"] == 2 and launcher.params["tasks_per_node"] == 4
    assert launcher.params["gpus_per_node"] == 4

    submitted = {}

    class Job:
        def results(self):
            return [None]

    def map_array(executor, fn, *job_params):
        submitted["script"] = executor._executor._make_submission_file_text("python -m submitit", "uid")
        submitted["overrides"] = job_params[0]
        return [Job() for _ in job_params[0]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    launcher.launch([["model=lstm"], ["model=transformer"]], initial_job_idx=0)
    script = submitted["script"]
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--signal=USR2@120",
    ):
        assert f"#SBATCH {line}" in script, line
    assert "srun" in script
    # a failed task ends the others (they waited in the rendezvous for 30 minutes), before srun runs
    assert script.index("export SLURM_KILL_BAD_EXIT=1") < script.index("srun")
    assert submitted["overrides"] == (["model=lstm"], ["model=transformer"])
    # a CPU trainer's processes are no GPUs: the job asks for none
    cpu = make_cfg(
        "hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=4",
        f"hydra.sweep.dir={tmp_path / 'cpu'}", fast=False,
    )  # fmt: skip
    launcher = instantiate(cpu.hydra.launcher)
    assert launcher.params["tasks_per_node"] == 4 and launcher.params["gpus_per_node"] is None
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cpu)
    launcher.launch([["model=lstm"]], initial_job_idx=0)
    assert "#SBATCH --ntasks-per-node=4" in submitted["script"] and "gpus" not in submitted["script"]


def test_a_slurm_sweep_over_the_trainers_devices_is_refused_before_its_first_job() -> None:
    """submitit asks one set of resources for all of a sweep's jobs, from the sweep's config:
    ``trainer.devices=1,4`` asked for 1 GPU per node for both jobs."""
    from omegaconf import OmegaConf

    from seqlab.utils.hydra_callbacks import check_slurm_resources

    def sweep(
        *overrides: str,
        launcher: str = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    ):
        return OmegaConf.create(
            {"hydra": {"launcher": {"_target_": launcher}, "overrides": {"task": list(overrides)}}}
        )

    for swept in ("trainer.devices=1,4", "trainer=gpu,ddp", "trainer.num_nodes=range(1,3)"):
        with pytest.raises(
            ConfigError, match=rf"{re.escape(swept)}: hydra/launcher=slurm asks SLURM for one set"
        ):
            check_slurm_resources(sweep("model=lstm,gru", swept))
    check_slurm_resources(sweep("model=lstm,gru", "trainer=ddp", "trainer.devices=4"))  # one setting
    in_params = sweep("model=lstm")
    in_params.hydra.sweeper = {"params": {"trainer.devices": "1,2", "seed": "1,2"}}  # an experiment's sweep
    with pytest.raises(ConfigError, match=r"trainer\.devices=1,2: hydra/launcher=slurm"):
        check_slurm_resources(in_params)
    local = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    check_slurm_resources(sweep("trainer.devices=1,2", launcher=local))  # each local job composes its own


def test_a_directory_that_is_no_checkpoint_is_refused(tmp_path: Path) -> None:
    from seqlab.utils.checkpoint_io import consolidate_checkpoint

    (tmp_path / "notes").mkdir()
    with pytest.raises(ConfigError, match=r"is a directory but not a sharded checkpoint"):
        consolidate_checkpoint(tmp_path / "notes", tmp_path / "out.ckpt")
    with pytest.raises(ConfigError, match="no such file"):
        consolidate_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_optimizer_state_converts_between_positional_and_by_name_forms(tmp_path: Path) -> None:
    """torch numbers an optimizer's parameters in param_groups order; FSDP/FSDP2 key them by name.
    The conversions pair by the groups, so groups that reorder the parameters (weight decay / no
    decay, as every task builds them) keep each moment with its own tensor."""
    from seqlab.utils.checkpoint_io import (
        optimizer_param_names,
        optimizer_state_by_name,
        optimizer_state_by_position,
        read_sharded_checkpoint,
    )

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        decay = [p for p in module.parameters() if p.ndim == 2]
        no_decay = [p for p in module.parameters() if p.ndim == 1]
        return module, torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])

    module, optimizer = build()
    module(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    names = optimizer_param_names(module, optimizer)
    assert names == [["0.weight", "2.weight"], ["0.bias", "1.weight", "1.bias", "2.bias"]]
    by_name = optimizer_state_by_name(optimizer.state_dict(), names)
    params = dict(module.named_parameters())
    for name, state in by_name["state"].items():  # every moment has its parameter's shape
        assert state["exp_avg"].shape == params[name].shape, name
        torch.testing.assert_close(state["exp_avg"], optimizer.state[params[name]]["exp_avg"])
    assert by_name["param_groups"][1]["weight_decay"] == 0.0
    # a module.parameters()-order pairing (what Lightning assumes) would give "0.bias" the
    # moments of "2.weight"; the round trip through names restores torch's form exactly
    fresh_module, fresh = build()
    fresh.load_state_dict(optimizer_state_by_position(by_name))
    for name, param in fresh_module.named_parameters():
        torch.testing.assert_close(
            fresh.state[param]["exp_avg_sq"], optimizer.state[params[name]]["exp_avg_sq"]
        )
    assert optimizer_state_by_position(optimizer.state_dict()) == optimizer.state_dict()
    with pytest.raises(ConfigError, match=r"groups of sizes \[2, 4\], this run's optimizer \[3, 3\]"):
        optimizer_state_by_name(optimizer.state_dict(), [names[0] + ["x"], names[1][:3]])
    deepspeed_dir = tmp_path / "ds.ckpt"
    deepspeed_dir.mkdir()
    (deepspeed_dir / "latest").write_text("global_step10")
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO checkpoint: training resumes from it under"):
        read_sharded_checkpoint(deepspeed_dir)


@pytest.mark.parametrize("trainer", ["fsdp2", "ddp"])
def test_a_deepspeed_checkpoint_is_refused_before_training_under_another_strategy(
    make_cfg, tmp_path: Path, trainer: str
) -> None:
    """Under trainer=fsdp* a DeepSpeed directory went to Lightning's own reader, which failed on
    every process after the launch with "does not point to a valid checkpoint"."""
    from seqlab.utils.resume import check_checkpoint_fits

    deepspeed_dir = tmp_path / "ds.ckpt"
    deepspeed_dir.mkdir()
    (deepspeed_dir / "latest").write_text("global_step10")
    cfg = make_cfg(f"trainer={trainer}", f"ckpt_path={deepspeed_dir}")
    with pytest.raises(ConfigError, match="is a DeepSpeed ZeRO checkpoint: training resumes from it under"):
        check_checkpoint_fits(str(deepspeed_dir), cfg)


def test_deepspeed_refuses_a_checkpoint_not_its_own_before_training(make_cfg, tmp_path: Path) -> None:
    """Lightning's DeepSpeed strategy resumes from its own ZeRO directories only: a DDP file or
    FSDP2 shards failed on every process after the launch ("not a valid DeepSpeed checkpoint"),
    unless ZeRO-3 takes a file's weights alone (``load_full_weights``)."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

    from seqlab.utils.resume import check_checkpoint_fits

    file = tmp_path / "ddp.ckpt"
    torch.save({"state_dict": {}}, file)
    _distributed_checkpoint_save({"state_dict": nn.Linear(3, 2).state_dict()}, tmp_path / "fsdp2")
    with pytest.raises(ConfigError, match=r"ddp.ckpt' holds a file, not a DeepSpeed ZeRO checkpoint"):
        check_checkpoint_fits(str(file), make_cfg("trainer=deepspeed"))
    with pytest.raises(ConfigError, match=r"holds the shards of trainer=fsdp2, not a DeepSpeed ZeRO"):
        check_checkpoint_fits(str(tmp_path / "fsdp2"), make_cfg("trainer=deepspeed", output="shards"))
    full = make_cfg("trainer=deepspeed_stage_3", "+trainer.strategy.load_full_weights=true", output="full")
    with pytest.raises(ConfigError, match="not written by seqlab"):  # past the strategy check: its metadata
        check_checkpoint_fits(str(file), full)


def test_fsdp_and_fsdp2_shards_are_refused_by_name_under_the_other(make_cfg, tmp_path: Path) -> None:
    """Lightning's FSDP1 keeps a sharded checkpoint's weights under "model", FSDP2 under
    "state_dict", and neither reads the other's (torch.distributed.checkpoint's "Missing key"
    on every process, after the launch); DDP reads both whole."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

    from seqlab.utils.checkpoint_io import sharded_by
    from seqlab.utils.resume import check_checkpoint_fits

    for saved_by, key in (("fsdp", "model"), ("fsdp2", "state_dict")):
        _distributed_checkpoint_save({key: nn.Linear(3, 2).state_dict()}, tmp_path / saved_by)
        torch.save({"epoch": 3}, tmp_path / saved_by / "meta.pt")  # Lightning's metadata file
        assert sharded_by(tmp_path / saved_by) == saved_by
    with pytest.raises(ConfigError, match=r"holds the shards of trainer=fsdp, which trainer=fsdp2 cannot"):
        check_checkpoint_fits(str(tmp_path / "fsdp"), make_cfg("trainer=fsdp2"))
    with pytest.raises(ConfigError, match=r"holds the shards of trainer=fsdp2, which trainer=fsdp cannot"):
        check_checkpoint_fits(str(tmp_path / "fsdp2"), make_cfg("trainer=fsdp", output="fsdp1"))
    with pytest.raises(ConfigError, match="not written by seqlab"):  # read whole: on to its metadata
        check_checkpoint_fits(str(tmp_path / "fsdp"), make_cfg("trainer=ddp", output="ddp"))
    assert sharded_by(tmp_path) is None


def test_fsdp_resumes_optimizer_states_saved_by_one_process_and_by_fsdp(tmp_path: Path) -> None:
    """Lightning's FSDP strategy reads a full checkpoint file and loads its optimizer states in
    ``load_checkpoint``, re-keying positional states by ``module.parameters()`` order: FSDP's own
    files are numbered so, one process's and DDP's in the groups' order (weight decay first), and
    every ``trainer=fsdp`` resume of a positional file was refused, FSDP's own ``last.ckpt`` too.
    Through seqlab's ``FSDPStrategy.load_checkpoint`` (one gloo process on the CPU, a real FSDP
    module) both kinds give each parameter its own Adam moments; Lightning's gives ``0.bias``
    another tensor's from a one-process file."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
    from lightning.pytorch.strategies import FSDPStrategy as LightningFSDP
    from lightning.pytorch.trainer.states import TrainerFn
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    from seqlab.utils.distributed import FSDPStrategy

    def build(wrap: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        ndim = {name: p.ndim for name, p in module.named_parameters()}  # decided before wrapping
        if wrap:
            module = FSDP(module, use_orig_params=True, device_id=torch.device("cpu"))
        named = [(n.replace("_fsdp_wrapped_module.", ""), p) for n, p in module.named_parameters()]
        decay = [p for n, p in named if ndim[n] == 2]
        no_decay = [p for n, p in named if ndim[n] == 1]
        return module, torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])

    def trained(wrap: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        module, optimizer = build(wrap)
        module(torch.ones(5, 3)).square().sum().backward()
        optimizer.step()
        return module, optimizer

    def moments(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        return {
            n.replace("_fsdp_wrapped_module.", ""): optimizer.state[p]["exp_avg"].clone()
            for n, p in module.named_parameters()
        }

    def resumed(strategy_class: type, path: Path) -> dict[str, torch.Tensor]:
        module, optimizer = build(wrap=True)
        strategy = strategy_class(state_dict_type="full")
        strategy._model, strategy.optimizers = module, [optimizer]
        strategy._lightning_module = SimpleNamespace(
            trainer=SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING)), strict_loading=True
        )
        strategy.load_checkpoint(path)
        return moments(module, optimizer)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        plain_module, plain_optimizer = trained(wrap=False)
        expected = moments(plain_module, plain_optimizer)
        weights = plain_module.state_dict()
        one_process = tmp_path / "one_process.ckpt"  # numbered in the groups' order
        torch.save({"state_dict": weights, "optimizer_states": [plain_optimizer.state_dict()]}, one_process)
        fsdp_module, fsdp_optimizer = trained(wrap=True)
        with _get_full_state_dict_context(fsdp_module, world_size=1):  # what FSDPStrategy saves
            saved = FSDP.optim_state_dict(fsdp_module, fsdp_optimizer)
            saved = FSDP.rekey_optim_state_dict(saved, OptimStateKeyType.PARAM_ID, fsdp_module)
        assert [g["params"] for g in saved["param_groups"]] == [[0, 4], [1, 2, 3, 5]]  # module order
        own = tmp_path / "fsdp.ckpt"
        torch.save({"state_dict": weights, "optimizer_states": [saved]}, own)
        for path in (one_process, own):
            for name, moment in resumed(FSDPStrategy, path).items():
                torch.testing.assert_close(moment, expected[name], msg=f"{path.name}: {name}")
        lightnings = resumed(LightningFSDP, one_process)  # what seqlab's renumbering prevents
        assert not torch.equal(lightnings["0.bias"], expected["0.bias"])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("weights_key", ["model", "state_dict"])
def test_fsdp_and_fsdp2_checkpoint_directories_read_alike(tmp_path: Path, weights_key: str) -> None:
    """Lightning's FSDP1 saves a sharded checkpoint's weights under "model", FSDP2 under
    "state_dict": both read as an ordinary checkpoint (eval.py, resuming elsewhere)."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    from seqlab.utils.checkpoint_io import read_sharded_checkpoint

    module = nn.Linear(3, 2)
    _distributed_checkpoint_save({weights_key: module.state_dict()}, tmp_path)
    torch.save({"epoch": 3}, tmp_path / _METADATA_FILENAME)
    checkpoint = read_sharded_checkpoint(tmp_path)
    assert checkpoint["epoch"] == 3 and "model" not in checkpoint
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(checkpoint["state_dict"][name], tensor)


@pytest.mark.parametrize("job_ends", [True, False])
def test_a_dead_rank_ends_the_sweep_job_not_the_sweep(job_ends: bool) -> None:
    """Lightning's watch over a DDP job's other ranks kills the launching process when one exits
    non-zero; in a sweep that is the sweep. seqlab's waits: if the job fails by itself meanwhile
    (``finish_job`` takes its ranks back), the launching process lives on to the next job; if it
    stays stuck (a rank waiting for ever in a collective), it is killed as Lightning would."""
    import subprocess
    import sys
    import time

    from seqlab.utils.distributed import RankObserver

    launching = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"]
    )  # stands in for the sweep
    ranks = [
        subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]),  # a rank that died
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),  # one left waiting
    ]
    observer = RankObserver(main_pid=launching.pid, child_processes=ranks, sleep_period=0.1)
    observer.grace = 3.0
    try:
        observer.start()
        assert ranks[1].wait(timeout=30) != 0, "the waiting rank is killed at once"
        if job_ends:
            time.sleep(0.5)
            ranks.clear()  # what finish_job does after a failed job
        observer.join(timeout=30)
        assert not observer.is_alive()
        if job_ends:
            assert launching.poll() is None, "the sweep lives on"
        else:
            assert launching.wait(timeout=30) != 0, "a job stuck past the grace ends the sweep"
    finally:
        launching.kill()
        launching.wait()


def test_deepspeed_consolidation_writes_a_whole_file_or_none(tmp_path: Path, monkeypatch) -> None:
    """Every process of a multi-process eval.py gathers a ZeRO checkpoint into the same file: each
    writes aside and renames, so no process reads another's half-written file, and a failed
    conversion leaves the previous file as it was."""
    import lightning.pytorch.utilities.deepspeed as lightning_deepspeed

    from seqlab.utils.checkpoint_io import consolidate_checkpoint

    zero = tmp_path / "ds.ckpt"
    zero.mkdir()
    (zero / "latest").write_text("global_step10")
    output = tmp_path / "eval" / "consolidated.ckpt"

    def convert(checkpoint_dir: str, output_file: str) -> None:
        assert Path(checkpoint_dir) == zero and Path(output_file).parent == output.parent
        assert Path(output_file) != output, "written aside, then renamed"
        torch.save({"w": torch.ones(3)}, output_file)

    def dies(checkpoint_dir: str, output_file: str) -> None:
        Path(output_file).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(lightning_deepspeed, "convert_zero_checkpoint_to_fp32_state_dict", convert)
    assert consolidate_checkpoint(zero, output) == output
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask, "an ordinary file's mode, not mkstemp's 0600"
    monkeypatch.setattr(lightning_deepspeed, "convert_zero_checkpoint_to_fp32_state_dict", dies)
    with pytest.raises(OSError, match="No space left"):
        consolidate_checkpoint(zero, output)
    assert torch.equal(torch.load(output, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in output.parent.iterdir()] == ["consolidated.ckpt"], "nothing left aside"


def _fsdp1_process(rank: int, port: int, results) -> None:
    """One of two gloo processes wrapping a task as Lightning's FSDPStrategy does (see
    ``_fsdp1_step``); rank 0 reports what it found."""
    import gc

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        found = _fsdp1_step()
        if rank == 0:
            results.put(found)
    finally:
        # The wrapped modules hold the process group through reference cycles: collect them, so
        # that destroying the group joins gloo's worker threads now. A worker still alive while
        # the interpreter shuts down aborts the process when it frees a tensor (SIGABRT,
        # "terminate called without an active exception", about one run in twenty-five here).
        gc.collect()
        dist.destroy_process_group()


def _fsdp1_step() -> tuple:
    """A task wrapped as Lightning's FSDPStrategy wraps it (FULL_SHARD, use_orig_params, one unit
    per backbone layer, seqlab's mixed-precision config), after the task's ``setup``; returns
    whether the parameters were flattened, the number of matrices, the number of decayed
    parameters, and the dtype a step's target arrives in."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from seqlab.tasks.classification import ClassificationTask
    from seqlab.utils.precision import FSDPPrecision

    torch.manual_seed(0)
    backbone = {
        "_target_": "seqlab.backbones.transformer.TransformerBackbone", "d_model": 16, "nhead": 2,
        "num_layers": 2, "dim_feedforward": 32,
    }  # fmt: skip
    task = ClassificationTask(backbone, vocab_size=50, num_classes=3, cls_id=2)
    matrices = sum(p.ndim >= 2 for p in task.parameters())
    task.remember_parameter_ranks()  # Lightning's setup hook, before the strategy wraps
    seen = {}

    def step(batch: dict) -> torch.Tensor:  # Lightning runs every step through the root's forward
        seen["target"] = batch["target"].dtype
        return batch["target"].sum()

    task.forward = step
    mixed = FSDPPrecision("bf16-mixed", task).mixed_precision_config
    wrapped = FullyShardedDataParallel(
        task, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True,
        device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({EncoderLayer}), mixed_precision=mixed,
    )  # fmt: skip
    flat = all(p.ndim <= 1 for p in task.parameters())
    decayed, _ = task.parameter_groups(0.01)
    # Without autograd: FSDP's post-backward hooks, registered on a forward with grad, would keep
    # the modules (and the process group) alive through C++ autograd nodes gc cannot see.
    with torch.no_grad():
        wrapped({"target": torch.tensor([1234.567])})
    return flat, matrices, len(decayed["params"]), seen["target"]


@pytest.mark.slow
def test_fsdp_keeps_weight_decay_and_the_batchs_precision() -> None:
    """Two things trainer=fsdp (FSDP1) got wrong, checked with torch's FSDP on two CPU processes:
    it makes every parameter a 1-d view of its shard before configure_optimizers, so no weight
    was decayed; and it cast every floating tensor of the batch, targets included, to bfloat16."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_fsdp1_process, args=(port, results), nprocs=2, start_method="spawn")
    flat, matrices, decayed, target = results.get()
    assert flat, "FSDP flattened the parameters (the case this guards)"
    assert decayed == matrices > 4
    assert target == torch.float32


def test_a_one_process_ddp_sweep_job_leaves_nothing_to_the_next(monkeypatch, tmp_path: Path) -> None:
    """``-m trainer=ddp trainer.devices=1,2``: the one-process job started no ranks, so its end
    left Lightning's launch environment and the one-process group in place; the next job took
    them as started from outside, started no ranks, and trained as rank 0 of 2 on half the data.
    And Lightning's launcher set the threads and ``OMP_NUM_THREADS`` for its processes: the next
    job of the sweep's process kept them (a single-process job after a 2-process one, half the
    cores)."""
    import lightning as L
    import torch.distributed as dist

    from seqlab.utils import distributed
    from seqlab.utils.distributed import LAUNCH_ENV, finish_job, use_script_launcher
    from seqlab.utils.parallel import job_resources

    monkeypatch.setattr(distributed, "in_multirun", lambda: True)
    for key in (*LAUNCH_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with job_resources(None):  # (outside a parallel sweep it reads no config)
            trainer = L.Trainer(
                strategy="ddp", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False
            )
            use_script_launcher(trainer)
            trainer.strategy._launcher.launch(trainer.strategy.setup_environment, trainer=trainer)
            assert (
                dist.is_initialized() and os.environ["LOCAL_RANK"] == "0" and "OMP_NUM_THREADS" in os.environ
            )
            assert finish_job(trainer, tmp_path) is None
        assert not dist.is_initialized()
        assert [key for key in LAUNCH_ENV if key in os.environ] == []
        assert torch.get_num_threads() == 1 and "OMP_NUM_THREADS" not in os.environ
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key in LAUNCH_ENV:
            os.environ.pop(key, None)
        torch.set_num_threads(threads)
