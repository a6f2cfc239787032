"""Token reduction through the four BLIP tasks: image and text tokens dropped in training and evaluation, the
consumers of the token state (NLVR2's twin cross-attention, VQA's answer decoder, retrieval's cached image
features, caption decoding), and the reduced checkpoint evaluated again without pruner code."""

import json
import subprocess
import sys

import pytest
import test_runs_vl
import tiny_blip
import torch
from test_runs_vl import REPO, env, tiny_args
from torch.testing import assert_close

import cli
from models.arch import architecture, read_weights, save_compressed
from models.blip import tokenize
from models.token_ops import EViTReducer
from tasks.retrieval import score_matrices

setup = test_runs_vl.setup  # the tiny world and MED config

# Every image block and the first text layer drop half of their tokens (fused into one).
EVIT = ["--pruner", "evit", "--keep_rate", "0.5", "--set", "evit.locations=[0]", "--set", "pruner_pretrained="]
TEXT = ["--set", "evit.text_locations=[0]", "--set", "evit.text_keep_rate=0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["nlvr", "caption", "vqa", "retrieval"])
def test_tokens_dropped_in_training_and_evaluation_and_the_checkpoint_evaluates_alone(setup, tmp_path, task):
    out = tmp_path / "evit"
    extra = EVIT + (TEXT if task != "caption" else [])  # the captioner has no text encoder to reduce
    argv = [str(a) for a in tiny_args(setup, out, task)] + extra
    res = cli.main(task, argv=argv)
    report = res["pruner_report"]
    assert report["keep_rate"] == 0.5 and report["image_tokens"] == [10]  # CLS + 8 of the 16 patches + the fused one
    assert res["flops"] < res["dense"]["flops"]  # traced on the reduced model
    assert res["flops_analytic"] == pytest.approx(res["flops"])
    st = res["compressed_checkpoint"]
    _, arch = read_weights(st)
    assert arch["reducers"]["visual_encoder.blocks.0"][0]["keep_rate"] == 0.5
    if task != "caption":
        assert arch["reducers"]["text_encoder.encoder.layer.0"][0]["point"] == "post_self_attn"

    # Evaluated again from the exported file with no pruner: the same numbers.
    ev = tmp_path / "eval"
    again = cli.main(task, argv=[str(a) for a in tiny_args(setup, ev, task)] + ["--evaluate", "--pretrained", st])
    assert again["metrics"] == res["metrics"]
    assert again["flops"] == pytest.approx(res["flops"])


@pytest.mark.slow
def test_tome_on_the_blip_vit_trains_and_its_export_evaluates_alone(setup, tmp_path):
    out = tmp_path / "tome"
    extra = ["--pruner", "tome", "--r", "4", "--set", "pruner_pretrained="]
    res = cli.main("nlvr", argv=[str(a) for a in tiny_args(setup, out, "nlvr")] + extra)
    assert res["pruner_report"]["image_tokens"] == [13]  # 17 tokens, 4 merged in the one block
    assert res["flops"] < res["dense"]["flops"] and res["flops_analytic"] == pytest.approx(res["flops"])
    ev = tmp_path / "eval"
    argv = [str(a) for a in tiny_args(setup, ev, "nlvr")] + ["--evaluate", "--pretrained", res["compressed_checkpoint"]]
    assert cli.main("nlvr", argv=argv)["metrics"] == res["metrics"]


def test_vqa_answer_decoder_reads_the_pruned_question(tmp_path):
    cfg = tiny_blip.tiny_config(tmp_path)
    model = tiny_blip.build("vqa", cfg).eval()
    model.text_encoder.layers[0].token_hooks.append(EViTReducer(0.3, point="post_self_attn"))
    images = torch.randn(2, 3, tiny_blip.SIZE, tiny_blip.SIZE)
    questions = ["a red circle of two", "two"]
    with torch.no_grad():
        states, mask = model.encode_question(images, questions)
        full = tokenize(model.tokenizer, questions, images.device, padding="longest").input_ids.shape[1]
        assert states.shape[1] == mask.shape[1] == 1 + 2 + 1 < full  # CLS, ceil(0.3 * 6) kept, the fused token
        answers = ["red", "two", "circle"]
        best = model.rank_answers(images, questions, answers, k=2)
        assert len(best) == 2 and all(0 <= b < 3 for b in best)
        assert len(model.generate_answers(images, questions, max_length=4)) == 2
    model.train()
    loss = model(images, questions, ["red", "two"], [1, 1], torch.ones(2))
    loss.backward()
    assert torch.isfinite(loss) and model.text_encoder.layers[1].attention.self.query.weight.grad is not None


class _VaryingLength:
    """A test hook: keeps a number of image tokens that depends on the batch (2 + batch size), so that cached
    evaluation batches differ in length."""

    point = "post_attn"
    needs = frozenset()

    def __call__(self, x, state, ctx):
        keep = min(x.shape[1], 2 + x.shape[0])
        return x[:, :keep], state.select(torch.arange(keep).expand(x.shape[0], -1))


class _Split:
    """A retrieval evaluation split of 5 images in batches of 3 and 2, each image with two captions."""

    def __init__(self):
        self.text = [f"a red circle w{i}" for i in range(10)]
        self.img2txt = {i: [2 * i, 2 * i + 1] for i in range(5)}
        self.txt2img = {t: t // 2 for t in range(10)}


def test_retrieval_reranks_cached_image_tokens_of_different_lengths(tmp_path):
    cfg = tiny_blip.tiny_config(tmp_path)
    model = tiny_blip.build("retrieval", cfg).eval()
    model.visual_encoder.blocks[0].token_hooks.append(_VaryingLength())
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, tiny_blip.SIZE, tiny_blip.SIZE, generator=g)
    split = _Split()

    class Loader(list):
        dataset = split

    loader = Loader([(images[:3], torch.arange(3)), (images[3:], torch.arange(3, 5))])
    with torch.no_grad():
        i2t, t2i = score_matrices(model, loader, k_test=3)
        # The reference: every image's own, unpadded tokens (its batch's length) against every text.
        t = model.text_inputs(split.text, images.device)
        ids = t.input_ids.clone()
        ids[:, 0] = model.tokenizer.enc_token_id
        text_feat = model.text_features(t.input_ids, t.attention_mask)
        for batch, rows in ((images[:3], range(3)), (images[3:], range(3, 5))):
            embeds, atts, feat = model.image_features(batch)
            assert embeds.shape[1] == 2 + len(batch)  # 5 and 4 tokens: the cache was padded
            for r, i in enumerate(rows):
                sims = feat[r] @ text_feat.t()
                top = (i2t[i] > -100).nonzero().flatten()  # the k texts it re-ranked (near-ties may pick either)
                assert len(top) == 3
                enc = embeds[r : r + 1].expand(3, -1, -1)
                expected = model.itm_logits(ids[top], t.attention_mask[top], enc)[:, 1] + sims[top]
                assert_close(i2t[i, top], expected, atol=1e-5, rtol=1e-5)
    assert (t2i > -100).sum(1).tolist() == [3] * 10


def test_a_reduced_checkpoint_evaluates_without_importing_pruners(tmp_path):
    cfg = tiny_blip.tiny_config(tmp_path)
    torch.manual_seed(0)
    model = tiny_blip.build("nlvr", cfg).eval()
    model.visual_encoder.blocks[1].token_hooks.append(EViTReducer(0.5))
    model.text_encoder.layers[0].token_hooks.append(EViTReducer(0.5, point="post_self_attn"))
    save_compressed(tmp_path / "reduced", model.state_dict(), architecture(model))
    images = torch.randn(4, 3, tiny_blip.SIZE, tiny_blip.SIZE, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    texts = ["a red circle of two", "two red"]
    with torch.no_grad():
        expected = model(images, texts)
    program = f"""
import json, sys, torch
sys.path.insert(0, {str(REPO)!r})
from tasks import nlvr
cfg = json.loads({json.dumps(json.dumps(cfg))})
model = nlvr.build_model({{**cfg, "image_size": {tiny_blip.SIZE}}}).eval()
nlvr.load_pretrained(model, {str(tmp_path / "reduced.safetensors")!r}, cfg, evaluate=True)
images = torch.load({str(tmp_path / "images.pt")!r}, weights_only=True)
with torch.no_grad():
    logits = model(images, {texts!r})
print(json.dumps({{"logits": logits.tolist(), "pruners": [m for m in sys.modules if m.startswith("pruners")]}}))
"""
    p = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["pruners"] == []
    assert_close(torch.tensor(out["logits"]), expected, atol=1e-6, rtol=1e-6)


def _task_outputs(task, model, images):
    """The tensors a task's evaluation reads, on fixed inputs."""
    with torch.no_grad():
        if task == "nlvr":
            return model(torch.cat([images, images.flip(0)]), ["a red circle", "two"])
        if task == "vqa":
            return model.encode_question(images, ["a red circle", "two"])[0]
        if task == "caption":
            return model(images, ["a picture of two", "a picture of a red circle"])
        t = model.text_inputs(["a red circle", "two"], images.device)
        ids = t.input_ids.clone()
        ids[:, 0] = model.tokenizer.enc_token_id
        embeds, atts, _ = model.image_features(images)
        return model.itm_logits(ids, t.attention_mask, embeds, atts)


@pytest.mark.parametrize("task", ["nlvr", "vqa", "caption", "retrieval"])
def test_keep_rate_one_and_r_zero_leave_every_blip_task_exactly_dense(tmp_path, task):
    from models.token_ops import ToMeReducer

    cfg = tiny_blip.tiny_config(tmp_path)
    images = torch.randn(2, 3, tiny_blip.SIZE, tiny_blip.SIZE, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = tiny_blip.build(task, cfg).eval()
    dense = _task_outputs(task, model, images)
    for block in model.visual_encoder.blocks:
        block.token_hooks += [EViTReducer(1.0), ToMeReducer(0)]
    for name, module in model.named_modules():
        if name.endswith("text_encoder"):
            for layer in module.layers:
                layer.token_hooks.append(EViTReducer(1.0, point="post_self_attn"))
    assert torch.equal(_task_outputs(task, model, images), dense)
