"""Cost probes of the BLIP task models: what each is fed when it is counted or timed, and the analytic cost of
the same call (:mod:`models.cost`). The models own them (``model.cost_probe(kind, ...)``); the benchmarks and the
entry scripts only call them.

Three kinds:

* ``seed``: the inputs and forward mode with which the seeds printed their FLOPs (UPop's
  ``print_params_and_flops``). Image sizes come from the model (the seeds hard-code 384 / 480, the sizes of
  their configs):

  ========= ============================================================== ======================
  task      inputs                                                         forward
  ========= ============================================================== ======================
  nlvr      2 images (one pair) + one fixed ~20-word sentence              inference logits
  caption   1 image + "a picture of car driving down a road ..."          teacher-forced LM loss
  vqa       1 image, 32 fixed questions, 47 fixed answers, n=[1]           training loss
  retrieval 1 image + 1 caption (padded to 35), alpha 0, random idx        full training step
  ========= ============================================================== ======================

  VQA: every question attends to the one image (broadcast), and the seed's ``for b, n in enumerate(n)`` with
  ``n=[1]`` keeps only the first question's states, so all 47 answers are decoded against that one question
  (again broadcast). Retrieval runs both momentum towers, ITC against the queues and three ITM passes (positive +
  two negatives).
* ``batch``: the same forward mode on a batch of the task's evaluation loader, for costs that depend on the
  input (token pruning). Texts the evaluation split lacks come from the seed: captioning uses the seed's caption
  for every image; VQA decodes the seed's answers against the batch's first question; retrieval pairs each image
  with its first caption. On a dense model, a batch shaped like the seed's inputs costs exactly what the seed's
  inputs cost.
* ``speed``: a deployment-like inference call at a chosen batch size, for latency and throughput: NLVR logits,
  captioning's teacher-forced LM pass (no beam search: its length depends on the weights), VQA's training
  forward with one answer per question, retrieval's ITC embeddings of both modalities plus the ITM logit of each
  pair.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from models.blip import lm_targets, tokenize
from models.cost import Cost, Probe, bert_cost, linear, lm_head_cost, random_images, vit_cost

__all__ = ["DUMMY_TEXTS", "KINDS", "blip_probe"]

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
KINDS = ("seed", "batch", "speed")
RETRIEVAL_TEXT_LENGTH = 35  # models.blip_retrieval.TEXT_LENGTH


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _tokens(model: nn.Module, texts: Sequence[str], **kw: Any) -> int:
    """Length of ``texts`` tokenised together (padding to the longest unless ``kw`` says otherwise)."""
    kw = {"padding": "longest", **kw}
    return int(model.tokenizer(list(texts), return_tensors="pt", **kw).input_ids.shape[1])


def _cycle(items: Sequence[str], n: int) -> list[str]:
    return list(itertools.islice(itertools.cycle(items), n))


def _grid(images: Tensor, model: nn.Module) -> tuple[int, int]:
    patch = model.visual_encoder.patch_embed.patch_size
    return images.shape[-2] // patch[0], images.shape[-1] // patch[1]


# ------------------------------------------------------------------------------------------- NLVR2


def _nlvr(model: nn.Module, images: Tensor, texts: list[str], note: str = "") -> Probe:
    n, length = len(texts), _tokens(model, texts)
    what = f"{2 * n} images {'x'.join(map(str, images.shape[-2:]))} + {n} sentence(s) of {length} tokens"

    def analytic() -> Cost:
        vision, tokens = vit_cost(model.visual_encoder, 2 * n, _grid(images, model))
        text, _ = bert_cost(model.text_encoder, n, length, encoder=[(n, tokens), (n, tokens)])
        head = sum(linear(n, m.in_features, m.out_features) for m in model.cls_head if isinstance(m, nn.Linear))
        return vision + text + head

    shape = {"pairs": n, "text_tokens": length}
    return Probe(lambda: model(images, texts), n, what + note + "; inference logits", analytic=analytic, shape=shape)


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


def _nlvr_batch(model: nn.Module, batch: Sequence[Any], dataset: Any) -> Probe:
    from data.nlvr import NLVRPairBatch

    if isinstance(batch, NLVRPairBatch):  # statements grouped by image pair: measured as BLIP runs them, one by one
        image0, image1 = batch.images[batch.pairs[:, 0]], batch.images[batch.pairs[:, 1]]
        text = batch.text
    else:
        image0, image1, text, _ = batch
    return _nlvr(model, torch.cat([image0, image1]).to(_device(model)), list(text))


def _nlvr_probe(model: nn.Module, kind: str, batch: Any, dataset: Any, batch_size: int) -> Probe:
    if kind == "batch":
        return _nlvr_batch(model, batch, dataset)
    n = 1 if kind == "seed" else batch_size
    sentence, note = _fitted_sentence(model)
    return _nlvr(model, random_images(model, 2 * n), [sentence] * n, note)


# ------------------------------------------------------------------------------------------ caption


def _caption(model: nn.Module, images: Tensor) -> Probe:
    n = images.shape[0]
    captions = [CAPTION] * n
    length = _tokens(model, captions[:1], truncation=True, max_length=40)
    what = f"{n} image(s) + the seed's caption ({length} tokens) each"

    def analytic() -> Cost:
        vision, tokens = vit_cost(model.visual_encoder, n, _grid(images, model))
        text, out = bert_cost(model.text_decoder.bert, n, length, encoder=[(n, tokens)])
        return vision + text + lm_head_cost(model.text_decoder, n * out)

    shape = {"images": n, "text_tokens": length}
    return Probe(lambda: model(images, captions), n, what + "; teacher-forced LM loss", analytic=analytic, shape=shape)


def _caption_probe(model: nn.Module, kind: str, batch: Any, dataset: Any, batch_size: int) -> Probe:
    if kind == "batch":
        return _caption(model, batch[0].to(_device(model)))
    return _caption(model, random_images(model, 1 if kind == "seed" else batch_size))


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


def _vqa_question_tokens(model: nn.Module, questions: Sequence[str]) -> int:
    return _tokens(model, questions, truncation=True, max_length=35)


def _vqa(model: nn.Module, images: Tensor, questions: list[str]) -> Probe:
    weights = torch.randn(len(VQA_ANSWERS), generator=torch.Generator().manual_seed(0)).to(images.device)
    n, q_len, a_len = images.shape[0], _vqa_question_tokens(model, questions), _tokens(model, VQA_ANSWERS)
    what = (
        f"{n} image(s) {'x'.join(map(str, images.shape[-2:]))}, {len(questions)} questions "
        f"({q_len} tokens), {len(VQA_ANSWERS)} answers ({a_len} tokens) decoded against the first question; "
        "training loss"
    )

    def analytic() -> Cost:
        vision, tokens = vit_cost(model.visual_encoder, n, _grid(images, model))
        question, q_out = bert_cost(model.text_encoder, len(questions), q_len, encoder=[(n, tokens)])
        answers = len(VQA_ANSWERS)
        decoder, a_out = bert_cost(model.text_decoder.bert, answers, a_len, encoder=[(1, q_out)])
        return vision + question + decoder + lm_head_cost(model.text_decoder, answers * a_out)

    shape = {"images": n, "questions": len(questions), "question_tokens": q_len, "answer_tokens": a_len}
    run = lambda: _vqa_seed_forward(model, images, questions, weights)  # noqa: E731
    return Probe(run, n, what, analytic=analytic, shape=shape)


def _vqa_speed(model: nn.Module, batch_size: int) -> Probe:
    images = random_images(model, batch_size)
    questions = _cycle(VQA_QUESTIONS, batch_size)
    answers = _cycle(VQA_ANSWERS, batch_size)
    weights = torch.ones(batch_size, device=images.device)
    n = [1] * batch_size
    q_len, a_len = _vqa_question_tokens(model, questions), _tokens(model, answers)
    what = f"{batch_size} image(s) with one question and one answer each; training loss"

    def analytic() -> Cost:
        vision, tokens = vit_cost(model.visual_encoder, batch_size, _grid(images, model))
        question, q_out = bert_cost(model.text_encoder, batch_size, q_len, encoder=[(batch_size, tokens)])
        decoder, a_out = bert_cost(model.text_decoder.bert, batch_size, a_len, encoder=[(batch_size, q_out)])
        return vision + question + decoder + lm_head_cost(model.text_decoder, batch_size * a_out)

    run = lambda: model(images, questions, answers, n, weights)  # noqa: E731
    return Probe(run, batch_size, what, analytic=analytic, shape={"question_tokens": q_len, "answer_tokens": a_len})


def _vqa_probe(model: nn.Module, kind: str, batch: Any, dataset: Any, batch_size: int) -> Probe:
    if kind == "seed":
        return _vqa(model, random_images(model, 1), VQA_QUESTIONS)
    if kind == "batch":
        return _vqa(model, batch[0].to(_device(model)), list(batch[1]))
    return _vqa_speed(model, batch_size)


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
    n = images.shape[0]
    what = (
        f"{n} image(s) {'x'.join(map(str, images.shape[-2:]))} + 1 caption each (padded to "
        f"{RETRIEVAL_TEXT_LENGTH} tokens); training step with momentum towers, ITC against the queues, ITM on the "
        "positive and two negatives"
    )

    def analytic() -> Cost:
        t, grid = RETRIEVAL_TEXT_LENGTH, _grid(images, model)
        vision, tokens = vit_cost(model.visual_encoder, n, grid)
        vision_m, _ = vit_cost(model.visual_encoder_m, n, grid)
        text, _ = bert_cost(model.text_encoder, n, t)
        text_m, _ = bert_cost(model.text_encoder_m, n, t)
        proj = sum(
            linear(n, m.in_features, m.out_features)
            for m in (model.vision_proj, model.vision_proj_m, model.text_proj, model.text_proj_m)
        )
        embed, queue = model.text_queue.shape
        itc = linear(n, embed, n + queue).scaled(4) + linear(n, embed, n).scaled(2)  # + hard-negative weights
        itm = bert_cost(model.text_encoder, n, t, encoder=[(n, tokens)])[0]
        itm = itm + bert_cost(model.text_encoder, 2 * n, t, encoder=[(2 * n, tokens)])[0]
        head = linear(3 * n, model.itm_head.in_features, model.itm_head.out_features)
        return vision + vision_m + text + text_m + proj + itc + itm + head

    run = lambda: _retrieval_step(model, images, captions, idx)  # noqa: E731
    return Probe(run, n, what, mutates=True, analytic=analytic, shape={"images": n, "text_tokens": 35})


def _retrieval_speed(model: nn.Module, batch_size: int) -> Probe:
    images = random_images(model, batch_size)
    captions = [RETRIEVAL_CAPTION] * batch_size

    def run() -> tuple[Tensor, Tensor]:
        embeds, atts, image_feat = model.image_features(images)
        text = model.text_inputs(captions, images.device)
        text_feat = model.text_features(text.input_ids, text.attention_mask)
        ids = text.input_ids.clone()
        ids[:, 0] = model.tokenizer.enc_token_id
        return image_feat @ text_feat.t(), model.itm_logits(ids, text.attention_mask, embeds, atts)

    def analytic() -> Cost:
        n, t = batch_size, RETRIEVAL_TEXT_LENGTH
        vision, tokens = vit_cost(model.visual_encoder, n, _grid(images, model))
        text, _ = bert_cost(model.text_encoder, n, t)
        proj = sum(linear(n, m.in_features, m.out_features) for m in (model.vision_proj, model.text_proj))
        itm = bert_cost(model.text_encoder, n, t, encoder=[(n, tokens)])[0]
        head = linear(n, model.itm_head.in_features, model.itm_head.out_features)
        return vision + text + proj + linear(n, model.vision_proj.out_features, n) + itm + head

    what = f"{batch_size} image-caption pair(s): ITC embeddings of both + the ITM logit of each pair"
    return Probe(run, batch_size, what, analytic=analytic)


def _retrieval_probe(model: nn.Module, kind: str, batch: Any, dataset: Any, batch_size: int) -> Probe:
    device = _device(model)
    if kind == "seed":
        idx = torch.randint(1000, 10000, (1,), generator=torch.Generator().manual_seed(0)).to(device)
        return _retrieval(model, random_images(model, 1), [RETRIEVAL_CAPTION], idx)
    if kind == "batch":
        image, index = batch
        if dataset is None or not hasattr(dataset, "img2txt"):
            raise TypeError("retrieval batches need their evaluation dataset (its text and img2txt) for captions")
        captions = [dataset.text[dataset.img2txt[int(i)][0]] for i in index]
        return _retrieval(model, image.to(device), captions, index.to(device))
    return _retrieval_speed(model, batch_size)


_PROBES = {"nlvr": _nlvr_probe, "caption": _caption_probe, "vqa": _vqa_probe, "retrieval": _retrieval_probe}


def blip_probe(model: nn.Module, kind: str, batch: Any = None, dataset: Any = None, batch_size: int = 1) -> Probe:
    """The probe of ``kind`` (``seed``, ``batch``: one batch of the evaluation loader, with its ``dataset``;
    ``speed``: ``batch_size`` samples) for a BLIP task model."""
    if kind not in KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; choose from {KINDS}")
    if kind == "batch" and batch is None:
        raise ValueError("a batch probe needs a batch of the evaluation loader")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    task = getattr(model, "task", None)
    if task not in _PROBES:
        raise TypeError(f"{type(model).__name__} has no cost probe (no seed convention for task {task!r})")
    return _PROBES[task](model, kind, batch, dataset, batch_size)
