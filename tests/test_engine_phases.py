"""Seam v2 in the engine: phases as data from the pruner (exact resume mid-phase, the step's LR handed to the
pruner, per-phase schedules), knowledge distillation from a frozen teacher, and optimizer groups."""

import copy
import json
import math

import pytest
import torch
from test_engine import ToyTask, make_data
from torch import nn

import utils
from engine import CHECKPOINT_LAST, Engine, EngineConfig, PhaseSpec, parameter_groups
from losses import KDConfig, kd_loss
from pruners.base import Pruner


class TwoPhases(Pruner):
    """A stand-in pruner with a constant-LR first phase (acting) and a cosine second phase (not acting); it
    records the LR of every step it sees and counts its phase ends."""

    name = "toy"

    def __init__(self, first: int = 2, second: int = 3):
        super().__init__({})
        self.first, self.second = first, second
        self.seen: list[tuple[int, int, float]] = []
        self.ended: list[str] = []
        self.scale = nn.Parameter(torch.ones(1))  # a learnable tensor of the pruner's own

    def attach(self, model):
        pass

    def phases(self, cfg):
        return [PhaseSpec("search", self.first, lr_schedule="constant"), PhaseSpec("train", self.second, pruning=False)]

    def param_groups(self):
        return [{"params": [self.scale], "lr_scale": 0.5, "weight_decay": 0.0}]

    def loss(self, model, outputs):
        return (self.scale - 2).pow(2).sum()

    def step(self, model, step, total, lr=0.0):
        self.seen.append((step, total, lr))

    def phase_end(self, name, model):
        self.ended.append(name)
        return False

    def state_dict(self):
        return {"scale": self.scale.detach().clone(), "seen": len(self.seen)}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.scale.copy_(state["scale"])


def engine(out, pruner=None, teacher=None, kd=None, **cfg):
    torch.manual_seed(0)
    base = dict(max_epoch=3, init_lr=0.05, weight_decay=0.0)
    base.update(cfg)
    model = nn.Linear(4, 1)
    return Engine(model, ToyTask(), EngineConfig(**base), utils.DistInfo(), out, pruner, teacher=teacher, kd=kd)


def test_phases_come_from_the_pruner_with_their_schedules_and_the_steps_lr(tmp_path):
    train, val = make_data()
    pruner = TwoPhases()
    eng = engine(tmp_path, pruner)
    eng.fit(train, {"val": val})
    assert [p.name for p in eng.phases] == ["search", "train"] and eng.state.epoch == 4
    assert pruner.ended == ["search", "train"]
    # The pruner acts in the first phase only: 2 epochs x 8 steps, counted 1..16 of 16, each with its LR.
    assert [(s, t) for s, t, _ in pruner.seen] == [(i, 16) for i in range(1, 17)]
    assert {lr for _, _, lr in pruner.seen} == {0.05}  # constant in the search
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["search", "search", "train", "train", "train"]
    assert all("val" in r for r in log)  # eval_every 1, in both phases
    # The second phase runs its own cosine from init_lr: epochs 0, 1, 2 of 3.
    lrs = [r["lr"] for r in log[2:]]
    assert lrs == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)])
    # The pruner's own group took a half LR step towards its loss's minimum.
    assert pruner.scale.item() > 1.0


@pytest.mark.parametrize("cut_after", [1, 3])  # mid-search, and mid-train
def test_a_run_resumed_mid_phase_ends_exactly_like_an_uninterrupted_one(tmp_path, cut_after):
    train, val = make_data()
    full = engine(tmp_path / "full", TwoPhases())
    full.fit(train, {"val": val})

    class Stop(Exception):
        pass

    cut = engine(tmp_path / "cut", TwoPhases())
    original = cut.save_checkpoint

    def save_then_maybe_stop(path):
        original(path)
        if cut.state.epoch == cut_after:
            raise Stop

    cut.save_checkpoint = save_then_maybe_stop
    with pytest.raises(Stop):
        cut.fit(train, {"val": val})
    resumed_pruner = TwoPhases()
    resumed = engine(tmp_path / "cut", resumed_pruner)
    resumed.fit(train, {"val": val}, resume=tmp_path / "cut" / CHECKPOINT_LAST)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(full.pruner.scale, resumed_pruner.scale)
    assert resumed.state.global_step == full.state.global_step == 40


def test_kd_is_zero_when_the_student_is_the_teacher():
    logits = torch.randn(6, 10)
    assert kd_loss(logits, logits.clone(), "soft", tau=2.0).abs().item() < 1e-6
    assert kd_loss(logits, logits.clone(), "soft", reduction="numel").abs().item() < 1e-6
    assert kd_loss(logits, logits + 1.0, "soft").abs().item() < 1e-6  # a shift changes no probability
    assert kd_loss(logits, -logits, "soft").item() > 0.1
    # hard distillation is cross-entropy against the teacher's class
    target = torch.randn(6, 10)
    expected = nn.functional.cross_entropy(logits, target.argmax(1))
    assert kd_loss(logits, target, "hard").item() == pytest.approx(expected.item())


class Classifier(ToyTask):
    """A 3-way toy classification task whose train_step returns its logits for distillation."""

    name = "toycls"
    main_metric = "acc"

    def train_step(self, model, batch, info):
        x, y = batch
        logits = model(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}

    def teacher_logits(self, teacher, batch):
        return teacher(batch[0])

    def evaluate(self, model, loader, split):
        hits = n = 0
        for x, y in loader:
            hits += int((model(x).argmax(1) == y).sum())
            n += len(y)
        return {"acc": hits / n}


def _cls_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=8), torch.utils.data.DataLoader(ds, batch_size=64)


def test_the_engine_adds_kd_from_a_frozen_teacher(tmp_path):
    train, val = _cls_data()
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    teacher = copy.deepcopy(student)
    cfg = EngineConfig(max_epoch=1, init_lr=0.0, weight_decay=0.0)
    kd = KDConfig(path="teacher.pth", kind="soft", alpha=0.7, tau=2.0)
    eng = Engine(student, Classifier(), cfg, utils.DistInfo(), tmp_path, teacher=teacher, kd=kd)
    stats = eng.fit(train, {"val": val})
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert abs(record["train"]["kd_loss"]) < 1e-6  # the student (LR 0) stays the teacher: KD is 0
    assert stats["metrics"]["val"]["acc"] >= 0
    assert not any(p.requires_grad for p in eng.teacher.parameters()) and not eng.teacher.training

    # With the teacher elsewhere the KD term pulls: total = 0.3 task + 0.7 kd.
    other = nn.Linear(4, 3)
    eng2 = Engine(nn.Linear(4, 3), Classifier(), cfg, utils.DistInfo(), tmp_path / "b", teacher=other, kd=kd)
    x, y = next(iter(train))
    out = eng2.task.train_step(eng2.model, (x, y), None)
    total, parts = eng2._distil(out["loss"], {"loss": out["loss"]}, out["logits"], (x, y))
    expected = 0.3 * out["loss"] + 0.7 * kd_loss(out["logits"], other(x), "soft", 2.0)
    assert total.item() == pytest.approx(expected.item()) and parts["kd_loss"].item() > 0


def test_a_teacher_for_a_task_without_logits_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no logits to distil"):
        Engine(nn.Linear(4, 1), ToyTask(), EngineConfig(), utils.DistInfo(), tmp_path, teacher=nn.Linear(4, 1))


def test_parameter_groups_skip_decay_on_biases_norms_and_named_tokens_and_scale_lrs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.body = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 2)

        def no_weight_decay(self):
            return {"cls_token"}

    net = Net()
    named = list(net.named_parameters())
    seeds = parameter_groups(net, named, 0.05, False, {})
    assert len(seeds) == 1 and seeds[0]["weight_decay"] == 0.05  # the BLIP seeds decay everything
    groups = parameter_groups(net, named, 0.05, True, {"head": 10.0})
    by_param = {id(p): g for g in groups for p in g["params"]}
    decay = {n: by_param[id(p)]["weight_decay"] for n, p in named}
    assert decay == {
        "cls_token": 0.0,
        "body.weight": 0.05,
        "body.bias": 0.0,
        "norm.weight": 0.0,
        "norm.bias": 0.0,
        "head.weight": 0.05,
        "head.bias": 0.0,
    }
    assert by_param[id(net.head.weight)]["lr_scale"] == 10.0 and by_param[id(net.body.weight)]["lr_scale"] == 1.0
    with pytest.raises(ValueError, match=r"lr_mult: \['classifier'\] match no trainable parameter"):
        parameter_groups(net, named, 0.05, True, {"classifier": 10.0})
