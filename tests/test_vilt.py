"""ViLT and PuMer: the forward against Hugging Face's port on the same random weights, every checkpoint layout
(original ``.ckpt``, PuMer folders, Hugging Face folders) under the loading policy, PuMer's masked softmax and token
reducer against references written here from the spec (pumer_vilt.md 2.3-2.6, 2.9, 2.10), the analytic cost
against the traced count and the published GMACs, and the PuMer pruner."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from torch.testing import assert_close

from benchmarks.flops import count
from models.arch import architecture
from models.token_ops import PuMerReducer, reducer_specs
from models.token_state import HookContext, KeyWeights, TokenState
from models.vilt import ViLT, vilt_cost, vilt_schedule
from models.vilt_checkpoints import (
    HEAD_PREFIXES,
    from_hf,
    hf_config,
    load_vilt_checkpoint,
    read_vilt_weights,
    save_hf,
    to_hf,
)
from models.vit import VisionTransformer
from pruners.pumer import PuMer
from tasks.vilt import load_pretrained
from utils import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden": 32, "heads": 4, "patch_size": 8, "image_size": 32, "vocab_size": 50, "max_text_len": 12}
TEXT = 10  # text tokens fed (of max_text_len 12)
IMAGE_TOKENS = 17  # (32 / 8) ** 2 patches + the image CLS
HF_CLASSES = {
    "vqa": "ViltForQuestionAnswering",
    "nlvr2": "ViltForImagesAndTextClassification",
    "retrieval": "ViltForImageAndTextRetrieval",
    "none": "ViltModel",
}
PUMER = {"prune_r": 0.1, "merge_r": 0.3, "merge_text": 0.2}


# ------------------------------------------------------------------------------------------------ helpers


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Weights far from the init (N(0, 0.2); LayerNorm weights around 1), so that mapping mistakes show."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if id(p) in norms else 0.0))
    return model


def _vilt(head: str = "vqa", depth: int = 2, seed: int = 0, labels: int = 7, **kw) -> ViLT:
    return _randomize(ViLT(head, labels, **{**TINY, "depth": depth, **kw}), seed).eval()


def _inputs(batch: int = 3, text: int = TEXT, size: int = 32, seed: int = 1):
    """Token ids, a text mask with padding in the second example, two image batches."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, text), generator=g)
    mask = torch.ones(batch, text, dtype=torch.long)
    if batch > 1:
        mask[1, 6:] = 0
        ids[1, 6:] = 0
    images = torch.randn(batch, 3, size, size, generator=g)
    images2 = torch.randn(batch, 3, size, size, generator=g)
    return ids, mask, images, images2


def _hf_twin(model: ViLT) -> nn.Module:
    """The Hugging Face class of ``model``'s head with ``model``'s weights (strict load)."""
    config = hf_config(model, 7 if model.head == "vqa" else None)
    config.pop("model_type")
    config.pop("architectures")
    hf = getattr(transformers, HF_CLASSES[model.head])(transformers.ViltConfig(**config)).eval()
    sd = to_hf(model.state_dict(), model.head)
    if model.head == "none":  # a bare ViltModel has no "vilt." prefix
        sd = {k.removeprefix("vilt."): v for k, v in sd.items()}
    hf.load_state_dict(sd, strict=True)
    return hf


def _ours(model: ViLT, ids, mask, images, images2):
    """Logits, or for the bare model (last hidden state, pooled output)."""
    if model.head == "none":
        x, _ = model.encode(ids, mask, images)
        return x, model.pooler(x)
    return model(ids, mask, images, images2)


def _theirs(hf: nn.Module, head: str, ids, mask, images, images2):
    if head == "nlvr2":
        return hf(input_ids=ids, attention_mask=mask, pixel_values=torch.stack([images, images2], dim=1)).logits
    out = hf(input_ids=ids, attention_mask=mask, pixel_values=images)
    if head == "none":
        return out.last_hidden_state, out.pooler_output
    return out.logits


def _max_diff(a, b) -> float:
    if isinstance(a, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape
    return float((a - b).abs().max())


def _attach(model: ViLT, layers, **spec) -> ViLT:
    for i in layers:
        model.transformer.blocks[i].token_hooks.append(PuMerReducer(**{**PUMER, **spec}))
    return model


# ------------------------------------------------------------------------------------------------ 1. HF oracle


@pytest.mark.parametrize("head", ["vqa", "nlvr2", "retrieval", "none"])
def test_forward_matches_hugging_face_with_the_same_shuffle(head):
    model = _vilt(head, norm_eps=1e-6, text_norm_eps=1e-6, patch_shuffle=True)
    hf = _hf_twin(model)
    assert hf.config.layer_norm_eps == 1e-6
    ids, mask, images, images2 = _inputs()
    with torch.no_grad():
        torch.manual_seed(5)
        ours = _ours(model, ids, mask, images, images2)
        torch.manual_seed(5)
        theirs = _theirs(hf, head, ids, mask, images, images2)
        torch.manual_seed(5)
        unpadded = _theirs(hf, head, ids, torch.ones_like(mask), images, images2)
    assert _max_diff(ours, theirs) <= 1e-5
    # The padding is exercised: without it the padded example's output changes, the others' do not.
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert _max_diff(first(unpadded)[1], first(theirs)[1]) > 1e-3
    assert _max_diff(first(unpadded)[0], first(theirs)[0]) <= 1e-5


@pytest.mark.parametrize("head", ["vqa", "nlvr2", "retrieval", "none"])
def test_unshuffled_forward_matches_hugging_face_up_to_the_patch_order(head):
    """Hugging Face always shuffles the patches; attention does not care, so the logits, the text tokens and the
    pooled output agree, and every image token has its twin somewhere in Hugging Face's order."""
    model = _vilt(head, seed=2, norm_eps=1e-6, text_norm_eps=1e-6, patch_shuffle=False)
    hf = _hf_twin(model)
    ids, mask, images, images2 = _inputs(seed=4)
    with torch.no_grad():
        ours = _ours(model, ids, mask, images, images2)
        torch.manual_seed(11)
        theirs = _theirs(hf, head, ids, mask, images, images2)
    if head != "none":
        assert _max_diff(ours, theirs) <= 1e-5
        return
    (x, pooled), (hx, hpooled) = ours, theirs
    assert _max_diff(pooled, hpooled) <= 1e-5
    assert _max_diff(x[:, : TEXT + 1], hx[:, : TEXT + 1]) <= 1e-5  # text, then the image CLS (first either way)
    assert _max_diff(x[:, TEXT:], hx[:, TEXT:]) > 1e-2  # the patch order differs ...
    nearest = torch.cdist(x[:, TEXT:], hx[:, TEXT:]).amin(dim=-1)  # ... but the tokens are the same
    assert float(nearest.max()) <= 1e-5


def test_patch_shuffle_permutes_image_tokens_and_records_their_positions():
    plain = _vilt("none", seed=3)
    shuffled = _vilt("none", seed=3, patch_shuffle=True)
    ids, mask, images, _ = _inputs()
    with torch.no_grad():
        x, state = plain.encode(ids, mask, images)
        torch.manual_seed(0)
        xs, ss = shuffled.encode(ids, mask, images)
    assert state.positions.tolist() == [list(range(TEXT + IMAGE_TOKENS))] * 3
    assert ss.positions[:, TEXT].tolist() == [TEXT] * 3  # the image CLS stays first
    assert not torch.equal(ss.positions, state.positions)
    assert_close(x.gather(1, ss.positions[..., None].expand_as(x)), xs, atol=1e-5, rtol=0)


def test_heads_and_input_errors():
    ids, mask, images, images2 = _inputs()
    with pytest.raises(ValueError, match="head"):
        ViLT("captioning", **TINY, depth=1)
    with pytest.raises(ValueError, match="masked_softmax"):
        ViLT("vqa", **TINY, depth=1, masked_softmax="multiplicative")
    with pytest.raises(ValueError, match="no forward logits"):
        _vilt("none")(ids, mask, images)
    with pytest.raises(ValueError, match="both images"):
        _vilt("nlvr2")(ids, mask, images)
    with pytest.raises(ValueError, match="max_text_len"):
        _vilt("vqa")(torch.ones(1, 13, dtype=torch.long), None, images[:1])
    pretrain = _vilt("pretrain")
    with torch.no_grad():
        assert pretrain.mlm_logits(ids, mask, images).shape == (3, TEXT, 50)
        assert pretrain.itm_logits(ids, mask, images).shape == (3, 2)
        _attach(pretrain, [1])
        with pytest.raises(ValueError, match="every text token"):
            pretrain.mlm_logits(ids, mask, images)
    assert _vilt("retrieval")(ids, mask, images).shape == (3, 1)
    assert _vilt("ve")(ids, mask, images).shape == (3, 3)
    assert _vilt("nlvr2")(ids, mask, images, images2).shape == (3, 2)


# ------------------------------------------------------------------------------------------------ 2. HF layout


@pytest.mark.parametrize("head", ["vqa", "nlvr2"])
def test_save_hf_loads_in_transformers_and_reads_back_exactly(tmp_path, head):
    model = _vilt(head, seed=5, norm_eps=1e-6, text_norm_eps=1e-6)
    save_hf(model, tmp_path)
    hf = getattr(transformers, HF_CLASSES[head]).from_pretrained(tmp_path).eval()
    ids, mask, images, images2 = _inputs(seed=6)
    with torch.no_grad():
        ours = model(ids, mask, images, images2)
        theirs = _theirs(hf, head, ids, mask, images, images2)
    assert _max_diff(ours, theirs) <= 1e-5
    ref = model.state_dict()
    for source in (tmp_path, tmp_path / "model.safetensors"):
        sd, arch, facts = read_vilt_weights(source, head)
        assert facts["layout"] == "hf" and arch is None
        assert set(sd) == set(ref)
        assert all(torch.equal(sd[k], ref[k]) for k in ref), [k for k in ref if not torch.equal(sd[k], ref[k])]


def test_save_hf_refuses_a_model_with_reducers(tmp_path):
    with pytest.raises(ValueError, match="dense"):
        save_hf(_attach(_vilt("vqa"), [1]), tmp_path)


@pytest.mark.parametrize("head", ["vqa", "nlvr2", "retrieval", "none"])
def test_from_hf_inverts_to_hf(head):
    sd = _vilt(head, seed=8).state_dict()
    back = from_hf(to_hf(sd, head), head)
    expected = {k: v for k, v in sd.items() if not k.startswith("itm_score.")}  # HF's retrieval has no ITM head
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    # The split q/k/v are copies, not views of the fused tensor.
    qkv = sd["transformer.blocks.0.attn.qkv.weight"].clone()
    to_hf(sd, head)["vilt.encoder.layer.0.attention.attention.query.weight"].add_(1.0)
    assert torch.equal(sd["transformer.blocks.0.attn.qkv.weight"], qkv)


def test_hf_layout_edges():
    for head in ("ve", "pretrain"):
        with pytest.raises(ValueError, match=head):
            to_hf(_vilt(head).state_dict(), head)
    hf = to_hf(_vilt("vqa", labels=3).state_dict(), "vqa")
    ve = from_hf(hf, "ve")  # PuMer's VE head has no HF class; its classifier maps to ve_classifier
    assert {k for k in ve if k.startswith("ve_classifier.")} == {
        f"ve_classifier.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")
    }
    with pytest.raises(CheckpointError, match="classifier"):
        from_hf(hf, "retrieval")
    del hf["vilt.encoder.layer.1.attention.attention.value.bias"]
    with pytest.raises(CheckpointError, match="value"):
        from_hf(hf, "vqa")


# ------------------------------------------------------------------------------------------------ 3. original .ckpt


def _original_ckpt(tmp_path, max_len: int = 12, seed: int = 3):
    """A pre-trained release: the backbone, the MLM and ITM heads, and the position_ids buffer of older BERTs."""
    src = _vilt("pretrain", seed=seed, max_text_len=max_len)
    sd = dict(src.state_dict())
    assert any(k.startswith("mlm_score.") for k in sd) and any(k.startswith("itm_score.") for k in sd)
    sd["text_embeddings.position_ids"] = torch.arange(max_len)[None]
    path = tmp_path / "vilt_200k_mlm_itm.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": {"config": {"max_text_len": 12}}}, path)
    return src.state_dict(), path


def _backbone(sd):
    return {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}


def test_original_ckpt_into_vqa_fresh_head_when_training_error_when_evaluating(tmp_path):
    file_sd, path = _original_ckpt(tmp_path)
    sd, arch, facts = read_vilt_weights(path, "vqa")
    assert facts["layout"] == "original" and arch is None
    assert "text_embeddings.position_ids" not in sd
    model = _vilt("vqa", seed=9)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("vqa_classifier.")}
    notes = load_vilt_checkpoint(model, sd, str(path))
    assert any("head initialised fresh" in n for n in notes), notes
    assert any("dropped" in n and "mlm_score" in n and "itm_score" in n for n in notes), notes
    got = model.state_dict()
    for k, v in _backbone(file_sd).items():
        assert torch.equal(got[k], v), k
    for k, v in head.items():
        assert torch.equal(got[k], v), k
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_vilt_checkpoint(_vilt("vqa"), sd, str(path), evaluate=True)
    # The same through the task's loader (which also fits the architecture first).
    model = _vilt("vqa", seed=10)
    load_pretrained(model, str(path), {"infer_arch": False})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in _backbone(file_sd).items())
    assert reducer_specs(model) == {} and model.masked_softmax == "additive"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_pretrained(_vilt("vqa"), str(path), {"infer_arch": False}, evaluate=True)


def test_original_ckpt_into_nlvr2_copies_the_image_modality_row(tmp_path):
    file_sd, path = _original_ckpt(tmp_path)
    sd, _, _ = read_vilt_weights(path, "nlvr2")
    model = _vilt("nlvr2", seed=9)
    notes = load_vilt_checkpoint(model, sd, str(path))
    assert any("NLVR2 modality row" in n for n in notes), notes
    types, rows = model.token_type_embeddings.weight, file_sd["token_type_embeddings.weight"]
    assert types.shape[0] == 3 and rows.shape[0] == 2
    assert torch.equal(types[:2], rows) and torch.equal(types[2], rows[1])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_vilt_checkpoint(_vilt("nlvr2"), sd, str(path), evaluate=True)


def test_original_ckpt_into_retrieval_ranks_with_the_itm_match_row(tmp_path):
    file_sd, path = _original_ckpt(tmp_path)
    sd, _, _ = read_vilt_weights(path, "retrieval")
    model = _vilt("retrieval", seed=9)
    notes = load_vilt_checkpoint(model, sd, str(path))
    assert any("rank_output" in n for n in notes), notes
    fc_w, fc_b = file_sd["itm_score.fc.weight"], file_sd["itm_score.fc.bias"]
    assert torch.equal(model.rank_output.weight, fc_w[1:2]) and torch.equal(model.rank_output.bias, fc_b[1:2])
    assert torch.equal(model.itm_score.fc.weight, fc_w)  # the ITM head is the retrieval model's own
    with torch.no_grad():  # so the ranker scores the ITM "match" logit
        ids, mask, images, _ = _inputs()
        assert_close(model(ids, mask, images)[:, 0], model.itm_logits(ids, mask, images)[:, 1])
    with pytest.raises(CheckpointError, match="rank_output"):
        load_vilt_checkpoint(_vilt("retrieval"), sd, str(path), evaluate=True)


def test_original_ckpt_positions_cut_and_misfits(tmp_path):
    file_sd, path = _original_ckpt(tmp_path, max_len=16)
    sd, _, _ = read_vilt_weights(path, "vqa")
    model = _vilt("vqa", seed=9)  # max_text_len 12
    notes = load_vilt_checkpoint(model, sd, str(path))
    assert any("positions cut" in n for n in notes), notes
    pos = "text_embeddings.position_embeddings.weight"
    assert torch.equal(model.state_dict()[pos], file_sd[pos][:12])
    broken = {k: v for k, v in sd.items() if k != "transformer.blocks.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing \['transformer.blocks.1.mlp.fc2.bias'\]"):
        load_vilt_checkpoint(_vilt("vqa"), broken, str(path))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_vilt_checkpoint(_vilt("vqa"), {**sd, "transformer.extra": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="shapes"):
        load_vilt_checkpoint(_vilt("vqa", hidden=16), sd, str(path))
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointError, match="not a ViLT"):
        read_vilt_weights(bad, "vqa")


# ------------------------------------------------------------------------------------------------ 4. PuMer folders

PUMER_CONFIG = {
    "architectures": ["ViltForQuestionAnswering"],
    "model_type": "vilt",
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "prune_r": 0.1,
    "merge_r": 0.3,
    "merge_text": 0.2,
    "reduce_layers": [1, 2],
    "sim_method": "mean_head",
    "merge_style": "tome",
}


def _pumer_folder(path, src: ViLT, config: dict):
    path.mkdir()
    sd = {(k if k.startswith(HEAD_PREFIXES) else f"vilt.{k}"): v for k, v in src.state_dict().items()}
    torch.save(sd, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("layers", [[1, 2], "12"])
def test_pumer_folder_attaches_its_reducers_and_masked_softmax(tmp_path, layers):
    src = _vilt("vqa", depth=4, seed=12)
    folder = _pumer_folder(tmp_path / "vilt-vqa2-p0.1-r0.3-t0.2-12", src, {**PUMER_CONFIG, "reduce_layers": layers})
    model = _vilt("vqa", depth=4, seed=13)
    load_pretrained(model, str(folder), {"infer_arch": False}, evaluate=True)
    assert model.masked_softmax == "pumer"
    spec = {"kind": "pumer", **PUMER, "sim_method": "mean_head", "merge_style": "tome"}
    assert reducer_specs(model) == {"transformer.blocks.1": [spec], "transformer.blocks.2": [spec]}
    assert [len(b.token_hooks) for b in model.transformer.blocks] == [0, 1, 1, 0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())

    ref = _attach(_vilt("vqa", depth=4, masked_softmax="pumer"), [1, 2])
    ref.load_state_dict(src.state_dict())
    dense = _vilt("vqa", depth=4, masked_softmax="pumer")
    dense.load_state_dict(src.state_dict())
    ids, mask, images, _ = _inputs(text=12)
    with torch.no_grad():
        got, want, full = model(ids, mask, images), ref(ids, mask, images), dense(ids, mask, images)
        _, state = model.encode(ids, mask, images)
    assert_close(got, want, atol=1e-6, rtol=0)
    assert _max_diff(got, full) > 1e-3  # the reducers change the result
    assert (state.text_len, state.counts[3][0]) == (8, 8 + 6)  # 12 text + 17 image -> (10, 10) -> (8, 6)


def test_pumer_folder_without_reduction_and_bad_folders(tmp_path):
    src = _vilt("vqa", depth=4, seed=12)
    ft = _pumer_folder(tmp_path / "ft", src, {**PUMER_CONFIG, "prune_r": 0.0, "merge_r": 0.0, "merge_text": 0.0})
    model = _vilt("vqa", depth=4)
    load_pretrained(model, str(ft), {"infer_arch": False}, evaluate=True)
    assert reducer_specs(model) == {} and model.masked_softmax == "pumer"  # the -ft baselines: softmax only
    dyn = _pumer_folder(tmp_path / "dyn", src, {**PUMER_CONFIG, "prune_layers": [3]})
    with pytest.raises(CheckpointError, match="prune_layers"):
        read_vilt_weights(dyn, "vqa")
    far = _pumer_folder(tmp_path / "far", src, {**PUMER_CONFIG, "reduce_layers": "258"})
    with pytest.raises(CheckpointError, match=r"reduce_layers \[5, 8\]"):
        read_vilt_weights(far, "vqa")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        read_vilt_weights(tmp_path / "empty", "vqa")


def test_our_file_with_its_description_restores_the_reducers(tmp_path):
    """What a PuMer run saves (the engine's architecture description) evaluates with its reducers."""
    model = _attach(_vilt("vqa", depth=4, seed=14, masked_softmax="pumer"), [1, 2])
    arch = architecture(model)
    assert arch["reducers"] == reducer_specs(model) and len(arch["reducers"]) == 2
    path = tmp_path / "model_pumer.pth"
    torch.save({"model": model.state_dict(), "arch": arch}, path)
    fresh = _vilt("vqa", depth=4, masked_softmax="pumer")
    load_pretrained(fresh, str(path), {"infer_arch": False}, evaluate=True)
    assert reducer_specs(fresh) == reducer_specs(model)
    ids, mask, images, _ = _inputs(text=12)
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask, images), model(ids, mask, images))


# ------------------------------------------------------------------------------------------------ 5. KeyWeights


def _ref_masked_softmax(scores: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spec 2.6, one row at a time in float64: e = exp(s - max) * w', w' = w with its own key raised to 1,
    p = (e + eps / N) / (sum e + eps)."""
    b, h, tq, tk = scores.shape
    out = torch.empty(b, h, tq, tk, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            for q in range(tq):
                s = scores[i, j, q].double()
                w = weights[i].double().clone()
                if q < tk:
                    w[q] = w[q] + (1 - w[q]) * 1.0
                e = (s - s.max()).exp() * w
                out[i, j, q] = (e + eps / tk) / (e.sum() + eps)
    return out


def test_key_weights_match_the_spec_formula():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 5, generator=g) * 3
    weights = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.5], [1.0, 0.25, 1.0, 1.0, 0.0]])
    probs = KeyWeights(weights).probs(scores)
    assert probs.dtype == torch.float32
    assert_close(probs.double(), _ref_masked_softmax(scores, weights), atol=1e-6, rtol=0)
    assert_close(probs.sum(-1), torch.ones(2, 3, 5), atol=1e-6, rtol=0)


def test_key_weights_all_ones_is_softmax_masked_keys_vanish_fractions_down_weight():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 2, 6, 6, generator=g) * 2
    assert_close(KeyWeights(torch.ones(2, 6)).probs(scores), scores.softmax(-1), atol=1e-6, rtol=0)

    w = torch.ones(2, 6)
    w[:, 4] = 0.0
    probs = KeyWeights(w).probs(scores)
    others = [q for q in range(6) if q != 4]
    assert float(probs[:, :, others, 4].max()) < 1e-5  # nobody attends to the masked key ...
    own = probs[:, :, 4, 4]  # ... except the masked token itself
    assert_close(own, scores[:, :, 4].softmax(-1)[..., 4], atol=1e-6, rtol=0)
    assert float(own.min()) > 1e-3

    w = torch.ones(2, 6)
    w[:, 2] = 0.5
    probs = KeyWeights(w).probs(scores)
    # A key weight w is a log(w) bias for every other query; lower than with weight 1.
    others = [q for q in range(6) if q != 2]
    expected = (scores + w.log()[:, None, None, :]).softmax(-1)
    assert_close(probs[:, :, others], expected[:, :, others], atol=3e-6, rtol=0)  # up to the eps smoothing
    assert bool((probs[:, :, others, 2] < scores.softmax(-1)[:, :, others, 2]).all())
    assert_close(probs[:, :, 2], scores[:, :, 2].softmax(-1), atol=1e-6, rtol=0)  # its own weight counts as 1


def test_token_state_masked_softmax_choice():
    x = torch.zeros(2, 4, 8)
    mask = torch.tensor([[1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    bias = TokenState(mask=mask, masked_softmax="pumer").attn_bias(x)
    assert isinstance(bias, KeyWeights) and torch.equal(bias.weights, mask)
    bias = TokenState(masked_softmax="pumer").attn_bias(x)
    assert isinstance(bias, KeyWeights) and torch.equal(bias.weights, torch.ones(2, 4))
    with pytest.raises(ValueError, match="causal"):
        TokenState(masked_softmax="pumer", causal=True).attn_bias(x)
    additive = TokenState(mask=mask, soft_mask=True).attn_bias(x)
    assert additive.shape == (2, 1, 1, 4) and float(additive[0, 0, 0, 3]) < -1e3


def test_pumer_softmax_model_agrees_on_real_tokens_not_on_pads():
    """Dense, the multiplicative mask differs from the additive one only where pads attend (to themselves)."""
    additive = _vilt("none", depth=3, seed=4)
    pumer = _vilt("none", depth=3, seed=4, masked_softmax="pumer")
    ids, mask, images, _ = _inputs()
    with torch.no_grad():
        xa, _ = additive.encode(ids, mask, images)
        xp, _ = pumer.encode(ids, mask, images)
    real = torch.cat([mask, torch.ones(3, IMAGE_TOKENS, dtype=torch.long)], dim=1).bool()
    assert float((xa - xp).abs()[real].max()) <= 1e-4
    assert float((xa - xp).abs()[~real].max()) > 1e-2


# ------------------------------------------------------------------------------------------------ 6. the reducer

# Spec 2.9: (text, image) after each reduce layer of the released ViLT configs, 145 image tokens.
SCHEDULES = {
    "vqa": (32, [2, 5, 8], [(26, 87), (21, 52), (17, 31)]),
    "ve": (40, [2, 4, 6, 8], [(32, 87), (26, 52), (21, 31), (17, 19)]),
    "nlvr2": (40, [2, 5, 8], [(32, 87), (26, 52), (21, 31)]),
}


@pytest.mark.parametrize("head", list(SCHEDULES))
def test_released_token_schedules_analytic_and_traced(head):
    text, layers, table = SCHEDULES[head]
    # ViLT-B/32's token geometry (patch 32 at 384: 144 patches + CLS, 12 blocks) at a small width.
    model = _vilt(head, depth=12, seed=1, labels=3, patch_size=32, image_size=384, max_text_len=40)
    _attach(model, layers)
    schedule = vilt_schedule(model, text, 145)
    assert schedule[0][0] == (text, 145)
    assert [schedule[i][1] for i in layers] == table
    assert all(before == after for i, (before, after) in enumerate(schedule) if i not in layers)

    seen = []

    def record(block, args, output):
        x, state = output
        seen.append((block.index, state.counts[block.index], (state.text_len, x.shape[1] - state.text_len)))

    handles = [b.register_forward_hook(record) for b in model.transformer.blocks]
    ids, _, images, images2 = _inputs(batch=2, text=text, size=384)
    try:
        with torch.no_grad():
            model(ids, torch.ones_like(ids), images, images2)
    finally:
        for h in handles:
            h.remove()
    expected = [(i, (sum(a), sum(a), sum(b)), b) for i, (a, b) in enumerate(schedule)]
    assert seen == expected * model.passes()


def _b32(head: str, layers=()) -> ViLT:
    with torch.device("meta"):
        model = ViLT(head, 3129)
    return _attach(model, layers)


@pytest.mark.parametrize(
    "head,layers,gmacs",
    [
        ("retrieval", [], 15.95),
        ("retrieval", [2, 5, 8], 8.70),
        ("retrieval", [2, 4, 6, 8], 7.64),
        ("vqa", [2, 5, 8], 8.70),
        ("nlvr2", [2, 5, 8], 17.4),
    ],
)
def test_vilt_b32_gmacs_at_32_text_tokens(head, layers, gmacs):
    model = _b32(head, layers)
    assert model.transformer.pos_embed.device.type == "meta"
    assert sum(p.numel() for p in model.transformer.parameters()) > 85_000_000
    cost = vilt_cost(model, 1, 32)
    assert abs(cost.seed_macs / 1e9 - gmacs) / gmacs < 0.01, cost.seed_macs / 1e9
    assert abs(cost.macs / 1e9 - gmacs) / gmacs < 0.01, cost.macs / 1e9


@pytest.mark.parametrize(
    "head,layers,spec,softmax",
    [
        ("vqa", [], {}, "additive"),
        ("vqa", [1, 2], {}, "pumer"),
        ("vqa", [1, 2], {}, "additive"),
        ("nlvr2", [1, 3], {"sim_method": "k_metric"}, "pumer"),
        ("ve", [0, 2], {"prune_r": 0.0, "merge_r": 3}, "pumer"),
        ("retrieval", [1], {"merge_style": "diff", "merge_r": 0.5}, "pumer"),
        ("pretrain", [2], {"merge_style": "tip", "sim_method": "first_head"}, "pumer"),
    ],
)
@pytest.mark.parametrize("kind", ["seed", "batch"])
def test_traced_count_equals_the_analytic_cost(head, layers, spec, softmax, kind):
    model = _attach(_vilt(head, depth=4, masked_softmax=softmax), layers, **spec)
    ids, mask, images, images2 = _inputs(batch=2, text=TEXT)
    batch = SimpleNamespace(ids=ids, mask=mask, images=images, images2=images2)
    probe = model.cost_probe(kind, batch=batch if kind == "batch" else None)
    with torch.no_grad():
        _, traced = count(probe.run, model)
    analytic = probe.analytic()
    assert traced.macs > 0
    assert (traced.macs, traced.flops) == (analytic.seed_macs, analytic.flops), (
        f"traced macs {traced.macs} flops {traced.flops}; analytic seed_macs {analytic.seed_macs} flops "
        f"{analytic.flops}; differences {traced.macs - analytic.seed_macs}, {traced.flops - analytic.flops}"
    )


# Hand-made reducer inputs: B = 2, T = 6 text tokens (the first example with 2 pads), N = 9 image tokens, 2 heads.
T_, N_, H_, D_, HD_ = 6, 9, 2, 8, 4


def _example(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    length = T_ + N_
    x = torch.randn(2, length, D_, generator=g, dtype=torch.float64)
    keys = torch.randn(2, H_, length, HD_, generator=g, dtype=torch.float64)
    probs = torch.rand(2, H_, length, length, generator=g, dtype=torch.float64)
    text_mask = torch.ones(2, T_, dtype=torch.float64)
    text_mask[0, 4:] = 0
    # The real text rows of example 0 ignore the image CLS, its pad rows stare at it: the pads' rows count
    # (spec 2.3), so the image CLS is the most salient image token there, and the first (protected) one.
    probs[0, :, :4, T_] = 1e-4
    probs[0, :, 4:, T_] = 50.0
    probs = probs / probs.sum(-1, keepdim=True)
    # Pad 4 (set A) has nearly the keys of word 3 (set B): they merge, and the merged mask is 0.5.
    keys[0, :, 4] = keys[0, :, 3] + 1e-3 * torch.randn(H_, HD_, generator=g, dtype=torch.float64)
    mask = torch.cat([text_mask, torch.ones(2, N_, dtype=torch.float64)], dim=1)
    state = TokenState(mask=mask, text_len=T_, masked_softmax="pumer")
    return x, state, HookContext(2, "post_attn", probs, keys)


def _ref_groups(metric: list[torch.Tensor], r: int, protect: bool = True) -> list[list[int]]:
    """ToMe's bipartite matching (spec 9), written out: even positions are set A, odd set B; each A token (but a
    protected first one) picks its most similar B token by cosine; the r best-matched A tokens merge into their
    B tokens. Returns the output groups in order (the kept A tokens by index, then every B token), each listing
    its representative first."""
    n = len(metric)
    r = min(r, (n - int(protect)) // 2)
    unit = [m / m.norm() for m in metric]
    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
    best = {}
    for a in a_set[int(protect) :]:
        sims = [float(unit[a] @ unit[b]) for b in b_set]
        j = max(range(len(b_set)), key=sims.__getitem__)
        best[a] = (sims[j], b_set[j])
    sources = sorted(best, key=lambda a: -best[a][0])[:r]
    kept = sorted(set(a_set) - set(sources))
    return [[a] for a in kept] + [[b] + [a for a in sources if best[a][1] == b] for b in b_set]


def _apply_groups(groups, tokens, mask, positions):
    x = torch.stack([torch.stack([tokens[i] for i in g]).mean(0) for g in groups])
    m = torch.stack([torch.stack([mask[i] for i in g]).mean(0) for g in groups])
    return x, m, [positions[g[0]] for g in groups]


def _ref_pumer(x, state, ctx, prune_r, merge_r, merge_text):
    """Spec 2.3-2.6 for one reduce layer, one example at a time."""
    t = state.text_len
    outs, masks, positions = [], [], []
    for b in range(x.shape[0]):
        n = x.shape[1] - t
        text_mask = state.mask[b, :t]
        kbar = ctx.keys[b].mean(0)  # (L, d): keys averaged over heads
        head_mean = ctx.probs[b].mean(0)  # (L, L)
        saliency = [float(sum(head_mean[i, t + j] for i in range(t))) / float(text_mask.sum()) for j in range(n)]
        keep = max(n - round(prune_r * n), 1)
        order = sorted(range(n), key=lambda j: -saliency[j])[:keep]
        img_groups = _ref_groups([kbar[t + j] for j in order], round(merge_r * n))
        img = _apply_groups(img_groups, [x[b, t + j] for j in order], [x.new_ones(())] * keep, [t + j for j in order])
        txt_groups = _ref_groups([kbar[i] for i in range(t)], round(merge_text * t))
        txt = _apply_groups(txt_groups, list(x[b, :t]), list(text_mask), list(range(t)))
        outs.append(torch.cat([txt[0], img[0]]))
        masks.append(torch.cat([txt[1], torch.ones(len(img_groups), dtype=x.dtype)]))
        positions.append(txt[2] + img[2])
    return torch.stack(outs), torch.stack(masks), positions, len(txt_groups)


def test_reducer_equals_the_spec_reference_on_a_hand_made_example():
    x, state, ctx = _example()
    reducer = PuMerReducer(prune_r=0.25, merge_r=0.3, merge_text=0.34)
    out, new = reducer(x, state, ctx)
    ref_x, ref_mask, ref_pos, ref_t = _ref_pumer(x, state, ctx, 0.25, 0.3, 0.34)
    # 9 image tokens: 2 pruned (round(2.25)), round(2.7) = 3 merged (cap (7 - 1) // 2 = 3); text: 2 merged.
    assert (ref_t, out.shape[1] - ref_t) == (4, 4) == reducer.out_split(T_, N_)
    assert new.text_len == ref_t
    assert_close(out, ref_x, atol=1e-12, rtol=0)
    assert_close(new.mask, ref_mask, atol=1e-12, rtol=0)
    assert new.positions.tolist() == ref_pos
    assert new.soft_mask and new.size is None
    assert new.positions[0, ref_t] == T_  # the image CLS, made most salient by the pad rows, leads
    assert 0.5 in new.mask[0].tolist()  # pad 4 merged with word 3


def test_global_tome_when_nothing_is_pruned():
    x, state, ctx = _example(seed=1)
    reducer = PuMerReducer(prune_r=0.0, merge_r=3.7, merge_text=0.2)  # int(merge_r) = 3 over the whole sequence
    out, new = reducer(x, state, ctx)
    groups = _ref_groups(list(ctx.keys[:, :, :].mean(1)[0]), 3)
    ref_x, ref_mask, ref_pos = _apply_groups(groups, list(x[0]), list(state.mask[0]), list(range(T_ + N_)))
    assert out.shape[1] == T_ + N_ - 3 and new.text_len == T_  # the text length is left as it was
    assert_close(out[0], ref_x, atol=1e-12, rtol=0)
    assert_close(new.mask[0], ref_mask, atol=1e-12, rtol=0)
    assert new.positions[0].tolist() == ref_pos
    assert reducer.out_split(T_, N_) == (T_, N_ - 3)
    assert reducer.needs == frozenset({"keys"})
    off = PuMerReducer(prune_r=0.0, merge_r=0.3, merge_text=0.2)  # int(0.3) = 0: nothing at all
    assert off.needs == frozenset() and off.out_split(T_, N_) == (T_, N_)
    same_x, same_state = off(x, state, ctx)
    assert same_x is x and same_state is state


def test_reducer_saliency_methods_select_their_top_k():
    x, state, ctx = _example(seed=2)
    t = T_
    n_text = state.mask[:, :t].sum(1, keepdim=True)
    kbar = ctx.keys.mean(1)
    scores = {
        "mean_head": ctx.probs[:, :, :t, t:].mean(1).sum(1) / n_text,
        "first_head": ctx.probs[:, 0, :t, t:].sum(1) / n_text,
        "k_metric": (kbar[:, :t] @ kbar[:, t:].transpose(1, 2)).sum(1) / n_text,
    }
    kept = {}
    for method, s in scores.items():
        out, new = PuMerReducer(prune_r=0.34, merge_r=0.0, merge_text=0.0, sim_method=method)(x, state, ctx)
        # round(3.06) = 3 pruned, no merging: the image tokens left are the top 6, in descending saliency.
        want = s.argsort(dim=1, descending=True)[:, :6] + t
        assert new.positions[:, t:].tolist() == want.tolist(), method
        assert_close(out[:, t:], x.gather(1, want[..., None].expand(-1, -1, D_)))
        kept[method] = want
    assert len({str(v.tolist()) for v in kept.values()}) == 3  # the three methods disagree on this example
    assert PuMerReducer(0.1, 0.3, 0.2, sim_method="mh").sim_method == "mean_head"


def test_reducer_merge_styles_lengths_and_sums():
    x, state, ctx = _example(seed=3)
    # round(0.9) = 1 pruned: 8 kept; round(4.5) = 4 merges, capped at (8 - 1) // 2 = 3 (tome, tip) or 8 // 2 = 4.
    lengths = {"tome": 5, "tip": 5, "diff": 4}
    results = {}
    for style, n_img in lengths.items():
        for method in ("mean_head", "first_head", "k_metric"):
            reducer = PuMerReducer(prune_r=0.1, merge_r=0.5, merge_text=0.2, sim_method=method, merge_style=style)
            out, new = reducer(x, state, ctx)
            assert reducer.out_split(T_, N_) == (T_ - 1, n_img) == (new.text_len, out.shape[1] - new.text_len)
            assert new.mask.shape == out.shape[:2]
            results[style, method] = (out, new)
    # round(0.9 * 6) = 5 text merges, capped at (6 - 1) // 2 = 2: the text [CLS] is protected.
    reducer = PuMerReducer(prune_r=0.1, merge_r=0.5, merge_text=0.9)
    out, new = reducer(x, state, ctx)
    assert reducer.out_split(T_, N_) == (4, 5) == (new.text_len, out.shape[1] - new.text_len)
    assert new.positions[:, 0].tolist() == [0, 0]
    # The same 8 image tokens are kept in each style; tip and diff sum them (the total is kept), tome averages.
    saliency = ctx.probs[:, :, :T_, T_:].mean(1).sum(1)
    keep = saliency.argsort(dim=1, descending=True)[:, :8] + T_
    kept_total = x.gather(1, keep[..., None].expand(-1, -1, D_)).sum(1)
    for style in ("tip", "diff"):
        assert_close(results[style, "mean_head"][0][:, T_ - 1 :].sum(1), kept_total)
    assert _max_diff(results["tome", "mean_head"][0][:, T_ - 1 :].sum(1), kept_total) > 1e-3
    # tip weights the keys by positive saliencies before the cosine: the same matching as tome (spec 2.10).
    assert torch.equal(results["tip", "mean_head"][1].positions, results["tome", "mean_head"][1].positions)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"sim_method": "qk"}, "sim_method"),
        ({"merge_style": "wavg"}, "merge_style"),
        ({"prune_r": 1.0}, "prune_r"),
        ({"prune_r": -0.1}, "prune_r"),
        ({"merge_text": 1.5}, "merge_text"),
        ({"merge_r": -1}, "merge_r"),
    ],
)
def test_reducer_rejects_bad_settings(kwargs, key):
    with pytest.raises(ValueError, match=key):
        PuMerReducer(**{**PUMER, **kwargs})


def test_reducer_needs_a_single_stream_state():
    x, state, ctx = _example()
    with pytest.raises(ValueError, match="text_len"):
        PuMerReducer(**PUMER)(x, state.replace(text_len=None), ctx)


# ------------------------------------------------------------------------------------------------ 7. the pruner


@pytest.mark.parametrize("layers", ["258", "2,5,8", [2, 5, 8], 258, " 2, 5 ,8"])
def test_pruner_reads_reduce_layers(layers):
    assert PuMer({"pumer": {"reduce_layers": layers}}).layers == [2, 5, 8]


@pytest.mark.parametrize(
    "section,match",
    [
        ({"reduce_layers": "2;5"}, "reduce_layers"),
        ({"reduce_layers": []}, "reduce_layers"),
        ({"reduce_layers": [2, 2]}, "distinct"),
        ({"reduce_layers": [2.0, 5.0]}, "reduce_layers"),
        ({"reduce_layers": True}, "reduce_layers"),
        ({"prune_r": 1.5}, "prune_r"),
        ({"sim_method": "qk"}, "sim_method"),
        ({"keep_ratio": 0.5}, "unknown"),
    ],
)
def test_pruner_rejects_bad_settings(section, match):
    with pytest.raises(ValueError, match=match):
        PuMer({"pumer": section})


def test_pruner_rejects_p_and_other_models():
    with pytest.raises(ValueError, match="--p"):
        PuMer({"p": 0.5, "pumer": {}})
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    with pytest.raises(TypeError, match="VisionTransformer"):
        PuMer({"pumer": {"reduce_layers": [1]}}).attach(vit)
    with pytest.raises(ValueError, match=r"\[4\]"):
        PuMer({"pumer": {"reduce_layers": [1, 4]}}).attach(_vilt("vqa", depth=4))


def test_pruner_attach_bypass_and_report():
    model = _vilt("vqa", depth=4, seed=6, masked_softmax="pumer")
    ids, mask, images, _ = _inputs(text=12)
    with torch.no_grad():
        dense = model(ids, mask, images)
    pruner = PuMer({"pumer": {"reduce_layers": "12"}})
    pruner.attach(model)
    assert [len(b.token_hooks) for b in model.transformer.blocks] == [0, 1, 1, 0]
    with torch.no_grad():
        reduced = model(ids, mask, images)
        assert _max_diff(reduced, dense) > 1e-3
        with pruner.bypassed():
            assert all(not b.token_hooks for b in model.transformer.blocks)
            assert torch.equal(model(ids, mask, images), dense)
        assert torch.equal(model(ids, mask, images), reduced)
        with pytest.raises(RuntimeError), pruner.bypassed():
            raise RuntimeError("evaluation failed")
        assert torch.equal(model(ids, mask, images), reduced)  # restored after an error too
    report = pruner.report()
    assert report["reduce_layers"] == [1, 2]
    assert {k: report[k] for k in PUMER} == PUMER
    assert report["tokens_after_reduce_layers"] == {1: [10, 10], 2: [8, 6]}
    with_reducers = vilt_cost(model, 1, 12).flops
    for b in model.transformer.blocks:
        b.token_hooks.clear()
    assert report["flops_ratio"] == round(with_reducers / vilt_cost(model, 1, 12).flops, 4) < 1.0
