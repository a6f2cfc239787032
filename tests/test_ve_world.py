"""SNLI-VE and ViLT's VQA answer vocabulary in the shapes world, the SNLI-VE dataset class, the vocabulary builder.

Hypotheses are checked by a parser written here from the sentence forms, against ``scenes.json``, not by the
generator's own code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from data import create_dataset, pre_caption, synthetic
from data.utils import ImageLoadError
from data.ve import VE_LABEL_IDS, VEDataset
from data.vqa import build_answer_vocab
from data.vqa import main as vqa_main

N, SIZE, SEED = 24, 24, 7
N_EVAL = synthetic.eval_split_size(N)
SPLITS = {"train": N, "dev": N_EVAL, "test": N_EVAL}
LABELS = ("entailment", "neutral", "contradiction")

COL = r"(red|green|blue|yellow)"
SHP = r"(circle|square|triangle)"
NUMBERS = {"one": 1, "two": 2, "three": 3}

# sha256 of tokenizer/vocab.txt as every world wrote it before SNLI-VE existed (VERSION 4; the same 159 tokens for
# this world and for the demo worlds, n=600 with and without n_eval=1400). The tiny models in checkpoints/demo
# were trained on these token ids.
VOCAB_SHA256 = "87f119c6c74476b375b5e92500bc1354628eba555854b7535c4e1e456538fa19"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return synthetic.make_world(
        tmp_path_factory.mktemp("ve") / "world", n=N, image_size=SIZE, seed=SEED, progress=False
    )


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ve_entries(world: Path, split: str) -> list[dict]:
    return jsonl(world / "annotation" / f"snli_ve_{split}.jsonl")


@pytest.fixture(scope="module")
def scenes(world) -> dict[str, set[tuple[str, str]]]:
    raw = json.loads((world / "scenes.json").read_text())
    return {p: {(o["color"], o["shape"]) for o in objs} for p, objs in raw.items()}


def form_and_label(hypothesis: str, objects: set[tuple[str, str]]) -> tuple[str, str]:
    """(sentence form, the label the scene gives it)."""
    if m := re.fullmatch(rf"there is a {COL} {SHP}\.", hypothesis):
        return "there_is", "entailment" if (m[1], m[2]) in objects else "contradiction"
    if m := re.fullmatch(r"the image contains exactly (one|two|three) (shapes?)\.", hypothesis):
        assert (m[2] == "shape") == (m[1] == "one"), hypothesis
        return "count", "entailment" if NUMBERS[m[1]] == len(objects) else "contradiction"
    if m := re.fullmatch(rf"the {COL} {SHP} is made of wood\.", hypothesis):
        # The picture shows whether the object is there, never what it is made of.
        return "wood", "neutral" if (m[1], m[2]) in objects else "contradiction"
    raise AssertionError(f"hypothesis matches no known form: {hypothesis!r}")


def test_checker_labels_hand_made_cases():
    scene = {("red", "circle"), ("blue", "square")}
    assert form_and_label("there is a red circle.", scene) == ("there_is", "entailment")
    assert form_and_label("there is a red square.", scene) == ("there_is", "contradiction")
    assert form_and_label("the image contains exactly two shapes.", scene) == ("count", "entailment")
    assert form_and_label("the image contains exactly one shape.", scene) == ("count", "contradiction")
    assert form_and_label("the blue square is made of wood.", scene) == ("wood", "neutral")
    assert form_and_label("the green square is made of wood.", scene) == ("wood", "contradiction")
    with pytest.raises(AssertionError):
        form_and_label("the image contains exactly two shape.", scene)


# ----------------------------------------------------------------------------------------------
# The split in the world


def test_files_follow_the_official_jsonl_format_with_one_hypothesis_per_label_and_image(world, scenes):
    meta = json.loads((world / "world.json").read_text())
    retrieval_ids = {
        Path(e["image"]).stem for s in ("train", "val", "test") for e in jsonl_or_json(world, f"flickr30k_{s}.json")
    }
    pair_ids, image_ids = set(), set()
    for split, images in SPLITS.items():
        entries = ve_entries(world, split)
        assert meta["files"][f"annotation/snli_ve_{split}.jsonl"] == len(entries) == 3 * images
        by_image = defaultdict(list)
        for e in entries:
            assert set(e) == {"pairID", "Flickr30K_ID", "sentence1", "sentence2", "gold_label"}, e
            assert all(isinstance(v, str) for v in e.values()), e
            assert re.fullmatch(r"9\d{8}", e["Flickr30K_ID"]) and e["pairID"].startswith(f"{e['Flickr30K_ID']}.jpg#")
            by_image[e["Flickr30K_ID"]].append(e)
            pair_ids.add(e["pairID"])
        assert len(by_image) == images
        for image_id, group in by_image.items():
            assert sorted(e["gold_label"] for e in group) == sorted(LABELS), group
            assert len({e["sentence1"] for e in group}) == 1
            # The premise is a true caption: it names exactly the objects of the picture.
            objects = scenes[f"flickr/flickr30k-images/{image_id}.jpg"]
            named = re.findall(rf"{COL} {SHP}", group[0]["sentence1"])
            assert len(named) == len(set(named)) and set(named) == objects, group[0]
            assert (world / "flickr" / "flickr30k-images" / f"{image_id}.jpg").is_file()
        assert Counter(e["gold_label"] for e in entries) == {label: images for label in LABELS}
        assert not image_ids & set(by_image)
        image_ids |= set(by_image)
    assert len(pair_ids) == 3 * sum(SPLITS.values())
    assert not image_ids & retrieval_ids


def jsonl_or_json(world: Path, name: str):
    return json.loads((world / "annotation" / name).read_text())


def test_every_hypothesis_is_true_to_its_label_and_no_sentence_form_gives_the_label_away(world, scenes):
    for split, images in SPLITS.items():
        labels_of_form = defaultdict(Counter)
        for e in ve_entries(world, split):
            form, label = form_and_label(e["sentence2"], scenes[f"flickr/flickr30k-images/{e['Flickr30K_ID']}.jpg"])
            assert label == e["gold_label"], e
            labels_of_form[form][label] += 1
        wood = labels_of_form["wood"]
        assert wood["neutral"] == images and wood["entailment"] == 0
        # Half of the contradictions say "made of wood" (of an absent object), half are false "there is" / counts.
        assert wood["contradiction"] == (images + 1) // 2, (split, dict(labels_of_form))
        if split == "train":
            for form in ("there_is", "count"):
                assert set(labels_of_form[form]) == {"entailment", "contradiction"}, (form, labels_of_form[form])


def test_splits_are_deterministic_and_leave_the_rest_of_the_world_alone(world, tmp_path, monkeypatch):
    again = synthetic.make_world(tmp_path / "again", n=N, image_size=SIZE, seed=SEED, progress=False)
    for split in SPLITS:
        name = f"annotation/snli_ve_{split}.jsonl"
        assert (again / name).read_bytes() == (world / name).read_bytes()
    # Without the split the world has the same texts (so the same vocabulary), annotation files and scenes.
    full = synthetic._build(N, SIZE, SEED)
    monkeypatch.setattr(synthetic, "_ve_splits", lambda *args: None)
    bare = synthetic._build(N, SIZE, SEED)
    assert full.texts == bare.texts
    assert {k: v for k, v in full.annotations.items() if "/snli_ve_" not in k} == bare.annotations
    assert {p: s for p, s in full.images.items() if p in bare.images} == bare.images
    assert len(full.images) - len(bare.images) == sum(SPLITS.values())


def test_the_vocabulary_is_unchanged_and_still_spells_every_hypothesis(world):
    from transformers import BertTokenizer

    vocab_file = world / "tokenizer" / "vocab.txt"
    assert hashlib.sha256(vocab_file.read_bytes()).hexdigest() == VOCAB_SHA256
    vocab = set(vocab_file.read_text().splitlines())
    hypotheses = [e["sentence2"] for split in SPLITS for e in ve_entries(world, split)]
    words = {w for h in hypotheses for w in synthetic.basic_tokens(h)}
    assert {"made", "wood"} <= words and not {"made", "wood"} & vocab
    tokenizer = BertTokenizer.from_pretrained(world / "tokenizer")
    for h in set(hypotheses):
        assert tokenizer.unk_token_id not in tokenizer(h)["input_ids"], h
    assert tokenizer.tokenize("the red circle is made of wood.")[:5] == ["the", "red", "circle", "is", "m"]


# ----------------------------------------------------------------------------------------------
# The dataset class


def cfg(world, **kw):
    return {
        "ann_root": str(world / "annotation"),
        "image_root": str(world / "flickr" / "flickr30k-images"),
        "image_size": SIZE,
        "hflip": False,
        "randaug": False,
        **kw,
    }


def test_create_dataset_reads_the_three_splits(world):
    train, dev, test = create_dataset("ve", cfg(world))
    assert [len(ds) for ds in (train, dev, test)] == [3 * n for n in SPLITS.values()]
    assert VE_LABEL_IDS == {"contradiction": 0, "neutral": 1, "entailment": 2}
    for ds, split in ((train, "train"), (dev, "dev"), (test, "test")):
        entries = ve_entries(world, split)
        for i in range(3):
            image, hypothesis, label = ds[i]
            assert isinstance(image, torch.Tensor) and image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
            assert hypothesis == pre_caption(entries[i]["sentence2"], 40) and not hypothesis.endswith(".")
            assert label == VE_LABEL_IDS[entries[i]["gold_label"]]
        assert Counter(ds.label(i) for i in range(len(ds))) == {0: len(ds) // 3, 1: len(ds) // 3, 2: len(ds) // 3}


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def pair(label="entailment", image="900000000"):
    entry = {"pairID": f"{image}.jpg#0r1x", "Flickr30K_ID": image, "sentence1": "p", "sentence2": "h"}
    return {**entry, "gold_label": label}


def test_bad_files_are_named_with_the_line_and_no_consensus_lines_are_skipped(world, tmp_path):
    images = world / "flickr" / "flickr30k-images"
    write(tmp_path / "snli_ve_train.jsonl", [pair(), "{not json", pair()])
    with pytest.raises(ValueError, match=r"snli_ve_train\.jsonl, line 2: not valid JSON"):
        VEDataset(None, images, tmp_path, "train")
    write(tmp_path / "snli_ve_train.jsonl", [pair(), "", pair("maybe")])
    with pytest.raises(ValueError, match=r"snli_ve_train\.jsonl, line 3: unknown gold_label 'maybe'"):
        VEDataset(None, images, tmp_path, "train")
    bad = pair()
    del bad["sentence2"]
    write(tmp_path / "snli_ve_train.jsonl", [bad])
    with pytest.raises(ValueError, match=r"snli_ve_train\.jsonl, line 1: missing sentence2"):
        VEDataset(None, images, tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"snli_ve_dev\.jsonl"):
        VEDataset(None, images, tmp_path, "dev")
    with pytest.raises(ValueError, match="unknown SNLI-VE split 'validation'"):
        VEDataset(None, images, tmp_path, "validation")

    write(tmp_path / "snli_ve_test.jsonl", [pair("-"), pair("neutral"), pair("-"), pair("contradiction", "42")])
    logger, records = logging.getLogger("vlcompress"), []
    handler = logging.Handler()
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ds = VEDataset(None, images, tmp_path, "test")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (len(ds), ds.skipped, ds.lines) == (2, 2, [2, 4])
    assert any("skipped 2" in r.getMessage() for r in records)
    image, hypothesis, label = ds[0]
    assert image.size == (SIZE, SIZE) and (hypothesis, label) == ("h", 1)
    with pytest.raises(ImageLoadError, match=r"42\.jpg.*line 4 of .*snli_ve_test\.jsonl"):
        ds[1]


# ----------------------------------------------------------------------------------------------
# VQA answer vocabulary


def qa(*answers):
    return {"question": "q?", "answer": list(answers)}


def test_build_answer_vocab_counts_normalised_majority_answers():
    entries = [
        qa("Two", "2", "two", "3"),  # normalised: 2, 2, 2, 3 -> "2"
        qa("2"),
        qa("two."),
        qa("a dog", "dog", "cat"),  # articles go: dog, dog, cat -> "dog"
        qa("the dog"),
        qa("cat", "dog"),  # a tie goes to the first seen: "cat"
        qa("yes", "yes", "no"),
        {"question": "q?", "answer": "yes"},  # Visual Genome style: one answer
        qa("isnt", "isn't"),  # contractions restored: "isn't"
    ]
    assert build_answer_vocab(entries, min_count=1) == ["2", "dog", "yes", "cat", "isn't"]
    assert build_answer_vocab(entries, min_count=2) == ["2", "dog", "yes"]
    assert build_answer_vocab(entries, min_count=3) == ["2"]
    assert build_answer_vocab(entries[:1] * 9) == ["2"] and build_answer_vocab(entries[:1] * 8) == []
    # Ties in count are alphabetical, whatever the order seen.
    assert build_answer_vocab([qa("x"), qa("b"), qa("c"), qa("c")], 1) == ["c", "b", "x"]
    with pytest.raises(ValueError, match="entry 1 has no answers"):
        build_answer_vocab([qa("a"), qa()], 1)


def test_world_answer_vocabulary_agrees_with_the_vqa_answers(world, tmp_path):
    ann = world / "annotation"
    label2ans = json.loads((ann / "vqa2_label2ans.json").read_text())
    ans2label = json.loads((ann / "vqa2_ans2label.json").read_text())
    assert ans2label == {a: i for i, a in enumerate(label2ans)} and len(set(label2ans)) == len(label2ans)

    counts = Counter()
    for name in ("vqa_train", "vqa_val"):
        for e in json.loads((ann / f"{name}.json").read_text()):
            assert len(set(e["answer"])) == 1  # the world's annotators agree
            counts[e["answer"][0]] += 1
    assert label2ans == sorted(counts, key=lambda a: (-counts[a], a))
    # The answers as the world's annotators write them: number words, which the official accuracy compares
    # unnormalised when the annotators agree, and which PuMer's soft scores count as written.
    assert {"one", "two", "three", "yes", "no"} <= set(label2ans) and not {"1", "2", "3"} & set(label2ans)
    test_answers = {a for e in json.loads((ann / "vqa_test.json").read_text()) for a in e["answer"]}
    assert test_answers <= set(label2ans)

    # The command line builds the normalised vocabulary (the real data's rule) from the same annotation.
    normalised = vqa_main(["--make-vocab", "--ann_root", str(ann), "--min_count", "1", "--out", str(tmp_path)])
    assert {"1", "2", "3"} <= set(normalised) and len(normalised) == len(label2ans)
    assert json.loads((tmp_path / "vqa2_label2ans.json").read_text()) == normalised


def test_make_vocab_command_line(world, tmp_path, capsys):
    # In process: `python -m data.vqa` runs this same main(), and a fresh interpreter costs seconds of imports.
    kept = vqa_main(["--make-vocab", "--ann_root", str(world / "annotation"), "--out", str(tmp_path)])
    assert f"{len(kept)} answers -> {tmp_path}" in capsys.readouterr().out
    # With the real threshold (9 questions) the small world keeps only its most common answers.
    assert kept == json.loads((tmp_path / "vqa2_label2ans.json").read_text())
    full = vqa_main(
        ["--make-vocab", "--ann_root", str(world / "annotation"), "--min_count", "1", "--out", str(tmp_path)]
    )
    assert kept and set(kept) < set(full)
    with pytest.raises(SystemExit) as exit_info:
        vqa_main(["--make-vocab", "--ann_root", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "vqa_train.json" in capsys.readouterr().err
