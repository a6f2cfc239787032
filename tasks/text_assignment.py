"""Text assignment (ALBEF's TA): two-image pre-training of the NLVR2 model on image-caption pairs.

Given a caption and two images, the model says whether the caption describes the first image, the second or
neither: a 3-way ``cls_head`` on the twin cross-attention encoder of ``BlipNLVR``. It teaches the two
branches to tell the images apart before NLVR2 fine-tuning, where statements name "the left image" or
"the right image". ALBEF runs it for one epoch on its pre-training images; here it makes the tiny demo
model's NLVR2 starting point (``scripts/demo/make_tiny_blip.sh``). The weights go on to NLVR2 without the
3-way head (``scripts/export_weights.py --drop cls_head``); NLVR2 then starts a fresh 2-way one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import utils
from data import create_dataset
from data.nlvr import TA_CLASSES
from models.blip_nlvr import BlipNLVR
from tasks import nlvr
from tasks.common import build_loaders

SCHEMA: dict[str, Any] = {
    **nlvr.SCHEMA,
    "ta_train_files": ["coco_karpathy_train.json"],  # caption annotations, under ann_root
    "ta_val_files": ["coco_karpathy_val.json"],
}


def build_data(config: dict, dist: utils.DistInfo):
    train, val = create_dataset("text_assignment", config)
    return build_loaders(config, dist, train, {"val": val})


def build_model(config: Mapping) -> BlipNLVR:
    return BlipNLVR(config, image_size=config["image_size"], num_classes=len(TA_CLASSES))


class TextAssignmentTask(nlvr.NLVRTask):
    """Cross-entropy over (first, second, neither); accuracy over the three classes."""

    name = "text_assignment"


def build_task(config: Mapping, train_loader) -> TextAssignmentTask:
    return TextAssignmentTask()


load_pretrained = nlvr.load_pretrained
