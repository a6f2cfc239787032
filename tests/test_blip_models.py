"""The four BLIP task models: official checkpoint layouts load exactly, real-size parameter counts match
the published figures, and each model trains and infers."""

import json

import pytest
import torch
from blip_layout import official_state_dict

from models.blip_caption import BlipCaption
from models.blip_nlvr import BlipNLVR
from models.blip_pretrain import BlipPretrain
from models.blip_retrieval import BlipRetrieval
from models.blip_vqa import BlipVQA
from models.checkpoints import load_blip_checkpoint

WIDTH, DEPTH, HEADS, PATCH, SIZE, QUEUE, EMBED = 32, 2, 2, 16, 32, 8, 8


def write_vocab(path, n_words):
    """A bert-base-uncased style vocabulary: [PAD], [unused*], [UNK] [CLS] [SEP] [MASK] at BERT's ids."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["red", "circle", "picture", "of", "two"]
    tokens += [f"w{i}" for i in range(n_words - len(tokens))]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(tokens[:n_words]) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tok = write_vocab(root / "tok", 140)
    med = {
        "hidden_size": WIDTH,
        "num_hidden_layers": DEPTH,
        "num_attention_heads": HEADS,
        "intermediate_size": 4 * WIDTH,
        "max_position_embeddings": 40,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "vocab_size": 142,
        "encoder_width": WIDTH,
        "add_cross_attention": True,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "type_vocab_size": 2,
    }
    (root / "med.json").write_text(json.dumps(med))
    return {
        "vit": "base",
        "vit_patch_size": PATCH,
        "vit_embed_dim": WIDTH,
        "vit_depth": DEPTH,
        "vit_heads": HEADS,
        "vit_drop_path": 0.0,
        "med_config": str(root / "med.json"),
        "tokenizer": str(tok),
    }


def build(task, cfg):
    if task == "nlvr":
        return BlipNLVR(cfg, SIZE)
    if task == "caption":
        return BlipCaption(cfg, SIZE)
    if task == "vqa":
        return BlipVQA(cfg, SIZE)
    if task == "retrieval":
        return BlipRetrieval(cfg, SIZE, queue_size=QUEUE, embed_dim=EMBED)
    return BlipPretrain(cfg, SIZE, queue_size=QUEUE, embed_dim=EMBED)


def layout_sd(task, seed=0):
    return official_state_dict(
        task,
        width=WIDTH,
        depth=DEPTH,
        heads=HEADS,
        mlp=4 * WIDTH,
        vocab=142,
        image_size=SIZE,
        patch=PATCH,
        queue_size=QUEUE,
        embed_dim=EMBED,
        max_positions=40,
        seed=seed,
    )


@pytest.mark.parametrize("task", ["nlvr", "caption", "vqa", "retrieval", "pretrain"])
def test_official_layout_loads_exactly(tiny, task):
    model = build(task, tiny)
    sd = layout_sd(task)
    report = load_blip_checkpoint(model, {"model": sd}, task)
    assert not report.missing
    assert all(k.endswith("embeddings.position_ids") for k in report.unexpected)
    ours = model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, sd[key].to(value.dtype)), key


@pytest.mark.parametrize("task", ["nlvr", "caption", "vqa", "retrieval"])
def test_tasks_start_from_a_pretrained_file(tiny, task):
    model = build(task, tiny)
    sd = layout_sd("pretrain", seed=1)
    load_blip_checkpoint(model, sd, task)
    assert torch.equal(model.visual_encoder.cls_token, sd["visual_encoder.cls_token"])


def test_our_pretrain_model_saves_the_official_pretrained_layout(tiny):
    model = build("pretrain", tiny)
    from blip_layout import official_layout

    expected = official_layout(
        "pretrain",
        width=WIDTH,
        depth=DEPTH,
        heads=HEADS,
        mlp=4 * WIDTH,
        vocab=142,
        image_size=SIZE,
        patch=PATCH,
        queue_size=QUEUE,
        embed_dim=EMBED,
        max_positions=40,
    )
    expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    dec = model.text_decoder.bert.encoder.layer[0]
    enc = model.text_encoder.encoder.layer[0]
    assert dec.crossattention is enc.crossattention and dec.attention is not enc.attention


# Published dense sizes (UPop README, momentum copies included).
PUBLISHED_M = {
    "nlvr": (BlipNLVR, 384, 259.45),
    "caption": (BlipCaption, 384, 224.0),
    "vqa": (BlipVQA, 480, 361.6),
    "retrieval": (BlipRetrieval, 384, 447.6),
}


@pytest.mark.parametrize("task", sorted(PUBLISHED_M))
def test_real_size_parameter_counts(tmp_path, task):
    tok = write_vocab(tmp_path / "bert", 30522)
    cfg = {"vit": "base", "med_config": "configs/med_config.json", "tokenizer": str(tok)}
    cls, size, published = PUBLISHED_M[task]
    with torch.device("meta"):  # shapes only: no memory, no time
        model = cls(cfg, size)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - published) / published < 0.005, (task, n, published)


def images(b=2):
    return torch.randn(b, 3, SIZE, SIZE)


def test_nlvr_trains_and_predicts(tiny):
    model = build("nlvr", tiny)
    loss = model(torch.cat([images(), images()]), ["a red circle", "two"], torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and model.cls_head[2].weight.grad is not None
    assert model.text_encoder.encoder.layer[0].crossattention.self1.query.weight.grad is not None
    model.eval()
    assert model(torch.cat([images(), images()]), ["a", "b"]).shape == (2, 2)


def test_retrieval_step_updates_queues(tiny):
    model = build("retrieval", tiny)
    ita, itm = model(images(4), ["a red circle", "two", "a", "of"], 0.4, torch.tensor([0, 1, 2, 3]))
    (ita + itm).backward()
    assert int(model.ptr_queue) == 4 and model.idx_queue[0, :4].tolist() == [0, 1, 2, 3]
    assert model.visual_encoder_m.cls_token.grad is None and model.temp.grad is not None


def test_caption_trains_and_generates(tiny):
    model = build("caption", tiny)
    loss = model(images(), ["a picture of a red circle", "a picture of two"])
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    out = model.generate(images(), num_beams=2, max_length=8, min_length=6)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_vqa_trains_ranks_and_generates(tiny):
    model = build("vqa", tiny)
    loss = model(images(), ["what color", "how many"], ["red", "circle", "two"], [2, 1], torch.tensor([0.5, 0.5, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    answers = ["red", "two", "circle", "of"]
    best = model.rank_answers(images(), ["what color", "how many"], answers, k=3)
    assert len(best) == 2 and all(0 <= i < len(answers) for i in best)
    assert len(model.generate_answers(images(), ["what color", "how many"], max_length=5)) == 2
