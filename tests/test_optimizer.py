"""``task.optimizer``: torch's fused kernel by default (``fused: auto``) where it has one, the same
update rule as torch's per-tensor loop, and a clear error for a value it cannot mean."""

from __future__ import annotations

import pytest
import torch

from seqlab.errors import ConfigError
from seqlab.tasks.base import fused_by_default
from seqlab.train import build_datamodule, build_task

TASK_DATA = {"forecasting": "data=timeseries", "classification": "data=sentiment_synthetic",
             "translation": "data=translation_synthetic"}  # fmt: skip


def build(make_cfg, *overrides: str):
    text = any(o.startswith("data=") and o != "data=timeseries" for o in overrides)  # FAST is the series'
    cfg = make_cfg("model=lstm", "model.d_model=16", "model.num_layers=1", *overrides, fast=not text)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    return build_task(cfg.task, cfg.model, datamodule), datamodule


@pytest.mark.parametrize("task", TASK_DATA)
def test_every_task_steps_with_the_fused_adamw_on_cpu(make_cfg, task: str) -> None:
    model, _ = build(make_cfg, TASK_DATA[task])
    optimizer, _ = model.build_optimizer(100)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    forced_off, _ = build(make_cfg, TASK_DATA[task], "task.optimizer.fused=false")
    assert not forced_off.build_optimizer(100)[0].defaults["fused"]


def test_the_fused_step_trains_as_the_per_tensor_loop(make_cfg) -> None:
    """Same hyperparameters reach the kernel (learning rate, betas, the no-decay group): twenty
    steps on the same batches give the same weights, to float32 rounding."""
    weights = []
    for fused in ("auto", "false"):
        torch.manual_seed(0)
        model, datamodule = build(
            make_cfg, f"task.optimizer.fused={fused}", "task.optimizer.weight_decay=0.1"
        )
        optimizer, scheduler = model.build_optimizer(20)
        assert optimizer.defaults["fused"] is (fused == "auto")
        batches = iter(datamodule.train_dataloader())
        for _ in range(20):
            optimizer.zero_grad()
            model.step_loss(next(batches)).backward()
            optimizer.step()
            scheduler.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(
        weights[0], torch.cat([p.detach().flatten() for p in build(make_cfg)[0].parameters()])
    )
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_auto_keeps_torch_default_where_there_is_no_fused_kernel(make_cfg) -> None:
    # RMSprop has no `fused` argument: auto must not pass one
    model, _ = build(make_cfg, "task.optimizer._target_=torch.optim.RMSprop")
    assert type(model.build_optimizer(10)[0]) is torch.optim.RMSprop

    cpu = [torch.nn.Parameter(torch.randn(2))]
    assert fused_by_default(torch.optim.AdamW, [{"params": cpu}])
    assert fused_by_default(torch.optim.SGD, [{"params": cpu}])
    assert not fused_by_default(torch.optim.Adamax, [{"params": cpu}])
    mixed = [{"params": cpu}, {"params": [torch.nn.Parameter(torch.randn(2, device="meta"))]}]
    assert not fused_by_default(torch.optim.AdamW, mixed)  # one device type only
    assert not fused_by_default(torch.optim.AdamW, [{"params": [torch.zeros(2, dtype=torch.int64)]}])

    class MyAdamW(torch.optim.AdamW):  # a subclass may not take `fused`
        pass

    assert not fused_by_default(MyAdamW, [{"params": cpu}])


def test_a_fused_value_that_means_nothing_is_refused(make_cfg) -> None:
    model, _ = build(make_cfg, "task.optimizer.fused=sometimes")
    with pytest.raises(
        ConfigError, match=r"task.optimizer.fused must be auto, true or false, got 'sometimes'"
    ):
        model.build_optimizer(10)
