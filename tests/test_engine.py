"""The shared engine on a toy regression task: schedules, accumulation, checkpoints, resume, guards."""

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import utils
from engine import CHECKPOINT_BEST, CHECKPOINT_LAST, Engine, EngineConfig, NonFiniteLossError


class ToyTask:
    name = "toy"
    main_metric = "neg_mse"

    def __init__(self, nan_at_step=None):
        self.nan_at_step = nan_at_step

    def train_step(self, model, batch, info):
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        if self.nan_at_step is not None and info.global_step >= self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss}

    def evaluate(self, model, loader, split):
        se, n = 0.0, 0
        for x, y in loader:
            se += float(((model(x) - y) ** 2).sum())
            n += y.numel()
        return {"neg_mse": -se / n}


def make_data(n=64, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    ds = TensorDataset(x, y)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
    return DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True), DataLoader(ds, batch_size=16)


def make_engine(tmp_path, task=None, **cfg):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    base = dict(max_epoch=3, init_lr=0.05, weight_decay=0.0)
    base.update(cfg)
    return Engine(model, task or ToyTask(), EngineConfig(**base), utils.DistInfo(), tmp_path)


def test_training_reduces_loss_and_writes_outputs(tmp_path):
    train, val = make_data()
    eng = make_engine(tmp_path, init_lr=0.3)
    before = eng.evaluate({"val": val})["val"]["neg_mse"]
    res = eng.fit(train, {"val": val})
    assert res["metrics"]["val"]["neg_mse"] > before * 0.2  # at least a 5x lower error
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert (tmp_path / CHECKPOINT_LAST).exists() and (tmp_path / CHECKPOINT_BEST).exists()
    assert res["params"] == 5 and res["best_epoch"] in (0, 1, 2)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    # Starting afresh in the same folder replaces the log; resuming extends it.
    make_engine(tmp_path, max_epoch=2).fit(train, {"val": val})
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1]
    make_engine(tmp_path, max_epoch=3).fit(train, {"val": val}, resume=tmp_path / CHECKPOINT_LAST)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_resume_equals_uninterrupted(tmp_path):
    train, val = make_data()
    full = make_engine(tmp_path / "full")
    full.fit(train, {"val": val})

    first = make_engine(tmp_path / "cut", max_epoch=1)
    first.fit(train, {"val": val})
    # A new process would rebuild everything from scratch and then load the checkpoint.
    torch.manual_seed(123)
    resumed = make_engine(tmp_path / "cut")
    resumed.fit(train, {"val": val}, resume=tmp_path / "cut" / CHECKPOINT_LAST)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.state.global_step == full.state.global_step == 24


def test_cosine_schedule_per_epoch(tmp_path):
    train, val = make_data()
    eng = make_engine(tmp_path, max_epoch=4, init_lr=0.1, min_lr=0.0)
    eng.fit(train, {"val": val})
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    expected = [0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert lrs == pytest.approx(expected)


def test_warmup_then_cosine():
    s = utils.LRSchedule(init_lr=1.0, min_lr=0.0, max_epoch=2, steps_per_epoch=10, warmup_steps=5, warmup_lr=0.0)
    assert [s(0, i) for i in range(5)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert s(0, 7) == 1.0 and s(1, 0) == pytest.approx(0.5)
    per_step = utils.LRSchedule(init_lr=1.0, min_lr=0.0, max_epoch=2, steps_per_epoch=10, per_step=True)
    assert per_step(0, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_gradient_accumulation_matches_large_batch(tmp_path):
    # SGD-like check through AdamW's first step: the accumulated gradient equals the big-batch gradient,
    # so the parameters after one optimizer step agree.
    x = torch.randn(16, 4)
    y = torch.randn(16, 1)
    ds = TensorDataset(x, y)
    big = make_engine(tmp_path / "big", max_epoch=1)
    big.fit(DataLoader(ds, batch_size=16), {})
    acc = make_engine(tmp_path / "acc", max_epoch=1, accum_steps=4)
    acc.fit(DataLoader(ds, batch_size=4), {})
    assert big.state.global_step == acc.state.global_step == 1
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    train, val = make_data()
    make_engine(tmp_path, max_epoch=1).fit(train, {"val": val})
    before = (tmp_path / CHECKPOINT_LAST).read_bytes()
    eng = make_engine(tmp_path, task=ToyTask(nan_at_step=10), max_epoch=3)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2 \(optimizer step 10\).*kept"):
        eng.fit(train, {"val": val}, resume=tmp_path / CHECKPOINT_LAST)
    assert (tmp_path / CHECKPOINT_LAST).read_bytes() == before


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    train, val = make_data()
    make_engine(tmp_path, max_epoch=1).fit(train, {"val": val})
    path = tmp_path / CHECKPOINT_LAST
    data = path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    eng = make_engine(tmp_path / "other")
    with pytest.raises(utils.CheckpointError, match=r"truncated.pth.*truncated or corrupt"):
        eng.fit(train, {"val": val}, resume=bad)
    assert not (tmp_path / "other" / CHECKPOINT_LAST).exists()
    assert path.read_bytes() == data


def test_weights_only_checkpoint_is_not_a_training_checkpoint(tmp_path):
    train, val = make_data()
    make_engine(tmp_path, max_epoch=1).fit(train, {"val": val})
    eng = make_engine(tmp_path / "x")
    with pytest.raises(utils.CheckpointError, match="not a training checkpoint.*--pretrained"):
        eng.load_checkpoint(tmp_path / CHECKPOINT_BEST)


def test_checkpoint_loads_with_weights_only(tmp_path):
    train, val = make_data()
    make_engine(tmp_path, max_epoch=1).fit(train, {"val": val})
    ckpt = torch.load(tmp_path / CHECKPOINT_LAST, weights_only=True)
    assert {"model", "optimizer", "scaler", "pruner", "rng", "state", "config"} <= set(ckpt)


def test_amp_bf16_runs_on_cpu(tmp_path):
    train, val = make_data()
    eng = make_engine(tmp_path, max_epoch=1, amp=True)
    res = eng.fit(train, {"val": val})
    assert math.isfinite(res["metrics"]["val"]["neg_mse"])


def test_unwrap_state_dict_strips_module_prefix():
    sd = {"module.w": torch.zeros(1), "module.b": torch.ones(1)}
    assert set(utils.unwrap_state_dict({"model": sd})) == {"w", "b"}
    with pytest.raises(utils.CheckpointError, match="no state dict"):
        utils.unwrap_state_dict({"model": {"a": 1}}, "x.pth")
    # The PLATON seed's per-epoch files keep the weights under 'model_state_dict'.
    seed_file = {"model_state_dict": {"w": torch.ones(2)}, "epoch": 3}
    assert torch.equal(utils.unwrap_state_dict(seed_file)["w"], torch.ones(2))
