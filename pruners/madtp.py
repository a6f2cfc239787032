"""MADTP: multimodal alignment-guided dynamic token pruning (Cao et al., CVPR 2024; double125/MADTP).

The reduction itself is model code (:class:`models.token_ops.MADTPReducer` at every block of every tower, placed
by :func:`models.madtp.reducer_plan`, reading the shared alignment tokens ``model.madtp``); a trained model saves
its temperature in its architecture description and evaluates without this module. What training needs lives
here (spec madtp.md 4-5):

* the temperature controller: the temperature ``T`` is the only knob. Before training the reference cost is
  measured at ``T = 0`` on the validation batches (``cost_batches``), the target is ``(1 - p)`` of it; optionally
  ``T`` is calibrated on those batches first (``calibrate``: a named step table, repeated until the cost is within
  ``calibrate_tolerance``); after every epoch the cost is measured at the epoch's ``T`` and, before the next epoch,
  ``T`` moves by the step of ``controller``'s table for ``abs(cost - target)`` (up when above the target). The
  tables are the seed's, in its GFLOPs (fvcore MACs per sample of the task's counted call); differences are
  converted into them by ``reference_gflops / measured reference`` so that a model of another size steers alike,
  and ``step_scale`` multiplies the temperature steps (the meaning of ``T`` depends on the scale of the
  token-alignment dot products, spec trap 7);
* the alignment loss ``loss_weight * mean(1 - cos(F_img, F_txt))`` between the alignment-token features of the
  image and the text encoder (the first forward of each that trained; NLVR2's image side is the mean of a
  statement's two images);
* model selection: only epochs whose measured cost is at most ``tolerance`` (seed GFLOPs, converted as above)
  above the target count, on the validation split (``parity_select_on_test``: the seed's test split).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import utils
from models.token_ops import MADTPReducer, attach_reducers
from pruners.base import Pruner
from utils import log

__all__ = ["CALIBRATION", "CONTROLLERS", "MADTP", "temperature_step"]

# Per-epoch step tables of the seed's scripts: (threshold in seed GFLOPs, temperature step) rows, the first row
# whose threshold abs(cost - target) exceeds gives the step; the last row is the "else" (spec 4).
CONTROLLERS: dict[str, list[tuple[float, float]]] = {
    "nlvr": [(30, 1.0), (10, 0.5), (5, 0.25), (1, 0.1), (0, 0.01)],
    "caption": [(50, 0.5), (30, 0.3), (20, 0.2), (10, 0.1), (5, 0.05), (2, 0.02), (0, 0.01)],
    "vqa": [(50, 0.25), (30, 0.15), (10, 0.1), (5, 0.05), (2, 0.01), (0, 0.0)],
}
CONTROLLERS["retrieval"] = CONTROLLERS["clip"] = CONTROLLERS["caption"]
# Calibration tables before training (caption, BLIP Flickr retrieval at p <= 0.5, CLIP retrieval).
CALIBRATION: dict[str, list[tuple[float, float]]] = {
    "caption": [(100, 1.0), (50, 0.5), (30, 0.3), (20, 0.2), (10, 0.1), (5, 0.05), (0, 0.02)],
    "clip": [(100, 0.5), (50, 0.25), (30, 0.15), (20, 0.1), (10, 0.05), (0, 0.02)],
}
CALIBRATION["retrieval"] = CALIBRATION["caption"]


def temperature_step(cur: float, target: float, table: list[tuple[float, float]]) -> float:
    """The signed change of the temperature for a measured cost ``cur`` against ``target`` (both in the table's
    units): the step of the first row whose threshold ``abs(cur - target)`` exceeds (else the last row's), added
    when the cost is above the target (prune more), subtracted otherwise."""
    diff = abs(cur - target)
    step = next((s for threshold, s in table if diff > threshold), table[-1][1])
    return step if cur > target else -step


def _table(name: Any, tables: Mapping[str, list], key: str) -> list[tuple[float, float]]:
    if isinstance(name, list):
        rows = [tuple(map(float, r)) for r in name]
        if not rows or any(len(r) != 2 for r in rows):
            raise ValueError(f"madtp.{key} must name a table ({sorted(tables)}) or list [threshold, step] rows")
        return rows
    if name not in tables:
        raise ValueError(f"madtp.{key} is {name!r}; choose a step table from {sorted(tables)} or give rows")
    return tables[name]


class MADTP(Pruner):
    """Config: ``--p`` (the share of the measured reference cost to remove) and the ``madtp`` section."""

    name = "madtp"
    exports_model = True
    DEFAULTS: dict[str, Any] = {
        "epochs": None,  # fine-tuning epochs (None: max_epoch; --epoch wins)
        "sd_num": 100,  # alignment tokens
        "sd_dim": None,  # their width (None: the towers' width; CLIP maps tokens to it with q_map)
        "q_map": False,  # one Linear per block and tower from the token width to sd_dim (the seed's CLIP)
        "towers": ["vision", "text"],  # which encoders reduce tokens
        "loss_weight": 0.1,  # weight of the alignment loss
        "temperature_init": 1.0,  # T of the first epoch (calibrated first when calibrate names a table)
        "controller": None,  # per-epoch step table: nlvr | caption | vqa | retrieval | clip, or [[threshold, step]]
        "calibrate": None,  # calibration table before training (caption | retrieval | clip, or rows); None: off
        "calibrate_tolerance": 10.0,  # calibration stops within this many seed GFLOPs of the target
        "calibrate_start": None,  # T the calibration starts from (None: temperature_init)
        "calibrate_steps": 50,  # at most this many calibration measurements
        "reference_gflops": None,  # the seed's constant for the task (132.54 NLVR2 ...): the tables' scale
        "step_scale": 1.0,  # multiplies every temperature step (T's meaning depends on the model, spec trap 7)
        "tolerance": 5.0,  # selection: cost at most this many seed GFLOPs above the target
        "cost_batches": 20,  # validation batches the cost is averaged over (each batch weighs the same)
        "parity_select_on_test": False,  # the seed's model selection on the test split
        "parity_open_loop": False,  # the seed's VQA: the controller never sees a measured cost (T += 0.25 / epoch)
        "parity_loss_fallback": False,  # the seed's objective where one side has no features: 1.1 x the task loss
    }

    def __init__(self, config: dict):
        super().__init__(config)
        opts = self.options()
        self.p = config.get("p")
        if self.p is None:
            raise ValueError("madtp: give --p, the share of the measured reference FLOPs to remove")
        if not 0.0 <= float(self.p) < 1.0:
            raise ValueError(f"madtp: --p is the share of FLOPs to remove, in [0, 1); got {self.p}")
        self.p = float(self.p)
        if opts["controller"] is None:
            raise ValueError("madtp.controller must name the task's step table (nlvr, caption, vqa, retrieval, clip)")
        self.table = _table(opts["controller"], CONTROLLERS, "controller")
        self.calibration = None if opts["calibrate"] is None else _table(opts["calibrate"], CALIBRATION, "calibrate")
        if opts["reference_gflops"] is None or float(opts["reference_gflops"]) <= 0:
            raise ValueError("madtp.reference_gflops must be the seed's reference cost of the task (e.g. 132.54)")
        if float(opts["temperature_init"]) <= 0:
            raise ValueError(f"madtp.temperature_init must be > 0, got {opts['temperature_init']}")
        towers = tuple(opts["towers"])
        if not towers or set(towers) - {"vision", "text"}:
            raise ValueError(f"madtp.towers must list vision and/or text, got {opts['towers']}")
        if int(opts["cost_batches"]) < 1:
            raise ValueError("madtp.cost_batches must be at least 1")
        self.opts, self.towers = opts, towers
        self.temperature = float(opts["temperature_init"])
        self.selection_split = "test" if opts["parity_select_on_test"] else None
        self.reference = self.target = self.cur = None  # measured seed-convention GMACs per sample
        self.keep_counts: dict[str, float] = {}
        self.calibrated = False
        self.model: nn.Module | None = None
        self.reducers: list[MADTPReducer] = []
        self._last_sim: float | None = None
        self._towers: dict[str, str] = {}

    # ------------------------------------------------------------------------------------ wiring
    def attach(self, model: nn.Module) -> None:
        from models.madtp import encoders, reducer_plan, reducers

        self.model = model
        # Encoder path -> modality, to tell the alignment records of the image and the text encoder apart.
        self._towers = {path: mod for mod, found in encoders(model).items() for path, _ in found}
        sd_dim = self.opts["sd_dim"]
        if sd_dim is None:
            if self.opts["q_map"]:
                raise ValueError("madtp.q_map maps tokens to madtp.sd_dim: give sd_dim (768 in the seed)")
            widths = {
                (m.blocks[0].attn.dim if hasattr(m, "blocks") else m.config.hidden_size)
                for t in self.towers
                for _, m in encoders(model)[t]
            }
            if len(widths) != 1:
                raise ValueError(f"madtp: the towers' widths differ ({sorted(widths)}): set madtp.sd_dim and q_map")
            sd_dim = widths.pop()
        loaded = [h.temperature for h in reducers(model)]
        if loaded:  # a MADTP checkpoint (evaluated, or trained further) keeps its own temperature
            self.temperature = max(loaded)
            log.info("madtp: the loaded model prunes at T %.4g; starting there", self.temperature)
        plan = reducer_plan(model, self.temperature, self.opts["sd_num"], sd_dim, self.opts["q_map"], self.towers)
        existing = getattr(model, "madtp", None)
        attach_reducers(model, plan, "madtp")  # replaces other reducers; binds to model.madtp (created if missing)
        if existing is None:
            log.info(
                "madtp: %d alignment tokens of width %d, new (N(0, 1), as the seed)", *model.madtp.space_dict.shape
            )
        self.reducers = reducers(model)
        log.info("madtp: %d reducing blocks, T %.4g, target: %.0f%% of the measured reference FLOPs",
                 len(self.reducers), self.temperature, 100 * (1 - self.p))  # fmt: skip

    def _set(self, temperature: float) -> None:
        self.temperature = round(max(0.0, float(temperature)), 6)
        for r in self.reducers:
            r.temperature = self.temperature

    @contextlib.contextmanager
    def at_temperature(self, temperature: float) -> Iterator[None]:
        saved = self.temperature
        self._set(temperature)
        try:
            yield
        finally:
            self._set(saved)

    def bypassed(self) -> contextlib.AbstractContextManager:
        return self.at_temperature(0.0)

    # ------------------------------------------------------------------------------------ measuring
    def _loader(self, engine: Any) -> Any:
        loaders = getattr(engine, "eval_loaders", None) or {}
        split = "val" if "val" in loaders else next(iter(loaders), None)
        if split is None:
            raise ValueError("madtp measures its FLOPs on an evaluation split; the run has none")
        return loaders[split]

    def measure(self, engine: Any) -> dict[str, Any]:
        """Seed-convention GMACs per sample averaged over the first ``cost_batches`` validation batches (each batch
        weighs the same, spec 6) at the current temperature, from the analytic cost model with each forward's
        token counts, and the tokens each block keeps (mean over batches)."""
        from benchmarks.measure import replayed_cost

        loader = self._loader(engine)
        out = replayed_cost(engine.model, loader, getattr(loader, "dataset", None), int(self.opts["cost_batches"]))
        # Every rank measured its own shard: one average over all batches, so that every rank steers alike.
        total, batches = utils.all_reduce_sum([out["macs"] * out["batches"], out["batches"]])
        return {"gmacs": total / batches / 1e9, "keep_counts": out["tokens"]}

    def _scale(self) -> float:
        """Seed GFLOPs per measured GMAC: the tables' thresholds apply to differences converted by it."""
        return float(self.opts["reference_gflops"]) / self.reference

    def _start(self, engine: Any) -> None:
        with self.bypassed():
            self.reference = self.measure(engine)["gmacs"]
        self.target = self.reference * (1.0 - self.p)
        log.info(
            "madtp: reference %.4g GMACs per sample measured at T = 0 (the seed's constant: %g), target %.4g",
            self.reference, float(self.opts["reference_gflops"]), self.target,
        )  # fmt: skip
        if self.calibration is None:
            return
        start = self.opts["calibrate_start"]
        self._set(self.temperature if start is None else float(start))
        tolerance, scale = float(self.opts["calibrate_tolerance"]), self._scale()
        for i in range(int(self.opts["calibrate_steps"])):
            cur = self.measure(engine)["gmacs"]
            log.info("madtp calibration %d: T %.4g -> %.4g GMACs (target %.4g)", i, self.temperature, cur, self.target)
            if abs(cur - self.target) * scale <= tolerance:
                break
            step = temperature_step(cur * scale, self.target * scale, self.calibration)
            self._set(self.temperature + step * float(self.opts["step_scale"]))
        else:
            log.warning(
                "madtp: calibration stopped after %d measurements at T %.4g, %.4g GMACs against the target %.4g "
                "(raise madtp.step_scale or calibrate_steps; a target beyond what pruning every layer to its "
                "above-mean tokens reaches cannot be met)",
                self.opts["calibrate_steps"], self.temperature, cur, self.target,
            )  # fmt: skip
        self.calibrated = True

    def epoch_start(self, epoch: int, engine: Any) -> None:
        if self.reference is None:
            self._start(engine)
            return
        if self.opts["parity_open_loop"]:  # the seed's VQA: its cost never reaches the controller
            cur = self.reference
        elif self.cur is None:
            return
        else:
            cur = self.cur
        scale = self._scale()
        step = temperature_step(cur * scale, self.target * scale, self.table) * float(self.opts["step_scale"])
        self._set(self.temperature + step)
        log.info("madtp: epoch %d at T %.4g (%+.4g; last cost %.4g, target %.4g)", epoch, self.temperature, step,
                 cur, self.target)  # fmt: skip

    def epoch_end(self, epoch: int, engine: Any) -> None:
        m = self.measure(engine)
        self.cur, self.keep_counts = m["gmacs"], m["keep_counts"]

    def at_target(self) -> bool:
        if self.cur is None or self.target is None:
            return False
        return (self.cur - self.target) * self._scale() < float(self.opts["tolerance"])

    # ------------------------------------------------------------------------------------ loss
    def loss(self, model: nn.Module, outputs: dict) -> torch.Tensor | None:
        align = model.madtp
        calls, align.calls = align.calls, []
        if self.temperature <= 0:
            return self._fallback(outputs)
        first = {}
        for record in calls:
            modality = self._modality(record["tower"])
            first.setdefault(modality, record["features"])
        if "vision" not in first or "text" not in first:
            return self._fallback(outputs)
        image, text = first["vision"], first["text"]
        image = _image_side(image, text.shape[0], outputs.get("image_rows"))
        sim = (1.0 - F.cosine_similarity(image.float(), text.float(), dim=-1)).mean()
        self._last_sim = float(sim.detach())
        return float(self.opts["loss_weight"]) * sim

    def _fallback(self, outputs: dict) -> torch.Tensor | None:
        if self.opts["parity_loss_fallback"]:  # the seed substitutes the task loss for the missing term
            return float(self.opts["loss_weight"]) * outputs["loss"]
        return None

    def _modality(self, tower: str) -> str:
        for path, modality in self._towers.items():
            if tower == path or tower.startswith(f"{path}.") or (not path and tower in ("blocks", "")):
                return modality
        raise KeyError(f"madtp: alignment features from an unknown tower {tower!r}")

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"temperature": self.temperature, "reference": self.reference, "target": self.target,
                "cur": self.cur, "keep_counts": self.keep_counts, "calibrated": self.calibrated}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self._set(state["temperature"])
        self.reference, self.target, self.cur = state["reference"], state["target"], state["cur"]
        self.keep_counts, self.calibrated = dict(state["keep_counts"]), bool(state["calibrated"])

    def report(self) -> dict:
        out: dict[str, Any] = {"temperature": round(self.temperature, 6), "p": self.p}
        if self.reference is not None:
            out |= {
                "reference_gmacs": self.reference,
                "reference_gflops_seed": float(self.opts["reference_gflops"]),
                "target_gmacs": self.target,
            }
        if self.cur is not None:
            out |= {
                "eval_gmacs": self.cur,
                "eval_cost_ratio": round(self.cur / self.reference, 4),
                "within_tolerance": self.at_target(),
                "keep_counts": self.keep_counts,
            }
        if self._last_sim is not None:
            out["alignment_loss"] = round(self._last_sim, 5)
        return out


def _image_side(image: torch.Tensor, texts: int, rows: torch.Tensor | None) -> torch.Tensor:
    """The image features (one row per text) that each text's features align with: ``rows`` (texts, k) names the
    image rows each text reads (their mean; NLVR2's two images), else one image per text, or two stacked halves."""
    if rows is not None:
        return image[rows.to(image.device)].mean(dim=1)
    if image.shape[0] == texts:
        return image
    if image.shape[0] == 2 * texts:
        return torch.stack(image.chunk(2), dim=1).mean(dim=1)
    raise ValueError(
        f"madtp: {image.shape[0]} images for {texts} texts and no image_rows from the task to pair them for the "
        "alignment loss"
    )
