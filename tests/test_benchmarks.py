"""The measuring harness: counts against hand formulas and the seeds' published totals, the CPU
attention formula against the explicit attention path, real-batch averaging, reports and plots."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks.flops import count
from benchmarks.measure import average_cost, compare, count_params, main, markdown, model_cost
from benchmarks.memory import TensorBytes
from benchmarks.plot import plot_runs, read_run
from benchmarks.presets import BERT_VOCAB_SIZE, bert_layout_vocab, build_preset, uniform_slice
from data.synthetic import ensure_world
from models import blip_probes as inputs
from models.blip_caption import BlipCaption
from models.blip_nlvr import BlipNLVR
from models.blip_retrieval import BlipRetrieval
from models.blip_vqa import BlipVQA
from models.tokenizer import init_tokenizer
from models.vit import VisionTransformer

TINY_MED = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "vocab_size": 0,  # replaced by the tokenizer's size
    "encoder_width": 32,
    "add_cross_attention": True,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "type_vocab_size": 2,
}
SIZE = 32


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return bert_layout_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, vocab):
    root = tmp_path_factory.mktemp("tiny")
    (root / "med.json").write_text(json.dumps(TINY_MED))
    return {
        "vit": "base",
        "vit_patch_size": 16,
        "vit_embed_dim": 32,
        "vit_depth": 2,
        "vit_heads": 2,
        "vit_drop_path": 0.0,
        "med_config": str(root / "med.json"),
        "tokenizer": str(vocab),
    }


def tiny_vit(**widths):
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=SIZE, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5, **widths
    ).eval()


# ------------------------------------------------------------------------------------ exact counts


@pytest.mark.parametrize(
    "widths",
    [{}, {"heads": [2, 1], "head_dims": [8, 16], "mlp_hidden": [40, 64]}],
    ids=["dense", "compressed"],
)
def test_tiny_vit_counts_match_hand_formulas(widths):
    model = tiny_vit(**widths)
    D, N, C, L = 32, 5, 5, 2  # 2x2 patches + CLS
    heads = widths.get("heads", [2] * L)
    dims = widths.get("head_dims", [16] * L)
    hidden = widths.get("mlp_hidden", [128] * L)
    patch = 4 * D * 3 * 16 * 16
    matmuls = patch + C * D  # the head sees the CLS token only
    params = (3 * 256 * D + D) + D + N * D + 2 * D + (C * D + C)
    for h, d, m in zip(heads, dims, hidden):
        inner = h * d
        matmuls += N * D * 3 * inner + 2 * N * N * inner + N * inner * D + 2 * N * D * m
        params += 4 * D + (3 * inner * D + 3 * inner) + (inner * D + D) + (m * D + m) + (m * D + D)
    layer_norms = (2 * L + 1) * 5 * N * D

    cost = model_cost(model)
    assert cost["params"] == params
    assert cost["macs"] == matmuls + layer_norms
    assert cost["flops"] == 2 * matmuls
    assert cost["macs_by_module"]["patch_embed"] == patch
    assert cost["macs_by_module"]["head"] == C * D


def test_sdpa_formula_counts_what_explicit_attention_counts():
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    _, fused = count(lambda: F.scaled_dot_product_attention(q, k, v))
    _, explicit = count(lambda: torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    assert fused.flops == explicit.flops == 2 * 2 * (2 * 3 * 7 * 11 * 8)
    assert fused.macs == explicit.macs

    vit = tiny_vit()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        _, sdpa = count(lambda: vit(x))
        _, probs = count(lambda: vit.forward_head(vit.forward_features(x, record_attn=range(2))))
    assert sdpa.flops == probs.flops and sdpa.macs == probs.macs


class _ProbsHook:
    point = "post_attn"
    needs = frozenset({"probs"})

    def __call__(self, x, state, ctx):
        return x, state


def test_sdpa_and_explicit_attention_agree_on_a_blip_model(tiny_cfg):
    """Every attention of a BLIP NLVR model (ViT, text self-attention, twin cross-attention) on the
    fused kernel counts what the explicit matmul + softmax path counts."""
    model = BlipNLVR(tiny_cfg, SIZE).eval()
    fused = model_cost(model)
    blocks = [*model.visual_encoder.blocks, *model.text_encoder.layers]
    for block in blocks:
        block.token_hooks.append(_ProbsHook())
    explicit = model_cost(model)
    assert fused["flops"] == explicit["flops"] and fused["macs"] == explicit["macs"]


TINY_BUILDERS = {
    "nlvr": lambda cfg: BlipNLVR(cfg, SIZE),
    "caption": lambda cfg: BlipCaption(cfg, SIZE),
    "vqa": lambda cfg: BlipVQA(cfg, SIZE),
    "retrieval": lambda cfg: BlipRetrieval(cfg, SIZE, queue_size=8, embed_dim=8),
}


@pytest.mark.parametrize("task", sorted(TINY_BUILDERS))
def test_meta_counts_equal_cpu_counts(tiny_cfg, task):
    cpu = TINY_BUILDERS[task](tiny_cfg)
    with torch.device("meta"):
        meta = TINY_BUILDERS[task](tiny_cfg)
    on_cpu, on_meta = model_cost(cpu), model_cost(meta)
    assert on_cpu["flops"] > 0 and on_cpu["macs"] > 0
    assert (on_cpu["flops"], on_cpu["macs"], on_cpu["params"]) == (on_meta["flops"], on_meta["macs"], on_meta["params"])


def test_counting_a_training_step_leaves_the_model_as_it_was(tiny_cfg):
    model = TINY_BUILDERS["retrieval"](tiny_cfg)
    with torch.no_grad():  # momentum towers that differ from the online ones make any update visible
        for p in model.visual_encoder_m.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost = model_cost(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # the training flag is put back
    online_only = sum(p.numel() for n, p in model.named_parameters() if n.startswith("itm_head") or n == "temp")
    assert 2 * cost["params_momentum"] == cost["params"] - online_only


# ----------------------------------------------------------------------------- the seeds' totals

PUBLISHED_GMACS = {  # UPop tables: fvcore "GFLOPs" of the dense models
    "blip-nlvr": 132.54,
    "blip-caption": 65.7,
    "blip-vqa": 186.1,
    "blip-retrieval": 153.2,
    "deit-small": 4.6,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_GMACS))
def test_real_size_counts_match_the_published_totals(preset, vocab):
    task, _, model = build_preset(preset, "meta", tokenizer=vocab)
    cost = model_cost(model)
    published = PUBLISHED_GMACS[preset]
    assert abs(cost["macs"] / 1e9 - published) / published < 0.02, (preset, cost["macs"] / 1e9)
    if preset == "blip-retrieval":  # the published size counts the momentum towers
        assert abs(cost["params"] / 1e6 - 447.6) < 0.5 and cost["params_momentum"] > 0.49 * cost["params"]


def test_stand_in_vocabulary_has_bert_layout_and_lengths(vocab):
    lines = (vocab / "vocab.txt").read_text().splitlines()
    assert len(lines) == BERT_VOCAB_SIZE and len(set(lines)) == BERT_VOCAB_SIZE
    assert [lines[i] for i in (0, 100, 101, 102, 103)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = init_tokenizer(vocab)
    assert len(tok) == 30524 and tok.bos_token_id == 30522 and tok.enc_token_id == 30523
    ids = tok([inputs.NLVR_SENTENCE]).input_ids[0]
    assert len(ids) == 36 and tok.unk_token_id not in ids
    assert max(len(tok(q).input_ids) for q in inputs.VQA_QUESTIONS) == 14
    assert tok(inputs.CAPTION, return_tensors="pt").input_ids.shape[1] == 15


# ---------------------------------------------------------------------------- real-batch averaging


def test_eval_batch_average_equals_the_dummy_count_for_same_shaped_inputs(tiny_cfg):
    nlvr = BlipNLVR(tiny_cfg, SIZE).eval()
    dummy = model_cost(nlvr)
    img = torch.randn(3, 3, SIZE, SIZE)
    same = [(img, img, [inputs.NLVR_SENTENCE] * 3, torch.zeros(3)), (img[:1], img[:1], [inputs.NLVR_SENTENCE], None)]
    avg = average_cost(nlvr, same)
    assert avg["samples"] == 4 and avg["batches"] == 2
    assert avg["flops"] == dummy["flops"] and avg["macs"] == dummy["macs"]
    shorter = average_cost(nlvr, [(img, img, ["a b"] * 3, None)])
    assert shorter["macs"] < dummy["macs"]  # the batch's own text is what is counted
    # Statements batched by image pair are counted as BLIP runs them, each with its two images.
    from data.nlvr import NLVRPairBatch

    pairs = NLVRPairBatch(img[:2], torch.tensor([[0, 1], [1, 0], [0, 1]]), [inputs.NLVR_SENTENCE] * 3, torch.zeros(3))
    grouped = average_cost(nlvr, [pairs])
    assert grouped["samples"] == 3 and grouped["macs"] == dummy["macs"]

    caption = BlipCaption(tiny_cfg, SIZE).eval()
    avg = average_cost(caption, [(torch.randn(2, 3, SIZE, SIZE), torch.arange(2))] * 3, max_batches=2)
    assert avg["batches"] == 2 and avg["macs"] == model_cost(caption)["macs"]

    vit = tiny_vit()
    avg = average_cost(vit, [(torch.randn(4, 3, SIZE, SIZE), torch.zeros(4))])
    assert avg["flops"] == model_cost(vit)["flops"]


# --------------------------------------------------------------------------------------- slicing


def test_uniform_slice_halves_every_width_and_keeps_momentum_towers_matched(tiny_cfg):
    model = BlipRetrieval(tiny_cfg, SIZE, queue_size=8, embed_dim=8).eval()
    small = uniform_slice(copy.deepcopy(model), 0.5)
    widths = small.visual_encoder.block_widths()
    assert widths["head_dims"] == [8, 8] and widths["mlp_hidden"] == [64, 64]
    assert small.text_encoder.block_widths() == small.text_encoder_m.block_widths()
    assert small.text_encoder.block_widths()["cross_head_dims"] == [8, 8]
    dense, sliced = model_cost(model), model_cost(small)
    assert sliced["params"] < dense["params"] and sliced["macs"] < dense["macs"]
    with pytest.raises(ValueError, match="keep must be in"):
        uniform_slice(model, 0.0)


# ----------------------------------------------------------------------------------------- reports


def test_compare_reports_every_quantity_with_the_ratio():
    dense = tiny_vit()
    small = uniform_slice(copy.deepcopy(dense), 0.5)
    report = compare({"A": dense, "B": small}, "classification", batch_size=2, warmup=0, repeats=1)
    a, b = report["models"]["A"], report["models"]["B"]
    for key in ("params", "flops", "macs", "latency_ms", "throughput", "memory_1_mib", "memory_n_mib"):
        assert report["ratio"][key] == pytest.approx(b[key] / a[key]), key
    assert report["ratio"]["params"] < 1 and b["throughput_batch"] == 2
    table = markdown(report)
    assert "| quantity | A | B | B / A |" in table
    row = next(line for line in table.splitlines() if line.startswith("| params (M)"))
    assert row.endswith(f"| {report['ratio']['params']:.3f} |")
    json.dumps(report)  # the report is plain JSON


def test_peak_tensor_memory_follows_allocations_and_frees():
    def work():
        a = torch.ones(1000)  # 4000 bytes
        b = a + 1
        del a
        c = b * 2
        c.view(10, 100).mul_(3)  # views and in-place results allocate nothing
        return c

    with TensorBytes() as tracker:
        out = work()
    assert tracker.peak == 8000 and tracker.live == 4000
    del out
    assert tracker.live == 0


def test_count_params_splits_out_momentum_towers(tiny_cfg):
    model = BlipRetrieval(tiny_cfg, SIZE, queue_size=8, embed_dim=8)
    got = count_params(model)
    towers = [model.visual_encoder_m, model.vision_proj_m, model.text_encoder_m, model.text_proj_m]
    assert got["momentum"] == sum(p.numel() for m in towers for p in m.parameters())
    assert got["params"] == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(tmp_path_factory.mktemp("bench") / "world", n=48, image_size=32, seed=0, progress=False)


def test_cli_counts_over_eval_batches_and_writes_json_and_markdown(tmp_path, world, capsys):
    # The world's small WordPiece vocabulary spells the seed's sentence out in 86 pieces.
    (tmp_path / "med.json").write_text(json.dumps({**TINY_MED, "max_position_embeddings": 128}))
    cfg = tmp_path / "nlvr_tiny.yaml"
    cfg.write_text(
        "\n".join(
            [
                f"image_root: {world}/nlvr",
                f"ann_root: {world}/annotation",
                f"tokenizer: {world}/tokenizer",
                f"med_config: {tmp_path / 'med.json'}",
                "vit_patch_size: 16",
                "vit_embed_dim: 32",
                "vit_depth: 1",
                "vit_heads: 2",
                "image_size: 32",
                "batch_size_test: 4",
                "num_workers: 0",
            ]
        )
    )
    out = tmp_path / "out"
    report = main(["--config", str(cfg), "--no-speed", "--slice", "0.5", "--eval-batches", "2", "--out", str(out)])
    assert report["task"] == "nlvr"  # read from the file name
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["ratio"]["macs"] < 1 and saved["models"]["A"]["eval_samples"] == 8
    table = (out / "benchmark.md").read_text()
    assert "B / A" in table and "mean over eval batches" in table
    assert table in capsys.readouterr().out


def test_cli_compares_two_checkpoints_with_timing(tmp_path):
    cfg = tmp_path / "deit_tiny.yaml"
    cfg.write_text("vit: deit_tiny\npatch_size: 16\nembed_dim: 32\ndepth: 1\nnum_heads: 2\nimage_size: 32\n")
    for i in (0, 1):
        torch.manual_seed(i)
        model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=7)
        torch.save(model.state_dict(), tmp_path / f"m{i}.pth")
    report = main(
        ["--config", str(cfg), "--checkpoint", str(tmp_path / "m0.pth"), "--checkpoint", str(tmp_path / "m1.pth")]
        + ["--device", "cpu", "--batch", "2", "--warmup", "0", "--repeats", "1"]
    )
    assert report["ratio"]["params"] == 1.0 and report["ratio"]["macs"] == 1.0
    assert report["models"]["B"]["latency_ms"] > 0 and report["sources"]["B"].endswith("m1.pth")


def test_cli_rejects_a_config_whose_task_it_cannot_tell(tmp_path):
    cfg = tmp_path / "mystery.yaml"
    cfg.write_text("image_size: 32\n")
    with pytest.raises(SystemExit, match="--task"):
        main(["--config", str(cfg), "--no-speed"])


# ------------------------------------------------------------------------------------------- plot


def _results(path, task, pruner, acc, flops=None):
    data = {"task": task, "pruner": pruner, "metrics": {"val": {"acc": acc + 1}, "test": {"acc": acc}}, "params": 1}
    if flops is not None:
        data.update(flops=flops, macs=flops / 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_plot_writes_a_png_with_one_point_per_run(tmp_path):
    runs = [
        _results(tmp_path / "dense" / "results.json", "nlvr", "none", 82.0, 264e9),
        _results(tmp_path / "p05" / "results.json", "nlvr", "upop", 80.0, 178e9),
        _results(tmp_path / "p075" / "results.json", "nlvr", "upop", 73.0, 100e9),
    ]
    out = tmp_path / "fig.png"
    points = plot_runs(runs, "acc", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(p.pruner, p.x, p.y, p.split) for p in points] == [
        ("none", 264, 82, "test"),
        ("upop", 178, 80, "test"),
        ("upop", 100, 73, "test"),
    ]
    assert read_run(runs[1], "acc", split="val", x="macs").x == 89 and read_run(runs[1], "acc", "val").y == 81


def test_plot_names_the_file_that_lacks_flops_or_the_metric(tmp_path):
    bare = _results(tmp_path / "old" / "results.json", "nlvr", "none", 82.0)
    with pytest.raises(ValueError, match=r"old/results.json has no 'flops'"):
        read_run(bare, "acc")
    ok = _results(tmp_path / "new" / "results.json", "nlvr", "none", 82.0, 1e9)
    with pytest.raises(ValueError, match="no metric 'CIDEr'"):
        read_run(ok, "CIDEr")
    other = _results(tmp_path / "vqa" / "results.json", "vqa", "none", 70.0, 1e9)
    with pytest.raises(ValueError, match="different tasks"):
        plot_runs([ok, other], "acc", tmp_path / "x.png")
