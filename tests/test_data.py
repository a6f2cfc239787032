"""Dataset classes, text normalisation, transforms, samplers and loaders on a hand-written fixture."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from data import (
    CaptionEvalDataset,
    CaptionTrainDataset,
    ImageLoadError,
    ImageNetDataset,
    NLVRDataset,
    RetrievalEvalDataset,
    VQATestDataset,
    VQATrainDataset,
    build_imagenet_transform,
    build_transform,
    create_dataset,
    create_loader,
    create_sampler,
    image_id_from_path,
    load_image,
    pre_caption,
    pre_question,
    vqa_collate_fn,
)
from data.nlvr import NLVRPairDataset, collate_pairs, eval_swap_decision
from data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, OPS, RandomAugment, apply_op, op_magnitude

SIZE = 8


# ---------------------------------------------------------------- fixture


def _write_image(path: Path, colour: tuple[int, int, int], size=(10, 7)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _colour(i: int) -> tuple[int, int, int]:
    return (20 * i % 256, 255 - 20 * i % 256, 60)


COCO_TRAIN = [
    {"image": "train2014/COCO_train2014_000000000005.jpg", "caption": "A Dog.  Runs!", "image_id": "coco_5"},
    {"image": "train2014/COCO_train2014_000000000005.jpg", "caption": "dog running", "image_id": "coco_5"},
    {"image": "val2014/COCO_val2014_000000000002.jpg", "caption": "a (red) ball", "image_id": "coco_2"},
    {"image": "train2014/COCO_train2014_000000000005.jpg", "caption": "the dog", "image_id": "coco_5"},
    {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "two cats", "image_id": "coco_9"},
    {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "cats: two", "image_id": "coco_9"},
]
COCO_VAL = [
    {"image": "val2014/COCO_val2014_000000000123.jpg", "caption": ["A cat.", "cat", "a small cat", "kitty", "x"]},
    {"image": "val2014/COCO_val2014_000000004567.jpg", "caption": ["Red ball!", "ball", "a ball", "toy", "y", "z"]},
    {"image": "val2014/COCO_val2014_000000000002.jpg", "caption": ["one", "two"]},
]
NLVR_TRAIN = [
    {"images": ["train/p0-img0.png", "train/p0-img1.png"], "sentence": "The LEFT image has two dogs.", "label": "True"},
    {"images": ["train/p1-img0.png", "train/p1-img1.png"], "sentence": "One image has a cat.", "label": "False"},
]
VQA_TRAIN = [
    {
        "question_id": 1,
        "question": "What colour is the ball?",
        "answer": ["red"] * 6 + ["blue"] * 3 + ["green"],
        "image": "train2014/COCO_train2014_000000000001.jpg",
        "dataset": "vqa",
    },
    {
        "question_id": 2,
        "question": "How many?",
        "answer": ["two", "2", "two", "two"],
        "image": "train2014/COCO_train2014_000000000002.jpg",
        "dataset": "vqa",
    },
]
VQA_VAL = [
    {
        "question_id": 3,
        "question": "Is it (red)?",
        "answer": ["yes"] * 10,
        "image": "val2014/COCO_val2014_000000000003.jpg",
        "dataset": "vqa",
    }
]
VG_QA = [{"question": "What is on the left?", "answer": "a cup", "image": "image/77.jpg", "dataset": "vg"}]
VQA_TEST = [
    {
        "question_id": 10,
        "question": "What colour?",
        "image": "test2015/COCO_test2015_000000000010.jpg",
        "dataset": "vqa",
        "answer": ["red"] * 10,
    },
    {
        "question_id": 11,
        "question": "How many cats?",
        "image": "test2015/COCO_test2015_000000000011.jpg",
        "dataset": "vqa",
        "answer": ["two"] * 9 + ["three"],
    },
    {
        "question_id": 12,
        "question": "Where?",
        "image": "test2015/COCO_test2015_000000000012.jpg",
        "dataset": "vqa",
        "answer": ["left"] * 10,
    },
]
ANSWER_LIST = ["red", "blue", "green", "two", "2", "yes", "a cup", "three", "left"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    ann = root / "annotation"
    _write_json(ann / "coco_karpathy_train.json", COCO_TRAIN)
    _write_json(ann / "coco_karpathy_val.json", COCO_VAL)
    _write_json(ann / "coco_karpathy_test.json", COCO_VAL[:2])
    images = {e["image"] for e in COCO_TRAIN + COCO_VAL}
    for i, rel in enumerate(sorted(images)):
        _write_image(root / "coco" / rel, _colour(i))

    flickr_train = [
        {"image": "flickr30k-images/1000.jpg", "caption": "a man", "image_id": "1000"},
        {"image": "flickr30k-images/1001.jpg", "caption": "a woman", "image_id": "1001"},
        {"image": "flickr30k-images/1000.jpg", "caption": "a person", "image_id": "1000"},
    ]
    flickr_eval = [
        {"image": "flickr30k-images/2000.jpg", "caption": [f"caption {k}." for k in range(5)]},
        {"image": "flickr30k-images/2001.jpg", "caption": [f"other {k}" for k in range(5)]},
    ]
    _write_json(ann / "flickr30k_train.json", flickr_train)
    _write_json(ann / "flickr30k_val.json", flickr_eval)
    _write_json(ann / "flickr30k_test.json", flickr_eval[::-1])
    for i, e in enumerate(flickr_train + flickr_eval):
        _write_image(root / "flickr" / e["image"], _colour(i))

    nlvr_eval = [
        {
            "images": [f"dev/d{i}-img0.png", f"dev/d{i}-img1.png"],
            "sentence": "the left image has more than the right image",
            "label": "True" if i % 2 else "False",
        }
        for i in range(16)
    ]
    nlvr_test = [{**e, "images": [p.replace("dev/", "test1/") for p in e["images"]]} for e in nlvr_eval]
    _write_json(ann / "nlvr_train.json", NLVR_TRAIN)
    _write_json(ann / "nlvr_dev.json", nlvr_eval)
    _write_json(ann / "nlvr_test.json", nlvr_test)
    for e in NLVR_TRAIN + nlvr_eval + nlvr_test:
        _write_image(root / "nlvr" / e["images"][0], (255, 0, 0))  # image0 red
        _write_image(root / "nlvr" / e["images"][1], (0, 0, 255))  # image1 blue

    _write_json(ann / "vqa_train.json", VQA_TRAIN)
    _write_json(ann / "vqa_val.json", VQA_VAL)
    _write_json(ann / "vg_qa.json", VG_QA)
    _write_json(ann / "vqa_test.json", VQA_TEST)
    _write_json(ann / "answer_list.json", ANSWER_LIST)
    for i, e in enumerate(VQA_TRAIN + VQA_VAL + VQA_TEST):
        _write_image(root / "vqa" / e["image"], _colour(i))
    _write_image(root / "vg" / "image/77.jpg", (1, 2, 3))

    for split in ("train", "val"):
        for c, cls in enumerate(("n02", "n01", "n03")):
            for k in range(2):
                _write_image(root / "imagenet" / split / cls / f"{cls}_{k}.JPEG", _colour(c))
    return root


def _config(world: Path, **kw) -> dict:
    cfg = {
        "ann_root": str(world / "annotation"),
        "image_size": SIZE,
        "prompt": "a picture of ",
        "vqa_root": str(world / "vqa"),
        "vg_root": str(world / "vg"),
        "train_files": ["vqa_train", "vqa_val", "vg_qa"],
    }
    cfg.update(kw)
    return cfg


TEST_TF = build_transform("test", SIZE)


def _expected_pixel(colour, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std)])


def _is_image_tensor(x, size=SIZE) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32 and tuple(x.shape) == (3, size, size)


# ---------------------------------------------------------------- text


@pytest.mark.parametrize(
    "text, max_words, expected",
    [
        ("A man.  Riding (a) horse!!", 50, "a man riding a horse"),
        ('x.!"()*#:;~y', 50, "x y"),
        ("a.b", 50, "a b"),
        ("It's a dog, isn't it? yes-no/maybe", 50, "it's a dog, isn't it? yes-no/maybe"),
        ("\ta\tb\n", 50, "\ta\tb"),  # lone whitespace characters are not collapsed
        ("hello \n", 50, "hello"),
        ("  lots   of\t\tspace  ", 50, "lots of space"),
        ("one two three four", 2, "one two"),
        ("one. two. three", 2, "one two"),
        ("", 5, ""),
    ],
)
def test_pre_caption(text, max_words, expected):
    assert pre_caption(text, max_words) == expected


@pytest.mark.parametrize(
    "text, max_words, expected",
    [
        ("What is this?  (A)", 50, "what is this?  a"),
        ('x.!"()*#:;~y', 50, "xy"),
        ("  leading kept  ", 50, "  leading kept"),
        ("trailing newline\n", 50, "trailing newline\n"),
        ("Is it   RED?", 50, "is it   red?"),
        ("a b c d", 3, "a b c"),
    ],
)
def test_pre_question(text, max_words, expected):
    assert pre_question(text, max_words) == expected


def test_pre_question_default_truncates_to_50_words():
    assert pre_question(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert pre_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))


# ---------------------------------------------------------------- captions and retrieval


def test_caption_train_items_and_contiguous_image_index(world):
    ds = CaptionTrainDataset(TEST_TF, world / "coco", world / "annotation", "coco", prompt="a picture of ")
    assert len(ds) == len(COCO_TRAIN)
    items = [ds[i] for i in range(len(ds))]
    assert [it[2] for it in items] == [0, 0, 1, 0, 2, 2]
    assert items[0][1] == "a picture of a dog runs"
    assert items[2][1] == "a picture of a red ball"
    assert all(_is_image_tensor(it[0]) for it in items)


def test_caption_train_truncates_to_max_words(world):
    ds = CaptionTrainDataset(None, world / "coco", world / "annotation", "coco", max_words=1)
    image, caption, idx = ds[0]
    assert caption == "a" and isinstance(image, Image.Image) and image.mode == "RGB" and idx == 0


def test_flickr_train(world):
    ds = CaptionTrainDataset(TEST_TF, world / "flickr", world / "annotation", "flickr")
    assert [ds[i][2] for i in range(3)] == [0, 1, 0]
    assert ds[1][1] == "a woman"


def test_caption_eval_parses_image_id_from_file_name(world):
    ds = CaptionEvalDataset(TEST_TF, world / "coco", world / "annotation", "val")
    ids = [ds[i][1] for i in range(len(ds))]
    assert ids == [123, 4567, 2] and all(type(i) is int for i in ids)
    assert _is_image_tensor(ds[0][0])
    assert len(CaptionEvalDataset(TEST_TF, world / "coco", world / "annotation", "test")) == 2


def test_image_id_from_path():
    assert image_id_from_path("val2014/COCO_val2014_000000000123.jpg") == 123
    assert image_id_from_path("flickr30k-images/2000.jpg") == 2000
    # BLIP strips the characters ".jpg" from both ends, which would mangle this name; we do not
    assert image_id_from_path("val2014/COCO_val2014_000000000100.jpg") == 100
    with pytest.raises(ValueError, match="COCO_val2014_abc.jpg"):
        image_id_from_path("val2014/COCO_val2014_abc.jpg")


def test_retrieval_eval_ground_truth(world):
    ds = RetrievalEvalDataset(TEST_TF, world / "coco", world / "annotation", "val")
    assert len(ds) == 3
    assert len(ds.text) == 13
    assert ds.text[:5] == ["a cat", "cat", "a small cat", "kitty", "x"]
    assert ds.text[5] == "red ball"
    assert ds.img2txt == {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9, 10], 2: [11, 12]}
    assert ds.txt2img == {j: i for i, js in ds.img2txt.items() for j in js}
    assert ds.image == [e["image"] for e in COCO_VAL]
    image, index = ds[2]
    assert index == 2 and _is_image_tensor(image)

    flickr = RetrievalEvalDataset(TEST_TF, world / "flickr", world / "annotation", "test", "flickr")
    assert flickr.image == ["flickr30k-images/2001.jpg", "flickr30k-images/2000.jpg"]
    assert flickr.text[5] == "caption 0" and flickr.txt2img[9] == 1


def test_retrieval_eval_rejects_train_layout(tmp_path, world):
    _write_json(tmp_path / "coco_karpathy_val.json", COCO_TRAIN)
    with pytest.raises(TypeError, match="single caption"):
        RetrievalEvalDataset(TEST_TF, world / "coco", tmp_path, "val")


# ---------------------------------------------------------------- NLVR2


RED = _expected_pixel((255, 0, 0))
BLUE = _expected_pixel((0, 0, 255))


def _order(item) -> str:
    first = item[0][:, 0, 0]
    second = item[1][:, 0, 0]
    if torch.allclose(first, RED, atol=1e-5) and torch.allclose(second, BLUE, atol=1e-5):
        return "kept"
    assert torch.allclose(first, BLUE, atol=1e-5) and torch.allclose(second, RED, atol=1e-5)
    return "swapped"


def test_nlvr_train_swap_exchanges_images_and_left_right(world, monkeypatch):
    ds = NLVRDataset(TEST_TF, world / "nlvr", world / "annotation", "train")
    monkeypatch.setattr(random, "random", lambda: 0.2)
    kept = ds[0]
    assert _order(kept) == "kept"
    assert kept[2] == "the left image has two dogs" and kept[3] == 1
    monkeypatch.setattr(random, "random", lambda: 0.7)
    swapped = ds[0]
    assert _order(swapped) == "swapped"
    assert swapped[2] == "the right image has two dogs" and swapped[3] == 1
    other = ds[1]
    assert _order(other) == "swapped" and other[2] == "one image has a cat" and other[3] == 0


def test_nlvr_eval_swap_is_deterministic(world):
    def make(split, **kw):
        return NLVRDataset(TEST_TF, world / "nlvr", world / "annotation", split, **kw)

    dev = make("val")
    random.seed(1)
    first = [dev[i] for i in range(len(dev))]
    random.seed(2)
    again = [make("val")[i] for i in range(len(dev))]
    orders = [_order(it) for it in first]
    assert orders == [_order(it) for it in again]
    assert orders == ["swapped" if eval_swap_decision(0, i) else "kept" for i in range(len(dev))]
    assert set(orders) == {"kept", "swapped"}
    for item, order in zip(first, orders):
        expected = "the left image has more than the right image"
        if order == "swapped":
            expected = "the right image has more than the left image"
        assert item[2] == expected
    assert [it[3] for it in first] == [i % 2 for i in range(16)]

    reseeded = make("test", swap_seed=5)
    assert [_order(reseeded[i]) for i in range(16)] != orders
    unswapped = make("test", eval_swap=False)
    assert {_order(unswapped[i]) for i in range(16)} == {"kept"}


def _shared_pairs(tmp_path):
    """A dev file whose first image pair carries three statements (entries 0, 2, 5) and the second three."""
    a, b = ["dev/d0-img0.png", "dev/d0-img1.png"], ["dev/d1-img0.png", "dev/d1-img1.png"]
    sentences = ["The LEFT image has two dogs.", "one image has a cat", "the right image has a cat", "no", "yes", "x"]
    entries = [
        {"images": a if i in (0, 2, 5) else b, "sentence": t, "label": "True" if i % 2 else "False"}
        for i, t in enumerate(sentences)
    ]
    _write_json(tmp_path / "nlvr_dev.json", entries)
    return tmp_path


def test_nlvr_pair_dataset_groups_statements_and_asks_each_what_the_plain_dataset_asks(tmp_path, world):
    ann = _shared_pairs(tmp_path)
    plain = NLVRDataset(TEST_TF, world / "nlvr", ann, "val")
    grouped = NLVRPairDataset(TEST_TF, world / "nlvr", ann, "val")
    assert len(grouped) == 2 and grouped.num_statements == 6
    assert [entries for _, entries in grouped.groups] == [[0, 2, 5], [1, 3, 4]]
    # The evaluation coin of each statement is its own, so one pair holds swapped and kept statements.
    assert {eval_swap_decision(0, i) for i in (0, 2, 5)} == {True, False}

    batch = collate_pairs([grouped[0], grouped[1]])
    assert batch.images.shape == (4, 3, SIZE, SIZE) and batch.pairs.dtype == torch.long
    for row, index in enumerate([0, 2, 5, 1, 3, 4]):
        image0, image1, sentence, label = plain[index]
        first, second = batch.pairs[row].tolist()
        assert {first, second} == ({0, 1} if index in (0, 2, 5) else {2, 3})
        assert torch.equal(batch.images[first], image0) and torch.equal(batch.images[second], image1)
        assert batch.text[row] == sentence and int(batch.targets[row]) == label


def test_nlvr_pair_dataset_swaps_each_training_statement_on_its_own(tmp_path, world, monkeypatch):
    ann = _shared_pairs(tmp_path)
    (ann / "nlvr_train.json").write_text((ann / "nlvr_dev.json").read_text())
    grouped = NLVRPairDataset(TEST_TF, world / "nlvr", ann, "train")
    coins = iter([0.2, 0.7, 0.9])
    monkeypatch.setattr(random, "random", lambda: next(coins))
    batch = collate_pairs([grouped[0]])
    assert batch.pairs.tolist() == [[0, 1], [1, 0], [1, 0]]
    assert batch.text == ["the left image has two dogs", "the left image has a cat", "x"]
    assert _order((batch.images[0], batch.images[1])) == "kept"


def test_nlvr_rejects_unknown_label(tmp_path, world):
    _write_json(tmp_path / "nlvr_dev.json", [{**NLVR_TRAIN[0], "label": "true"}])
    ds = NLVRDataset(TEST_TF, world / "nlvr", tmp_path, "val")
    with pytest.raises(ValueError, match="nlvr_dev.json.*'true'"):
        ds[0]
    _write_json(tmp_path / "nlvr_dev.json", [NLVR_TRAIN[0], {**NLVR_TRAIN[1], "images": ["train/p1-img0.png"]}])
    with pytest.raises(ValueError, match=r"entry 1 of .*nlvr_dev\.json needs \"images\": a list of two paths"):
        NLVRPairDataset(TEST_TF, world / "nlvr", tmp_path, "val")


# ---------------------------------------------------------------- VQA


def test_vqa_train_weights(world):
    ds = VQATrainDataset(TEST_TF, world / "annotation", world / "vqa", world / "vg")
    assert len(ds) == 4
    image, question, answers, weights = ds[0]
    assert _is_image_tensor(image)
    assert question == "what colour is the ball?"
    assert answers == ["red", "blue", "green"]
    assert weights == pytest.approx([0.6, 0.3, 0.1])
    _, _, answers, weights = ds[1]
    assert answers == ["two", "2"] and weights == pytest.approx([0.75, 0.25])
    _, question, answers, weights = ds[2]
    assert question == "is it red?" and answers == ["yes"] and weights == pytest.approx([1.0])
    image, question, answers, weights = ds[3]
    assert question == "what is on the left?" and answers == ["a cup"] and weights == [0.2]
    # read from vg_root: the only image of that colour (JPEG: a few grey levels of slack)
    assert torch.allclose(image[:, 0, 0], _expected_pixel((1, 2, 3)), atol=0.07)


def test_vqa_collate(world):
    ds = VQATrainDataset(TEST_TF, world / "annotation", world / "vqa", world / "vg", ["vqa_train", "vg_qa"])
    images, questions, answers, weights, n = vqa_collate_fn([ds[i] for i in range(3)])
    assert images.shape == (3, 3, SIZE, SIZE)
    assert questions == ["what colour is the ball?", "how many?", "what is on the left?"]
    assert answers == ["red", "blue", "green", "two", "2", "a cup"]
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor([0.6, 0.3, 0.1, 0.75, 0.25, 0.2]))
    assert n == [3, 2, 1]


def test_vqa_test_dataset(world, tmp_path):
    ds = VQATestDataset(TEST_TF, world / "annotation", world / "vqa", world / "vg")
    image, question, qid = ds[1]
    assert _is_image_tensor(image) and question == "how many cats?" and qid == 11
    assert ds.answer_list == ANSWER_LIST
    assert ds.answers == {10: ["red"] * 10, 11: ["two"] * 9 + ["three"], 12: ["left"] * 10}

    official = tmp_path / "annotation"
    _write_json(official / "vqa_test.json", [{k: v for k, v in e.items() if k != "answer"} for e in VQA_TEST])
    _write_json(official / "answer_list.json", ANSWER_LIST)
    ds = VQATestDataset(TEST_TF, official, world / "vqa")
    assert ds.answers is None and ds[2][2] == 12


def test_vqa_unknown_source_is_named(tmp_path, world):
    _write_json(tmp_path / "vqa_train.json", [{**VQA_TRAIN[0], "dataset": "gqa"}])
    ds = VQATrainDataset(TEST_TF, tmp_path, world / "vqa", world / "vg", ["vqa_train"])
    with pytest.raises(ValueError, match="entry 0 of .*vqa_train.json has dataset 'gqa'"):
        ds[0]


# ---------------------------------------------------------------- ImageNet


def test_imagenet(world):
    ds = ImageNetDataset(world / "imagenet", "val", build_imagenet_transform("val", SIZE))
    assert ds.classes == ["n01", "n02", "n03"]
    assert len(ds) == 6
    image, target = ds[0]
    assert _is_image_tensor(image) and target == 0
    # class n01 was written with colour index 1
    assert torch.allclose(image[:, 4, 4], _expected_pixel(_colour(1), IMAGENET_MEAN, IMAGENET_STD), atol=0.07)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageNetDataset(world / "nowhere", "train")


# ---------------------------------------------------------------- errors


def test_missing_image_names_file_and_entry(tmp_path, world):
    bad = [{"image": "train2014/COCO_train2014_000000000777.jpg", "caption": "a lost zebra", "image_id": "coco_777"}]
    _write_json(tmp_path / "coco_karpathy_train.json", COCO_TRAIN[:1] + bad)
    ds = CaptionTrainDataset(TEST_TF, world / "coco", tmp_path, "coco")
    with pytest.raises(ImageLoadError) as info:
        ds[1]
    message = str(info.value)
    assert "COCO_train2014_000000000777.jpg" in message
    assert "file not found" in message
    assert "entry 1 of" in message and "coco_karpathy_train.json" in message
    assert "a lost zebra" in message
    assert isinstance(info.value, OSError)


def test_truncated_image_raises(tmp_path):
    path = tmp_path / "broken.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-600])
    with pytest.raises(ImageLoadError, match=r"broken\.jpg.*truncated.*entry 3 of vqa_test\.json.*question_id"):
        load_image(path, {"question_id": 7, "image": "broken.jpg"}, 3, "vqa_test.json")


def test_corrupt_image_in_imagenet_is_named(tmp_path):
    (tmp_path / "val" / "cls").mkdir(parents=True)
    (tmp_path / "val" / "cls" / "x.JPEG").write_bytes(b"not an image")
    ds = ImageNetDataset(tmp_path, "val")
    with pytest.raises(ImageLoadError, match=r"x\.JPEG.*entry 0 of .*val.*\"class\": \"cls\""):
        ds[0]


def test_missing_annotation_names_path(tmp_path, world):
    cfg = _config(world, ann_root=str(tmp_path / "empty"), image_root=str(world / "coco"))
    with pytest.raises(FileNotFoundError, match=r"empty[/\\]coco_karpathy_train\.json"):
        create_dataset("caption_coco", cfg)
    with pytest.raises(FileNotFoundError, match=r"nlvr_train\.json"):
        create_dataset("nlvr", cfg)


# ---------------------------------------------------------------- create_dataset


def test_create_dataset_all_tasks(world):
    cfg = _config(world, image_root=str(world / "coco"), hflip=False)
    train, val, test = create_dataset("caption_coco", cfg)
    assert isinstance(train, CaptionTrainDataset) and train.prompt == "a picture of "
    assert train[0][1].startswith("a picture of ") and _is_image_tensor(train[0][0])
    assert isinstance(val, CaptionEvalDataset) and len(test) == 2

    train, val, test = create_dataset("retrieval_coco", cfg)
    assert train.prompt == "" and isinstance(val, RetrievalEvalDataset)
    flickr = create_dataset("retrieval", _config(world, image_root=str(world / "flickr"), dataset="flickr"))
    assert flickr[1].image[0] == "flickr30k-images/2000.jpg"

    nlvr = create_dataset("nlvr", _config(world, image_root=str(world / "nlvr"), nlvr_eval_swap=False, seed=3))
    assert [d.split for d in nlvr] == ["train", "val", "test"]
    assert not nlvr[1].eval_swap and nlvr[2].swap_seed == 3
    assert len(nlvr[0][0]) == 4

    vqa = create_dataset("vqa", cfg)
    assert len(vqa) == 2 and isinstance(vqa[0], VQATrainDataset) and isinstance(vqa[1], VQATestDataset)
    assert len(vqa[0]) == 4

    imagenet = create_dataset("imagenet", _config(world, image_root=str(world / "imagenet")))
    assert len(imagenet) == 2 and imagenet[0].split == "train" and imagenet[1].classes == ["n01", "n02", "n03"]

    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        create_dataset("coco", cfg)
    with pytest.raises(KeyError, match="image_root"):
        create_dataset("nlvr", _config(world))


# ---------------------------------------------------------------- samplers and loaders


def test_distributed_sampler_shards_are_disjoint_and_cover(world):
    cfg = _config(world, image_root=str(world / "coco"))
    train, val, _ = create_dataset("caption_coco", cfg)
    shards = [create_sampler([train, val], [True, False], 2, rank)[0] for rank in (0, 1)]
    for s in shards:
        s.set_epoch(3)
    a, b = (set(s) for s in shards)
    assert a.isdisjoint(b) and a | b == set(range(len(train)))
    assert len(a) == len(b) == len(train) // 2


def test_create_loader_batches(world):
    cfg = _config(world, image_root=str(world / "coco"))
    train, val, _ = create_dataset("caption_coco", cfg)
    train_loader, val_loader = create_loader([train, val], [None, None], [4, 2], [0, 0], [True, False], [None, None])
    batches = list(train_loader)
    assert len(batches) == 1  # 6 samples, batch 4, drop_last
    images, captions, idx = batches[0]
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert len(captions) == 4 and all(c.startswith("a picture of ") for c in captions)
    assert idx.dtype == torch.int64 and set(idx.tolist()) <= {0, 1, 2}
    assert [len(b[1]) for b in val_loader] == [2, 1]  # eval keeps the last partial batch
    assert [b[1].tolist() for b in val_loader] == [[123, 4567], [2]]

    # the loader's own generator makes the shuffle order a function of the seed
    first = create_loader([train], [None], [4], [0], [True], [None], seed=11)[0]
    second = create_loader([train], [None], [4], [0], [True], [None], seed=11)[0]
    assert [b[2].tolist() for b in first] == [b[2].tolist() for b in second]

    vqa_train, _ = create_dataset("vqa", cfg)
    (loader,) = create_loader([vqa_train], [None], [2], [0], [False], [vqa_collate_fn])
    images, questions, answers, weights, n = next(iter(loader))
    assert images.shape == (2, 3, SIZE, SIZE) and len(questions) == 2
    assert len(answers) == len(weights) == sum(n) == 5


class _NumpyDraws(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        info = torch.utils.data.get_worker_info()
        return info.id, float(np.random.random())


def _draws_per_worker(**kw) -> dict[int, list[float]]:
    (loader,) = create_loader([_NumpyDraws()], [None], [1], [2], [False], [None], **kw)
    per_worker: dict[int, list[float]] = {}
    for wid, value in loader:
        per_worker.setdefault(int(wid), []).append(float(value))
    return per_worker


def test_worker_numpy_seeding_default_and_fork_parity():
    proper = _draws_per_worker()
    assert proper[0] != proper[1]
    assert _draws_per_worker() == proper  # same seed, same draws
    np.random.seed(123)
    parity = _draws_per_worker(fork_parity_seeding=True)
    assert parity[0] == parity[1]  # every worker replays the parent's NumPy stream
    np.random.seed(123)
    assert parity[0] == list(np.random.random(2))


# ---------------------------------------------------------------- transforms


def _random_uint8(h=13, w=17, seed=0, low=0, high=256) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(low, high, (3, h, w), dtype=np.uint8))


def _opencv_warp(img: np.ndarray, forward: np.ndarray, fill) -> np.ndarray:
    """Reference for OpenCV's warpAffine (bilinear, constant border) on an HWC array."""
    h, w, _ = img.shape
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))
    out = np.zeros(img.shape, dtype=np.float64)
    fill = np.asarray(fill, dtype=np.float64)
    for y in range(h):
        for x in range(w):
            sx, sy, _ = inverse @ (x, y, 1)
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            corners = ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy))
            for dx, dy, weight in corners:
                xx, yy = x0 + dx, y0 + dy
                out[y, x] += weight * (img[yy, xx] if 0 <= xx < w and 0 <= yy < h else fill)
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)


def _opencv_matrix(name: str, m: float, h: int, w: int) -> np.ndarray:
    if name == "ShearX":
        return np.array([[1, m, 0], [0, 1, 0]], float)
    if name == "ShearY":
        return np.array([[1, 0, 0], [m, 1, 0]], float)
    if name == "TranslateX":
        return np.array([[1, 0, -m], [0, 1, 0]], float)
    if name == "TranslateY":
        return np.array([[1, 0, 0], [0, 1, -m]], float)
    cos, sin = math.cos(math.radians(m)), math.sin(math.radians(m))
    cx, cy = w / 2, h / 2  # cv2.getRotationMatrix2D((W/2, H/2), m, 1)
    return np.array([[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]])


def test_blip_magnitudes_at_m5():
    assert op_magnitude("Brightness", 5) == 1.0 and op_magnitude("Sharpness", 5) == 1.0
    assert op_magnitude("ShearX", 5) == pytest.approx(0.15)
    assert op_magnitude("TranslateY", 5) == 5.0
    assert op_magnitude("Rotate", 5) == 15.0
    assert op_magnitude("Equalize", 5) is None
    with pytest.raises(ValueError, match="Solarize"):
        op_magnitude("Solarize", 5)


@pytest.mark.parametrize("name", OPS)
def test_every_op_gives_a_valid_image(name):
    # low contrast and > 255 pixels, so that AutoContrast and Equalize (PIL rules) have work to do
    img = _random_uint8(20, 24, low=40, high=180)
    magnitude = op_magnitude(name, 5)
    out = apply_op(img, name, magnitude)
    assert out.dtype == torch.uint8 and out.shape == img.shape
    if name in ("Identity", "Brightness", "Sharpness"):
        assert torch.equal(out, img)  # identities at M=5
    else:
        assert not torch.equal(out, img)


@pytest.mark.parametrize(
    "name, magnitude",
    [
        ("ShearX", 0.15),
        ("ShearX", -0.15),
        ("ShearY", 0.15),
        ("TranslateX", 5.0),
        ("TranslateY", -5.0),
        ("Rotate", 15.0),
        ("Rotate", -15.0),
    ],
)
def test_geometric_ops_match_opencv_semantics(name, magnitude):
    img = _random_uint8(9, 11, seed=1)
    ref = _opencv_warp(
        img.permute(1, 2, 0).numpy().astype(np.float64), _opencv_matrix(name, magnitude, 9, 11), (128, 128, 128)
    )
    got = apply_op(img, name, magnitude).permute(1, 2, 0).numpy()
    diff = np.abs(ref.astype(int) - got.astype(int))
    assert diff.max() <= 1  # only exact .5 rounding ties may differ (float32 sampling grid)
    assert (diff == 0).mean() > 0.9


def _dot(y: int, x: int) -> torch.Tensor:
    img = torch.zeros(3, 21, 21, dtype=torch.uint8)
    img[:, y, x] = 255
    return img


def _peak(img: torch.Tensor) -> tuple[int, int]:
    return divmod(int(img.float().sum(0).argmax()), img.shape[-1])


def test_geometric_op_directions():
    img = _dot(10, 18)
    shifted = apply_op(img, "TranslateX", 5.0)
    assert torch.equal(shifted[:, :, :16], img[:, :, 5:])  # content moves left by 5 px
    assert (shifted[:, :, 16:] == 128).all()  # the uncovered strip takes the fill value
    assert _peak(apply_op(img, "TranslateY", -5.0)) == (15, 18)
    y, x = _peak(apply_op(img, "Rotate", 30.0, fill=(0, 0, 0)))
    assert y < 10 and x > 10  # counter-clockwise: a dot right of the centre moves up
    assert _peak(apply_op(_dot(10, 5), "ShearX", 0.3, fill=(0, 0, 0))) == (10, 8)  # x' = x + 0.3 y
    assert _peak(apply_op(_dot(4, 10), "ShearY", -0.2, fill=(0, 0, 0))) == (2, 10)  # y' = y - 0.2 x


def test_autocontrast_and_equalize_match_pil():
    for seed, (low, high) in enumerate([(10, 201), (37, 90), (0, 256)]):
        arr = np.random.default_rng(seed).integers(low, high, (12, 15, 3), dtype=np.uint8)
        arr[..., 2] = arr[..., 2] // 3 + 40
        pil = Image.fromarray(arr)
        tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        for name, reference in (("AutoContrast", ImageOps.autocontrast), ("Equalize", ImageOps.equalize)):
            got = apply_op(tensor, name).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(got, np.asarray(reference(pil)))


def test_random_augment_follows_blip_draw_order():
    img = _random_uint8()
    for seed in range(6):
        np.random.seed(seed)
        (op,) = np.random.choice(2, 1)
        apply = np.random.random() <= 0.5
        negative = apply and np.random.random() > 0.5
        name = ("TranslateX", "ShearY")[op]
        expected = apply_op(img, name, -op_magnitude(name, 5) if negative else op_magnitude(name, 5))
        np.random.seed(seed)
        out = RandomAugment(1, 5, ops=("TranslateX", "ShearY"))(img)
        assert torch.equal(out, expected if apply else img)


def test_random_augment_accepts_pil_and_rejects_bad_ops():
    pil = Image.new("RGB", (9, 7), (10, 200, 30))
    out = RandomAugment(2, 5)(pil)
    assert out.dtype == torch.uint8 and out.shape == (3, 7, 9)
    with pytest.raises(ValueError, match="Posterize"):
        RandomAugment(ops=("Posterize",))


def test_test_transform_is_square_resize_and_clip_normalisation():
    colour = (200, 100, 50)
    out = build_transform("test", 12)(Image.new("RGB", (31, 17), colour))
    assert out.shape == (3, 12, 12) and out.dtype == torch.float32 and type(out) is torch.Tensor
    assert torch.allclose(out, _expected_pixel(colour)[:, None, None].expand(3, 12, 12), atol=1e-5)


def test_train_transform_switches():
    img = Image.new("RGB", (20, 16), (9, 99, 199))
    torch.manual_seed(0)
    np.random.seed(0)
    out = build_transform("train", 10)(img)
    assert out.shape == (3, 10, 10) and out.dtype == torch.float32

    def names(tf):
        return [type(t).__name__ for t in tf.transforms]

    assert names(build_transform("train", 10)) == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ToImage",
        "RandomAugment",
        "ToDtype",
        "Normalize",
        "ToPureTensor",
    ]
    plain = build_transform("train", 10, {"hflip": False, "randaug": False, "crop_scale": [1.0, 1.0]})
    assert "RandomHorizontalFlip" not in names(plain) and "RandomAugment" not in names(plain)
    # crop_scale [1, 1] is no crop at all: training sees exactly what evaluation sees
    striped = Image.fromarray(np.arange(20 * 16 * 3, dtype=np.uint8).reshape(16, 20, 3))
    assert names(plain)[0] == "Resize" and torch.equal(plain(striped), build_transform("test", 10)(striped))
    cropped = build_transform("train", 10, {"hflip": False, "randaug": False, "crop_scale": [0.8, 1.0]})
    assert cropped.transforms[0].scale == (0.8, 1.0)
    # a uniform image stays uniform under crop + resize when nothing else runs
    assert torch.allclose(cropped(img), _expected_pixel((9, 99, 199))[:, None, None].expand(3, 10, 10), atol=1e-5)
    with pytest.raises(ValueError, match="crop_scale"):
        build_transform("train", 10, {"crop_scale": [0.9, 0.1]})


def test_imagenet_transforms():
    img = Image.new("RGB", (40, 30), (50, 150, 250))
    val = build_imagenet_transform("val", 14)
    assert [type(t).__name__ for t in val.transforms][:2] == ["Resize", "CenterCrop"]
    assert val.transforms[0].size == [16]  # int(14 / 0.875)
    out = val(img)
    assert out.shape == (3, 14, 14)
    assert torch.allclose(out[:, 7, 7], _expected_pixel((50, 150, 250), IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)
    train = build_imagenet_transform("train", 14, {"interpolation": "bilinear"})
    assert train.transforms[0].scale == (0.08, 1.0)
    assert train(img).shape == (3, 14, 14)
