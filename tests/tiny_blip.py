"""Tiny BLIP task models for tests: configs, builders and state dicts laid out like the official files."""

import json

from blip_layout import official_state_dict

from models.blip_caption import BlipCaption
from models.blip_nlvr import BlipNLVR
from models.blip_pretrain import BlipPretrain
from models.blip_retrieval import BlipRetrieval
from models.blip_vqa import BlipVQA

WIDTH, DEPTH, HEADS, PATCH, SIZE, QUEUE, EMBED = 32, 2, 2, 16, 32, 8, 8


def write_vocab(path, n_words):
    """A bert-base-uncased style vocabulary: [PAD], [unused*], [UNK] [CLS] [SEP] [MASK] at BERT's ids."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["red", "circle", "picture", "of", "two"]
    tokens += [f"w{i}" for i in range(n_words - len(tokens))]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(tokens[:n_words]) + "\n")
    return path


def tiny_config(root):
    """Config of a tiny BLIP (ViT and MED 2 x 32, 32 px) whose vocabulary and MED file live under ``root``."""
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
