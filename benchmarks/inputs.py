"""What each task's model is fed when it is measured: one place for every dummy input.

Per task, three kinds of :class:`Probe` (a ready-to-run call plus the number of samples it serves):

* ``seed``: the inputs and forward mode with which the seeds printed their FLOPs (UPop's
  ``print_params_and_flops``; DeiT in ``compress_deit.py``). Image sizes come from the model (the
  seeds hard-code 384 / 480 / 224, the sizes of their configs):

  ============== ============================================================== ======================
  task           inputs                                                         forward
  ============== ============================================================== ======================
  nlvr           2 images (one pair) + one fixed ~20-word sentence              inference logits
  caption        1 image + "a picture of car driving down a road ..."          teacher-forced LM loss
  vqa            1 image, 32 fixed questions, 47 fixed answers, n=[1]           training loss
  retrieval      1 image + 1 caption (padded to 35), alpha 0, random idx        full training step
  classification 1 image                                                        inference logits
  ============== ============================================================== ======================

  VQA: every question attends to the one image (broadcast), and the seed's ``for b, n in
  enumerate(n)`` with ``n=[1]`` keeps only the first question's states, so all 47 answers are decoded
  against that one question (again broadcast). Retrieval runs both momentum towers, ITC against the
  queues and three ITM passes (positive + two negatives).
* ``batch``: the same forward mode on a batch of the task's evaluation loader, for costs that depend
  on the input (token pruning). Texts the evaluation split lacks come from the seed: captioning uses
  the seed's caption for every image; VQA decodes the seed's answers against the batch's first
  question; retrieval pairs each image with its first caption. On a dense model, a batch shaped like
  the seed's inputs costs exactly what the seed's inputs cost.
* ``speed``: a deployment-like inference call at a chosen batch size, for latency and throughput:
  NLVR logits, captioning's teacher-forced LM pass (no beam search: its length depends on the
  weights), VQA's training forward with one answer per question, retrieval's ITC embeddings of both
  modalities plus the ITM logit of each pair, classification logits.

Everything is written against the models' public forward signatures.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from data.nlvr import NLVRPairBatch
from models.blip import lm_targets, tokenize

__all__ = ["TASKS", "Probe", "batch_probe", "image_size", "seed_probe", "speed_probe"]

# The seeds' dummy texts (UPop utils.print_params_and_flops).
NLVR_SENTENCE = (
    "Params and FLOPs test, test params and FLOPs, params and FLOPs test, test params and FLOPs, params and FLOPs test"
)
CAPTION = "a picture of car driving down a road behind a lot of sheep"
RETRIEVAL_CAPTION = "car driving down a road behind a lot of sheep"
VQA_QUESTIONS = [
    "where is the yellow pedestrian crossing?",
    "how many people are in the photo?",
    "where are boats?",
    "what is in the window?",
    "what color is the road?",
    "does the banana need the pillow?",
    "do you need a chopstick?",
    "what is the man sitting on?",
    "who is wearing a white top?",
    "what is the man studying?",
    "what color is the roof?",
    "how many people are in the photo?",
    "what is beyond the beach?",
    "what is the woman doing to the pizza?",
    "what color is the man's shirt?",
    "where is the man surfing?",
    "what is the person with the knife doing?",
    "when was the picture taken of the clock tower?",
    "what is blue color?",
    "how many people are there?",
    "how many people in the picture?",
    "who is to the right?",
    "what country is shown on the placemat?",
    "how many people are in this picture?",
    "where is the cat?",
    "how many spoons are in the picture?",
    "are the names on the scoreboard the names of people?",
    "what is the sign?",
    "what are the people playing?",
    "what is the shoreline?",
    "what is on the police officers head?",
    "who are eating on the table?",
]
VQA_ANSWERS = [
    "on sign", "1", "on water", "cat in window", "gray", "no", "no", "surfboard", "tennis player",
    "science project", "attendance list", "science", "school projects", "paper", "speech", "no idea",
    "gray and green", "four", "hills", "taking picture", "taking photo", "photographing it", "smiling",
    "s", "gray", "in ocean", "cutting cake", "early morning", "umbrella", "one", "three", "man", "italy",
    "sicily", "italia", "australia", "zero", "on dashboard", "1", "yes", "newport beach sacramento", "no",
    "road closed", "nintendo wii", "rocks", "hats", "no one",
]  # fmt: skip
DUMMY_TEXTS = [NLVR_SENTENCE, CAPTION, RETRIEVAL_CAPTION, *VQA_QUESTIONS, *VQA_ANSWERS]

TASKS = ("nlvr", "caption", "vqa", "retrieval", "classification")


@dataclass
class Probe:
    """A call to count or time. ``samples`` is what its cost is divided by (pairs, images);
    ``mutates`` marks a training step that updates model state (momentum towers, queues), which the
    caller must restore; ``inputs`` says in words what is fed."""

    run: Callable[[], Any]
    samples: int
    inputs: str
    mutates: bool = False


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def image_size(model: nn.Module) -> tuple[int, int]:
    """The input size the model's image encoder was built for."""
    vit = getattr(model, "visual_encoder", model)
    patch_embed = getattr(vit, "patch_embed", None)
    if patch_embed is None:
        raise TypeError(f"{type(model).__name__} has no visual_encoder.patch_embed or patch_embed to size images by")
    return tuple(patch_embed.img_size)


def _images(model: nn.Module, n: int) -> Tensor:
    # Drawn on the CPU with a fixed seed (a meta device has no generator), then moved.
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, *image_size(model), generator=g).to(_device(model))


def _tokens(model: nn.Module, texts: Sequence[str]) -> int:
    """Length of ``texts`` tokenised together with padding to the longest, [CLS]/[SEP] included."""
    return int(model.tokenizer(list(texts), padding="longest", return_tensors="pt").input_ids.shape[1])


def _cycle(items: Sequence[str], n: int) -> list[str]:
    return list(itertools.islice(itertools.cycle(items), n))


# ------------------------------------------------------------------------------------------- NLVR2


def _nlvr(model: nn.Module, images: Tensor, texts: list[str], note: str = "") -> Probe:
    n = len(texts)
    what = f"{2 * n} images {'x'.join(map(str, images.shape[-2:]))} + {n} sentence(s) of {_tokens(model, texts)} tokens"
    return Probe(lambda: model(images, texts), n, what + note + "; inference logits")


def _fitted_sentence(model: nn.Module) -> tuple[str, str]:
    """The seed's sentence, cut word by word to the text encoder's position limit if it exceeds it
    (the NLVR2 model does not truncate; a small demo vocabulary can spell the sentence out in more
    pieces than a demo model has positions). Returns (sentence, note for the report)."""
    limit = model.text_encoder.embeddings.position_embeddings.num_embeddings
    words = NLVR_SENTENCE.split(" ")
    while len(words) > 1 and _tokens(model, [" ".join(words)]) > limit:
        words.pop()
    if len(words) == len(NLVR_SENTENCE.split(" ")):
        return NLVR_SENTENCE, ""
    return " ".join(words), f" (the seed's sentence cut to {len(words)} words to fit {limit} positions)"


def _nlvr_seed(model: nn.Module) -> Probe:
    sentence, note = _fitted_sentence(model)
    return _nlvr(model, _images(model, 2), [sentence], note)


def _nlvr_batch(model: nn.Module, batch: Sequence[Any], dataset: Any) -> Probe:
    if isinstance(batch, NLVRPairBatch):  # statements grouped by image pair: measured as BLIP runs them, one by one
        image0, image1 = batch.images[batch.pairs[:, 0]], batch.images[batch.pairs[:, 1]]
        text = batch.text
    else:
        image0, image1, text, _ = batch
    return _nlvr(model, torch.cat([image0, image1]).to(_device(model)), list(text))


def _nlvr_speed(model: nn.Module, batch_size: int) -> Probe:
    sentence, note = _fitted_sentence(model)
    return _nlvr(model, _images(model, 2 * batch_size), [sentence] * batch_size, note)


# ------------------------------------------------------------------------------------------ caption


def _caption(model: nn.Module, images: Tensor) -> Probe:
    captions = [CAPTION] * images.shape[0]
    what = f"{images.shape[0]} image(s) + the seed's caption ({_tokens(model, captions[:1])} tokens) each"
    return Probe(lambda: model(images, captions), images.shape[0], what + "; teacher-forced LM loss")


def _caption_seed(model: nn.Module) -> Probe:
    return _caption(model, _images(model, 1))


def _caption_batch(model: nn.Module, batch: Sequence[Any], dataset: Any) -> Probe:
    return _caption(model, batch[0].to(_device(model)))


def _caption_speed(model: nn.Module, batch_size: int) -> Probe:
    return _caption(model, _images(model, batch_size))


# ---------------------------------------------------------------------------------------------- VQA


def _vqa_seed_forward(model: nn.Module, image: Tensor, questions: list[str], weights: Tensor) -> Tensor:
    """The seed's training forward with ``n=[1]``: only the first question's states reach the decoder."""
    states, q_mask = model.encode_question(image, questions)
    states, q_mask = states[:1], q_mask[:1]
    tok = model.tokenizer
    answers = tokenize(tok, VQA_ANSWERS, image.device, first=tok.bos_token_id, padding="longest")
    targets = lm_targets(tok, answers.input_ids)
    out = model.text_decoder(
        answers.input_ids, answers.attention_mask, states, q_mask, labels=targets, reduction="none"
    )
    return (weights * out.loss).sum() / image.shape[0]


def _vqa(model: nn.Module, images: Tensor, questions: list[str]) -> Probe:
    weights = torch.randn(len(VQA_ANSWERS), generator=torch.Generator().manual_seed(0)).to(images.device)
    what = (
        f"{images.shape[0]} image(s) {'x'.join(map(str, images.shape[-2:]))}, {len(questions)} questions "
        f"({_tokens(model, questions)} tokens), {len(VQA_ANSWERS)} answers ({_tokens(model, VQA_ANSWERS)} tokens) "
        "decoded against the first question; training loss"
    )
    return Probe(lambda: _vqa_seed_forward(model, images, questions, weights), images.shape[0], what)


def _vqa_seed(model: nn.Module) -> Probe:
    return _vqa(model, _images(model, 1), VQA_QUESTIONS)


def _vqa_batch(model: nn.Module, batch: Sequence[Any], dataset: Any) -> Probe:
    image, question = batch[0], batch[1]
    return _vqa(model, image.to(_device(model)), list(question))


def _vqa_speed(model: nn.Module, batch_size: int) -> Probe:
    images = _images(model, batch_size)
    questions = _cycle(VQA_QUESTIONS, batch_size)
    answers = _cycle(VQA_ANSWERS, batch_size)
    weights = torch.ones(batch_size, device=images.device)
    n = [1] * batch_size
    what = f"{batch_size} image(s) with one question and one answer each; training loss"
    return Probe(lambda: model(images, questions, answers, n, weights), batch_size, what)


# ---------------------------------------------------------------------------------------- retrieval


def _retrieval_step(model: nn.Module, images: Tensor, captions: list[str], idx: Tensor) -> Any:
    # Enqueueing only copies features (no arithmetic); it is skipped because it needs the queue
    # pointer's value (unavailable on the meta device) and a batch that divides the queue length.
    model._dequeue_and_enqueue = lambda *args: None
    try:
        return model(images, captions, 0.0, idx)
    finally:
        del model._dequeue_and_enqueue


def _retrieval(model: nn.Module, images: Tensor, captions: list[str], idx: Tensor) -> Probe:
    what = (
        f"{images.shape[0]} image(s) {'x'.join(map(str, images.shape[-2:]))} + 1 caption each (padded to "
        "35 tokens); training step with momentum towers, ITC against the queues, ITM on the positive "
        "and two negatives"
    )
    return Probe(lambda: _retrieval_step(model, images, captions, idx), images.shape[0], what, mutates=True)


def _retrieval_seed(model: nn.Module) -> Probe:
    idx = torch.randint(1000, 10000, (1,), generator=torch.Generator().manual_seed(0)).to(_device(model))
    return _retrieval(model, _images(model, 1), [RETRIEVAL_CAPTION], idx)


def _retrieval_batch(model: nn.Module, batch: Sequence[Any], dataset: Any) -> Probe:
    image, index = batch
    if dataset is None or not hasattr(dataset, "img2txt"):
        raise TypeError("retrieval batches need their evaluation dataset (its text and img2txt) for captions")
    captions = [dataset.text[dataset.img2txt[int(i)][0]] for i in index]
    return _retrieval(model, image.to(_device(model)), captions, index.to(_device(model)))


def _retrieval_speed(model: nn.Module, batch_size: int) -> Probe:
    images = _images(model, batch_size)
    captions = [RETRIEVAL_CAPTION] * batch_size

    def run() -> tuple[Tensor, Tensor]:
        embeds, image_feat = model.image_features(images)
        text = model.text_inputs(captions, images.device)
        text_feat = model.text_features(text.input_ids, text.attention_mask)
        ids = text.input_ids.clone()
        ids[:, 0] = model.tokenizer.enc_token_id
        return image_feat @ text_feat.t(), model.itm_logits(ids, text.attention_mask, embeds)

    what = f"{batch_size} image-caption pair(s): ITC embeddings of both + the ITM logit of each pair"
    return Probe(run, batch_size, what)


# ----------------------------------------------------------------------------------- classification


def _classification(model: nn.Module, images: Tensor) -> Probe:
    what = f"{images.shape[0]} image(s) {'x'.join(map(str, images.shape[-2:]))}; inference logits"
    return Probe(lambda: model(images), images.shape[0], what)


def _classification_batch(model: nn.Module, batch: Sequence[Any], dataset: Any) -> Probe:
    return _classification(model, batch[0].to(_device(model)))


_SEED = {
    "nlvr": _nlvr_seed,
    "caption": _caption_seed,
    "vqa": _vqa_seed,
    "retrieval": _retrieval_seed,
    "classification": lambda model: _classification(model, _images(model, 1)),
}
_BATCH = {
    "nlvr": _nlvr_batch,
    "caption": _caption_batch,
    "vqa": _vqa_batch,
    "retrieval": _retrieval_batch,
    "classification": _classification_batch,
}
_SPEED = {
    "nlvr": _nlvr_speed,
    "caption": _caption_speed,
    "vqa": _vqa_speed,
    "retrieval": _retrieval_speed,
    "classification": lambda model, b: _classification(model, _images(model, b)),
}


def _check(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def seed_probe(model: nn.Module, task: str) -> Probe:
    """The seed's dummy inputs and forward mode for ``task`` (see the module docstring)."""
    _check(task)
    return _SEED[task](model)


def batch_probe(model: nn.Module, task: str, batch: Sequence[Any], dataset: Any = None) -> Probe:
    """The seed's forward mode on one batch of ``task``'s evaluation loader (``dataset``: the loader's
    dataset, which retrieval needs for the captions)."""
    _check(task)
    return _BATCH[task](model, batch, dataset)


def speed_probe(model: nn.Module, task: str, batch_size: int) -> Probe:
    """The inference call timed for latency and throughput, at ``batch_size`` samples."""
    _check(task)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return _SPEED[task](model, batch_size)
