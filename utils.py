"""Distributed setup, rank-0 logging, seeding, learning-rate schedules and checkpoint I/O."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import random
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

log = logging.getLogger("vlcompress")


# ----------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or is_dist()


def pick_device(requested: str | None = None) -> torch.device:
    """``None``/"auto" gives CUDA when present, else CPU; an explicit "cuda" without a GPU is an error."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return device


def init_distributed(requested_device: str | None = None) -> DistInfo:
    """Set up torch.distributed from torchrun's environment; a plain ``python`` run is one process.

    NCCL on CUDA, gloo on CPU. Each rank uses the GPU of its LOCAL_RANK.
    """
    device = pick_device(requested_device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not is_dist():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(values: Iterable[float]) -> list[float]:
    """Sum a few numbers over ranks (float64, so counts stay exact), on the device the backend needs."""
    nccl = is_dist() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------------------
# logging and progress


def setup_logging(output_dir: str | Path | None = None) -> None:
    """INFO on rank 0 (console and ``<output_dir>/run.log``), warnings only elsewhere."""
    level = logging.INFO if is_main_process() else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if output_dir is not None and is_main_process():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "run.log"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(level)
    log.propagate = False


def progress(iterable: Iterable, desc: str = "", total: int | None = None, **kw) -> Iterable:
    """A tqdm bar on rank 0 only (and not when stderr is no terminal and TQDM_DISABLE is set)."""
    disable = not is_main_process() or bool(os.environ.get("TQDM_DISABLE"))
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False, **kw)


def append_jsonl(path: str | Path, record: Mapping) -> None:
    if not is_main_process():
        return
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (rank 0 only)."""
    if not is_main_process():
        return
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------
# seeding


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": _encode_python_rng(random.getstate()),
        "numpy": _encode_numpy_rng(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    random.setstate(_decode_python_rng(state["python"]))
    np.random.set_state(_decode_numpy_rng(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# RNG states are stored as tensors and plain containers so that checkpoints load with
# weights_only=True (no pickled Python objects).
def _encode_python_rng(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _decode_python_rng(d: Mapping) -> tuple:
    return (d["version"], tuple(int(x) for x in d["state"].tolist()), d["gauss"])


def _encode_numpy_rng(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _decode_numpy_rng(d: Mapping) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


# ----------------------------------------------------------------------------------------------
# learning-rate schedules


def cosine_lr(epoch: float, max_epoch: float, init_lr: float, min_lr: float) -> float:
    """The seeds' per-epoch cosine: epoch 0 gives init_lr; the last epoch does not reach min_lr."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def warmup_lr(step: int, max_step: int, init_lr: float, max_lr: float) -> float:
    return min(max_lr, init_lr + (max_lr - init_lr) * step / max(max_step, 1))


def step_lr(epoch: int, init_lr: float, min_lr: float, rate: float) -> float:
    return max(min_lr, init_lr * rate**epoch)


@dataclass
class LRSchedule:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then cosine (or constant, or linear).

    ``per_step=False`` (the seeds' recipe) evaluates the cosine at the epoch index, constant within an
    epoch; ``per_step=True`` evaluates it at the fractional epoch of each step. ``linear`` (PuMer's polynomial
    decay of power 1, as Hugging Face's) falls per step from ``init_lr`` at the end of the warm-up towards
    ``min_lr``, which it would reach one step after the last.
    """

    init_lr: float
    min_lr: float
    max_epoch: int
    steps_per_epoch: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    per_step: bool = False
    kind: str = "cosine"

    def __call__(self, epoch: int, step_in_epoch: int) -> float:
        global_step = epoch * self.steps_per_epoch + step_in_epoch
        if global_step < self.warmup_steps:
            return warmup_lr(global_step, self.warmup_steps, self.warmup_lr, self.init_lr)
        if self.kind == "constant":
            return self.init_lr
        if self.kind == "linear":
            total = max(self.max_epoch * self.steps_per_epoch - self.warmup_steps, 1)
            left = max(0.0, 1.0 - (global_step - self.warmup_steps) / total)
            return self.min_lr + (self.init_lr - self.min_lr) * left
        t = epoch + (step_in_epoch / max(self.steps_per_epoch, 1) if self.per_step else 0.0)
        return cosine_lr(t, self.max_epoch, self.init_lr, self.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, honouring a group's ``lr_scale`` (pruner groups use their own rates)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ----------------------------------------------------------------------------------------------
# checkpoint I/O


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or of the wrong layout; the message names the file."""


@contextlib.contextmanager
def _atomic_file(path: str | Path) -> Iterator[Any]:
    """An open binary file in ``path``'s folder that replaces ``path`` only once fully written and
    synced: a crash never leaves half a file, and an earlier file stays intact until then."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _atomic_file(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with _atomic_file(path) as f:
        torch.save(obj, f)


def load_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a ``.pth``/``.pt`` with ``weights_only=True`` or a ``.safetensors`` file; clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {e}") from e
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(f"cannot load checkpoint {path} (truncated or corrupt): {e}") from e
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects besides tensors and plain containers "
            f"({_pickled_global(str(e))}), which would run code when unpickled; this project never unpickles "
            "them. On a machine you trust, re-save its weights as a plain state dict or as safetensors."
        ) from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        kind = "truncated or corrupt" if path.stat().st_size > 0 else "empty"
        raise CheckpointError(f"cannot load checkpoint {path} ({kind}): {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def load_model_folder(path: str | Path, what: str = "a model folder") -> tuple[dict, dict]:
    """(state dict, config) of a ``save_pretrained``-style folder: ``config.json`` beside ``model.safetensors`` or
    ``pytorch_model.bin`` (the first found). ``what`` names the expected kind in the errors."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is a folder without config.json; {what} needs one")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return dict(load_checkpoint_file(path / name)), config
    raise CheckpointError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def _pickled_global(message: str) -> str:
    """What torch's weights-only unpickler refused, e.g. ``GLOBAL posix.system``."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return f"GLOBAL {m.group(1)}" if m else "objects the safe unpickler does not allow"


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the half-written ``.<name>.*.tmp`` files that a run killed during an atomic write left in
    ``folder``; returns them. Call before a run starts writing there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.glob(".*.tmp") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def unwrap_state_dict(obj: Mapping, path: str | Path = "") -> dict:
    """Accept ``{'model': sd}``, ``{'model_state_dict': sd}`` (the PLATON seed's per-epoch files) or a bare
    state dict; strip a DDP ``module.`` prefix."""
    sd = obj.get("model", obj.get("model_state_dict", obj)) if isinstance(obj, Mapping) else obj
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} has no state dict (expected tensors, or one under 'model')")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def freeze_parameters(model: torch.nn.Module, prefixes: Sequence[str]) -> int:
    """Stop training the parameters whose names start with one of ``prefixes`` (module paths such as
    ``visual_encoder``); returns how many tensors were frozen. A prefix that names nothing is an error."""
    named = list(model.named_parameters())
    frozen = 0
    for prefix in prefixes:
        hits = [p for name, p in named if name == prefix or name.startswith(prefix.rstrip(".") + ".")]
        if not hits:
            tops = sorted({name.split(".", 1)[0] for name, _ in named})
            raise ValueError(f"freeze: {prefix!r} names no parameter of the model; its modules are {tops}")
        for p in hits:
            frozen += p.requires_grad
            p.requires_grad_(False)
    return frozen


def count_parameters(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
