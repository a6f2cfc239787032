"""The real dataset classes read the synthetic world unchanged (what every demo relies on)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import create_dataset, vqa_collate_fn

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("w") / "world"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data.synthetic",
            "--out",
            str(root),
            "--n",
            "200",
            "--image-size",
            str(SIZE),
            "--quiet",
        ],
        cwd=REPO,
        check=True,
    )
    return root


def cfg(world, **kw):
    return {"ann_root": str(world / "annotation"), "image_size": SIZE, "hflip": False, "randaug": False, **kw}


def test_cli_writes_every_annotation_file(world):
    names = {p.name for p in (world / "annotation").rglob("*.json")}
    expected = (
        {f"coco_karpathy_{s}.json" for s in ("train", "val", "test")}
        | {"coco_karpathy_val_gt.json", "coco_karpathy_test_gt.json", "vg_qa.json", "answer_list.json"}
        | {f"flickr30k_{s}.json" for s in ("train", "val", "test")}
        | {f"nlvr_{s}.json" for s in ("train", "dev", "test")}
        | {f"vqa_{s}.json" for s in ("train", "val", "test")}
    )
    assert expected <= names


def image_ok(x):
    return isinstance(x, torch.Tensor) and x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32


def test_nlvr(world):
    train, val, test = create_dataset("nlvr", cfg(world, image_root=str(world / "nlvr")))
    for ds in (train, val, test):
        im0, im1, sentence, label = ds[0]
        assert image_ok(im0) and image_ok(im1) and isinstance(sentence, str) and label in (0, 1)
    assert len(train) == 800  # n = 200 training pairs, 4 statements each


@pytest.mark.parametrize(
    "name,root", [("caption_coco", "coco"), ("retrieval_coco", "coco"), ("retrieval_flickr", "flickr")]
)
def test_caption_and_retrieval(world, name, root):
    train, val, test = create_dataset(name, cfg(world, image_root=str(world / root), prompt="a picture of "))
    image, caption, idx = train[0]
    assert image_ok(image) and isinstance(caption, str) and isinstance(idx, int)
    if name == "caption_coco":
        assert caption.startswith("a picture of ")
        image, image_id = val[0]
        assert image_ok(image) and isinstance(image_id, int)
    else:
        image, index = test[3]
        assert image_ok(image) and index == 3
        assert len(test.text) == 5 * len(test.image) and test.txt2img[test.img2txt[3][0]] == 3


def test_vqa(world):
    train, test = create_dataset("vqa", cfg(world, vqa_root=str(world / "vqa"), vg_root=str(world / "vg")))
    batch = vqa_collate_fn([train[i] for i in range(4)])
    images, questions, answers, weights, n = batch
    assert images.shape == (4, 3, SIZE, SIZE) and len(questions) == 4 and len(answers) == sum(n)
    assert weights.shape == (len(answers),)
    image, question, qid = test[0]
    assert image_ok(image) and isinstance(question, str) and qid in test.answers
    assert set(test.answer_list) >= {a for v in test.answers.values() for a in v}


def test_imagenet(world):
    train, val = create_dataset("imagenet", cfg(world, image_root=str(world / "imagenet"), eval_crop_ratio=1.0))
    assert len(train.classes) == 12 and train.classes == val.classes
    image, label = val[0]
    assert image_ok(image) and 0 <= label < 12
