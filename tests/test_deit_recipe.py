"""The DeiT / ImageNet classification harness: recipes built from timm's parts, repeated augmentation, mixup
with a teacher, model EMA, DeiT names and checkpoint layouts, the evaluation protocol."""

import json
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import ColorJitter, v2
from torchvision.transforms.v2 import InterpolationMode

import tasks.classification as cls
import utils
from config import ConfigError, validate
from data.samplers import RepeatedAugSampler
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_imagenet_transform
from engine import CHECKPOINT_LAST, Engine, EngineConfig
from losses import KDConfig
from tasks import registry

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def config(**over):
    """A classification config as the entry script resolves it (schema defaults, then ``over``), completed."""
    schema = registry.schema(registry.lookup("classification"))
    c = validate({"image_size": SIZE, "num_classes": 5, "vit": "deit_tiny", **TINY, **over}, schema)
    return cls.complete_config(c)


def names(transform):
    return [type(t).__name__ for t in transform.transforms]


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageNet-style tree: 2 classes, 12 train and 4 val images each, 40x36 px."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in ("n001", "n002"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


# --------------------------------------------------------------------------- recipes -> timm ops


def test_deit_recipe_builds_timms_pipeline():
    c = config(recipe="deit")
    train = build_imagenet_transform("train", SIZE, c)
    ops = {type(t): t for t in train.transforms}
    crop = ops[RandomResizedCropAndInterpolation]
    assert crop.size == (SIZE, SIZE) and crop.scale == (0.08, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert [t.p for t in train.transforms if type(t).__name__ == "RandomHorizontalFlip"] == [0.5]
    ra = ops[RandAugment]
    assert ra.num_layers == 2 and len(ra.ops) == 15
    assert {op.magnitude for op in ra.ops} == {9} and {op.magnitude_std for op in ra.ops} == {0.5}
    assert "SolarizeIncreasing" in {op.name for op in ra.ops}  # inc1: the increasing-severity variants
    assert ra.ops[0].hparams["translate_const"] == int(SIZE * 0.45)
    assert ColorJitter not in ops  # colour jitter 0.3 is set, but timm drops it under RandAugment
    erase = ops[RandomErasing]
    assert (erase.probability, erase.mode, erase.max_count) == (0.25, "pixel", 1)
    assert (c["mixup"], c["cutmix"], c["mixup_prob"], c["mixup_switch_prob"], c["smoothing"]) == (0.8, 1, 1, 0.5, 0.1)
    assert c["repeated_aug"] is True and c["drop_path_rate"] == 0.1 and c["color_jitter"] == 0.3
    out = train(Image.new("RGB", (40, 36), (10, 120, 240)))
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "recipe,interpolation", [("uvc", InterpolationMode.BILINEAR), ("plain", InterpolationMode.BICUBIC)]
)
def test_light_recipes_crop_and_flip_only(recipe, interpolation):
    c = config(recipe=recipe)
    train = build_imagenet_transform("train", SIZE, c)
    assert names(train)[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert train.transforms[0].interpolation == interpolation and train.transforms[0].scale == (0.08, 1.0)
    assert not {"RandAugment", "RandomErasing", "ColorJitter"} & set(names(train))
    assert c["repeated_aug"] is False
    mixup = cls.build_task(c, None).mixup
    if recipe == "uvc":  # timm Mixup applied with probability 0.8, smoothing folded in; no drop path
        assert isinstance(mixup, Mixup) and mixup.mix_prob == 0.8 and mixup.label_smoothing == 0.1
        assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.switch_prob, mixup.mode) == (0.8, 1.0, 0.5, "batch")
        assert c["drop_path_rate"] == 0.0
    else:
        assert mixup is None and c["smoothing"] == 0.1


def test_explicit_keys_beat_the_recipe():
    plain = build_imagenet_transform("train", SIZE, config(recipe="plain", randaug="rand-m5-n1", reprob=0.5))
    assert {"RandAugment", "RandomErasing"} <= set(names(plain))
    jitter = build_imagenet_transform("train", SIZE, config(recipe="plain", color_jitter=0.4))
    assert "ColorJitter" in names(jitter)
    deit = config(
        recipe="deit", reprob=0.0, randaug="", color_jitter=0.0, mixup=0.0, cutmix=0.0, interpolation="bilinear"
    )
    assert "ColorJitter" in names(build_imagenet_transform("train", SIZE, {**deit, "color_jitter": 0.3}))
    assert names(build_imagenet_transform("train", SIZE, deit))[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert deit["train_interpolation"] == "bilinear" and cls.build_task(deit, None).mixup is None
    assert config(recipe="uvc", train_interpolation="bicubic")["train_interpolation"] == "bicubic"
    assert config(recipe="deit", drop_path_rate=0.0)["drop_path_rate"] == 0.0


@pytest.mark.parametrize("recipe", ["deit", "uvc", "plain"])
def test_every_recipe_evaluates_with_one_protocol(recipe):
    val = build_imagenet_transform("val", SIZE, config(recipe=recipe))
    assert names(val)[:2] == ["Resize", "CenterCrop"]
    resize, crop = val.transforms[:2]
    assert resize.size == [int(SIZE / 0.875)] and resize.interpolation == InterpolationMode.BICUBIC
    assert crop.size == (SIZE, SIZE)
    norm = next(t for t in val.transforms if isinstance(t, v2.Normalize))
    assert tuple(norm.mean) == IMAGENET_MEAN and tuple(norm.std) == IMAGENET_STD


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "key,value",
    [
        ("recipe", "fancy"),
        ("mixup", -0.1),
        ("mixup", "lots"),
        ("cutmix", -1),
        ("mixup_prob", 1.5),
        ("mixup_switch_prob", -0.5),
        ("mixup_mode", "row"),
        ("smoothing", 1.0),
        ("randaug", "rand-zz9"),
        ("randaug", True),
        ("color_jitter", -0.3),
        ("reprob", 2.0),
        ("remode", "blur"),
        ("recount", 0),
        ("repeated_aug", "yes"),
        ("drop_path_rate", 1.5),
        ("interpolation", "cubic"),
        ("train_interpolation", "fancy"),
        ("eval_crop_ratio", 0.0),
        ("model_ema_decay", 1.0),
        ("vit", "deit_huge_patch16_224"),
        ("batch_size_train", 7),  # the deit recipe mixes batches: they must be even
    ],
)
def test_bad_values_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config(**{"recipe": "deit", key: value})


def test_config_errors_come_before_any_data(monkeypatch):
    def untouchable(*args, **kwargs):
        raise AssertionError("data loaded before the config was checked")

    monkeypatch.setattr(cls, "create_dataset", untouchable)
    schema = registry.schema(registry.lookup("classification"))
    bad = validate({"recipe": "deit", "reprob": 3.0}, schema)
    with pytest.raises(ConfigError, match="'reprob'"):
        cls.build_data(bad, utils.DistInfo())


# --------------------------------------------------------------------------- mixup, teacher, distillation


def test_mixup_targets_are_soft_with_smoothing_folded_in():
    np.random.seed(0)
    task = cls.build_task(config(recipe="deit", num_classes=10), None)
    mixup = task.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.label_smoothing) == (0.8, 1.0, 1.0, 0.1)
    labels = torch.arange(8) % 10
    for _ in range(5):
        _, targets = mixup(torch.randn(8, 3, SIZE, SIZE), labels)
        assert targets.shape == (8, 10)
        assert_close(targets.sum(1), torch.ones(8))
        off = 0.1 / 10
        assert (targets >= off - 1e-7).all()
        assert ((targets > off + 1e-6).sum(1) <= 2).all()  # two classes share the mass: own and partner's
        # own + partner's weights: 1 - smoothing + 2 * off, whatever the mixing weight
        pair = targets[torch.arange(8), labels] + targets[torch.arange(8), labels.flip(0)]
        assert_close(pair, torch.full((8,), 1 - 0.1 + 2 * off))


class Recorder:
    """Forward pre-hook keeping each input batch."""

    def __init__(self, module):
        self.inputs = []
        module.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].detach().clone()))


def _tiny_batches(n=8, steps=1, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n * steps, 3, SIZE, SIZE, generator=g)
    labels = torch.randint(0, classes, (n * steps,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=n, shuffle=False, drop_last=True)


def test_teacher_sees_the_mixed_images(tmp_path):
    np.random.seed(1)
    c = config(recipe="deit", teacher={"path": "teacher.pth"}, vit="deit_tiny_distilled_patch16_224")
    torch.manual_seed(0)
    student, teacher = cls.build_model(c), cls.build_model(c)
    assert student.distilled_training  # a teacher is configured: (class, distillation) logits in training
    seen_student, seen_teacher = Recorder(student), Recorder(teacher)
    loader = _tiny_batches(steps=2)
    kd = KDConfig(path="teacher.pth", kind="soft", alpha=0.5, reduction="numel")
    engine = Engine(
        student,
        cls.build_task(c, loader),
        EngineConfig(init_lr=1e-3),
        utils.DistInfo(),
        tmp_path,
        teacher=teacher,
        kd=kd,
    )
    engine.fit(loader, {})
    raw = [images for images, _ in loader]
    assert len(seen_student.inputs) == len(seen_teacher.inputs) == 2
    for s, t, r in zip(seen_student.inputs, seen_teacher.inputs, raw):
        assert torch.equal(s, t)  # the very same pixels
        assert not torch.equal(s, r)  # and they are mixed, not the loader's images
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert {"task_loss", "kd_loss", "loss"} <= set(record["train"])


def test_an_odd_batch_loses_its_last_sample_under_mixup():
    np.random.seed(0)
    c = config(recipe="uvc")
    model, task = cls.build_model(c), cls.build_task(c, None)
    seen = Recorder(model)
    out = task.train_step(model, (torch.randn(5, 3, SIZE, SIZE), torch.arange(5)), None)
    assert seen.inputs[0].shape[0] == 4 and torch.isfinite(out["loss"])


@pytest.mark.parametrize("kind,reduction", [("hard", "batchmean"), ("soft", "numel")])
def test_distilled_student_routes_heads_and_learns(tmp_path, kind, reduction):
    c = config(recipe="plain", vit="deit_tiny_distilled_patch16_224", teacher={"path": "t.pth"}, drop_path_rate=0.0)
    torch.manual_seed(0)
    teacher = _randomize(cls.build_model(c), seed=3)
    # KD alone (alpha 1) reaches only the distillation head, the task loss alone (alpha 0) only the class head.
    for alpha, quiet, loud in ((1.0, "head", "head_dist"), (0.0, "head_dist", "head")):
        student = cls.build_model(c)
        grads = {}
        for name in ("head", "head_dist"):
            getattr(student, name).weight.register_hook(lambda g, n=name, out=grads: out.__setitem__(n, g.abs().sum()))
        kd = KDConfig(path="t.pth", kind=kind, alpha=alpha, reduction=reduction)
        Engine(
            student,
            cls.build_task(c, None),
            EngineConfig(),
            utils.DistInfo(),
            tmp_path / f"a{alpha}",
            teacher=teacher,
            kd=kd,
        ).fit(_tiny_batches(), {})
        assert grads[quiet] == 0 and grads[loud] > 0
    # Both terms together: the loss falls on a repeated tiny batch.
    student = cls.build_model(c)
    loader = _tiny_batches()
    kd = KDConfig(path="t.pth", kind=kind, alpha=0.5, reduction=reduction)
    cfg = EngineConfig(max_epoch=12, init_lr=3e-3, weight_decay=0.0, lr_schedule="constant")
    Engine(student, cls.build_task(c, loader), cfg, utils.DistInfo(), tmp_path / "fit", teacher=teacher, kd=kd).fit(
        loader, {}
    )
    losses = [json.loads(x)["train"]["loss"] for x in (tmp_path / "fit" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0]


# --------------------------------------------------------------------------- repeated augmentation


def test_repeated_sampler_single_process_repeats_each_index_three_times():
    data = list(range(12))
    sampler = RepeatedAugSampler(data, num_repeats=3, seed=7)
    sampler.set_epoch(0)
    order = list(sampler)
    assert len(order) == len(sampler) == 12  # an epoch keeps DeiT's length: one pass of samples
    counts = Counter(order)
    assert set(counts.values()) == {3} and len(counts) == 4
    assert all(order[i] == order[i + 1] == order[i + 2] for i in range(0, 12, 3))  # copies side by side
    again = RepeatedAugSampler(data, num_repeats=3, seed=7)
    again.set_epoch(0)
    assert list(again) == order  # (seed, epoch) decide the order: resumable
    sampler.set_epoch(1)
    assert list(sampler) != order
    other = RepeatedAugSampler(data, num_repeats=3, seed=8)
    other.set_epoch(0)
    assert list(other) != order
    # ImageNet-sized splits: DeiT's floor(N / 256) * 256 samples per epoch
    assert len(RepeatedAugSampler(range(1000), seed=0)) == 768
    assert len(RepeatedAugSampler(range(1000), num_replicas=2, rank=1, seed=0)) == 384


def test_repeated_sampler_shards_two_ranks():
    data = list(range(12))
    one = RepeatedAugSampler(data, seed=3)
    ranks = [RepeatedAugSampler(data, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for s in (one, *ranks):
        s.set_epoch(5)
    a, b = (list(s) for s in ranks)
    assert len(a) == len(b) == 6
    # dealt round-robin from the one-process list: copies of an image go to both ranks
    assert [x for pair in zip(a, b) for x in pair] == list(one)
    assert set(a) == set(b) and Counter(a + b) == Counter(list(one))


def test_build_data_uses_the_repeated_sampler(folder):
    c = config(recipe="deit", image_root=str(folder), num_classes=None, batch_size_train=6, num_workers=0)
    train, evals = cls.build_data(c, utils.DistInfo())
    assert isinstance(train.sampler, RepeatedAugSampler) and c["num_classes"] == 2
    images, labels = next(iter(train))
    assert images.shape == (6, 3, SIZE, SIZE) and labels.tolist()[0:3] == [labels[0].item()] * 3
    assert next(iter(evals["val"]))[0].shape[1:] == (3, SIZE, SIZE)
    plain = config(recipe="plain", image_root=str(folder), num_classes=None, num_workers=0, batch_size_train=4)
    assert type(cls.build_data(plain, utils.DistInfo())[0].sampler).__name__ == "DistributedSampler"


# --------------------------------------------------------------------------- model EMA


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([2.0]))

    def forward(self, x):
        return self.w * x


class ScalarTask:
    name = "scalar"
    main_metric = "neg"

    def __init__(self):
        self.trajectory = []

    def train_step(self, model, batch, info):
        self.trajectory.append(float(model.w.detach()))
        return {"loss": ((model(batch[0]) - 5.0) ** 2).mean()}

    def evaluate(self, model, loader, split):
        return {"neg": -float(model.w)}


def test_model_ema_follows_the_closed_form(tmp_path):
    d = 0.9
    task = ScalarTask()
    loader = DataLoader(TensorDataset(torch.ones(6, 1)), batch_size=1)
    engine = Engine(
        Scalar(),
        task,
        EngineConfig(max_epoch=1, init_lr=0.1, model_ema=True, model_ema_decay=d),
        utils.DistInfo(),
        tmp_path,
    )
    engine.fit(loader, {"val": loader})
    w = task.trajectory + [float(engine.model.w.detach())]  # w_0 .. w_k, k optimizer steps
    k = len(w) - 1
    expected = d**k * w[0] + sum((1 - d) * d ** (k - j) * w[j] for j in range(1, k + 1))
    assert abs(w[-1] - w[0]) > 0.1  # the weights moved
    assert float(engine.ema.module.w.detach()) == pytest.approx(expected, abs=1e-6)
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert record["ema"]["val"]["neg"] == pytest.approx(-expected, abs=1e-6)
    assert record["val"]["neg"] == pytest.approx(-w[-1])  # selection sees the model itself
    saved = torch.load(tmp_path / CHECKPOINT_LAST, weights_only=True)
    assert float(saved["model_ema"]["w"]) == pytest.approx(expected, abs=1e-6)
    resumed = Engine(
        Scalar(), ScalarTask(), EngineConfig(max_epoch=2, model_ema=True, model_ema_decay=d), utils.DistInfo(), tmp_path
    )
    resumed.fit(loader, {"val": loader}, resume=tmp_path / CHECKPOINT_LAST)
    assert resumed.ema is not None and resumed.results()["ema_metrics"]["val"]["neg"] != record["ema"]["val"]["neg"]


# --------------------------------------------------------------------------- DeiT names and checkpoints

# Spec uvc_deit §6: the official deit_*.pth key layout (beside "model"), per block and overall.
BLOCK_KEYS = [
    f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")
]
OFFICIAL_KEYS = {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    "head.weight",
    "head.bias",
}


def official_keys(depth, distilled):
    keys = OFFICIAL_KEYS | {f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS}
    return keys | ({"dist_token", "head_dist.weight", "head_dist.bias"} if distilled else set())


@pytest.mark.parametrize(
    "name,image_size,widths",
    [
        ("deit_tiny_patch16_224", SIZE, TINY),
        ("deit_small_distilled_patch16_224", SIZE, TINY),
        # the 384 models: image_size comes from the name (a coarse patch keeps the test cheap)
        ("deit_base_distilled_patch16_384", None, {"patch_size": 64, "embed_dim": 32, "depth": 1, "num_heads": 2}),
    ],
)
@pytest.mark.parametrize("layout", ["official_pth", "timm_safetensors"])
def test_deit_files_load_strictly_and_match_timm(tmp_path, name, image_size, widths, layout):
    distilled = "distilled" in name
    size = image_size or 384
    ref = timm.create_model(name, pretrained=False, num_classes=5, img_size=size, **widths)
    ref = _randomize(ref).eval()
    sd = ref.state_dict()
    assert set(sd) == official_keys(widths["depth"], distilled)
    assert sd["pos_embed"].shape[1] == (size // widths["patch_size"]) ** 2 + 1 + distilled
    if layout == "official_pth":
        path = tmp_path / f"{name}.pth"
        torch.save({"model": sd}, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    c = config(vit=name, image_size=image_size, **widths)
    assert c["image_size"] == size
    ours = cls.build_model(c)
    assert ours.distilled == distilled and ours.patch_embed.img_size == (size, size)
    cls.load_pretrained(ours, str(path), c)
    ours.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
        if distilled:  # eval averages both heads
            feats = ours.forward_features(x)
            assert_close(ours(x), (ours.head(feats[:, 0]) + ours.head_dist(feats[:, 1])) / 2)


def test_distilled_file_into_a_plain_deit_names_the_fix(tmp_path):
    ref = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5, img_size=SIZE, **TINY)
    torch.save({"model": ref.state_dict()}, tmp_path / "d.pth")
    c = config(vit="deit_tiny_patch16_224")
    with pytest.raises(utils.CheckpointError, match="distilled"):
        cls.load_pretrained(cls.build_model(c), str(tmp_path / "d.pth"), c)


def test_distilled_training_only_with_a_teacher():
    plain = cls.build_model(config(vit="deit_tiny_distilled_patch16_224")).train()
    assert plain.distilled and not plain.distilled_training
    assert plain(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 5)  # timm: heads averaged without a teacher
    taught = cls.build_model(config(vit="deit_tiny_distilled_patch16_224", teacher={"path": "t.pth"})).train()
    cls_logits, dist_logits = taught(torch.randn(2, 3, SIZE, SIZE))
    assert cls_logits.shape == dist_logits.shape == (2, 5)
