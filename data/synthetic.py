"""The built-in "shapes world": a deterministic stand-in for every dataset the project reads.

Each picture shows one to three solid shapes (circle, square, triangle) in four colours (red, green,
blue, yellow) on a plain light background, placed left to right in three horizontal slots with a
little jitter and no overlap. Because the content of every picture is known exactly, every caption,
statement, question and answer written about it is true by construction, and ``scenes.json`` keeps
that ground truth so it can be checked independently of the text generator.

The world is written in the official annotation formats (Karpathy-style COCO captions with
``coco_gt`` files, Flickr30k retrieval splits, NLVR2 pairs, VQAv2 / Visual Genome QA with ViLT's answer
vocabulary, SNLI-VE, an ImageNet ImageFolder tree) plus a small WordPiece vocabulary in the
``bert-base-uncased`` layout, so the real dataset classes read it unchanged. The attributes are few
and the shapes large, so that a tiny transformer trained from scratch on a CPU learns every task within
minutes.

Layout written under ROOT::

    world.json          {"version", "seed", "n", "image_size", "files": {relative path: entries}}
    scenes.json         {image path relative to ROOT: [{"shape", "color", "bbox"}, ...]}
    annotation/         coco_karpathy_{train,val,test}.json, coco_gt/coco_karpathy_{val,test}_gt.json,
                        flickr30k_{train,val,test}.json, nlvr_{train,dev,test}.json,
                        vqa_{train,val,test}.json, vg_qa.json, answer_list.json,
                        vqa2_ans2label.json, vqa2_label2ans.json, snli_ve_{train,dev,test}.jsonl
    coco/               train2014/, val2014/
    flickr/             flickr30k-images/ (retrieval images, and SNLI-VE premises from id 900000000 on)
    nlvr/               train/, dev/, test1/
    vqa/                train2014/, val2014/, test2015/
    vg/                 image/
    imagenet/           train/<color>_<shape>/, val/<color>_<shape>/
    tokenizer/          vocab.txt, tokenizer_config.json

Objects in ``scenes.json`` are listed left to right; ``bbox`` is ``[x0, y0, x1, y1]`` in pixels with
exclusive ``x1`` / ``y1``.

Positions inside a picture ("on the left", "what shape is on the left?") appear in captions and VQA
only. NLVR2 statements use "left" / "right" solely to name the left or right picture of the pair,
because the NLVR2 loader swaps the two pictures at random and exchanges those two words.

SNLI-VE hypotheses are left out of the WordPiece vocabulary (their new words, "made", "wood", split into
letter pieces), so that adding the split did not change the token ids of models trained on older worlds.

Usage::

    python -m data.synthetic --out ROOT [--n N] [--image-size S] [--seed K]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import unicodedata
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data.utils import pre_caption
from data.vqa import VOCAB_FILES, answer_vocab_files, build_answer_vocab

VERSION = 5  # bumped whenever the generator writes different files for the same arguments

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
}
COLOR_NAMES = tuple(COLORS)
CLASSES = tuple(sorted(f"{c}_{s}" for c in COLOR_NAMES for s in SHAPES))

MIN_N = len(CLASSES)
MIN_EVAL = 20
MIN_IMAGE_SIZE = 24
QUESTIONS_PER_IMAGE = 3
NLVR_STATEMENTS_PER_PAIR = 2  # each yields one true and one false example
VE_LABELS = ("entailment", "neutral", "contradiction")  # each premise image gets one hypothesis of each
VE_FIRST_ID = 900_000_000  # Flickr30K_ID of the first SNLI-VE premise; retrieval images count up from 1000

# Text the task scripts add around the world's own text; the vocabulary must cover it too.
EXTRA_TEXT = ("a picture of",)

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
_SLOT_WORDS = ("on the left", "in the middle", "on the right")
_SIDES = ("left", "right")
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_JPEG_QUALITY = 90

# Ordered content of a scene: ((color, shape), ...) from left to right.
Content = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    bbox: tuple[int, int, int, int]

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "bbox": list(self.bbox)}


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # left to right
    background: tuple[int, int, int]
    fills: tuple[tuple[int, int, int], ...]  # the drawn colour of each object, jittered around COLORS

    @property
    def content(self) -> Content:
        return tuple((o.color, o.shape) for o in self.objects)


def eval_split_size(n: int, n_eval: int | None = None) -> int:
    """Number of scenes in each held-out split (val / test) for ``n`` training scenes: ``n_eval`` when given (larger
    held-out splits tell smaller differences apart; the training splits do not change with it), else
    ``max(n // 4, MIN_EVAL)``."""
    return max(n // 4, MIN_EVAL) if n_eval is None else n_eval


# ----------------------------------------------------------------------------------------------
# Scenes


def _rng(seed: int, *stream: str) -> np.random.Generator:
    # One independent stream per (task, split): changing one task never shifts another's data.
    return np.random.default_rng([seed, zlib.crc32("/".join(stream).encode())])


def _random_content(rng: np.random.Generator, k: int) -> Content:
    # Objects in one scene never share both colour and shape, so "the red circle" is always one thing.
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    idx = rng.choice(len(pairs), size=k, replace=False)
    return tuple(pairs[i] for i in idx)


def _place(rng: np.random.Generator, content: Content, size: int, slots: Sequence[int] | None = None) -> Scene:
    k = len(content)
    if slots is None:
        slots = sorted(rng.choice(3, size=k, replace=False).tolist())
    slot_w = size / 3
    base_side = max(4, round(0.75 * slot_w))
    margin = max(1, round(0.08 * size))
    objects, fills = [], []
    for (color, shape), slot in zip(content, slots):
        side = max(4, round(base_side * rng.uniform(0.85, 1.0)))
        lo = int(np.ceil(slot * slot_w + 1))
        hi = int(np.floor((slot + 1) * slot_w - 1 - side))
        x0 = int(rng.integers(lo, max(lo, hi) + 1))
        y0 = int(rng.integers(margin, size - margin - side + 1))
        objects.append(Obj(shape, color, (x0, y0, x0 + side, y0 + side)))
        jitter = rng.integers(-15, 16, size=3)
        fills.append(tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255)))
    background = tuple(int(v) for v in rng.integers(230, 251, size=3))
    return Scene(tuple(objects), background, tuple(fills))


def _random_scene(rng: np.random.Generator, size: int, k: int | None = None) -> Scene:
    if k is None:
        k = int(rng.integers(1, 4))
    return _place(rng, _random_content(rng, k), size)


def _all_contents(k: int) -> list[Content]:
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    return list(itertools.permutations(pairs, k))


def max_unique_scenes() -> int:
    """How many scenes with pairwise different content exist (the cap on a val / test split)."""
    return sum(len(_all_contents(k)) for k in (1, 2, 3))


class _UniqueScenes:
    """Draws scenes whose content is new within one split, so retrieval has one right answer.

    Scenes whose *set* of objects is new are preferred: then even captions that list the objects in
    a fixed order, ignoring positions, single out one picture. Only when those run out does a scene
    repeat a set of objects in a new left-to-right order.
    """

    def __init__(self, rng: np.random.Generator, size: int):
        self.rng, self.size = rng, size
        self.seen_sets: set[frozenset] = set()
        self.seen: set[Content] = set()
        self.by_k = {k: _all_contents(k) for k in (1, 2, 3)}

    def __call__(self) -> Scene:
        first = int(self.rng.integers(1, 4))
        others = [k for k in (1, 2, 3) if k != first]
        order = [first, *(others[i] for i in self.rng.permutation(2))]
        for new_set in (True, False):
            for k in order:
                pool = [
                    c
                    for c in self.by_k[k]
                    if c not in self.seen and (not new_set or frozenset(c) not in self.seen_sets)
                ]
                if pool:
                    content = pool[int(self.rng.integers(len(pool)))]
                    self.seen.add(content)
                    self.seen_sets.add(frozenset(content))
                    return _place(self.rng, content, self.size)
        raise ValueError(f"no scene content left: a split can hold at most {max_unique_scenes()} distinct scenes")


def render(scene: Scene, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj, fill in zip(scene.objects, scene.fills):
        x0, y0, x1, y1 = obj.bbox
        box = (x0, y0, x1 - 1, y1 - 1)  # PIL boxes include their far edge
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    return image


# ----------------------------------------------------------------------------------------------
# Text


def _np(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _canonical(content: Content) -> Content:
    # A fixed order that ignores positions, so these captions stay true under a horizontal flip.
    return tuple(sorted(content, key=lambda cs: (SHAPES.index(cs[1]), COLOR_NAMES.index(cs[0]))))


def _slot(obj: Obj, size: int) -> int:
    return min(2, int(((obj.bbox[0] + obj.bbox[2]) / 2) // (size / 3)))


def captions(scene: Scene, size: int) -> list[str]:
    """Five true, complete descriptions of a scene; three ignore positions, two state them."""
    objs = scene.objects
    k = len(objs)
    listed = _join([_np(c, s) for c, s in _canonical(scene.content)])
    ltr = [_np(o.color, o.shape) for o in objs]
    if k == 1:
        positional = f"{ltr[0]} {_SLOT_WORDS[_slot(objs[0], size)]}"
        from_right = f"a single {objs[0].color} {objs[0].shape}"
    elif k == 2:
        positional = f"{ltr[0]} to the left of {ltr[1]}"
        from_right = f"{ltr[1]} on the right and {ltr[0]} on the left"
    else:
        positional = f"{_join(ltr)} from left to right"
        from_right = f"{ltr[2]} on the right, {ltr[1]} in the middle and {ltr[0]} on the left"
    counted = f"{_NUMBER_WORDS[k]} shape{'s' if k > 1 else ''}: {listed}"
    # Phrased as NLVR2 statements are ("... image contains exactly two shapes"), so that pre-training on
    # captions covers the language the NLVR2 demo fine-tunes on, as web captions do for the real NLVR2.
    stated = f"an image that contains exactly {_count_phrase(k)}: {listed}"
    return [listed, counted, positional, from_right, stated]


def _count_phrase(k: int) -> str:
    return f"{_NUMBER_WORDS[k]} shape{'s' if k != 1 else ''}"


@dataclass(frozen=True)
class _Template:
    """An NLVR2 statement family: a grid of parameters, a sentence for each, and its truth."""

    name: str
    params: list[tuple]
    text: Callable[[tuple], str]
    truth: Callable[[Scene, Scene, tuple], bool]


def _has(scene: Scene, color: str | None = None, shape: str | None = None) -> bool:
    return any((color is None or o.color == color) and (shape is None or o.shape == shape) for o in scene.objects)


def _side(left: Scene, right: Scene, side: str) -> Scene:
    return left if side == "left" else right


def _nlvr_templates() -> list[_Template]:
    return [
        _Template(
            "contains",
            [(side, c, s) for side in _SIDES for c in COLOR_NAMES for s in SHAPES],
            lambda p: f"the {p[0]} image contains {_np(p[1], p[2])}.",
            lambda a, b, p: _has(_side(a, b, p[0]), p[1], p[2]),
        ),
        _Template(
            "count",
            [(side, k) for side in _SIDES for k in (1, 2, 3)],
            lambda p: f"the {p[0]} image contains exactly {_count_phrase(p[1])}.",
            lambda a, b, p: len(_side(a, b, p[0]).objects) == p[1],
        ),
        _Template(
            "more",
            [("left",), ("right",), ("same",)],
            lambda p: (
                "both images contain the same number of shapes."
                if p[0] == "same"
                else f"the {p[0]} image has more shapes than the {'right' if p[0] == 'left' else 'left'} image."
            ),
            lambda a, b, p: {
                "left": len(a.objects) > len(b.objects),
                "right": len(b.objects) > len(a.objects),
                "same": len(a.objects) == len(b.objects),
            }[p[0]],
        ),
        _Template(
            "both_shape",
            [(s,) for s in SHAPES],
            lambda p: f"both images contain a {p[0]}.",
            lambda a, b, p: _has(a, shape=p[0]) and _has(b, shape=p[0]),
        ),
        _Template(
            "both_color",
            [(c,) for c in COLOR_NAMES],
            lambda p: f"both images contain a {p[0]} shape.",
            lambda a, b, p: _has(a, color=p[0]) and _has(b, color=p[0]),
        ),
        _Template(
            "total",
            [(k,) for k in range(2, 7)],
            lambda p: f"there are {_NUMBER_WORDS[p[0]]} shapes in total.",
            lambda a, b, p: len(a.objects) + len(b.objects) == p[0],
        ),
        _Template(
            "exactly_one",
            [(s,) for s in SHAPES],
            lambda p: f"exactly one image contains a {p[0]}.",
            lambda a, b, p: _has(a, shape=p[0]) != _has(b, shape=p[0]),
        ),
    ]


_TEMPLATES = _nlvr_templates()
NLVR_FAMILIES = tuple(t.name for t in _TEMPLATES)
# Every sentence a template can write, as the NLVR2 dataset hands it to the model (``pre_caption``), with its
# family. Both sides are among each side-bearing template's parameters, so a left/right-swapped sentence is
# listed too.
_FAMILY_OF = {pre_caption(t.text(p), 1000): t.name for t in _TEMPLATES for p in t.params}


def nlvr_family(sentence: str) -> str | None:
    """The statement family ("contains", "count", "more", ...) of one of the world's NLVR2 sentences, raw or
    as the dataset gives it; ``None`` for a sentence the world never writes (e.g. any real NLVR2 sentence)."""
    return _FAMILY_OF.get(pre_caption(sentence, 1000))


def _near_miss(rng: np.random.Generator, template: _Template, left: Scene, right: Scene) -> tuple[str, str] | None:
    """A true statement and a false one that differs from it in a single parameter."""
    truths = {p: template.truth(left, right, p) for p in template.params}
    options = []
    for p, ok in truths.items():
        if not ok:
            continue
        misses = [q for q, q_ok in truths.items() if not q_ok and sum(x != y for x, y in zip(p, q)) == 1]
        options.extend((p, q) for q in misses)
    if not options:
        return None
    p, q = options[int(rng.integers(len(options)))]
    return template.text(p), template.text(q)


def nlvr_statements(rng: np.random.Generator, left: Scene, right: Scene, count: int) -> list[tuple[str, bool]]:
    """``count`` (true, false) statement pairs about an image pair, each pair from its own template."""
    out: list[tuple[str, bool]] = []
    for t in rng.permutation(len(_TEMPLATES)):
        pair = _near_miss(rng, _TEMPLATES[t], left, right)
        if pair is not None:
            out += [(pair[0], True), (pair[1], False)]
        if len(out) == 2 * count:
            break
    return out


def _yes_no(rng: np.random.Generator, scene: Scene, want_yes: bool) -> tuple[str, str]:
    by_shape = [s for s in SHAPES if _has(scene, shape=s) == want_yes]
    by_color = [c for c in COLOR_NAMES if _has(scene, color=c) == want_yes]
    kinds = [k for k, pool in (("shape", by_shape), ("color", by_color)) if pool]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "shape":
        return f"is there a {by_shape[int(rng.integers(len(by_shape)))]}?", "yes" if want_yes else "no"
    return f"is there a {by_color[int(rng.integers(len(by_color)))]} shape?", "yes" if want_yes else "no"


def vqa_questions(rng: np.random.Generator, scene: Scene, want_yes: bool) -> list[tuple[str, str]]:
    """One yes/no question with the requested answer plus open questions of distinct kinds."""
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    open_kinds: list[Callable[[], tuple[str, str]]] = [
        lambda: ("how many shapes are there?", _NUMBER_WORDS[len(objs)]),
    ]
    unique_shapes = [s for s in SHAPES if shapes.count(s) == 1]
    if unique_shapes:

        def color_of() -> tuple[str, str]:
            s = unique_shapes[int(rng.integers(len(unique_shapes)))]
            return f"what color is the {s}?", colors[shapes.index(s)]

        open_kinds.append(color_of)
    unique_colors = [c for c in COLOR_NAMES if colors.count(c) == 1]
    if unique_colors:

        def shape_of() -> tuple[str, str]:
            c = unique_colors[int(rng.integers(len(unique_colors)))]
            return f"what shape is {c}?", shapes[colors.index(c)]

        open_kinds.append(shape_of)
    if len(objs) >= 2:
        open_kinds.append(lambda: ("what shape is on the left?", objs[0].shape))
        open_kinds.append(lambda: ("what color is the shape on the right?", objs[-1].color))
    picked = rng.choice(len(open_kinds), size=min(QUESTIONS_PER_IMAGE - 1, len(open_kinds)), replace=False)
    qas = [_yes_no(rng, scene, want_yes)] + [open_kinds[i]() for i in picked]
    return [qas[i] for i in rng.permutation(len(qas))]


def _balanced_flags(rng: np.random.Generator, m: int) -> list[bool]:
    flags = [i < (m + 1) // 2 for i in range(m)]
    return [flags[i] for i in rng.permutation(m)]


def _ve_there_is(color: str, shape: str) -> str:
    return f"there is {_np(color, shape)}."


def _ve_count(k: int) -> str:
    return f"the image contains exactly {_count_phrase(k)}."


def _ve_wood(color: str, shape: str) -> str:
    return f"the {color} {shape} is made of wood."


def ve_hypotheses(rng: np.random.Generator, scene: Scene, wood_contradiction: bool) -> dict[str, str]:
    """One SNLI-VE hypothesis per label, each true to its label for ``scene``.

    Entailment: a present object ("there is a red circle.") or the true count ("the image contains exactly two
    shapes."). Neutral: "the {color} {shape} is made of wood." about a present object (the picture cannot say).
    Contradiction: the wood sentence about an absent object when ``wood_contradiction``, else an absent object
    or a wrong count. With half the contradictions of each kind, no sentence form tells the label: each form
    goes with two labels, and the objects and counts it names are distributed alike under both.
    """
    present = list(scene.content)
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    k = len(present)

    def pick(pool: Sequence):
        return pool[int(rng.integers(len(pool)))]

    entailment = _ve_there_is(*pick(present)) if rng.integers(2) == 0 else _ve_count(k)
    neutral = _ve_wood(*pick(present))
    if wood_contradiction:
        contradiction = _ve_wood(*pick(absent))
    elif rng.integers(2) == 0:
        contradiction = _ve_there_is(*pick(absent))
    else:
        contradiction = _ve_count(pick([j for j in (1, 2, 3) if j != k]))
    return {"entailment": entailment, "neutral": neutral, "contradiction": contradiction}


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _is_punct(ch: str) -> bool:
    # BERT's basic tokenizer treats all non-alphanumeric ASCII and Unicode P* as punctuation.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def basic_tokens(text: str) -> list[str]:
    """Lower-case words and single punctuation marks, as BERT's basic tokenizer splits them."""
    out: list[str] = []
    for word in text.lower().split():
        current = ""
        for ch in word:
            if _is_punct(ch):
                if current:
                    out.append(current)
                out.append(ch)
                current = ""
            else:
                current += ch
        if current:
            out.append(current)
    return out


def build_vocab(texts: Sequence[str]) -> list[str]:
    words = {t for text in texts for t in basic_tokens(text)}
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    # Every ASCII punctuation mark, so that a prompt or query typed by hand never meets [UNK].
    punctuation = [chr(c) for c in range(33, 127) if _is_punct(chr(c))]
    body = sorted(words | set(chars) | set(punctuation))
    return list(_SPECIAL_TOKENS) + body + [f"##{c}" for c in chars]


# ----------------------------------------------------------------------------------------------
# World assembly


@dataclass
class _World:
    size: int
    images: dict[str, Scene] = field(default_factory=dict)  # path relative to ROOT -> scene
    annotations: dict[str, Any] = field(default_factory=dict)  # path relative to ROOT -> JSON data
    texts: list[str] = field(default_factory=list)

    def add(self, path: str, scene: Scene) -> None:
        if path in self.images:
            raise AssertionError(f"image path used twice: {path}")
        self.images[path] = scene

    def annotate(self, name: str, data: Any) -> None:
        self.annotations[f"annotation/{name}"] = data


def _coco_gt(entries: list[dict]) -> dict:
    annotations, images = [], []
    for entry in entries:
        image_id = int(Path(entry["image"]).stem.rsplit("_", 1)[-1])
        images.append({"id": image_id})
        for caption in entry["caption"]:
            annotations.append({"image_id": image_id, "caption": caption, "id": len(annotations)})
    return {"annotations": annotations, "images": images, "info": {}, "licenses": [], "type": "captions"}


def _caption_splits(world: _World, seed: int, n: int, n_eval: int, family: str) -> None:
    size = world.size
    next_id = 1 if family == "coco" else 1000
    for split, count in (("train", n), ("val", n_eval), ("test", n_eval)):
        rng = _rng(seed, family, split)
        draw = (lambda r=rng: _random_scene(r, size)) if split == "train" else _UniqueScenes(rng, size)
        entries = []
        for _ in range(count):
            image_id, next_id = next_id, next_id + 1
            if family == "coco":
                folder = "train2014" if split == "train" else "val2014"
                rel = f"{folder}/COCO_{folder}_{image_id:012d}.jpg"
                key = f"coco_{image_id}"
            else:
                rel = f"flickr30k-images/{image_id}.jpg"
                key = str(image_id)
            scene = draw()
            world.add(f"{family}/{rel}", scene)
            texts = captions(scene, size)
            world.texts += texts
            if split == "train":
                entries += [{"image": rel, "caption": t, "image_id": key} for t in texts]
            else:
                entries.append({"image": rel, "caption": texts})
        if family == "coco":
            world.annotate(f"coco_karpathy_{split}.json", entries)
            if split != "train":
                world.annotate(f"coco_gt/coco_karpathy_{split}_gt.json", _coco_gt(entries))
        else:
            world.annotate(f"flickr30k_{split}.json", entries)


def _nlvr_splits(world: _World, seed: int, n: int, n_eval: int) -> None:
    # NLVR2 is the hardest task of the world (counting and comparing across two images), so its training
    # split gets twice as many image pairs (n, i.e. 2n images) as the other tasks have scenes.
    for split, folder, pairs in (("train", "train", n), ("dev", "dev", n_eval // 2), ("test", "test1", n_eval // 2)):
        rng = _rng(seed, "nlvr", split)
        entries = []
        for pair in range(max(1, pairs)):
            left, right = _random_scene(rng, world.size), _random_scene(rng, world.size)
            paths = [f"{folder}/{folder}-{pair}-0-img{i}.png" for i in (0, 1)]
            world.add(f"nlvr/{paths[0]}", left)
            world.add(f"nlvr/{paths[1]}", right)
            statements = nlvr_statements(rng, left, right, NLVR_STATEMENTS_PER_PAIR)
            for i in rng.permutation(len(statements)):
                sentence, label = statements[i]
                entries.append({"images": paths, "sentence": sentence, "label": "True" if label else "False"})
                world.texts.append(sentence)
        world.annotate(f"nlvr_{split}.json", entries)


def _vqa_splits(world: _World, seed: int, n: int, n_eval: int) -> None:
    question_id = 0
    answers: set[str] = set()
    for split, folder, count in (("train", "train2014", n), ("val", "val2014", n_eval), ("test", "test2015", n_eval)):
        rng = _rng(seed, "vqa", split)
        entries = []
        for image_index, want_yes in enumerate(_balanced_flags(rng, count)):
            rel = f"{folder}/COCO_{folder}_{image_index + 1:012d}.jpg"
            scene = _random_scene(rng, world.size)
            world.add(f"vqa/{rel}", scene)
            for question, answer in vqa_questions(rng, scene, want_yes):
                question_id += 1
                entry = {
                    "question_id": question_id,
                    "question": question,
                    "answer": [answer] * 10,
                    "image": rel,
                    "dataset": "vqa",
                }
                if split == "test":
                    # Not in the official test file; dataset code must not depend on it.
                    entry = {k: entry[k] for k in ("question_id", "question", "image", "dataset", "answer")}
                entries.append(entry)
                answers.add(answer)
                world.texts += [question, answer]
        world.annotate(f"vqa_{split}.json", entries)

    rng = _rng(seed, "vg", "train")
    entries = []
    for image_index, want_yes in enumerate(_balanced_flags(rng, max(n // 2, MIN_EVAL))):
        rel = f"image/{image_index + 1}.jpg"
        scene = _random_scene(rng, world.size)
        world.add(f"vg/{rel}", scene)
        for question, answer in vqa_questions(rng, scene, want_yes):
            entries.append({"question": question, "answer": answer, "image": rel, "dataset": "vg"})
            answers.add(answer)
            world.texts += [question, answer]
    world.annotate("vg_qa.json", entries)
    world.annotate("answer_list.json", sorted(answers))

    # ViLT's classifier vocabulary; every answer counts, since the world is small. The answers stay as the world's
    # annotators write them ("two", not the normalised "2"): soft scores count the answers as written (PuMer), and
    # the official accuracy compares unanimous answers unnormalised, so a normalised label would score nothing.
    vocab_entries = [e for name in VOCAB_FILES for e in world.annotations[f"annotation/{name}.json"]]
    for name, data in answer_vocab_files(build_answer_vocab(vocab_entries, min_count=1, normalize=False)).items():
        world.annotate(name, data)


def _ve_splits(world: _World, seed: int, n: int, n_eval: int) -> None:
    """SNLI-VE in its official jsonl layout; premises are new Flickr30k-style pictures with a true caption.

    Hypotheses are not added to ``world.texts``: the WordPiece vocabulary stays that of the worlds before this
    split existed (its letter pieces spell the new words).
    """
    image_id = VE_FIRST_ID
    for split, count in (("train", n), ("dev", n_eval), ("test", n_eval)):
        rng = _rng(seed, "snli_ve", split)
        entries = []
        for wood_contradiction in _balanced_flags(rng, count):
            flickr_id, image_id = str(image_id), image_id + 1
            scene = _random_scene(rng, world.size)
            world.add(f"flickr/flickr30k-images/{flickr_id}.jpg", scene)
            texts = captions(scene, world.size)
            premise = texts[int(rng.integers(len(texts)))]
            hypotheses = ve_hypotheses(rng, scene, wood_contradiction)
            for i in rng.permutation(len(VE_LABELS)):
                label = VE_LABELS[i]
                entries.append(
                    {
                        "pairID": f"{flickr_id}.jpg#0r1{label[0]}",  # the official "<image>.jpg#<caption>r1<e|n|c>"
                        "Flickr30K_ID": flickr_id,
                        "sentence1": premise,
                        "sentence2": hypotheses[label],
                        "gold_label": label,
                    }
                )
        world.annotate(f"snli_ve_{split}.jsonl", entries)


def _imagenet_splits(world: _World, seed: int, n: int, n_eval: int) -> None:
    for split, count in (("train", n), ("val", n_eval)):
        rng = _rng(seed, "imagenet", split)
        per_class = max(1, count // len(CLASSES))
        for name in CLASSES:
            color, shape = name.split("_")
            for i in range(per_class):
                scene = _place(rng, ((color, shape),), world.size)
                world.add(f"imagenet/{split}/{name}/{name}_{i:05d}.JPEG", scene)


def _build(n: int, image_size: int, seed: int, n_eval: int | None = None) -> _World:
    world = _World(image_size)
    n_eval = eval_split_size(n, n_eval)
    _caption_splits(world, seed, n, n_eval, "coco")
    _caption_splits(world, seed, n, n_eval, "flickr")
    _nlvr_splits(world, seed, n, n_eval)
    _vqa_splits(world, seed, n, n_eval)
    _imagenet_splits(world, seed, n, n_eval)
    _ve_splits(world, seed, n, n_eval)
    return world


def _entry_count(rel: str, data: Any) -> int:
    # COCO ground-truth files count their captions; answer -> label maps count their answers.
    return len(data["annotations"]) if rel.startswith("annotation/coco_gt/") else len(data)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) + "\n")


def _write_jsonl(path: Path, entries: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def _write(
    root: Path, world: _World, n: int, image_size: int, seed: int, progress: bool, n_eval: int | None = None
) -> None:
    for path in tqdm(sorted(world.images), desc="rendering shapes world", unit="img", disable=not progress):
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        image = render(world.images[path], image_size)
        if target.suffix == ".png":
            image.save(target, format="PNG")
        else:
            image.save(target, format="JPEG", quality=_JPEG_QUALITY)

    files: dict[str, int] = {}
    for rel, data in world.annotations.items():
        (_write_jsonl if rel.endswith(".jsonl") else _write_json)(root / rel, data)
        files[rel] = _entry_count(rel, data)
    scenes = {p: [o.to_json() for o in world.images[p].objects] for p in sorted(world.images)}
    _write_json(root / "scenes.json", scenes)
    files["scenes.json"] = len(scenes)

    vocab = build_vocab(world.texts + list(EXTRA_TEXT))
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    _write_json(
        root / "tokenizer" / "tokenizer_config.json",
        {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512},
    )
    files["tokenizer/vocab.txt"] = len(vocab)

    # Written last: its presence marks a complete world.
    meta = {"version": VERSION, "seed": seed, "n": n, "image_size": image_size}
    if n_eval is not None:
        meta["n_eval"] = n_eval
    _write_json(root / "world.json", {**meta, "files": files})


def _check_args(n: int, image_size: int, seed: int, n_eval: int | None = None) -> None:
    if not isinstance(n, int) or n < MIN_N:
        raise ValueError(f"n must be an integer >= {MIN_N} (one training image per class), got {n!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if n_eval is not None and (not isinstance(n_eval, int) or n_eval < MIN_EVAL):
        raise ValueError(f"n_eval must be an integer >= {MIN_EVAL}, got {n_eval!r}")
    if eval_split_size(n, n_eval) > max_unique_scenes():
        raise ValueError(
            f"n={n}, n_eval={n_eval} asks for val/test splits of {eval_split_size(n, n_eval)} distinct scenes, but "
            f"only {max_unique_scenes()} exist"
        )


def world_matches(out: str | Path, n: int, image_size: int, seed: int, n_eval: int | None = None) -> bool:
    """Whether ``out`` holds a complete world generated with these arguments."""
    out = Path(out)
    try:
        meta = json.loads((out / "world.json").read_text())
    except (OSError, ValueError):
        return False
    expected = {"version": VERSION, "seed": seed, "n": n, "image_size": image_size, "n_eval": n_eval}
    if any(meta.get(k) != v for k, v in expected.items()):
        return False
    return all((out / rel).is_file() for rel in meta.get("files", {}))


def _install(tmp: Path, out: Path) -> None:
    """Move a finished world into place, replacing an older world but nothing else."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "world.json").is_file()):
            raise FileExistsError(f"{out} exists and is not a synthetic world; refusing to replace it")
        graveyard = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, graveyard / "world")
        shutil.rmtree(graveyard, ignore_errors=True)
    os.replace(tmp, out)


def _generate(
    out: Path, n: int, image_size: int, seed: int, progress: bool, reuse: bool, n_eval: int | None = None
) -> Path:
    _check_args(n, image_size, seed, n_eval)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A crash leaves only a hidden temporary directory, never a half world under ``out``.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(tmp, _build(n, image_size, seed, n_eval), n, image_size, seed, progress, n_eval)
        if reuse and world_matches(out, n, image_size, seed, n_eval):  # another process finished first
            shutil.rmtree(tmp)
            return out
        try:
            _install(tmp, out)
        except OSError:
            if reuse and world_matches(out, n, image_size, seed, n_eval):
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_world(
    out: str | Path, n: int = 600, image_size: int = 64, seed: int = 0, progress: bool = True, n_eval: int | None = None
) -> Path:
    """Generate the world into ``out`` (replacing a previous world there) and return ``out``."""
    return _generate(Path(out), n, image_size, seed, progress, reuse=False, n_eval=n_eval)


def ensure_world(
    out: str | Path, n: int = 600, image_size: int = 64, seed: int = 0, progress: bool = True, n_eval: int | None = None
) -> Path:
    """Return ``out`` after making sure it holds the world for these arguments, generating it if not."""
    out = Path(out)
    if world_matches(out, n, image_size, seed, n_eval):
        return out
    return _generate(out, n, image_size, seed, progress, reuse=True, n_eval=n_eval)


def ensure_demo_world(world: Mapping[str, Any], progress: bool = True) -> Path:
    """:func:`ensure_world` for a config's ``world`` section (``dir``, ``n``, ``image_size``, ``seed``, optional
    ``n_eval``); a relative ``dir`` is taken from the working directory."""
    return ensure_world(
        Path(world["dir"]).absolute(),
        n=world["n"],
        image_size=world["image_size"],
        seed=world["seed"],
        progress=progress,
        n_eval=world.get("n_eval"),
    )


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Render the built-in shapes world: pictures of 1-3 coloured shapes with captions "
        "(COCO, Flickr30k), NLVR2 statements, VQA / Visual Genome questions, SNLI-VE hypotheses, an ImageNet-style "
        "class tree and a WordPiece vocabulary, all in the official annotation formats. "
        "The same arguments always give the same files.",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="directory to write the world into (replaced if it already holds a world)",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=600,
        help=f"training scenes per task; val and test splits get max(n // 4, {MIN_EVAL}) each (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size", type=int, default=64, help="side of the square RGB pictures in pixels (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--n-eval", type=int, default=None, help="scenes in each val / test split instead of max(n // 4, ...)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = make_world(
            args.out, n=args.n, image_size=args.image_size, seed=args.seed, progress=not args.quiet, n_eval=args.n_eval
        )
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    print(out)
    return out


if __name__ == "__main__":
    main()
