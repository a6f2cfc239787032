"""CLIP weights in the layouts users hold, mapped onto :class:`models.clip.ClipRetrieval` and back.

Three layouts (:func:`detect_layout`):

* ``openai``: OpenAI's release (``visual.conv1.weight``, ``visual.transformer.resblocks.{i}.attn.in_proj_weight``,
  ``ln_final``, ``text_projection``, ...). open_clip's state dicts use the same keys, and so do the UPop / MADTP
  forks' fine-tuned ``clip_large_retrieval_{coco,flickr}.pth`` (``{'model': ...}``), which add the momentum twins
  (``visual_m.*``, ``transformer_m.*``, ``token_embedding_m``, ``ln_final_m``, ``text_projection_m``,
  ``positional_embedding_m``) and the queues, and UPop's ``*_compressed.pth`` at pruned widths.
* ``hf``: a Hugging Face ``CLIPModel`` (``vision_model.*``, ``text_model.*``, separate q/k/v projections,
  ``visual_projection`` / ``text_projection`` Linear layers without bias).
* ``ours``: this project's names (timm style: ``visual.blocks.{i}.attn.qkv``, ``text.blocks.{i}.mlp.fc1``, ...).

OpenAI's ``.pt`` files are TorchScript archives; reading one runs TorchScript deserialisation, so it is refused unless
the caller trusts the file (``trust_torchscript``); ``scripts/convert_clip.py`` converts one once into a plain
safetensors file. Every other file is read with ``weights_only=True`` or as safetensors.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.clip import ClipArch
from utils import CheckpointError, load_model_folder, log

__all__ = [
    "LAYOUTS",
    "detect_layout",
    "dense_problems",
    "hf_config",
    "infer_arch",
    "is_torchscript",
    "load_clip_checkpoint",
    "read_clip_weights",
    "save_hf",
    "save_weights",
    "to_layout",
    "to_ours",
]

LAYOUTS = ("ours", "openai", "hf")
_TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # ints of OpenAI's archives
_QUEUES = ("image_queue", "text_queue", "idx_queue", "ptr_queue")
_MOMENTUM = ("visual_m.", "text_m.")

# One pre-norm block: OpenAI / open_clip names -> ours.
_OPENAI_BLOCK = (
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
# Everything outside the blocks: (OpenAI key, our key, reshape to ours, reshape back). ``{m}`` is "" or "_m".
_OPENAI_TOP = (
    ("visual{m}.conv1.weight", "visual{m}.patch_embed.proj.weight", None, None),
    ("visual{m}.class_embedding", "visual{m}.cls_token", lambda t: t.reshape(1, 1, -1), lambda t: t.reshape(-1)),
    ("visual{m}.positional_embedding", "visual{m}.pos_embed", lambda t: t.unsqueeze(0), lambda t: t.squeeze(0)),
    ("visual{m}.ln_pre.", "visual{m}.norm_pre.", None, None),
    ("visual{m}.ln_post.", "visual{m}.norm.", None, None),
    ("visual{m}.proj", "visual{m}.proj", None, None),
    ("token_embedding{m}.weight", "text{m}.token_embedding.weight", None, None),
    ("positional_embedding{m}", "text{m}.pos_embed", None, None),
    ("ln_final{m}.", "text{m}.norm.", None, None),
    ("text_projection{m}", "text{m}.proj", None, None),
    ("logit_scale{m}", "logit_scale{m}", None, None),
)
_OPENAI_BLOCKS = (
    ("visual{m}.transformer.resblocks.", "visual{m}.blocks."),
    ("transformer{m}.resblocks.", "text{m}.blocks."),
)

# Hugging Face CLIPModel names -> ours (online towers only; the q/k/v Linear layers are fused separately).
_HF_BLOCK = (
    ("layer_norm1.", "norm1."),
    ("self_attn.out_proj.", "attn.proj."),
    ("layer_norm2.", "norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
_HF_TOP = (
    ("vision_model.embeddings.patch_embedding.weight", "visual.patch_embed.proj.weight", None, None),
    (
        "vision_model.embeddings.class_embedding",
        "visual.cls_token",
        lambda t: t.reshape(1, 1, -1),
        lambda t: t.reshape(-1),
    ),
    (
        "vision_model.embeddings.position_embedding.weight",
        "visual.pos_embed",
        lambda t: t.unsqueeze(0),
        lambda t: t.squeeze(0),
    ),
    ("vision_model.pre_layrnorm.", "visual.norm_pre.", None, None),  # sic: transformers' name
    ("vision_model.post_layernorm.", "visual.norm.", None, None),
    ("visual_projection.weight", "visual.proj", lambda t: t.t(), lambda t: t.t()),
    ("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight", None, None),
    ("text_model.embeddings.position_embedding.weight", "text.pos_embed", None, None),
    ("text_model.final_layer_norm.", "text.norm.", None, None),
    ("text_projection.weight", "text.proj", lambda t: t.t(), lambda t: t.t()),
    ("logit_scale", "logit_scale", None, None),
)
_HF_BLOCKS = (("vision_model.encoder.layers.", "visual.blocks."), ("text_model.encoder.layers.", "text.blocks."))
_HF_IGNORED = re.compile(r".*\.position_ids$")


def detect_layout(sd: Mapping[str, Any], source: str = "the state dict") -> str:
    """``openai``, ``hf`` or ``ours``, from the keys; anything else is an error naming what was found."""
    keys = set(sd)
    if "visual.conv1.weight" in keys or any(k.startswith("visual.transformer.resblocks.") for k in keys):
        return "openai"
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if "visual.patch_embed.proj.weight" in keys or any(k.startswith("text.blocks.") for k in keys):
        return "ours"
    sample = ", ".join(sorted(keys)[:6]) or "no keys"
    raise CheckpointError(f"{source} is not a CLIP state dict in a known layout (keys: {sample}, ...)")


def _map_keys(
    sd: Mapping[str, Tensor],
    top: tuple,
    blocks: tuple,
    block_map: tuple,
    momentum: tuple[str, ...],
    reverse: bool,
    source: str,
    ignore: Callable[[str], bool] = lambda k: False,
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if ignore(key):
            continue
        new = _map_one(key, value, top, blocks, block_map, momentum, reverse)
        if new is None:
            unknown.append(key)
            continue
        out[new[0]] = new[1].contiguous()
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys have no CLIP counterpart: {', '.join(unknown[:6])}")
    return out


def _map_one(key, value, top, blocks, block_map, momentum, reverse):
    for m in momentum:
        for src, dst, fwd, back in top:
            a, b = (dst, src) if reverse else (src, dst)
            a, b = a.format(m=m), b.format(m=m)
            fn = back if reverse else fwd
            if a.endswith(".") and key.startswith(a):
                return b + key[len(a) :], value
            if key == a:
                return b, (fn(value) if fn is not None else value)
        for src, dst in blocks:
            a, b = (dst, src) if reverse else (src, dst)
            a, b = a.format(m=m), b.format(m=m)
            if not key.startswith(a):
                continue
            index, _, rest = key[len(a) :].partition(".")
            for x, y in block_map:
                x, y = (y, x) if reverse else (x, y)
                if rest.startswith(x):
                    return f"{b}{index}.{y}{rest[len(x) :]}", value
    return None


def to_ours(sd: Mapping[str, Tensor], source: str = "the state dict") -> tuple[dict[str, Tensor], str]:
    """(state dict in our layout, the layout it came in)."""
    layout = detect_layout(sd, source)
    if layout == "ours":
        return dict(sd), layout
    if layout == "openai":
        sd = {k: v for k, v in sd.items() if k not in _TORCHSCRIPT_EXTRAS and k != "attn_mask"}
        queues = {k: sd.pop(k) for k in list(sd) if k in _QUEUES}
        out = _map_keys(sd, _OPENAI_TOP, _OPENAI_BLOCKS, _OPENAI_BLOCK, ("", "_m"), False, source)
        return {**out, **queues}, layout
    return _hf_to_ours(sd, source), layout


def _hf_to_ours(sd: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    sd = {k: v for k, v in sd.items() if not _HF_IGNORED.match(k)}
    fused: dict[str, Tensor] = {}
    qkv = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
    parts: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    for key in list(sd):
        m = qkv.match(key)
        if m:
            parts.setdefault((m.group(1), m.group(2), m.group(4)), {})[m.group(3)] = sd.pop(key)
    for (tower, index, kind), pieces in parts.items():
        if set(pieces) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: {tower} layer {index} lacks some of its q/k/v {kind} tensors")
        ours = "visual" if tower == "vision_model" else "text"
        fused[f"{ours}.blocks.{index}.attn.qkv.{kind}"] = torch.cat([pieces["q"], pieces["k"], pieces["v"]])
    return {**_map_keys(sd, _HF_TOP, _HF_BLOCKS, _HF_BLOCK, ("",), False, source), **fused}


def to_layout(sd: Mapping[str, Tensor], layout: str, momentum: bool = True) -> dict[str, Tensor]:
    """Our state dict in ``layout`` (``openai``: the open_clip / fork keys, with the momentum twins and queues when
    ``momentum`` and present; ``hf``: a ``CLIPModel`` state dict, online towers only)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if layout == "ours":
        return dict(sd)
    online = {k: v for k, v in sd.items() if not k.startswith(_MOMENTUM) and k not in _QUEUES}
    if layout == "openai":
        kept = sd if momentum else online
        queues = {k: v for k, v in kept.items() if k in _QUEUES}
        rest = {k: v for k, v in kept.items() if k not in _QUEUES}
        return {**_map_keys(rest, _OPENAI_TOP, _OPENAI_BLOCKS, _OPENAI_BLOCK, ("", "_m"), True, "our model"), **queues}
    out = {}
    qkv = re.compile(r"^(visual|text)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
    for key in list(online):
        m = qkv.match(key)
        if not m:
            continue
        tower = "vision_model" if m.group(1) == "visual" else "text_model"
        q, k, v = online.pop(key).chunk(3)
        for name, t in zip("qkv", (q, k, v)):
            out[f"{tower}.encoder.layers.{m.group(2)}.self_attn.{name}_proj.{m.group(3)}"] = t.contiguous()
    return {**_map_keys(online, _HF_TOP, _HF_BLOCKS, _HF_BLOCK, ("",), True, "our model"), **out}


# ------------------------------------------------------------------------------------------------ shapes


def _count_blocks(sd: Mapping[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def infer_arch(sd: Mapping[str, Tensor], source: str = "the state dict", act: str = "quick_gelu") -> ClipArch:
    """The dense CLIP architecture of a state dict in our layout (OpenAI's build_model rule: heads = width / 64;
    compressed widths are the architecture description's business, not this one's)."""
    need = ("visual.patch_embed.proj.weight", "visual.pos_embed", "text.proj", "text.pos_embed", "text.norm.weight")
    missing = [k for k in need if k not in sd]
    if missing or "text.token_embedding.weight" not in sd:
        raise CheckpointError(
            f"{source}: cannot infer a CLIP architecture without {', '.join(missing) or 'text.token_embedding.weight'}"
        )
    conv = sd["visual.patch_embed.proj.weight"]
    patch = int(conv.shape[-1])
    grid = round((sd["visual.pos_embed"].shape[1] - 1) ** 0.5)
    return ClipArch(
        embed_dim=int(sd["text.proj"].shape[1]),
        image_size=patch * grid,
        patch_size=patch,
        vision_width=int(conv.shape[0]),
        vision_layers=_count_blocks(sd, "visual.blocks."),
        context_length=int(sd["text.pos_embed"].shape[0]),
        vocab_size=int(sd["text.token_embedding.weight"].shape[0]),
        text_width=int(sd["text.norm.weight"].shape[0]),
        text_layers=_count_blocks(sd, "text.blocks."),
        act=act,
    )


# ------------------------------------------------------------------------------------------------ files


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``code/`` folder or ``constants.pkl``)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())


def _hf_act(config: Mapping[str, Any], source: str) -> str:
    acts = {config.get(part, {}).get("hidden_act", "quick_gelu") for part in ("text_config", "vision_config")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(
            f"{source}: activations {sorted(acts)}; this CLIP supports quick_gelu or gelu in both towers"
        )
    return acts.pop()


def read_clip_weights(
    path: str | Path, trust_torchscript: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(state dict in our layout, architecture description or None, facts) from any CLIP file: a TorchScript
    archive (only with ``trust_torchscript``), a Hugging Face folder, or a ``.pth`` / ``.pt`` / ``.bin`` /
    ``.safetensors`` file in any layout (``{'model': ...}`` or bare, DDP ``module.`` prefix tolerated). ``facts``
    holds the ``layout`` and, for a Hugging Face folder, its activation (``act``). Tensors come back float32."""
    from models.arch import read_weights

    path = Path(path)
    facts: dict[str, Any] = {}
    if path.is_dir():
        sd, config = load_model_folder(path, "a Hugging Face CLIPModel folder")
        facts["act"] = _hf_act(config, str(path))
        arch = None
    elif is_torchscript(path):
        if not trust_torchscript:
            raise CheckpointError(
                f"{path} is a TorchScript archive (OpenAI's CLIP release format); reading it deserialises code. "
                f"Convert it once with `python scripts/convert_clip.py {path} <out>.safetensors --trust-torchscript` "
                "and use the safetensors file, or pass trust_torchscript: true (--set trust_torchscript=true) if you "
                "trust where it came from"
            )
        log.warning("%s: loading a TorchScript archive because trust_torchscript is set", path)
        sd, arch = dict(torch.jit.load(str(path), map_location="cpu").state_dict()), None
    else:
        sd, arch = read_weights(path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    sd, facts["layout"] = to_ours(sd, str(path))
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    return sd, arch, facts


def hf_config(arch: ClipArch, logit_scale: float | None = None) -> dict[str, Any]:
    """A ``CLIPConfig`` (as a dict) of ``arch``, for exporting to the Hugging Face layout."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.text_width,
        "intermediate_size": 4 * arch.text_width,
        "num_hidden_layers": arch.text_layers,
        "num_attention_heads": arch.heads("text"),
        "max_position_embeddings": arch.context_length,
        "hidden_act": arch.act,
        "layer_norm_eps": 1e-5,
        "projection_dim": arch.embed_dim,
    }
    vision = {
        "hidden_size": arch.vision_width,
        "intermediate_size": 4 * arch.vision_width,
        "num_hidden_layers": arch.vision_layers,
        "num_attention_heads": arch.heads("vision"),
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "hidden_act": arch.act,
        "layer_norm_eps": 1e-5,
        "projection_dim": arch.embed_dim,
    }
    kw = {} if logit_scale is None else {"logit_scale_init_value": float(logit_scale)}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch.embed_dim, **kw).to_dict()
    config["architectures"] = ["CLIPModel"]
    return config


def dense_problems(sd: Mapping[str, Tensor], arch: ClipArch, description: Mapping[str, Any] | None = None) -> list[str]:
    """Why a state dict (our layout) with its architecture description is not the uniform model ``arch`` describes:
    per-layer widths, skipped blocks, uneven value widths, token reducers or attention scales of its own."""
    problems = []
    for tower, width in (("visual", arch.vision_width), ("text", arch.text_width)):
        layers = arch.vision_layers if tower == "visual" else arch.text_layers
        for i in range(layers):
            qkv, fc1 = sd.get(f"{tower}.blocks.{i}.attn.qkv.weight"), sd.get(f"{tower}.blocks.{i}.mlp.fc1.weight")
            if qkv is None or fc1 is None or qkv.shape[0] != 3 * width or fc1.shape[0] != 4 * width:
                problems.append(f"{tower}.blocks.{i} has other widths")
    description = description or {}
    for key in ("skipped", "value_dims", "reducers"):
        if description.get(key):
            problems.append(f"the description lists {key}")
    for name, scale in (description.get("scales") or {}).items():
        heads = arch.heads("vision" if name.startswith("visual") else "text")
        width = arch.vision_width if name.startswith("visual") else arch.text_width
        if abs(float(scale) - (width // heads) ** -0.5) > 1e-9:
            problems.append(f"{name} has attention scale {scale}")
    return problems


def save_hf(
    sd: Mapping[str, Tensor], arch: ClipArch, folder: str | Path, description: Mapping[str, Any] | None = None
) -> Path:
    """Write a state dict (our layout) as a Hugging Face ``CLIPModel`` folder (``config.json`` + ``model.safetensors``,
    online towers only). That class has one width per tower: a compressed or token-reduced model is refused."""
    from safetensors.torch import save_file

    problems = dense_problems(sd, arch, description)
    if problems:
        raise ValueError(
            f"Hugging Face's CLIPModel cannot express this CLIP ({'; '.join(problems[:3])}); export it in the openai "
            "layout, which keeps its architecture description beside it"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_layout({k: v.detach().cpu().contiguous() for k, v in sd.items()}, "hf")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(arch, float(sd["logit_scale"]) if "logit_scale" in sd else None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def save_weights(
    sd: Mapping[str, Tensor],
    path: str | Path,
    layout: str = "openai",
    description: Mapping[str, Any] | None = None,
    momentum: bool = True,
) -> Path:
    """Write a state dict (our layout) as ``layout`` (``openai``: the open_clip / fork keys, with the momentum twins and
    queues when ``momentum`` and present, as the forks' fine-tuned files; ``ours``): ``.safetensors`` (its
    architecture ``description``, when given, beside it as ``<stem>.json``) or ``{'model': ..., 'arch': ...}`` for
    another suffix. A compressed model keeps its widths in the shapes and its attention scales in the description;
    without one, loading it needs ``--infer_arch`` (and takes the seed's scale convention)."""
    from safetensors.torch import save_file

    from utils import atomic_torch_save

    if layout not in ("openai", "ours"):
        raise ValueError(f"save_weights writes the openai or ours layout, not {layout!r} (save_hf writes hf)")
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if not momentum:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(_MOMENTUM) and k not in _QUEUES}
    tensors = to_layout(tensors, layout, momentum)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"format": "pt"})
        if description is not None:
            path.with_suffix(".json").write_text(json.dumps(dict(description), indent=1, sort_keys=True) + "\n")
    else:
        atomic_torch_save({"model": tensors, **({"arch": dict(description)} if description else {})}, path)
    return path


# ------------------------------------------------------------------------------------------------ loading


def load_clip_checkpoint(
    model: nn.Module,
    sd: Mapping[str, Tensor],
    source: str,
    *,
    evaluate: bool = False,
    reset_momentum: bool = True,
) -> dict[str, Any]:
    """Load a state dict in our layout into ``model`` (already cut to its widths), strictly.

    Allowed gaps: momentum towers absent from the file (OpenAI, open_clip and Hugging Face files have none) are
    copied from the online towers; queues absent from the file keep their fresh values. Everything else missing or
    unexpected, any shape mismatch, and an image grid that differs from the model's (CLIP has no position
    interpolation: set ``image_size`` to the file's resolution) is an error. ``reset_momentum`` (the forks' default)
    copies the online towers into the momentum ones after loading. Returns what happened, for the log.
    """
    target = model.state_dict()
    pos = sd.get("visual.pos_embed")
    if pos is not None and pos.shape != target["visual.pos_embed"].shape:
        side = round((pos.shape[1] - 1) ** 0.5)
        patch = model.arch.patch_size
        raise CheckpointError(
            f"{source} is a CLIP for {side * patch} px images ({side}x{side} patches) but the model is built for "
            f"{model.arch.image_size} px; set image_size: {side * patch} (CLIP position embeddings are not resampled)"
        )
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    momentum_missing = [k for k in missing if k.startswith(_MOMENTUM)]
    queues_missing = [k for k in missing if k in _QUEUES]
    bad_missing = [k for k in missing if k not in momentum_missing and k not in queues_missing]
    mismatched = [
        f"{k} (file {tuple(v.shape)}, model {tuple(target[k].shape)})"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {', '.join(mismatched[:4])}")
    if bad_missing:
        what = "weights evaluation needs" if evaluate else "model keys"
        problems.append(f"{len(bad_missing)} {what} missing: {', '.join(bad_missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} keys the model does not have: {', '.join(unexpected[:5])}")
    if problems:
        raise CheckpointError(f"cannot load {source} into the CLIP retrieval model: " + "; ".join(problems))
    model.load_state_dict(dict(sd), strict=False)
    copied = False
    if momentum_missing or reset_momentum:
        model.reset_momentum()
        copied = True
    report = {
        "source": source,
        "momentum": "copied from the online towers" if copied else "from the file",
        "queues": "fresh" if queues_missing else "from the file",
    }
    log.info("loaded CLIP weights %s (momentum %s, queues %s)", source, report["momentum"], report["queues"])
    return report
