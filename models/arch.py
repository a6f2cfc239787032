"""Architectures of compressed models: describe, rebuild, infer from shapes, save and load.

A compressed model is an ordinary model with other widths (DESIGN.md). Its architecture description (version
2) holds the size of every prunable unit (per attention module: head count and head width; per FFN: hidden
width), the attention scale of every attention module (compression may keep the dense scale, as ViT and this
project's UPop on BERT do, or recompute it from the kept width, as BERT and CLIP in the UPop seed), the value
width of each head where a method cut them unevenly (``value_dims``), the blocks a method removed
(``skipped``), and the token reducers of each block with their settings (``reducers``,
:mod:`models.token_ops`). Version 1 files (units and scales) load as they are.

* :func:`architecture` describes a model as a JSON-able dict; :func:`apply_architecture` cuts a
  freshly built dense model down to such a description (the kept weights are placeholders that a
  state dict then overwrites).
* :func:`infer_architecture` reads the widths from a state dict's tensor shapes, for files that carry
  no description (the seed's released UPop checkpoints); head counts are never changed by UPop, so the
  head width is the projection's rows divided by the model's head count, and the scale follows the
  seed's convention (see :func:`apply_architecture`).
* :func:`save_compressed` writes ``<stem>.safetensors`` + ``<stem>.json`` and ``<stem>.pth``;
  :func:`read_weights` reads any of them (or a plain checkpoint) back as (state dict, architecture).

Models expose their units with a ``prunable_units(momentum=False)`` method (BLIP task models) or are
a :class:`models.vit.VisionTransformer`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.layers import Attention, Mlp, SkippedBlock, Unit
from utils import CheckpointError, atomic_write_bytes, load_checkpoint_file, log, unwrap_state_dict

__all__ = [
    "ARCH_VERSION",
    "apply_architecture",
    "architecture",
    "fit_to_checkpoint",
    "infer_architecture",
    "model_units",
    "read_weights",
    "save_compressed",
]

ARCH_VERSION = 2
READABLE_VERSIONS = (1, 2)


def model_units(model: nn.Module, momentum: bool = False) -> list[Unit]:
    """The prunable units of a task model (``momentum`` adds the momentum towers of contrastive models)."""
    from models.vit import VisionTransformer, prunable_units

    if hasattr(model, "prunable_units"):
        return model.prunable_units(momentum=momentum)
    if isinstance(model, VisionTransformer):
        return prunable_units(model)
    raise TypeError(f"{type(model).__name__} exposes no prunable units (no prunable_units() method)")


def _attention_modules(units: list[Unit]) -> dict[str, Attention]:
    return {u.name: u.module for u in units if isinstance(u.module, Attention)}


def architecture(model: nn.Module) -> dict[str, Any]:
    """Every unit's size (``{name: {kind: size}}``), every attention module's scale, the uneven value widths,
    the skipped blocks and the token reducers of ``model``."""
    from models.token_ops import reducer_specs

    units = model_units(model, momentum=True)
    sizes: dict[str, dict[str, int]] = {}
    for u in units:
        sizes.setdefault(u.name, {})[u.kind] = int(u.size if u.kind == "neuron" else _unit_size(u))
    attentions = _attention_modules(units)
    return {
        "version": ARCH_VERSION,
        "units": sizes,
        "scales": {name: float(m.scale) for name, m in attentions.items()},
        "value_dims": {name: list(m.value_dims) for name, m in attentions.items() if m.value_dims is not None},
        "skipped": [name for name, m in model.named_modules() if isinstance(m, SkippedBlock)],
        "reducers": reducer_specs(model),
    }


def skip_blocks(model: nn.Module, names: list[str], source: str = "the architecture") -> None:
    """Replace the blocks ``names`` (module paths such as ``visual_encoder.blocks.8``) by pass-through
    :class:`~models.layers.SkippedBlock` s, in place; their parameters leave the model."""
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, index = name.rpartition(".")
        parent = modules.get(parent_name)
        if not isinstance(parent, nn.ModuleList) or not index.isdigit() or int(index) >= len(parent):
            raise CheckpointError(f"{source}: skipped block {name} is not a block of the model")
        block = parent[int(index)]
        if not isinstance(block, SkippedBlock):
            parent[int(index)] = SkippedBlock(getattr(block, "index", int(index)))


def _unit_size(u: Unit) -> int:
    # Unit.size is the size at listing time; read the module so a description is always current.
    if u.kind == "head_dim":
        return u.module.head_dim
    if u.kind == "head":
        return u.module.num_heads
    return u.module.hidden


def _check_version(arch: Mapping[str, Any], source: str) -> None:
    version = arch.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{source}: architecture description version {version!r}; this project reads {READABLE_VERSIONS}"
        )


def apply_architecture(model: nn.Module, arch: Mapping[str, Any], source: str = "the architecture") -> list[str]:
    """Cut ``model`` (at least as wide as ``arch`` everywhere) down to ``arch``; returns the changed units.

    The first ``k`` entries of every unit are kept; their values are placeholders for the state dict
    loaded next. Scales listed in ``arch`` are set exactly; without them, ViT attention keeps its
    dense scale and BERT attention takes ``head_dim ** -0.5`` (the seed's released checkpoints rely on
    both).
    """
    _check_version(arch, source)
    skip_blocks(model, list(arch.get("skipped", [])), source)
    units = model_units(model, momentum=True)
    by_name: dict[str, dict[str, Unit]] = {}
    for u in units:
        by_name.setdefault(u.name, {})[u.kind] = u
    unknown = sorted(set(arch["units"]) - set(by_name))
    if unknown:
        raise CheckpointError(f"{source} names units the model does not have: {unknown[:5]}")
    changed = []
    for name, kinds in arch["units"].items():
        for kind, size in kinds.items():
            if kind not in by_name[name]:
                raise CheckpointError(f"{source}: unit {name} has no kind {kind!r}")
            unit = by_name[name][kind]
            current = _unit_size(unit)
            size = int(size)
            if size > current:
                raise CheckpointError(
                    f"{source}: {name} {kind} width {size} exceeds the model's {current}; "
                    "build the model from the dense config"
                )
            if size < current:
                unit.keep(torch.arange(size))
                changed.append(f"{name}.{kind}={size}")
    attentions = _attention_modules(units)
    for name, scale in arch.get("scales", {}).items():
        if name not in attentions:
            raise CheckpointError(f"{source}: scale given for {name}, which is not an attention module of the model")
        attentions[name].scale = float(scale)
    for name, widths in arch.get("value_dims", {}).items():
        if name not in attentions:
            raise CheckpointError(f"{source}: value widths given for {name}, which is not an attention module")
        attention = attentions[name]
        if len(widths) != attention.num_heads or max(widths) > attention.head_dim:
            raise CheckpointError(
                f"{source}: {name} value widths {widths} do not fit {attention.num_heads} heads of {attention.head_dim}"
            )
        attention.keep_value_dims([torch.arange(int(w)) for w in widths])
        changed.append(f"{name}.value_dims")
    if arch.get("reducers") is not None:
        from models.token_ops import attach_reducers

        try:
            attach_reducers(model, arch["reducers"], source)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        changed += [f"{name}.reducers" for name in arch["reducers"]]
    return changed + [f"{name} skipped" for name in arch.get("skipped", [])]


def _rows(sd: Mapping[str, Tensor], key: str, source: str) -> int:
    if key not in sd:
        raise CheckpointError(f"{source} has no {key}, which the model's architecture needs")
    return int(sd[key].shape[0])


def infer_architecture(model: nn.Module, sd: Mapping[str, Tensor], source: str = "the checkpoint") -> dict[str, Any]:
    """The architecture a state dict's shapes imply for ``model`` (head counts taken from the model).

    Only units whose weights the file carries are described; scales are left to the seed convention
    of :func:`apply_architecture`.
    """
    sizes: dict[str, dict[str, int]] = {}
    for u in model_units(model, momentum=True):
        m = u.module
        if u.kind == "head_dim":
            key = f"{u.name}.qkv.weight" if getattr(m, "fused", False) else f"{u.name}.query.weight"
            if key not in sd:
                continue
            groups = 3 if m.fused else 1
            rows = _rows(sd, key, source)
            if rows % (groups * m.num_heads):
                raise CheckpointError(
                    f"{source}: {key} has {rows} rows, not a multiple of {groups} x {m.num_heads} heads"
                )
            sizes.setdefault(u.name, {})["head_dim"] = rows // (groups * m.num_heads)
        elif u.kind == "neuron":
            key = f"{u.name}.fc1.weight" if isinstance(m, Mlp) else f"{u.name}.dense.weight"
            if key in sd:
                sizes.setdefault(u.name, {})["neuron"] = _rows(sd, key, source)
    return {"version": ARCH_VERSION, "units": sizes}


def _dense_unit_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    return architecture(model)["units"]


def fit_to_checkpoint(
    model: nn.Module,
    sd: Mapping[str, Tensor],
    arch: Mapping[str, Any] | None,
    source: str,
    infer: bool = False,
) -> str | None:
    """Cut ``model`` to the checkpoint's architecture; a summary or None.

    A file without a description whose shapes are the dense model's loads as it is. One whose shapes say it
    is compressed is an error naming the missing description, unless ``infer`` (``--infer_arch``): then the
    widths are read from the shapes and attention scales follow the seed's convention, which is right for
    the seeds' released files and wrong for this project's (their scales are in the description).
    Models without prunable units are left alone.
    """
    try:
        dense = _dense_unit_sizes(model)
    except TypeError:
        return None
    inferred = arch is None
    if inferred:
        arch = infer_architecture(model, sd, source)
        differ = sorted(
            f"{name}.{kind}={size}"
            for name, kinds in arch["units"].items()
            for kind, size in kinds.items()
            if dense.get(name, {}).get(kind) not in (None, size)
        )
        if differ and not infer:
            raise CheckpointError(
                f"{source} holds a compressed model ({len(differ)} unit widths differ from the dense model, e.g. "
                f"{', '.join(differ[:3])}) but no architecture description ({_missing_description(source)}); "
                "restore the description next to it, or pass --infer_arch (config: infer_arch: true) to read the "
                "widths from the tensor shapes, which is meant for the seeds' released *_compressed.pth files"
            )
    changed = apply_architecture(model, arch, source)
    if not changed:
        return None
    how = "inferred from tensor shapes" if inferred else "from its architecture description"
    widths = [c for c in changed if "=" in c]
    others = [c for c in changed if "=" not in c]
    summary = (
        f"{source}: architecture {how}; {len(widths)} of {sum(len(k) for k in dense.values())} unit widths differ "
        f"from dense" + (f"; {', '.join(others[:6])}" + (" ..." if len(others) > 6 else "") if others else "")
    )
    log.info("%s", summary)
    return summary


# ------------------------------------------------------------------------------------------------ files


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _missing_description(source: str) -> str:
    path = Path(source)
    if path.suffix == ".safetensors":
        return f"{_sidecar(path)} does not exist"
    return "the file has no 'arch' entry"


def _unshared(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous copies, one per key: safetensors refuses tensors that share storage (tied weights)."""
    seen: set[int] = set()
    out = {}
    for k, t in sd.items():
        t = t.detach()
        storage = t.untyped_storage().data_ptr()
        out[k] = t.clone().contiguous() if storage in seen or not t.is_contiguous() else t
        seen.add(storage)
    return out


def save_compressed(stem: str | Path, state_dict: Mapping[str, Tensor], arch: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` (the architecture) and ``<stem>.pth``.

    The ``.pth`` holds ``{'model': state_dict, 'arch': arch}`` and loads with ``weights_only=True``;
    either file rebuilds the model through :func:`read_weights` and :func:`fit_to_checkpoint`.
    """
    from safetensors.torch import save as safetensors_bytes

    from utils import atomic_torch_save

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    st = stem.with_suffix(".safetensors")
    atomic_write_bytes(st, safetensors_bytes(_unshared(sd), metadata={"format": "pt"}))
    atomic_write_bytes(_sidecar(st), (json.dumps(dict(arch), indent=1, sort_keys=True) + "\n").encode())
    pth = stem.with_suffix(".pth")
    atomic_torch_save({"model": sd, "arch": dict(arch)}, pth)
    return {"safetensors": st, "json": _sidecar(st), "pth": pth}


def read_weights(
    path: str | Path, extras: dict[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(state dict, architecture or None) from a ``.safetensors`` (+ sidecar ``.json``) or ``.pth`` file; ``extras``
    (when given) receives the file's top-level numbers and strings (e.g. the MADTP seed's ``temperature``)."""
    path = Path(path)
    obj = load_checkpoint_file(path)
    if extras is not None:
        extras.update({k: v for k, v in obj.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)})
    arch = None
    if path.suffix == ".safetensors":
        side = _sidecar(path)
        if side.is_file():
            try:
                arch = json.loads(side.read_text())
            except ValueError as e:
                raise CheckpointError(f"architecture file {side} is not valid JSON: {e}") from e
    elif isinstance(obj.get("arch"), Mapping):
        arch = dict(obj["arch"])
    return unwrap_state_dict(obj, path), arch


def kept_fraction(model: nn.Module, dense: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Kept share of attention head dims and FFN neurons per modality, against ``dense`` unit sizes."""
    kept: dict[str, list[int]] = {}
    for u in model_units(model):
        if u.kind == "head":
            continue
        base = dense[u.name][u.kind]
        key = f"{u.modality}_{'attn' if u.kind == 'head_dim' else 'ffn'}"
        k = kept.setdefault(key, [0, 0])
        k[0] += _unit_size(u)
        k[1] += base
    return {key: round(a / b, 4) for key, (a, b) in sorted(kept.items()) if b}


def sync_momentum_towers(model: nn.Module) -> list[str]:
    """Give every momentum tower (``<tower>_m``) its online tower's widths and scales, then its weights.

    UPop never searches the momentum towers; after compression they are cut like the online ones and
    overwritten with the online weights (the seed's ``copy_params``). A model without momentum towers
    is left alone. Returns the momentum modules that were overwritten.
    """
    from models.checkpoints import copy_momentum_params

    arch = architecture(model)
    momentum_units = {u.name for u in model_units(model, momentum=True)} - {u.name for u in model_units(model)}
    if not momentum_units:
        return []
    mirrored: dict[str, Any] = {"version": ARCH_VERSION, "units": {}, "scales": {}}
    for name in momentum_units:
        tower, rest = name.split(".", 1)
        online = f"{tower[:-2]}.{rest}"
        mirrored["units"][name] = arch["units"][online]
        if online in arch["scales"]:
            mirrored["scales"][name] = arch["scales"][online]
    apply_architecture(model, mirrored, "the online towers")
    return copy_momentum_params(model)
