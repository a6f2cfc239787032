"""The shapes world: layout and formats, determinism, truth of every text, balance, CLI, vocabulary.

Truth is checked by a parser written here from the sentence templates, against ``scenes.json``; and
``scenes.json`` is checked against the pixels. Neither check uses the generator's own text code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import synthetic

REPO = Path(__file__).resolve().parents[1]
N, SIZE, SEED = 40, 64, 3
N_EVAL = max(N // 4, 20)

COL = r"(red|green|blue|yellow)"
SHP = r"(circle|square|triangle)"
NP = rf"a {COL} {SHP}"
NPLIST = rf"({NP}(?:, {NP})*(?: and {NP})?)"
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
CLASSES = sorted(f"{c}_{s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return synthetic.make_world(
        tmp_path_factory.mktemp("synthetic") / "world", n=N, image_size=SIZE, seed=SEED, progress=False
    )


def load(root: Path, rel: str):
    return json.loads((root / rel).read_text())


@pytest.fixture(scope="module")
def scenes(world) -> dict[str, list[tuple[str, str, tuple[int, int, int, int]]]]:
    """Image path -> objects (colour, shape, bbox), sorted left to right here rather than trusted."""
    raw = load(world, "scenes.json")
    return {
        p: sorted(((o["color"], o["shape"], tuple(o["bbox"])) for o in objs), key=lambda o: o[2][0])
        for p, objs in raw.items()
    }


def content(objs) -> list[tuple[str, str]]:
    return [(c, s) for c, s, _ in objs]


def nps(text: str) -> list[tuple[str, str]]:
    return re.findall(NP, text)


# ----------------------------------------------------------------------------------------------
# Independent truth checkers


def caption_is_true(text: str, objs) -> bool:
    """Every caption must describe the whole scene: all objects, and their order where it says so."""
    ltr = content(objs)
    k = len(ltr)
    if m := re.fullmatch(NPLIST, text):
        return sorted(nps(m[1])) == sorted(ltr)
    if m := re.fullmatch(rf"(one|two|three) (shapes?): {NPLIST}", text):
        plural_ok = (m[2] == "shape") == (m[1] == "one")
        return plural_ok and NUMBERS[m[1]] == k and sorted(nps(m[3])) == sorted(ltr)
    if m := re.fullmatch(rf"an image that contains exactly (one|two|three) (shapes?): {NPLIST}", text):
        plural_ok = (m[2] == "shape") == (m[1] == "one")
        return plural_ok and NUMBERS[m[1]] == k and sorted(nps(m[3])) == sorted(ltr)
    if m := re.fullmatch(rf"a single {COL} {SHP}", text):
        return ltr == [(m[1], m[2])]
    if m := re.fullmatch(rf"{NP} (on the left|in the middle|on the right)", text):
        x0, _, x1, _ = objs[0][2]
        third = int(((x0 + x1) / 2) // (SIZE / 3))
        where = ["on the left", "in the middle", "on the right"][third]
        return ltr == [(m[1], m[2])] and m[3] == where
    if m := re.fullmatch(rf"{NP} to the left of {NP}", text):
        return ltr == [(m[1], m[2]), (m[3], m[4])]
    if m := re.fullmatch(rf"{NPLIST} from left to right", text):
        return k >= 2 and ltr == nps(m[1])
    if m := re.fullmatch(rf"{NP} on the right and {NP} on the left", text):
        return ltr == [(m[3], m[4]), (m[1], m[2])]
    if m := re.fullmatch(rf"{NP} on the right, {NP} in the middle and {NP} on the left", text):
        return ltr == [(m[5], m[6]), (m[3], m[4]), (m[1], m[2])]
    raise AssertionError(f"caption matches no known template: {text!r}")


NLVR_PATTERNS = {
    "contains": rf"the (left|right) image contains {NP}",
    "count": r"the (left|right) image contains exactly (one|two|three) (shapes?)",
    "more": r"the (left|right) image has more shapes than the (left|right) image",
    "same": r"both images contain the same number of shapes",
    "both_shape": rf"both images contain a {SHP}",
    "both_color": rf"both images contain a {COL} shape",
    "total": r"there are (\w+) shapes in total",
    "exactly_one": rf"exactly one image contains a {SHP}",
}


def nlvr_truth(sentence: str, left, right) -> tuple[str, bool]:
    """(template name, truth) of a statement about an image pair."""
    text = sentence.rstrip(".")
    pick = {"left": left, "right": right}
    for name, pattern in NLVR_PATTERNS.items():
        m = re.fullmatch(pattern, text)
        if not m:
            continue
        if name == "contains":
            return name, (m[2], m[3]) in content(pick[m[1]])
        if name == "count":
            assert (m[3] == "shape") == (m[2] == "one"), sentence
            return name, len(pick[m[1]]) == NUMBERS[m[2]]
        if name == "more":
            assert m[1] != m[2], sentence
            return name, len(pick[m[1]]) > len(pick[m[2]])
        if name == "same":
            return name, len(left) == len(right)
        if name == "both_shape":
            return name, all(any(s == m[1] for _, s in content(o)) for o in (left, right))
        if name == "both_color":
            return name, all(any(c == m[1] for c, _ in content(o)) for o in (left, right))
        if name == "total":
            return name, len(left) + len(right) == NUMBERS[m[1]]
        if name == "exactly_one":
            return name, sum(any(s == m[1] for _, s in content(o)) for o in (left, right)) == 1
    raise AssertionError(f"statement matches no known template: {sentence!r}")


def swap_sides(sentence: str) -> str:
    """What the NLVR2 loader does when it swaps the two images."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(w, w) for w in sentence.rstrip(".").split(" "))


def vqa_answer(question: str, objs) -> str:
    ltr = content(objs)
    colors = [c for c, _ in ltr]
    shapes = [s for _, s in ltr]
    words = {v: k for k, v in NUMBERS.items()}
    if question == "how many shapes are there?":
        return words[len(ltr)]
    if question == "what shape is on the left?":
        assert len(ltr) >= 2, question
        return shapes[0]
    if question == "what color is the shape on the right?":
        assert len(ltr) >= 2, question
        return colors[-1]
    if m := re.fullmatch(rf"what color is the {SHP}\?", question):
        assert shapes.count(m[1]) == 1, f"{question!r} is ambiguous for {ltr}"
        return colors[shapes.index(m[1])]
    if m := re.fullmatch(rf"what shape is {COL}\?", question):
        assert colors.count(m[1]) == 1, f"{question!r} is ambiguous for {ltr}"
        return shapes[colors.index(m[1])]
    if m := re.fullmatch(rf"is there a {SHP}\?", question):
        return "yes" if m[1] in shapes else "no"
    if m := re.fullmatch(rf"is there a {COL} shape\?", question):
        return "yes" if m[1] in colors else "no"
    raise AssertionError(f"question matches no known template: {question!r}")


# ----------------------------------------------------------------------------------------------
# Layout and formats


ANNOTATIONS = [
    "coco_karpathy_train.json",
    "coco_karpathy_val.json",
    "coco_karpathy_test.json",
    "coco_gt/coco_karpathy_val_gt.json",
    "coco_gt/coco_karpathy_test_gt.json",
    "flickr30k_train.json",
    "flickr30k_val.json",
    "flickr30k_test.json",
    "nlvr_train.json",
    "nlvr_dev.json",
    "nlvr_test.json",
    "vqa_train.json",
    "vqa_val.json",
    "vqa_test.json",
    "vg_qa.json",
    "answer_list.json",
    "vqa2_ans2label.json",
    "vqa2_label2ans.json",
]


def referenced_images(root: Path) -> set[str]:
    """Every image an annotation file names, as a path relative to the world's root."""
    refs = set()
    for split in ("train", "val", "test"):
        refs |= {f"coco/{e['image']}" for e in load(root, f"annotation/coco_karpathy_{split}.json")}
        refs |= {f"flickr/{e['image']}" for e in load(root, f"annotation/flickr30k_{split}.json")}
        refs |= {f"vqa/{e['image']}" for e in load(root, f"annotation/vqa_{split}.json")}
    for split in ("train", "dev", "test"):
        refs |= {f"nlvr/{p}" for e in load(root, f"annotation/nlvr_{split}.json") for p in e["images"]}
    refs |= {f"vg/{e['image']}" for e in load(root, "annotation/vg_qa.json")}
    for split in ("train", "dev", "test"):
        lines = (root / f"annotation/snli_ve_{split}.jsonl").read_text().splitlines()
        refs |= {f"flickr/flickr30k-images/{json.loads(line)['Flickr30K_ID']}.jpg" for line in lines}
    refs |= {p.relative_to(root).as_posix() for p in (root / "imagenet").rglob("*.JPEG")}
    return refs


def test_world_json_lists_every_annotation_file_with_its_entry_count(world):
    meta = load(world, "world.json")
    assert {k: meta[k] for k in ("version", "seed", "n", "image_size")} == {
        "version": synthetic.VERSION,
        "seed": SEED,
        "n": N,
        "image_size": SIZE,
    }
    on_disk = {p.relative_to(world).as_posix() for p in (world / "annotation").rglob("*.json")}
    assert on_disk == {f"annotation/{a}" for a in ANNOTATIONS}
    assert on_disk <= set(meta["files"])
    for rel, count in meta["files"].items():
        data = load(world, rel) if rel.endswith(".json") else (world / rel).read_text().splitlines()
        entries = data["annotations"] if rel.startswith("annotation/coco_gt/") else data
        assert count == len(entries), rel


def test_caption_files_follow_the_karpathy_and_flickr_formats(world):
    train = load(world, "annotation/coco_karpathy_train.json")
    assert len({e["image"] for e in train}) == N and len(train) == 5 * N
    for e in train:
        assert set(e) == {"image", "caption", "image_id"} and isinstance(e["caption"], str)
        m = re.fullmatch(r"train2014/COCO_train2014_(\d{12})\.jpg", e["image"])
        assert m and e["image_id"] == f"coco_{int(m[1])}"
        assert not e["caption"].startswith("a picture of")
    ids = {}
    for split in ("val", "test"):
        entries = load(world, f"annotation/coco_karpathy_{split}.json")
        assert len(entries) == N_EVAL
        for e in entries:
            assert set(e) == {"image", "caption"} and len(e["caption"]) == 5
            assert all(isinstance(c, str) for c in e["caption"])
            assert re.fullmatch(r"val2014/COCO_val2014_\d{12}\.jpg", e["image"])
        ids[split] = [int(e["image"][-16:-4]) for e in entries]
        gt = load(world, f"annotation/coco_gt/coco_karpathy_{split}_gt.json")
        assert set(gt) == {"annotations", "images", "info", "licenses", "type"} and gt["type"] == "captions"
        assert [im["id"] for im in gt["images"]] == ids[split]
        expected = [(i, c) for e, i in zip(entries, ids[split]) for c in e["caption"]]
        assert [(a["image_id"], a["caption"]) for a in gt["annotations"]] == expected
        assert len({a["id"] for a in gt["annotations"]}) == len(expected)
    assert not set(ids["val"]) & set(ids["test"])

    flickr_train = load(world, "annotation/flickr30k_train.json")
    assert len(flickr_train) == 5 * N
    for e in flickr_train:
        m = re.fullmatch(r"flickr30k-images/(\d+)\.jpg", e["image"])
        assert set(e) == {"image", "caption", "image_id"} and m and e["image_id"] == m[1]
    for split in ("val", "test"):
        entries = load(world, f"annotation/flickr30k_{split}.json")
        assert len(entries) == N_EVAL
        for e in entries:
            assert set(e) == {"image", "caption"} and len(e["caption"]) == 5
            assert re.fullmatch(r"flickr30k-images/\d+\.jpg", e["image"])


def test_nlvr_and_vqa_files_follow_the_official_formats(world):
    for split, folder in (("train", "train"), ("dev", "dev"), ("test", "test1")):
        for e in load(world, f"annotation/nlvr_{split}.json"):
            assert set(e) == {"images", "sentence", "label"} and e["label"] in ("True", "False")
            assert len(e["images"]) == 2 and all(re.fullmatch(rf"{folder}/[\w-]+\.png", p) for p in e["images"])
            assert e["images"][0] != e["images"][1]

    question_ids = []
    answers = set()
    for split, folder in (("train", "train2014"), ("val", "val2014"), ("test", "test2015")):
        entries = load(world, f"annotation/vqa_{split}.json")
        keys = {"question_id", "question", "answer", "image", "dataset"}
        for e in entries:
            assert set(e) == keys and e["dataset"] == "vqa" and isinstance(e["question_id"], int)
            assert re.fullmatch(rf"{folder}/COCO_{folder}_\d{{12}}\.jpg", e["image"])
            assert len(e["answer"]) == 10 and all(isinstance(a, str) for a in e["answer"])
            answers |= set(e["answer"])
        question_ids += [e["question_id"] for e in entries]
    assert len(question_ids) == len(set(question_ids))
    for e in load(world, "annotation/vg_qa.json"):
        assert set(e) == {"question", "answer", "image", "dataset"} and e["dataset"] == "vg"
        assert isinstance(e["answer"], str) and re.fullmatch(r"image/\d+\.jpg", e["image"])
        answers.add(e["answer"])
    assert load(world, "annotation/answer_list.json") == sorted(answers)


def test_every_image_exists_is_rgb_of_the_right_size_and_has_ground_truth(world, scenes):
    refs = referenced_images(world)
    assert refs == set(scenes)
    formats = {".jpg": "JPEG", ".JPEG": "JPEG", ".png": "PNG"}
    for rel in refs:
        with Image.open(world / rel) as im:
            assert (im.mode, im.size, im.format) == ("RGB", (SIZE, SIZE), formats[Path(rel).suffix]), rel


def test_imagenet_trees_have_twelve_equally_populated_classes(world, scenes):
    for split, per_class in (("train", N // 12), ("val", N_EVAL // 12)):
        tree = world / "imagenet" / split
        assert sorted(d.name for d in tree.iterdir()) == CLASSES
        for d in tree.iterdir():
            files = list(d.glob("*.JPEG"))
            assert len(files) == per_class, d.name
            for f in files:
                objs = scenes[f.relative_to(world).as_posix()]
                assert [f"{c}_{s}" for c, s in content(objs)] == [d.name]


# ----------------------------------------------------------------------------------------------
# Truth


def colour_name(rgb) -> str:
    r, g, b = (int(v) for v in rgb)
    if r > 170 and g > 140 and b < 110:
        return "yellow"
    if r > 150 and g < 110 and b < 110:
        return "red"
    if g > r + 50 and g > b + 50:
        return "green"
    if b > r + 50 and b > g + 50:
        return "blue"
    return f"unknown{(r, g, b)}"


def test_scenes_agree_with_the_pixels(world, scenes):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for rel, objs in scenes.items():
        pixels = np.asarray(Image.open(world / rel).convert("RGB")).astype(int)
        background = pixels[0, 0]
        assert background.min() > 200, rel
        assert 1 <= len(objs) <= 3 and len(set(content(objs))) == len(objs), rel
        distance = np.full((SIZE, SIZE), SIZE)
        for i, (colour, shape, (x0, y0, x1, y1)) in enumerate(objs):
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE, rel
            if i:
                assert objs[i - 1][2][2] < x0, f"{rel}: objects overlap horizontally"
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            if shape == "triangle":
                cy = y0 + (2 * (y1 - y0)) // 3  # the box centre of a triangle is near its thin top
            assert colour_name(pixels[cy, cx]) == colour, f"{rel}: {colour} {shape} at {(cx, cy)}"
            filled = (np.abs(pixels[y0:y1, x0:x1] - background).max(-1) > 60).mean()
            lo, hi = {"square": (0.9, 1.0), "circle": (0.7, 0.92), "triangle": (0.4, 0.7)}[shape]
            assert lo <= filled <= hi, f"{rel}: {shape} fills {filled:.2f} of its box"
            dx = np.maximum(np.maximum(x0 - xx, xx - (x1 - 1)), 0)
            dy = np.maximum(np.maximum(y0 - yy, yy - (y1 - 1)), 0)
            distance = np.minimum(distance, np.maximum(dx, dy))
        away = pixels[distance >= 2]
        assert np.abs(away - background).max() <= 50, f"{rel}: something besides the listed objects"


def test_every_caption_is_true_and_complete(world, scenes):
    for family, prefix in (("coco_karpathy", "coco"), ("flickr30k", "flickr")):
        per_image = defaultdict(list)
        for split in ("train", "val", "test"):
            for e in load(world, f"annotation/{family}_{split}.json"):
                texts = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
                per_image[e["image"]] += texts
        for image, texts in per_image.items():
            assert len(texts) == 5 and len(set(texts)) == 5, image
            for text in texts:
                assert caption_is_true(text, scenes[f"{prefix}/{image}"]), f"{image}: {text!r}"


def test_caption_checker_rejects_false_captions():
    objs = [("red", "circle", (1, 5, 15, 19)), ("blue", "square", (44, 5, 58, 19))]
    assert caption_is_true("a red circle to the left of a blue square", objs)
    assert not caption_is_true("a blue square to the left of a red circle", objs)
    assert not caption_is_true("three shapes: a red circle and a blue square", objs)
    assert not caption_is_true("a red circle", objs)
    with pytest.raises(AssertionError, match="no known template"):
        caption_is_true("a red circle next to a blue square", objs)


def test_every_nlvr_statement_matches_its_label_even_after_the_loader_swaps_the_images(world, scenes):
    for split in ("train", "dev", "test"):
        entries = load(world, f"annotation/nlvr_{split}.json")
        by_template = defaultdict(list)
        for e in entries:
            left, right = (scenes[f"nlvr/{p}"] for p in e["images"])
            label = e["label"] == "True"
            name, truth = nlvr_truth(e["sentence"], left, right)
            assert truth == label, f"{split}: {e}"
            assert nlvr_truth(swap_sides(e["sentence"]), right, left)[1] == label, f"{split} swapped: {e}"
            # "left" / "right" may only name one of the two images.
            assert not re.search(r"left|right", re.sub(r"the (left|right) image", "", e["sentence"])), e
            family = "more" if name == "same" else name  # "same" is the third choice of "more"
            by_template[(tuple(e["images"]), family)].append(label)
        labels = Counter(e["label"] for e in entries)
        assert labels["True"] == labels["False"] == len(entries) // 2, (split, labels)
        # Near misses: each template is used once truly and once falsely on the same pair.
        assert all(sorted(v) == [False, True] for v in by_template.values()), split
        assert len({t for _, t in by_template}) >= 5, f"{split}: too few kinds of statements"


def test_nlvr_family_names_each_statement_as_the_independent_parser_does(world, scenes):
    from data.utils import pre_caption

    seen = set()
    for split in ("train", "dev"):
        for e in load(world, f"annotation/nlvr_{split}.json"):
            left, right = (scenes[f"nlvr/{p}"] for p in e["images"])
            name = nlvr_truth(e["sentence"], left, right)[0]
            family = "more" if name == "same" else name
            # As written, as the dataset hands it over (pre_caption), and with the sides swapped.
            for sentence in (e["sentence"], pre_caption(e["sentence"], 40), swap_sides(e["sentence"])):
                assert synthetic.nlvr_family(sentence) == family, sentence
            seen.add(family)
    assert len(seen) == 7
    assert synthetic.nlvr_family("the left image contains two dogs.") is None
    assert synthetic.nlvr_family("") is None


def test_nlvr_checker_rejects_false_statements():
    left = [("red", "circle", (0, 0, 1, 1))]
    right = [("red", "square", (0, 0, 1, 1)), ("blue", "triangle", (5, 0, 6, 1))]
    assert nlvr_truth("the right image has more shapes than the left image.", left, right) == ("more", True)
    assert nlvr_truth("the left image contains a red square.", left, right) == ("contains", False)
    assert nlvr_truth("exactly one image contains a triangle.", left, right) == ("exactly_one", True)
    assert nlvr_truth("both images contain a red shape.", left, right) == ("both_color", True)
    assert nlvr_truth("there are four shapes in total.", left, right) == ("total", False)
    assert swap_sides("the left image contains a red circle.") == "the right image contains a red circle"


def test_every_vqa_answer_is_true(world, scenes):
    for split in ("train", "val", "test"):
        for e in load(world, f"annotation/vqa_{split}.json"):
            expected = vqa_answer(e["question"], scenes[f"vqa/{e['image']}"])
            assert e["answer"] == [expected] * 10, e
    for e in load(world, "annotation/vg_qa.json"):
        assert e["answer"] == vqa_answer(e["question"], scenes[f"vg/{e['image']}"]), e


def test_yes_no_answers_are_balanced_and_questions_varied(world):
    for name in ("vqa_train", "vqa_val", "vqa_test", "vg_qa"):
        entries = load(world, f"annotation/{name}.json")
        answers = Counter(e["answer"] if isinstance(e["answer"], str) else e["answer"][0] for e in entries)
        assert answers["yes"] > 0 and abs(answers["yes"] - answers["no"]) <= 1, (name, answers)
        kinds = {re.sub(rf"\b{COL}\b|\b{SHP}\b", "_", e["question"]) for e in entries}
        assert len(kinds) >= 6, (name, kinds)


def test_caption_val_and_test_scenes_are_unique(world, scenes):
    for family, prefix in (("coco_karpathy", "coco"), ("flickr30k", "flickr")):
        for split in ("val", "test"):
            entries = load(world, f"annotation/{family}_{split}.json")
            contents = [tuple(content(scenes[f"{prefix}/{e['image']}"])) for e in entries]
            assert len(set(contents)) == len(contents), (family, split)
            # With few scenes even the set of objects is unique, so every caption names one image.
            assert len({frozenset(c) for c in contents}) == len(contents), (family, split)
            captions = [c for e in entries for c in e["caption"]]
            assert len(set(captions)) == len(captions), (family, split)


# ----------------------------------------------------------------------------------------------
# Determinism, CLI, reuse


def world_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_worlds_and_another_seed_differs(tmp_path):
    a, b, c = (
        synthetic.make_world(tmp_path / name, n=20, image_size=32, seed=seed, progress=False)
        for name, seed in (("a", 5), ("b", 5), ("c", 6))
    )
    files_a, files_b, files_c = world_files(a), world_files(b), world_files(c)
    assert files_a.keys() == files_b.keys() == files_c.keys()
    for rel, path in files_a.items():
        if path.suffix in (".json", ".jsonl", ".txt"):
            assert path.read_bytes() == files_b[rel].read_bytes(), rel
        else:
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(files_b[rel]))), rel
    for rel in (
        "scenes.json",
        "annotation/nlvr_train.json",
        "annotation/vqa_train.json",
        "annotation/coco_karpathy_test.json",
    ):
        assert files_a[rel].read_bytes() != files_c[rel].read_bytes(), rel
    first = "coco/val2014/COCO_val2014_000000000021.jpg"
    assert not np.array_equal(np.asarray(Image.open(files_a[first])), np.asarray(Image.open(files_c[first])))


def test_cli_writes_every_file(tmp_path):
    out = tmp_path / "cli world"
    run = subprocess.run(
        [sys.executable, "-m", "data.synthetic", "--out", str(out), "--n", "200", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    meta = load(out, "world.json")
    assert (meta["n"], meta["image_size"], meta["seed"]) == (200, 64, 0)
    assert all((out / rel).is_file() for rel in meta["files"])
    assert meta["files"]["annotation/coco_karpathy_val.json"] == 50
    assert meta["files"]["annotation/nlvr_train.json"] == 800  # n image pairs x 2 true/false statement pairs
    assert len(list((out / "imagenet" / "train").rglob("*.JPEG"))) == 12 * (200 // 12)


def test_cli_help_and_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--help"])
    assert exit_info.value.code == 0
    assert "--image-size" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path / "w"), "--n", "5"])
    assert exit_info.value.code == 2 and "n must be an integer >= 12" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_argument_validation():
    with pytest.raises(ValueError, match="image_size must be"):
        synthetic.make_world("unused", n=20, image_size=8)
    with pytest.raises(ValueError, match="only 1464 exist"):
        synthetic.make_world("unused", n=6000)
    with pytest.raises(ValueError, match="seed must be"):
        synthetic.make_world("unused", n=20, seed=-1)


def test_ensure_world_reuses_a_matching_world_and_regenerates_otherwise(tmp_path):
    out = tmp_path / "world"
    assert synthetic.ensure_world(out, n=20, image_size=32, seed=1, progress=False) == out
    stamp = (out / "world.json").stat().st_mtime_ns
    marker = out / "reused"
    marker.touch()
    synthetic.ensure_world(out, n=20, image_size=32, seed=1, progress=False)
    assert marker.exists() and (out / "world.json").stat().st_mtime_ns == stamp

    synthetic.ensure_world(out, n=20, image_size=32, seed=2, progress=False)
    assert not marker.exists() and load(out, "world.json")["seed"] == 2
    synthetic.ensure_world(out, n=24, image_size=32, seed=2, progress=False)
    assert load(out, "world.json")["n"] == 24
    assert [p.name for p in tmp_path.iterdir()] == ["world"], "temporary directories left behind"

    (out / "scenes.json").unlink()  # an incomplete world is not reused
    assert not synthetic.world_matches(out, n=24, image_size=32, seed=2)
    synthetic.ensure_world(out, n=24, image_size=32, seed=2, progress=False)
    assert (out / "scenes.json").is_file()


def test_a_crash_leaves_no_half_world_and_foreign_directories_are_kept(tmp_path, monkeypatch):
    calls = []

    def failing_render(scene, size):
        calls.append(1)
        if len(calls) > 10:
            raise RuntimeError("disk full")
        return original(scene, size)

    original = synthetic.render
    monkeypatch.setattr(synthetic, "render", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.ensure_world(tmp_path / "world", n=20, image_size=32, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "render", original)

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic world"):
        synthetic.ensure_world(foreign, n=20, image_size=32, seed=0, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# ----------------------------------------------------------------------------------------------
# Vocabulary


def test_vocabulary_covers_every_text_without_unknown_tokens(world):
    from transformers import BertTokenizer

    vocab = (world / "tokenizer" / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) == len(set(vocab))
    assert {"a", "z", "##a", "##z", "?", ":", ",", "."} <= set(vocab)
    assert load(world, "tokenizer/tokenizer_config.json") == {
        "do_lower_case": True,
        "tokenizer_class": "BertTokenizer",
        "model_max_length": 512,
    }

    tokenizer = BertTokenizer.from_pretrained(world / "tokenizer")
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1)
    texts = ["a picture of a red circle", "Zebra crossing, 42!"]
    for split in ("train", "val", "test"):
        for e in load(world, f"annotation/coco_karpathy_{split}.json"):
            texts += e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        texts += [q for e in load(world, f"annotation/vqa_{split}.json") for q in [e["question"], *e["answer"]]]
    for split in ("train", "dev", "test"):
        texts += [e["sentence"] for e in load(world, f"annotation/nlvr_{split}.json")]
    texts += load(world, "annotation/answer_list.json")
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
    words = [t for t in tokenizer.tokenize("two shapes: a red circle and a blue square") if not t.startswith("##")]
    assert words == ["two", "shapes", ":", "a", "red", "circle", "and", "a", "blue", "square"]
