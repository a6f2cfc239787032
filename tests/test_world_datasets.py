"""The real dataset classes read the synthetic world unchanged (what every demo relies on)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import create_dataset, pre_caption, vqa_collate_fn

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


def ta_sets(world):
    files = {"ta_train_files": ["coco_karpathy_train.json"], "ta_val_files": ["coco_karpathy_val.json"]}
    return create_dataset("text_assignment", cfg(world, image_root=str(world / "coco"), **files))


def test_text_assignment_pairs_each_caption_with_its_image_first_second_or_not_at_all(world):
    import json
    from collections import Counter

    train, val = ta_sets(world)
    val_entries = json.loads((world / "annotation" / "coco_karpathy_val.json").read_text())
    assert len(val) == sum(len(e["caption"]) for e in val_entries)  # every caption of the list is an item
    assert len(train) == len(json.loads((world / "annotation" / "coco_karpathy_train.json").read_text()))
    labels = Counter()
    for i in range(len(val)):
        first, second, label = val.assignment(i)
        own = val.images.index(val.annotation[val.items[i][0]]["image"])
        assert first != second
        assert (first == own, second == own) == {0: (True, False), 1: (False, True), 2: (False, False)}[label]
        labels[label] += 1
    assert all(labels[c] > len(val) / 4 for c in range(3)), labels  # about a third each
    # Evaluation items are the same in every run; training items are drawn afresh.
    _, again = ta_sets(world)
    assert [again.assignment(i) for i in range(50)] == [val.assignment(i) for i in range(50)]
    assert len({train.assignment(0) for _ in range(20)}) > 1
    im0, im1, caption, label = val[3]
    assert image_ok(im0) and image_ok(im1) and label == val.assignment(3)[2]
    assert caption == pre_caption(val.items[3][1], 30)


def test_text_assignment_names_the_bad_annotation(world, tmp_path):
    import json

    from data import TextAssignmentDataset

    (tmp_path / "two.json").write_text(
        json.dumps([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": "y"}])
    )
    with pytest.raises(ValueError, match=r"at least 3 distinct images.*two\.json.*have 2"):
        TextAssignmentDataset(None, world, tmp_path, ["two.json"], train=True)
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}]))
    with pytest.raises(ValueError, match=r"entry 1 of .*bad\.json needs \"image\" and \"caption\""):
        TextAssignmentDataset(None, world, tmp_path, ["bad.json"], train=True)


class _SaysTrueWhenLeft(torch.nn.Module):
    """Calls a statement true when it names the left image: right on some families, wrong on others."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images, text):
        assert images.shape[0] == 2 * len(text)
        says = torch.tensor(["left" in t for t in text])
        return torch.stack([(~says).float(), says.float()], dim=1)


def test_nlvr_evaluation_reports_accuracy_per_statement_family(world):
    from collections import defaultdict

    from data.synthetic import nlvr_family
    from tasks.nlvr import NLVRTask

    _, val, _ = create_dataset("nlvr", cfg(world, image_root=str(world / "nlvr")))
    loader = torch.utils.data.DataLoader(val, batch_size=7)
    out = NLVRTask().evaluate(_SaysTrueWhenLeft(), loader, "val")

    hits, correct = defaultdict(list), 0
    for _, _, sentence, label in (val[i] for i in range(len(val))):
        hit = int("left" in sentence) == label
        hits[nlvr_family(sentence)].append(hit)
        correct += hit
    assert None not in hits
    assert out["n"] == len(val) and out["acc"] == pytest.approx(100 * correct / len(val))
    assert out["by_statement"] == pytest.approx({f: 100 * sum(h) / len(h) for f, h in hits.items()})
    assert len(set(out["by_statement"].values())) > 1  # the stub is not equally good everywhere

    # One sentence the world never writes: the split is not the world's, so no per-family figures.
    foreign = [(*val[0][:2], "two dogs are playing.", 1)]
    out = NLVRTask().evaluate(_SaysTrueWhenLeft(), torch.utils.data.DataLoader(foreign + [val[1]], batch_size=2), "x")
    assert out["n"] == 2 and "by_statement" not in out


class _SaysTrueWhenLeftIsDarker(torch.nn.Module):
    """Compares the two images a statement reads: it depends on which picture is which."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images, text, pairs=None):
        if pairs is None:
            first, second = images.chunk(2)
        else:
            assert images.shape[0] < 2 * len(text)  # each picture once, though statements share them
            first, second = images[pairs[:, 0]], images[pairs[:, 1]]
        says = first.mean(dim=(1, 2, 3)) < second.mean(dim=(1, 2, 3))
        return torch.stack([(~says).float(), says.float()], dim=1)


def test_grouped_nlvr_scores_every_statement_as_the_plain_split_does(world):
    from data.nlvr import collate_pairs
    from tasks.nlvr import NLVRTask, _pairs_per_batch

    _, val, _ = create_dataset("nlvr", cfg(world, image_root=str(world / "nlvr")))
    _, grouped, _ = create_dataset("nlvr", cfg(world, image_root=str(world / "nlvr"), nlvr_group_pairs=True))
    assert grouped.num_statements == len(val) == 4 * len(grouped)  # the world writes four per pair
    assert _pairs_per_batch(32, grouped) == 8 and _pairs_per_batch(2, grouped) == 1

    plain = NLVRTask().evaluate(_SaysTrueWhenLeftIsDarker(), torch.utils.data.DataLoader(val, batch_size=7), "val")
    loader = torch.utils.data.DataLoader(grouped, batch_size=3, collate_fn=collate_pairs)
    assert NLVRTask().evaluate(_SaysTrueWhenLeftIsDarker(), loader, "val") == plain
    assert 0 < plain["acc"] < 100


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
