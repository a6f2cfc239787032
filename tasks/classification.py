"""Image classification (ImageNet ImageFolder layout) with a ViT / DeiT backbone, and its training recipes.

A recipe is a preset of the augmentation, mixing, regularisation and sampling keys (``RECIPES``); every key can
be set on its own and then beats the preset (spec uvc_deit §6, trap 16):

* ``deit``: DeiT's official recipe (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 + cutmix
  1.0 with label smoothing 0.1, repeated augmentation x3, drop path 0.1), what UPop retrains with;
* ``uvc``: UVC's light recipe (crop + flip with bilinear resampling, timm Mixup applied with probability 0.8,
  label smoothing 0.1, no drop path);
* ``plain``: crop + flip and label-smoothed cross-entropy, the demo's.

Every recipe is evaluated with one protocol (bicubic resize to size / 0.875, centre crop). The pieces are timm's:
``create_transform``, ``Mixup``, ``SoftTargetCrossEntropy``, ``RepeatAugSampler`` (data/samplers.py) and
``ModelEmaV3`` (the engine's ``model_ema``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

import utils
from config import ConfigError, check_values
from data import create_dataset
from data.samplers import RepeatedAugSampler
from data.transforms import ERASE_MODES, INTERPOLATIONS, timm_auto_augment
from engine import StepInfo
from models.vit import VisionTransformer, vit_config, vit_variant
from tasks.common import DATA_DEFAULTS, build_loaders
from tasks.metrics import wilson_interval

RECIPE_KEYS = (
    "smoothing",
    "mixup",
    "cutmix",
    "mixup_prob",
    "mixup_switch_prob",
    "mixup_mode",
    "randaug",
    "color_jitter",
    "reprob",
    "remode",
    "recount",
    "repeated_aug",
    "drop_path_rate",
    "interpolation",
    "train_interpolation",
)
_NO_MIXING = {"mixup": 0.0, "cutmix": 0.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "mixup_mode": "batch"}
_NO_EXTRA_AUG = {"randaug": "", "color_jitter": 0.0, "reprob": 0.0, "remode": "pixel", "recount": 1}
RECIPES: dict[str, dict[str, Any]] = {
    "deit": {
        "smoothing": 0.1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_mode": "batch",
        "randaug": "rand-m9-mstd0.5-inc1",
        "color_jitter": 0.3,  # timm's factory drops it, RandAugment being on (DeiT's setting all the same)
        "reprob": 0.25,
        "remode": "pixel",
        "recount": 1,
        "repeated_aug": True,
        "drop_path_rate": 0.1,
        "interpolation": "bicubic",
        "train_interpolation": "bicubic",
    },
    "uvc": {
        "smoothing": 0.1,
        **_NO_MIXING,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 0.8,
        **_NO_EXTRA_AUG,
        "repeated_aug": False,
        "drop_path_rate": 0.0,
        "interpolation": "bicubic",  # evaluation: the harness protocol, not UVC's bilinear (trap 17)
        "train_interpolation": "bilinear",  # torchvision's RandomResizedCrop default, as UVC trains
    },
    "plain": {
        "smoothing": 0.1,
        **_NO_MIXING,
        **_NO_EXTRA_AUG,
        "repeated_aug": False,
        "drop_path_rate": 0.1,
        "interpolation": "bicubic",
        "train_interpolation": "bicubic",
    },
}

SCHEMA: dict[str, Any] = {
    **DATA_DEFAULTS,
    "image_size": None,  # None: the model's native size (224; 384 for the *_384 DeiTs)
    "batch_size_train": 128,
    "batch_size_test": 256,
    "crop_scale": [0.08, 1.0],
    "eval_crop_ratio": 0.875,
    # The training recipe (RECIPES); each key below left at None takes the recipe's value.
    "recipe": "plain",
    "interpolation": None,  # evaluation resize, and training crops unless train_interpolation says otherwise
    "train_interpolation": None,  # None: interpolation when that is set, else the recipe's
    "smoothing": None,  # label smoothing; with mixup folded into the mixed targets
    "mixup": None,  # mixup alpha (0 = off)
    "cutmix": None,  # cutmix alpha (0 = off)
    "mixup_prob": None,  # probability of mixing a batch (or element)
    "mixup_switch_prob": None,  # probability of cutmix instead of mixup when both are on
    "mixup_mode": None,  # batch | pair | elem
    "randaug": None,  # a timm auto-augment string ("" = off)
    "color_jitter": None,  # 0 = off; timm's factory ignores it when randaug is on
    "reprob": None,  # random-erasing probability (0 = off)
    "remode": None,  # const | rand | pixel
    "recount": None,  # erased regions per image
    "repeated_aug": None,  # DeiT's repeated augmentation x3 (data.samplers.RepeatedAugSampler)
    # An exponential moving average of the weights (timm ModelEmaV3), evaluated beside the model and saved
    # with the checkpoints; DeiT keeps one and does not report it, so model selection ignores it.
    "model_ema": False,
    "model_ema_decay": 0.99996,
    # the backbone: a preset or timm DeiT name of models.vit.vit_config, each width overridable
    "vit": "deit_small",
    "patch_size": None,
    "embed_dim": None,
    "depth": None,
    "num_heads": None,
    "drop_path_rate": None,
    "num_classes": None,  # None: the number of class folders
}
MIXUP_MODES = ("batch", "pair", "elem")
REPEATS = 3  # DeiT's repeated augmentation count


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _probability(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1


# key -> (test, what it must be): checked on the completed config, naming the key.
CHECKS: dict[str, tuple[Any, str]] = {
    "recipe": (lambda v: v in RECIPES, f"one of {sorted(RECIPES)}"),
    "image_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "eval_crop_ratio": (lambda v: _number(v) and 0 < v <= 1, "in (0, 1]"),
    "crop_scale": (
        lambda v: len(v) == 2 and all(_number(x) for x in v) and 0 < v[0] <= v[1] <= 1,
        "[min, max] with 0 < min <= max <= 1",
    ),
    "interpolation": (lambda v: v in INTERPOLATIONS, f"one of {INTERPOLATIONS}"),
    "train_interpolation": (lambda v: v in INTERPOLATIONS, f"one of {INTERPOLATIONS}"),
    "smoothing": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "mixup": (lambda v: _number(v) and v >= 0, "a mixup alpha >= 0 (0 = off)"),
    "cutmix": (lambda v: _number(v) and v >= 0, "a cutmix alpha >= 0 (0 = off)"),
    "mixup_prob": (_probability, "a probability in [0, 1]"),
    "mixup_switch_prob": (_probability, "a probability in [0, 1]"),
    "mixup_mode": (lambda v: v in MIXUP_MODES, f"one of {MIXUP_MODES}"),
    "color_jitter": (lambda v: _number(v) and v >= 0, "a number >= 0 (0 = off)"),
    "reprob": (_probability, "a probability in [0, 1]"),
    "remode": (lambda v: v in ERASE_MODES, f"one of {ERASE_MODES}"),
    "recount": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "repeated_aug": (lambda v: isinstance(v, bool), "true or false"),
    "drop_path_rate": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model_ema_decay": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def complete_config(config: dict) -> dict:
    """Fill the recipe's values into the keys left at None and check every recipe key, in place (and returned).

    Idempotent; called by every builder below before anything is read or built, so a bad value stops the run
    with a ConfigError naming its key before any data loads. ``train_interpolation`` follows an explicit
    ``interpolation`` (one key for both), else the recipe. ``image_size`` None is the model's native size.
    """
    source = config.get("_source", "")
    check_values(config, {"recipe": CHECKS["recipe"]}, source)
    preset = RECIPES[config["recipe"]]
    if config.get("train_interpolation") is None and config.get("interpolation") is not None:
        config["train_interpolation"] = config["interpolation"]
    for key in RECIPE_KEYS:
        if config.get(key) is None:
            config[key] = preset[key]
    try:
        variant = vit_variant(config["vit"])
    except ValueError as e:
        raise ConfigError(f"config key 'vit': {e}") from None
    if config.get("image_size") is None:
        config["image_size"] = variant["img_size"]
    check_values(config, CHECKS, source)
    try:
        config["randaug"] = timm_auto_augment(config["randaug"])
    except ValueError as e:
        raise ConfigError(f"config key 'randaug': {e}") from None
    if mixing(config) and config["batch_size_train"] % 2:
        raise ConfigError(
            f"config key 'batch_size_train' must be even with mixup/cutmix on (timm's Mixup pairs sample i with "
            f"sample B-1-i), got {config['batch_size_train']}"
        )
    return config


def mixing(config: Mapping) -> bool:
    """Whether batches go through timm's Mixup (and the loss takes soft targets)."""
    return config["mixup"] > 0 or config["cutmix"] > 0


def build_data(config: dict, dist: utils.DistInfo):
    complete_config(config)
    train_set, val_set = create_dataset("imagenet", config)
    if config["num_classes"] is None:
        config["num_classes"] = len(train_set.classes)
    elif config["num_classes"] != len(train_set.classes):
        raise ValueError(
            f"num_classes is {config['num_classes']} but {config['image_root']}/train holds "
            f"{len(train_set.classes)} class folders"
        )
    sampler = None
    if config["repeated_aug"]:
        sampler = RepeatedAugSampler(train_set, dist.world_size, dist.rank, REPEATS, seed=config["seed"])
    return build_loaders(config, dist, train_set, {"val": val_set}, train_sampler=sampler)


def build_model(config: dict) -> VisionTransformer:
    """The named ViT/DeiT; a distilled DeiT trained with a teacher returns (class, distillation) logits in
    training, so the task loss reaches the class head and the KD term the distillation head (DeiT). Without a
    teacher it averages its heads, as timm's does."""
    complete_config(config)
    arch = dict(vit_config(config["vit"]))
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if config[key] is not None:
            arch[key] = config[key]
    model = VisionTransformer(
        img_size=config["image_size"],
        num_classes=config["num_classes"],
        drop_path_rate=config["drop_path_rate"],
        distilled=vit_variant(config["vit"])["distilled"],
        **arch,
    )
    model.distilled_training = model.distilled and bool((config.get("teacher") or {}).get("path"))
    return model


class ClassificationTask:
    """Cross-entropy of the class logits, on mixed images against mixed soft targets when ``mixup`` is given.

    The images the student saw are kept until the engine asks for the teacher's logits, so that a teacher
    judges the same mixed pixels (DeiT, UVC).
    """

    name = "classification"
    main_metric = "acc1"

    def __init__(self, smoothing: float = 0.0, mixup: Mixup | None = None):
        self.smoothing = smoothing
        self.mixup = mixup
        self.soft_ce = SoftTargetCrossEntropy()
        self._seen: tuple[Any, torch.Tensor] | None = None  # (batch, the images the student was fed)

    def train_step(self, model, batch, info: StepInfo) -> dict[str, torch.Tensor]:
        """The loss and the logits (a (class, distillation) pair for a distilled DeiT trained with a teacher),
        which go back for distillation. With mixup an odd batch loses its last sample, as UVC's loop does (the
        training loader's batches are full and even; see ``complete_config``)."""
        images, labels = batch
        device = next(model.parameters()).device
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if self.mixup is not None:
            if len(images) % 2:
                images, labels = images[:-1], labels[:-1]
            images, targets = self.mixup(images, labels)
        self._seen = (batch, images)
        logits = model(images)
        cls = logits[0] if isinstance(logits, tuple) else logits
        if self.mixup is not None:
            loss = self.soft_ce(cls.float(), targets)
        else:
            loss = F.cross_entropy(cls.float(), labels, label_smoothing=self.smoothing)
        return {"loss": loss, "logits": logits}

    def teacher_logits(self, teacher, batch) -> torch.Tensor:
        """The frozen teacher's logits for the images the student just saw (mixed, when mixing), in eval mode:
        a distilled teacher averages its heads."""
        seen, images = self._seen if self._seen is not None else (None, None)
        self._seen = None
        if seen is not batch:
            images = batch[0]
        return teacher(images.to(next(teacher.parameters()).device, non_blocking=True))

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, float]:
        device = next(model.parameters()).device
        correct1 = correct5 = total = 0.0
        for images, labels in utils.progress(loader, desc=f"eval {split}"):
            logits = model(images.to(device)).float()
            labels = labels.to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += float((top[:, 0] == labels).sum())
            correct5 += float((top == labels[:, None]).any(dim=1).sum())
            total += labels.numel()
        c1, c5, n = utils.all_reduce_sum([correct1, correct5, total])
        return {
            "acc1": 100.0 * c1 / max(n, 1),
            "acc1_ci95": wilson_interval(c1, n),
            "acc5": 100.0 * c5 / max(n, 1),
            "n": int(n),
        }


def build_mixup(config: Mapping) -> Mixup | None:
    """timm's Mixup with the label smoothing folded into its targets; None when mixup and cutmix are off."""
    if not mixing(config):
        return None
    if config.get("num_classes") is None:
        raise ValueError("mixup needs num_classes (set by build_data from the class folders, or in the config)")
    return Mixup(
        mixup_alpha=config["mixup"],
        cutmix_alpha=config["cutmix"],
        prob=config["mixup_prob"],
        switch_prob=config["mixup_switch_prob"],
        mode=config["mixup_mode"],
        label_smoothing=config["smoothing"],
        num_classes=config["num_classes"],
    )


def build_task(config: dict, train_loader) -> ClassificationTask:
    complete_config(config)
    return ClassificationTask(config["smoothing"], build_mixup(config))


def load_pretrained(model: torch.nn.Module, path: str, config: Mapping, evaluate: bool = False) -> None:
    """Weights from a checkpoint of this project (dense or compressed), an official DeiT file (``{"model": sd}``)
    or a timm state dict (.pth or .safetensors), every key required; a compressed file first cuts the model to
    its widths (described, or inferred with ``infer_arch``). A file released by UVC (gates and mask buffers) is
    converted to the model it describes first (``models.uvc_checkpoints``)."""
    from models.arch import fit_to_checkpoint, read_weights
    from models.uvc_checkpoints import convert_uvc_state_dict, is_uvc_state_dict

    sd, arch = read_weights(path)
    if arch is None and isinstance(model, VisionTransformer) and is_uvc_state_dict(sd):
        sd, arch = convert_uvc_state_dict(sd, str(path), num_heads=model.blocks[0].attn.num_heads)
    has_dist = "dist_token" in sd
    if isinstance(model, VisionTransformer) and has_dist != model.distilled:
        # spec uvc_deit trap 14: the token count differs, so no partial load can work
        raise utils.CheckpointError(
            f"{path} holds a {'distilled' if has_dist else 'non-distilled'} DeiT but vit {config.get('vit')!r} "
            f"builds a {'distilled' if model.distilled else 'non-distilled'} one; pick the matching name "
            "(deit_*_distilled_patch16_* for files with dist_token and head_dist)"
        )
    fit_to_checkpoint(model, sd, arch, str(path), infer=config.get("infer_arch", False))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise utils.CheckpointError(
            f"{path} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
