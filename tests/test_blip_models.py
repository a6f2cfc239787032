"""The four BLIP task models: official checkpoint layouts load exactly, real-size parameter counts match
the published figures, and each model trains and infers."""

import pytest
import torch
from tiny_blip import DEPTH, EMBED, HEADS, PATCH, QUEUE, SIZE, WIDTH, build, layout_sd, tiny_config, write_vocab

from models.blip_caption import BlipCaption
from models.blip_nlvr import BlipNLVR
from models.blip_retrieval import BlipRetrieval
from models.blip_vqa import BlipVQA
from models.checkpoints import load_blip_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("tiny"))


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


def test_nlvr_pairs_encode_each_image_once_and_change_nothing_else(tiny):
    model = build("nlvr", tiny).eval()
    pictures = images(3)
    pairs = torch.tensor([[0, 1], [1, 0], [2, 0], [0, 1]])
    text = ["a red circle", "two", "of", "a red circle two"]
    targets = torch.tensor([0, 1, 1, 0])
    encoded = []
    model.visual_encoder.patch_embed.register_forward_hook(lambda m, i, o: encoded.append(i[0].shape[0]))

    stacked = torch.cat([pictures[pairs[:, 0]], pictures[pairs[:, 1]]])
    expected = model(stacked, text)
    model(stacked, text, targets).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = model(pictures, text, pairs=pairs)
    model(pictures, text, targets, pairs=pairs).backward()

    assert encoded == [8, 8, 3, 3]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert model.visual_encoder.cls_token.grad is not None
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


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
