"""MED (BLIP's BERT): parity with transformers' BERT, caching, LM loss, tying, beam search, key
grammar, pruning seams, the NLVR2 twin layers, and the tokenizer."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from transformers import BertConfig
from transformers import BertLMHeadModel as HFBertLMHeadModel
from transformers import BertModel as HFBertModel

from models.med import (
    MASK_VALUE,
    BertLMHeadModel,
    BertModel,
    MedConfig,
    beam_search,
    extended_attention_mask,
    nucleus_sample,
    prunable_units,
)
from models.tokenizer import init_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOL = {"atol": 1e-5, "rtol": 1e-5}
VOCAB, HIDDEN, HEADS, FFN, MAX_POS = 40, 32, 4, 48, 32
EOS, PAD = 3, 0


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw) -> MedConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POS,
        encoder_width=24,
    )
    return MedConfig(**{**base, **kw})


def _hf_config(**kw) -> BertConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POS,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertConfig(**{**base, **kw})


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (zero biases and unit norms would hide slicing bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _hf_weights(hf: nn.Module) -> dict[str, torch.Tensor]:
    # MED has no token-type embeddings; the oracle's are zeroed before it runs.
    return {k: v for k, v in hf.state_dict().items() if "token_type" not in k}


def _zero_token_types(hf: nn.Module) -> None:
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "token_type" in name:
                p.zero_()


def _inputs(batch: int = 2, length: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -2:] = 0  # right padding, as the tokenizer produces
    ids[1, -2:] = PAD
    return ids, mask


def _states(batch: int = 2, tokens: int = 5, width: int = 24, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(seed))


def _decoder(seed: int = 0, **kw) -> BertLMHeadModel:
    return _randomize(BertLMHeadModel(_config(**kw)), seed).eval()


# --------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("with_cross", [False, True])
def test_text_mode_matches_hf_bert(with_cross):
    hf = _randomize(HFBertModel(_hf_config(), add_pooling_layer=False)).eval()
    _zero_token_types(hf)
    ours = BertModel(_config(add_cross_attention=with_cross)).eval()
    result = ours.load_state_dict(_hf_weights(hf), strict=False)
    assert result.unexpected_keys == []
    assert all(".crossattention." in k for k in result.missing_keys) and bool(result.missing_keys) == with_cross
    ids, mask = _inputs()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).last_hidden_state
        # text mode never touches the cross-attention, even when encoder states are passed
        got = ours(ids, mask, _states() if with_cross else None, mode="text")
    assert got.shape == (2, 6, HIDDEN)
    assert_close(got, expected, **TOL)


def test_decoder_matches_hf_lm_head_with_cross_attention():
    hf = _randomize(HFBertLMHeadModel(_hf_config(is_decoder=True, add_cross_attention=True))).eval()
    _zero_token_types(hf)
    ours = BertLMHeadModel(_config(encoder_width=HIDDEN)).eval()
    ours.load_state_dict(_hf_weights(hf), strict=True)
    ids, mask = _inputs()
    enc = _states(width=HIDDEN)
    enc_mask = torch.ones(2, 5, dtype=torch.long)
    enc_mask[0, -1] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).logits
        got = ours(ids, mask, enc, enc_mask).logits
    assert got.shape == (2, 6, VOCAB)
    assert_close(got, expected, **TOL)
    # the masked image token matters: unmasking it changes the result
    with torch.no_grad():
        assert not torch.allclose(ours(ids, mask, enc).logits, got, atol=1e-3)


def test_multimodal_matches_hf_layers_run_bidirectionally():
    # transformers only runs cross-attention in decoders; switching its config back to an encoder
    # after construction keeps the cross-attention layers but builds a bidirectional mask.
    hf = _randomize(HFBertModel(_hf_config(is_decoder=True, add_cross_attention=True), add_pooling_layer=False))
    hf.eval()
    hf.config.is_decoder = False
    _zero_token_types(hf)
    ours = BertModel(_config(encoder_width=HIDDEN)).eval()
    ours.load_state_dict(_hf_weights(hf), strict=True)
    ids, mask = _inputs()
    enc = _states(width=HIDDEN)
    enc_mask = torch.ones(2, 5, dtype=torch.long)
    enc_mask[1, :2] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
        got = ours(ids, mask, enc, enc_mask)
        causal = ours(ids, mask, enc, enc_mask, is_decoder=True)
    assert_close(got, expected.last_hidden_state, **TOL)
    assert not torch.allclose(got, causal, atol=1e-3)


def test_extended_mask_is_bert_additive_with_cached_prefix():
    pad = torch.tensor([[1, 1, 1, 0]])
    enc = extended_attention_mask(pad, 1, 4)
    assert enc.shape == (1, 1, 1, 4) and enc.flatten().tolist() == [0, 0, 0, MASK_VALUE]
    dec = extended_attention_mask(pad, 1, 2, past=2, is_decoder=True)[0, 0]
    # two new queries at positions 2 and 3 see the cached prefix, themselves causally, never the pad
    assert dec.tolist() == [[0, 0, 0, MASK_VALUE], [0, 0, 0, MASK_VALUE]]
    full = extended_attention_mask(None, 1, 3, is_decoder=True)[0, 0]
    assert (full == 0).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match="covers 3 positions but there are 4"):
        extended_attention_mask(torch.ones(1, 3), 1, 2, past=2, is_decoder=True)


# --------------------------------------------------------------------------- caching


def test_kv_cached_decoding_equals_full_causal_pass():
    model = _decoder()
    # a head-dim mask must act the same on cached and fresh keys
    model.bert.layers[0].attention.self.head_dim_mask = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.7])
    ids, mask = _inputs(length=7)
    enc = _states()
    with torch.no_grad():
        full = model(ids, mask, enc).logits
        cache = model.new_cache()
        steps = [model(ids[:, :3], mask[:, :3], enc, cache=cache).logits]
        for t in range(3, 7):
            # cross-attention keys/values come from the cache after the first call, not from these states
            steps.append(model(ids[:, t : t + 1], mask[:, : t + 1], torch.zeros_like(enc), cache=cache).logits)
    assert cache.length == 7
    assert cache.cross_attn[1].k.shape == (2, HEADS, 5, HIDDEN // HEADS)
    assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_cache_requires_decoder_and_reorders_rows():
    model = _decoder()
    with pytest.raises(ValueError, match="needs is_decoder=True"):
        model.bert(torch.ones(1, 2, dtype=torch.long), encoder_hidden_states=_states(1), cache=model.new_cache())
    ids, _ = _inputs(batch=3, length=4)
    enc = _states(batch=3)
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :3], encoder_hidden_states=enc, cache=cache)
        cache.reorder(torch.tensor([2, 0, 0]))
        step = model(ids[[2, 0, 0], 3:], encoder_hidden_states=enc[[2, 0, 0]], cache=cache).logits[:, -1]
        full = model(ids[[2, 0, 0]], encoder_hidden_states=enc[[2, 0, 0]]).logits[:, -1]
    assert_close(step, full, **TOL)


# --------------------------------------------------------------------------- LM loss and tying


@pytest.mark.parametrize("smoothing", [0.1, 0.0])
def test_lm_loss_matches_hand_computation(smoothing):
    model = _randomize(BertLMHeadModel(_config(), label_smoothing=smoothing)).eval()
    ids, mask = _inputs(length=6)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # e.g. a prompt
    enc = _states()
    with torch.no_grad():
        out_mean = model(ids, mask, enc, labels=labels)
        out_none = model(ids, mask, enc, labels=labels, reduction="none")
    logp = out_mean.logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    per_token = torch.zeros(target.shape)
    for b in range(2):
        for t in range(target.shape[1]):
            if target[b, t] != -100:
                nll = -logp[b, t, target[b, t]]
                per_token[b, t] = (1 - smoothing) * nll + smoothing * (-logp[b, t].mean())
    counted = (target != -100).sum()
    assert_close(out_mean.loss, per_token.sum() / counted, **TOL)
    assert out_none.loss.shape == (2,)
    assert_close(out_none.loss, per_token.sum(1), **TOL)
    with pytest.raises(ValueError, match="reduction must be"):
        model(ids, mask, enc, labels=labels, reduction="sum")


def test_lm_decoder_is_tied_to_word_embeddings_through_loading():
    model = _decoder()
    emb = model.bert.embeddings.word_embeddings
    decoder = model.cls.predictions.decoder
    assert decoder.weight is emb.weight and decoder.bias is model.cls.predictions.bias
    names = [n for n, _ in model.named_parameters()]
    assert "cls.predictions.decoder.weight" not in names and "bert.embeddings.word_embeddings.weight" in names
    sd = model.state_dict()
    assert sd["cls.predictions.decoder.weight"].data_ptr() == sd["bert.embeddings.word_embeddings.weight"].data_ptr()
    assert sd["cls.predictions.decoder.bias"].data_ptr() == sd["cls.predictions.bias"].data_ptr()

    fresh = torch.randn(VOCAB, HIDDEN)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["bert.embeddings.word_embeddings.weight"] = fresh.clone()
    sd["cls.predictions.decoder.weight"] = fresh.clone()
    other = BertLMHeadModel(_config()).eval()
    other.load_state_dict(sd, strict=True)
    assert other.cls.predictions.decoder.weight is other.bert.embeddings.word_embeddings.weight
    assert_close(other.bert.embeddings.word_embeddings.weight.detach(), fresh)

    # a checkpoint naming the tensor only once loads into the tied parameter too
    del sd["bert.embeddings.word_embeddings.weight"]
    sd["cls.predictions.decoder.weight"] = fresh * 2
    other.load_state_dict(sd, strict=True)
    assert_close(other.bert.embeddings.word_embeddings.weight.detach(), fresh * 2)

    sd["bert.embeddings.word_embeddings.weight"] = fresh
    with pytest.raises(RuntimeError, match="cls.predictions.decoder.weight differs from bert.embeddings"):
        other.load_state_dict(sd)

    # a new embedding Parameter (as width slicing creates) is what the logits use
    ids, mask = _inputs()
    with torch.no_grad():
        emb.weight = nn.Parameter(emb.weight * 3)
        hidden = model.cls.predictions.transform(model.bert(ids, mask, _states(), is_decoder=True))
        expected = hidden @ emb.weight.T + model.cls.predictions.bias
        assert_close(model(ids, mask, _states()).logits, expected, **TOL)
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in model.state_dict().items() if not k.startswith("cls.predictions.decoder.")
    )


# --------------------------------------------------------------------------- generation


def _reference_beam_search(logits_fn, prompt, *, num_beams, max_length, min_length, rep, lp, n_ret):
    """Beam search of transformers 4.15 for one sample, written plainly: ``logits_fn(seq)`` gives the
    next-token logits of a whole sequence; finished hypotheses are all kept and the best
    ``num_beams`` of them judged when needed."""
    k = num_beams

    def logprobs(seq):
        lp_ = logits_fn(seq).float().log_softmax(-1)
        for tok in set(seq):
            lp_[tok] = lp_[tok] * rep if lp_[tok] < 0 else lp_[tok] / rep
        if len(seq) < min_length:
            lp_[EOS] = -math.inf
        return lp_

    beams = [(list(prompt), torch.tensor(0.0))] + [(list(prompt), torch.tensor(-1e9))] * (k - 1)
    finished: list[tuple[float, list[int]]] = []
    done = False
    while True:
        cands = []
        for b, (seq, score) in enumerate(beams):
            totals = (logprobs(seq) + score).tolist()
            vocab = len(totals)
            cands += [(total, b * vocab + tok) for tok, total in enumerate(totals)]
        cands = sorted(cands, key=lambda c: (-c[0], c[1]))[: 2 * k]
        length = len(beams[0][0])
        survivors = []
        for rank, (score, flat) in enumerate(cands):
            seq, tok = beams[flat // vocab][0], flat % vocab
            if tok == EOS:
                if rank < k:
                    finished.append((score / length**lp, seq))
            else:
                survivors.append((seq + [tok], torch.tensor(score)))
            if len(survivors) == k:
                break
        best_kept = sorted(finished, key=lambda f: -f[0])[:k]
        done = len(finished) >= k and best_kept[-1][0] >= cands[0][0] / length**lp
        beams = survivors
        if done or len(beams[0][0]) >= max_length:
            break
    if not done:
        finished += [(float(score) / len(seq) ** lp, seq) for seq, score in beams]
    return [seq for _, seq in sorted(finished, key=lambda f: -f[0])[:n_ret]]


def _pad_like_hf(seqs, max_length):
    width = min(max(len(s) for s in seqs) + 1, max_length)
    out = torch.full((len(seqs), width), PAD)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
        if len(s) < max_length:
            out[i, len(s)] = EOS
    return out


# The EOS bias makes hypotheses end at different lengths: some samples finish early, others run
# to max_length, so the bookkeeping of finished hypotheses and the stopping rule both matter.
@pytest.mark.parametrize(
    "num_beams,max_length,min_length,rep,lp,n_ret,eos_bias",
    [
        (3, 9, 5, 1.0, 1.0, 1, 1.5),
        (2, 8, 0, 1.3, 0.6, 2, 0.0),
        (2, 8, 0, 1.3, 0.6, 2, 1.5),
        (4, 10, 4, 1.0, 2.0, 1, 2.5),
    ],
)
def test_beam_search_matches_reference(num_beams, max_length, min_length, rep, lp, n_ret, eos_bias):
    model = _decoder(seed=3)
    with torch.no_grad():
        model.cls.predictions.bias[EOS] += eos_bias
    prompts = torch.tensor([[1, 7, 8], [1, 9, 10], [1, 11, 12]])
    enc = _states(batch=3, seed=5)
    got = model.beam_search(
        prompts,
        enc,
        num_beams=num_beams,
        max_length=max_length,
        min_length=min_length,
        eos_token_id=EOS,
        pad_token_id=PAD,
        repetition_penalty=rep,
        length_penalty=lp,
        num_return_sequences=n_ret,
    )
    seqs = []
    for b in range(3):

        def logits_fn(seq, b=b):
            with torch.no_grad():
                return model(torch.tensor([seq]), encoder_hidden_states=enc[b : b + 1]).logits[0, -1]

        seqs += _reference_beam_search(
            logits_fn,
            prompts[b].tolist(),
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            rep=rep,
            lp=lp,
            n_ret=n_ret,
        )
    expected = _pad_like_hf(seqs, max_length)
    assert torch.equal(got, expected), (got, expected)
    assert (got[:, :3] == prompts.repeat_interleave(n_ret, 0)).all()


@pytest.mark.parametrize("seed", range(12))
def test_beam_search_function_matches_reference_on_a_table_language_model(seed):
    # A flat random "language model" whose next-token logits depend on the first prompt token, the
    # length and the last token: many near-competitive hypotheses of different lengths, so that
    # length normalisation, the stopping rule and the hypothesis bookkeeping all decide the outcome.
    g = torch.Generator().manual_seed(seed)
    vocab = 10
    table = torch.randn(vocab, 16, vocab, vocab, generator=g) * 1.5
    num_beams = int(torch.randint(2, 5, (1,), generator=g))
    max_length = int(torch.randint(6, 12, (1,), generator=g))
    min_length = int(torch.randint(0, 7, (1,), generator=g))
    rep = [1.0, 1.4][seed % 2]
    lp = [1.0, 0.5, 2.0][seed % 3]
    n_ret = 1 + seed % num_beams

    def logits_fn(seq):
        return table[seq[0], len(seq), seq[-1]]

    def step(tokens, reorder):
        return torch.stack([logits_fn(row) for row in tokens.tolist()])

    prompts = torch.tensor([[1, 4], [2, 6], [5, 5]])
    settings = dict(num_beams=num_beams, max_length=max_length, min_length=min_length)
    got = beam_search(
        step,
        prompts,
        **settings,
        eos_token_id=EOS,
        pad_token_id=PAD,
        repetition_penalty=rep,
        length_penalty=lp,
        num_return_sequences=n_ret,
    )
    seqs = []
    for prompt in prompts.tolist():
        seqs += _reference_beam_search(logits_fn, prompt, **settings, rep=rep, lp=lp, n_ret=n_ret)
    assert torch.equal(got, _pad_like_hf(seqs, max_length)), (got, seqs)


def test_beam_search_honours_min_length():
    model = _decoder(seed=4)
    with torch.no_grad():
        model.cls.predictions.bias[EOS] += 30.0  # EOS is by far the likeliest token everywhere
    prompts = torch.tensor([[1, 7], [1, 8]])
    kwargs = dict(num_beams=3, max_length=12, eos_token_id=EOS, pad_token_id=PAD)
    eager = model.generate(prompts, _states(), min_length=0, **kwargs)
    assert eager.tolist() == [[1, 7, EOS], [1, 8, EOS]]
    held = model.generate(prompts, _states(), min_length=6, **kwargs)
    # the length before EOS counts the prompt: exactly 6 tokens, then EOS as soon as allowed
    assert held.shape == (2, 7)
    assert (held[:, 6] == EOS).all() and not (held[:, :6] == EOS).any()


@pytest.mark.parametrize("rep", [1.0, 1.6])
def test_sampling_with_tiny_nucleus_is_greedy_and_pads_after_eos(rep):
    model = _decoder(seed=6)
    with torch.no_grad():
        model.cls.predictions.bias[EOS] += 3.0
    prompts = torch.tensor([[1, 7], [1, 9]])
    enc = _states()
    got = model.generate(
        prompts,
        enc,
        sample=True,
        top_p=0.0,
        max_length=10,
        min_length=3,
        repetition_penalty=rep,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    expected = []
    for b in range(2):
        seq = prompts[b].tolist()
        while len(seq) < 10 and (len(seq) == 2 or seq[-1] != EOS):
            with torch.no_grad():
                logits = model(torch.tensor([seq]), encoder_hidden_states=enc[b : b + 1]).logits[0, -1]
            for tok in set(seq):  # sampling penalises raw logits: shrink positive, grow negative
                logits[tok] = logits[tok] / rep if logits[tok] > 0 else logits[tok] * rep
            if len(seq) < 3:
                logits[EOS] = -math.inf
            seq.append(int(logits.argmax()))
        expected.append(seq)
    width = got.shape[1]
    assert width == max(len(s) for s in expected)
    assert got.tolist() == [s + [PAD] * (width - len(s)) for s in expected]
    assert EOS in got[0].tolist() or EOS in got[1].tolist()


@pytest.mark.parametrize(
    "top_p,top_k,allowed",
    [(0.6, 50, {0}), (0.8, 50, {0, 1}), (0.9, 50, {0, 1, 2}), (1.0, 2, {0, 1}), (0.95, 0, {0, 1, 2})],
)
def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p(top_p, top_k, allowed):
    # probabilities of tokens 0..4: .698, .156, .104, .035, .008 (token 5 = EOS is never drawn)
    logits = torch.tensor([2.0, 0.5, 0.1, -1.0, -2.5, -30.0])

    def step(tokens, reorder):
        return logits.expand(tokens.shape[0], -1)

    drawn = nucleus_sample(
        step,
        torch.zeros(400, 1, dtype=torch.long),
        max_length=2,
        eos_token_id=5,
        pad_token_id=PAD,
        top_p=top_p,
        top_k=top_k,
        generator=torch.Generator().manual_seed(0),
    )
    assert drawn.shape == (400, 2)
    assert set(drawn[:, 1].tolist()) == allowed


# --------------------------------------------------------------------------- key grammar


def _grammar_keys(depth, *, cross, twin=False, merge_from=6, prefix="", lm_head=False, enc_width=24):
    """State-dict keys and shapes of the MED key grammar (``position_ids`` left out: it is a buffer
    of the official checkpoints that MED does not keep)."""
    d, f = HIDDEN, FFN

    def lin(name, out, inp):
        return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}

    def norm(name):
        return {f"{name}.weight": (d,), f"{name}.bias": (d,)}

    b = f"{prefix}bert." if lm_head else prefix
    keys = {
        f"{b}embeddings.word_embeddings.weight": (VOCAB, d),
        f"{b}embeddings.position_embeddings.weight": (MAX_POS, d),
        **norm(f"{b}embeddings.LayerNorm"),
    }
    for i in range(depth):
        layer = f"{b}encoder.layer.{i}"
        for part in ("query", "key", "value"):
            keys |= lin(f"{layer}.attention.self.{part}", d, d)
        keys |= lin(f"{layer}.attention.output.dense", d, d) | norm(f"{layer}.attention.output.LayerNorm")
        if cross:
            for branch in ("self0", "self1") if twin else ("self",):
                keys |= lin(f"{layer}.crossattention.{branch}.query", d, d)
                keys |= lin(f"{layer}.crossattention.{branch}.key", d, enc_width)
                keys |= lin(f"{layer}.crossattention.{branch}.value", d, enc_width)
            for dense in ("dense0", "dense1") if twin else ("dense",):
                keys |= lin(f"{layer}.crossattention.output.{dense}", d, d)
            if twin and i >= merge_from:
                keys |= lin(f"{layer}.crossattention.output.merge_layer", d, 2 * d)
            keys |= norm(f"{layer}.crossattention.output.LayerNorm")
        keys |= lin(f"{layer}.intermediate.dense", f, d)
        keys |= lin(f"{layer}.output.dense", d, f) | norm(f"{layer}.output.LayerNorm")
    if lm_head:
        p = f"{prefix}cls.predictions."
        keys |= {f"{p}bias": (VOCAB,), f"{p}decoder.weight": (VOCAB, d), f"{p}decoder.bias": (VOCAB,)}
        keys |= lin(f"{p}transform.dense", d, d) | norm(f"{p}transform.LayerNorm")
    return keys


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "kind",
    ["text_encoder", "multimodal_encoder", "decoder", "nlvr_twin"],
)
def test_state_dict_follows_key_grammar(kind):
    if kind == "text_encoder":
        model, expected = BertModel(_config(add_cross_attention=False)), _grammar_keys(2, cross=False)
    elif kind == "multimodal_encoder":
        model, expected = BertModel(_config()), _grammar_keys(2, cross=True)
    elif kind == "decoder":
        model, expected = BertLMHeadModel(_config()), _grammar_keys(2, cross=True, lm_head=True)
    else:
        model = BertModel(_config(num_hidden_layers=8), twin_cross_attention=True)
        expected = _grammar_keys(8, cross=True, twin=True)
    assert _shapes(model) == expected


def test_state_dict_nested_under_a_task_prefix():
    holder = nn.Module()
    holder.text_decoder = BertLMHeadModel(_config())
    assert _shapes(holder) == _grammar_keys(2, cross=True, lm_head=True, prefix="text_decoder.")
    copy_ = nn.Module()
    copy_.text_decoder = BertLMHeadModel(_config())
    copy_.load_state_dict(holder.state_dict(), strict=True)
    holder.eval()
    copy_.eval()
    ids = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        expected = holder.text_decoder(ids, None, _states(1)).logits
        assert_close(copy_.text_decoder(ids, None, _states(1)).logits, expected)


def test_med_config_json_matches_blip():
    config = MedConfig.from_json_file(REPO / "configs" / "med_config.json")
    assert config == MedConfig()
    raw = json.loads((REPO / "configs" / "med_config.json").read_text())
    assert (raw["vocab_size"], raw["layer_norm_eps"], raw["hidden_act"], raw["encoder_width"]) == (
        30524,
        1e-12,
        "gelu",
        768,
    )
    assert MedConfig.from_json_file(REPO / "configs" / "med_config.json", encoder_width=1024).encoder_width == 1024
    with pytest.raises(ValueError, match=r"unknown MED config keys \['hiden_size'\]"):
        MedConfig.from_dict({**raw, "hiden_size": 10})
    assert MedConfig.coerce(_hf_config()).hidden_size == HIDDEN


# --------------------------------------------------------------------------- pruning seams


def _keep_vector(size: int, seed: int, drop: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:drop]] = False
    return keep


def _forward(model, ids, mask, enc):
    with torch.no_grad():
        if isinstance(model, BertLMHeadModel):
            return model(ids, mask, enc).logits
        return model(ids, mask, enc)


@pytest.mark.parametrize("kind", ["decoder", "nlvr_twin"])
def test_masks_equal_physical_slicing(kind):
    if kind == "decoder":
        model = _decoder(seed=7)
        enc = _states()
    else:
        model = _randomize(BertModel(_config(num_hidden_layers=7), twin_cross_attention=True), 7).eval()
        enc = [_states(seed=8), _states(tokens=3, seed=9)]
    ids, mask = _inputs()
    units = prunable_units(model)
    before = sum(p.numel() for p in model.parameters())
    removed = 0
    keeps = {}
    for n, unit in enumerate(u for u in units if u.kind in ("head_dim", "neuron")):
        keep = _keep_vector(unit.size, n, drop=2 if unit.kind == "head_dim" else 5)
        # soft values on kept entries must survive slicing too
        unit.set_mask(keep.float() * (0.5 + torch.rand(unit.size, generator=torch.Generator().manual_seed(n))))
        keeps[unit.name, unit.kind] = keep
        removed += int((~keep).sum()) * unit.cost
    masked = _forward(model, ids, mask, enc)
    for unit in units:
        if (unit.name, unit.kind) in keeps:
            keep = keeps[unit.name, unit.kind]
            if unit.kind == "head_dim":
                unit.keep(keep, rescale=False)
            else:
                unit.keep(keep)
    assert_close(_forward(model, ids, mask, enc), masked, **TOL)
    assert sum(p.numel() for p in model.parameters()) == before - removed


def test_head_masks_equal_head_slicing():
    model = _decoder(seed=9)
    ids, mask = _inputs()
    units = [u for u in prunable_units(model) if u.kind == "head"]
    assert len(units) == 4  # self- and cross-attention of two layers
    for n, unit in enumerate(units):
        unit.set_mask(_keep_vector(unit.size, n, drop=1).float())
    masked = _forward(model, ids, mask, _states())
    for unit in units:
        unit.keep(unit.module.head_mask.bool())
    assert model.block_widths()["heads"] == [3, 3] and model.block_widths()["cross_heads"] == [3, 3]
    assert_close(_forward(model, ids, mask, _states()), masked, **TOL)


def test_head_dim_slicing_rescales_like_bert_and_rebuilds_from_widths():
    model = _decoder(seed=10)
    ids, mask = _inputs()
    enc = _states()
    attn = model.bert.layers[1].crossattention.self
    keep = torch.tensor([True, False, True, True, False, True, True, False])
    attn.head_dim_mask = keep.float()
    with torch.no_grad():
        attn.scale = 5**-0.5  # the scale BERT recomputes from the 5 kept coordinates
        expected = model(ids, mask, enc).logits
        attn.scale = 8**-0.5
        unscaled = model(ids, mask, enc).logits
    attn.keep_head_dims(keep)  # rescale is BERT's default
    attn.head_dim_mask = None
    assert attn.scale == pytest.approx(5**-0.5)
    got = _forward(model, ids, mask, enc)
    assert_close(got, expected, **TOL)
    assert not torch.allclose(got, unscaled, atol=1e-4)

    model.bert.layers[0].intermediate.keep_neurons(torch.arange(0, FFN, 2))
    widths = model.block_widths()
    assert widths == {
        "heads": [4, 4],
        "head_dims": [8, 8],
        "mlp_hidden": [FFN // 2, FFN],
        "cross_heads": [4, 4],
        "cross_head_dims": [8, 5],
    }
    rebuilt = BertLMHeadModel(_config(), **json.loads(json.dumps(widths))).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert_close(_forward(rebuilt, ids, mask, enc), _forward(model, ids, mask, enc), **TOL)


def test_prunable_units_names_sizes_and_costs():
    model = BertLMHeadModel(_config())
    units = prunable_units(model, modality="decoder", prefix="text_decoder.")
    table = [(u.name, u.kind, u.size, u.modality) for u in units]
    assert table[:5] == [
        ("text_decoder.bert.encoder.layer.0.attention.self", "head_dim", 8, "decoder"),
        ("text_decoder.bert.encoder.layer.0.attention.self", "head", 4, "decoder"),
        ("text_decoder.bert.encoder.layer.0.crossattention.self", "head_dim", 8, "cross"),
        ("text_decoder.bert.encoder.layer.0.crossattention.self", "head", 4, "cross"),
        ("text_decoder.bert.encoder.layer.0.intermediate", "neuron", FFN, "decoder"),
    ]
    assert len(units) == 10
    cost = {(u.name.removeprefix("text_decoder.bert.encoder.layer.1."), u.kind): u.cost for u in units}
    # one head coordinate: a q, k and v row (with biases) in every head plus an output-dense column
    assert cost["attention.self", "head_dim"] == HEADS * (3 * (HIDDEN + 1) + HIDDEN)
    assert cost["attention.self", "head"] == 8 * (3 * (HIDDEN + 1) + HIDDEN)
    # cross-attention keys and values read the 24-wide encoder states
    assert cost["crossattention.self", "head_dim"] == HEADS * ((HIDDEN + 1) + 2 * (24 + 1) + HIDDEN)
    assert cost["intermediate", "neuron"] == HIDDEN + 1 + HIDDEN
    twin = BertModel(_config(num_hidden_layers=7), twin_cross_attention=True)
    names = {u.name for u in prunable_units(twin)}
    assert {"encoder.layer.6.crossattention.self0", "encoder.layer.6.crossattention.self1"} <= names
    assert len(names) == 7 * 4 and not any(n.endswith("crossattention.self") for n in names)


# --------------------------------------------------------------------------- NLVR2 twin layers


def _attend(x, ctx, attn, mask=None):
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.query(x).view(b, t, h, d).transpose(1, 2)
    k = attn.key(ctx).view(b, ctx.shape[1], h, d).transpose(1, 2)
    v = attn.value(ctx).view(b, ctx.shape[1], h, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * d)


def test_nlvr_twin_layers_average_then_merge():
    model = _randomize(BertModel(_config(num_hidden_layers=7), twin_cross_attention=True), 11).eval()
    layers = model.layers
    assert [layer.crossattention.output.merge_layer is not None for layer in layers] == [False] * 6 + [True]
    ids, mask = _inputs()
    images = [_states(seed=12), _states(tokens=3, seed=13)]
    image_masks = [torch.ones(2, 5, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 1, 1]])]
    with torch.no_grad():
        got = model(ids, mask, images, image_masks)
        emb = model.embeddings
        x = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings.weight[: ids.shape[1]])
        for layer in layers:
            sa = layer.attention
            x = sa.output.LayerNorm(sa.output.dense(_attend(x, x, sa.self, mask)) + x)
            ca = layer.crossattention
            h0 = ca.output.dense0(_attend(x, images[0], ca.self0, image_masks[0]))
            h1 = ca.output.dense1(_attend(x, images[1], ca.self1, image_masks[1]))
            if ca.output.merge_layer is None:
                fused = (h0 + h1) / 2
            else:
                fused = ca.output.merge_layer(torch.cat([h0, h1], dim=-1))
            x = ca.output.LayerNorm(fused + x)
            ffn = F.gelu(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(layer.output.dense(ffn) + x)
    assert_close(got, x, **TOL)
    with pytest.raises(ValueError, match="list of two encoder states"):
        model(ids, mask, images[0])
    with pytest.raises(ValueError, match="twin_cross_attention=True"):
        BertModel(_config())(ids, mask, images)


# --------------------------------------------------------------------------- hooks, checkpointing, errors


def test_token_hook_can_drop_padding_tokens_without_changing_the_rest():
    model = _randomize(BertModel(_config()), 14).eval()
    ids, _ = _inputs()
    mask = torch.ones_like(ids)
    mask[:, -1] = 0  # the last token is padding in both samples
    enc = _states()
    seen = []

    class DropLast:
        point = "post_attn"
        needs = frozenset({"probs"})

        def __call__(self, x, state, ctx):
            seen.append((ctx.block, tuple(ctx.probs.shape), tuple(ctx.cross_probs.shape)))
            return x[:, :-1], state.select(torch.arange(x.shape[1] - 1).expand(x.shape[0], -1))

    with torch.no_grad():
        full = model(ids, mask, enc)
        model.layers[0].token_hooks.append(DropLast())
        pruned, state = model.encode(ids, mask, enc, record_attn=[1])
    assert seen == [(0, (2, HEADS, 6, 6), (2, HEADS, 6, 5))]
    assert state.maps[1].shape == (2, HEADS, 5, 5) and state.cross_maps[1].shape == (2, HEADS, 5, 5)
    assert state.padding_mask(pruned).tolist() == [[1] * 5] * 2
    assert pruned.shape == (2, 5, HIDDEN)
    assert_close(pruned, full[:, :-1], **TOL)


def test_grad_checkpointing_changes_neither_values_nor_names():
    model = _decoder(seed=15, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    clone = copy.deepcopy(model)
    clone.set_grad_checkpointing(True)
    assert [n for n, _ in clone.named_parameters()] == [n for n, _ in model.named_parameters()]
    ids, mask = _inputs()
    labels = ids.masked_fill(mask == 0, -100)
    enc = _states().requires_grad_(True)
    enc2 = enc.detach().clone().requires_grad_(True)
    model(ids, mask, enc, labels=labels).loss.backward()
    clone(ids, mask, enc2, labels=labels).loss.backward()
    assert_close(enc2.grad, enc.grad, **TOL)
    for (name, a), (_, b) in zip(model.named_parameters(), clone.named_parameters()):
        assert_close(b.grad, a.grad, **TOL, msg=name)


def test_deepcopy_keeps_output_dense_links():
    model = _decoder(seed=16)
    clone = copy.deepcopy(model)
    attn = clone.bert.layers[0].attention
    assert attn.self.output_dense is attn.output.dense
    assert clone.cls.predictions.decoder.weight is clone.bert.embeddings.word_embeddings.weight
    attn.self.keep_head_dims([0, 1, 2, 3])
    assert attn.output.dense.weight.shape == (HIDDEN, HEADS * 4)
    assert model.bert.layers[0].attention.output.dense.weight.shape == (HIDDEN, HIDDEN)


def test_mode_errors_name_the_problem():
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        BertModel(_config())(ids)
    with pytest.raises(ValueError, match="has no cross-attention; call it with mode='text'"):
        BertModel(_config(add_cross_attention=False))(ids, encoder_hidden_states=_states(1))
    with pytest.raises(ValueError, match="mode must be"):
        BertModel(_config())(ids, mode="fusion")
    with pytest.raises(ValueError, match="exceed max_position_embeddings=32"):
        BertModel(_config())(torch.ones(1, 33, dtype=torch.long), mode="text")
    with pytest.raises(ValueError, match="no pooler"):
        BertModel(_config(), add_pooling_layer=True)
    with pytest.raises(ValueError, match="mlp_hidden lists 1 layers but num_hidden_layers is 2"):
        BertModel(_config(), mlp_hidden=[8])


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from data.synthetic import ensure_world

    return ensure_world(tmp_path_factory.mktemp("med") / "world", n=12, image_size=24, progress=False)


def test_tokenizer_on_the_synthetic_vocabulary(world):
    tokenizer = init_tokenizer(world / "tokenizer")
    size = len((world / "tokenizer" / "vocab.txt").read_text().splitlines())
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.mask_token_id == 4
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [size, size + 1]
    assert tokenizer.bos_token_id == size and tokenizer.enc_token_id == size + 1
    assert len(tokenizer) == size + 2

    texts = []
    for split in ("train", "val", "test"):
        for e in json.loads((world / f"annotation/coco_karpathy_{split}.json").read_text()):
            texts += e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        for e in json.loads((world / f"annotation/vqa_{split}.json").read_text()):
            texts += [e["question"], *e.get("answer", [])]
    for split in ("train", "dev", "test"):
        texts += [e["sentence"] for e in json.loads((world / f"annotation/nlvr_{split}.json").read_text())]
    for split in ("train", "val", "test"):
        for e in json.loads((world / f"annotation/flickr30k_{split}.json").read_text()):
            texts += e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
    texts += json.loads((world / "annotation/answer_list.json").read_text()) + ["a picture of "]
    assert len(texts) > 100
    encoded = tokenizer(texts, padding="longest")["input_ids"]
    assert all(tokenizer.unk_token_id not in ids for ids in encoded)
    assert all(ids[0] == tokenizer.cls_token_id for ids in encoded)

    # BLIP swaps the first token for [DEC] / [ENC]; decoding without specials drops both
    ids = tokenizer("A red circle.", return_tensors="pt").input_ids
    ids[:, 0] = tokenizer.enc_token_id
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a red circle."


def test_tokenizer_missing_directory_is_named(tmp_path):
    missing = tmp_path / "bert-base-uncased"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*vocab.txt"):
        init_tokenizer(missing)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="has no vocab.txt"):
        init_tokenizer(missing)
