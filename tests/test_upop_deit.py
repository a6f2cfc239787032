"""UPop on DeiT (spec upop.md §2.3, §4.4, §7.5; the seed's compress_deit.py): the DeiT options (no mask update at
search step 0, L1 terms not divided by the world size), the attention cost of real-size DeiTs, masked = compressed,
a tiny DeiT searched, compressed and evaluated through the entry point, the seed's released file layout, the config
and the published-row scripts."""

import json
import re

import pytest
import test_runs
import torch
from test_runs import REPO

import cli
import tasks.classification
from models.arch import architecture, read_weights
from models.vit import VisionTransformer, prunable_units, vit_config
from pruners.upop import UPop, is_update_step
from tasks import registry
from utils import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")
world = test_runs.world  # the tiny synthetic world fixture (96 images, 32 px)

DEIT = {"update_at_start": False, "w_sp_divide_world": False}  # what configs/deit_small_upop.yaml sets


def tiny_deit(seed=0, **kw):
    """embed 48, 3 heads of 16, MLP 192, depth 2, 32 px in 8 px patches; biases non-zero so slicing shows."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def search(model, p=0.5, steps=7, interval=3, **opts):
    """``steps`` search steps on fixed weights (no optimizer), soft-target CE as DeiT's mixup loss; ends binary."""
    pruner = UPop({"p": p, "max_epoch": 1, "upop": {"interval": interval, **DEIT, **opts}})
    pruner.attach(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = torch.randn(4, 3, 32, 32, generator=g)
        target = torch.softmax(torch.randn(4, 10, generator=g), 1)
        loss = -(target * model(x).log_softmax(1)).sum(1).mean() + pruner.loss(model, {})
        loss.backward()
        pruner.before_optimizer_step(model)
        pruner.step(model, step, steps)
    model.zero_grad(set_to_none=True)
    return pruner


# ---------------------------------------------------------------------------------------------- options


def test_the_deit_schedule_skips_the_update_at_step_zero():
    assert [s for s in range(10) if is_update_step(s, 10, 3)] == [0, 3, 6, 9]
    assert [s for s in range(10) if is_update_step(s, 10, 3, at_start=False)] == [3, 6, 9]
    assert [s for s in range(11) if is_update_step(s, 11, 3, at_start=False)] == [3, 6, 9, 10]
    assert is_update_step(0, 1, 5, at_start=False)  # a one-step search still ends binary
    for at_start, first in ((True, 1), (False, 0)):
        model = tiny_deit()
        pruner = UPop({"p": 0.5, "max_epoch": 1, "upop": {"interval": 3, "update_at_start": at_start}})
        pruner.attach(model)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        pruner.before_optimizer_step(model)
        pruner.step(model, 1, 10)  # search step s = 0
        assert pruner.updates == first
        assert all(bool((m == 1).all()) for m in pruner.masks) != bool(first)


def test_a_deit_search_updates_at_every_interval_and_the_last_step():
    pruner = search(tiny_deit(), steps=7, interval=3)
    assert pruner.updates == 2 and pruner.p_t == 0.5  # s = 3 and s = 6 (the last); not s = 0
    assert all(set(m.detach().unique().tolist()) <= {0.0, 1.0} for m in pruner.masks)


@pytest.mark.parametrize("divide", [True, False])
def test_the_sparsity_terms_are_divided_by_the_world_size_only_when_asked(monkeypatch, divide):
    model = tiny_deit()
    pruner = UPop({"p": 0.5, "max_epoch": 1, "upop": {"w_sp_divide_world": divide}})
    pruner.attach(model)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
    # 2 blocks: 2 x 16 attention entries and 2 x 192 neurons, all at 1.
    undivided = 4.8e-3 * 32 + 2e-4 * 384
    assert float(pruner.loss(model, {}).detach()) == pytest.approx(undivided / 8 if divide else undivided)


@pytest.mark.parametrize(
    "preset, head_dim_cost, neuron_cost, attn_cost",
    [("deit_tiny", 2313, 385, 6), ("deit_small", 9234, 769, 12), ("deit_base", 36900, 1537, 24)],
)
def test_the_attention_cost_is_the_int_parameter_ratio_at_real_size(preset, head_dim_cost, neuron_cost, attn_cost):
    with torch.device("meta"):  # shapes only: the units carry their costs
        model = VisionTransformer(num_classes=1000, **vit_config(preset))
    costs = {(u.kind, u.cost) for u in prunable_units(model) if u.kind != "head"}
    assert costs == {("head_dim", head_dim_cost), ("neuron", neuron_cost)}
    pruner = UPop({"p": 0.5, "max_epoch": 1})
    pruner.attach(model)
    assert pruner.attn_cost == attn_cost  # the seed's int(9234 / 769) = 12 for DeiT-S
    n_attn = sum(m.numel() for u, m in zip(pruner.units, pruner.masks) if u.kind == "head_dim")
    n_ffn = sum(m.numel() for u, m in zip(pruner.units, pruner.masks) if u.kind == "neuron")
    assert (n_attn, n_ffn) == (12 * 64, 12 * 4 * model.embed_dim)  # DeiT-S: 768 and 18,432 (spec §1)


# ---------------------------------------------------------------------------------------------- compression


def test_masked_deit_at_the_end_of_search_equals_its_compressed_version():
    model = tiny_deit()
    dense = architecture(model)["units"]
    pruner = search(model)
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        masked = model(x)
    pruner.compress(model)
    assert architecture(model)["units"] != dense
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=1e-5, rtol=1e-5)  # the sliced qkv bias included
    assert all(b.attn.scale == 16**-0.5 for b in model.blocks)  # DeiT keeps the dense scale (spec §4.2)
    assert all(u.module.head_dim_mask is None for u in prunable_units(model) if u.kind == "head_dim")


def released_layout(model, widths, seed=0):
    """A state dict laid out like the seed's deit_small_patch16_224_0X0x_compressed.pth: timm keys, and per block
    qkv (18 d, 384), proj (384, 6 d), fc1 (h, 384), fc2 (384, h), random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in model.state_dict().items()}
    e = model.embed_dim
    for i, (d, h) in enumerate(widths):
        shapes = {
            "attn.qkv.weight": (18 * d, e),
            "attn.qkv.bias": (18 * d,),
            "attn.proj.weight": (e, 6 * d),
            "mlp.fc1.weight": (h, e),
            "mlp.fc1.bias": (h,),
            "mlp.fc2.weight": (e, h),
        }
        for key, shape in shapes.items():
            sd[f"blocks.{i}.{key}"] = torch.randn(shape, generator=g) * 0.02
    return sd


def test_the_seeds_released_deit_small_files_load_strictly_with_inferred_widths(tmp_path):
    def deit_small(**widths):
        return VisionTransformer(num_classes=1000, **vit_config("deit_small"), **widths).eval()

    widths = [(64 - 5 * i, 1536 - 97 * i) for i in range(12)]  # every block its own head width and MLP width
    sd = released_layout(deit_small(), widths)
    path = tmp_path / "deit_small_patch16_224_050x_compressed.pth"
    torch.save({"model": sd}, path)  # the seed saves {'model': state dict} and nothing else
    assert read_weights(path)[1] is None

    with pytest.raises(CheckpointError, match="no architecture description.*--infer_arch"):
        tasks.classification.load_pretrained(deit_small(), str(path), {})
    model = deit_small()
    tasks.classification.load_pretrained(model, str(path), {"infer_arch": True}, evaluate=True)
    assert model.block_widths() == {
        "heads": [6] * 12,
        "head_dims": [d for d, _ in widths],
        "mlp_hidden": [h for _, h in widths],
    }
    assert all(b.attn.scale == 64**-0.5 for b in model.blocks)  # the seed's DeiT keeps 1/sqrt(64)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())

    # The same weights in a model built at those widths give the same logits.
    built = deit_small(head_dims=[d for d, _ in widths], mlp_hidden=[h for _, h in widths])
    built.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), built(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- entry point


def tiny_run_args(world, out):
    sets = {
        "world.dir": world,
        "world.n": 96,
        "world.image_size": 32,
        "image_size": 32,
        "patch_size": 8,
        "embed_dim": 48,
        "num_heads": 3,
        "depth": 2,
        "batch_size_train": 8,
        "batch_size_test": 16,
        "warmup_steps": 0,
        "num_workers": 0,
        "measure_latency": "false",
    }
    return ["--demo", "--output_dir", str(out)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_upop_on_a_tiny_deit_through_the_entry_point_then_the_compressed_checkpoint_alone(world, tmp_path):
    base = tiny_run_args(world, tmp_path / "upop")
    upop = ["--pruner", "upop", "--p", "0.5", "--epoch", "1", "--interval", "3"]
    upop += ["--set", "upop.search_epochs=1", "--set", "upop.update_at_start=false"]
    upop += ["--set", "upop.w_sp_divide_world=false"]
    res = cli.main("classification", argv=base + upop)
    report = res["pruner_report"]
    assert report["compressed"] and report["p_t"] == 0.5 and report["attn_cost"] == 6
    assert res["params"] < res["dense"]["params"]

    st = res["compressed_checkpoint"]
    sd, arch = read_weights(st)
    assert arch["pruner"] == "upop" and arch["p"] == 0.5
    # Kept widths meet the mask budget: half of the cost-weighted entries (attention 6, neuron 1), to one entry.
    units = arch["units"]
    pruned = sum(6 * (16 - u["head_dim"]) for n, u in units.items() if n.endswith("attn"))
    pruned += sum(192 - u["neuron"] for n, u in units.items() if n.endswith("mlp"))
    total = 2 * (6 * 16 + 192)
    assert abs(pruned - 0.5 * total) <= 6, (units, pruned)

    # The exported model evaluates alone (no pruner) to the run's numbers; so does a seed-style bare state dict.
    again = cli.main("classification", argv=base + ["--evaluate", "--pretrained", st])
    bare = tmp_path / "deit_tiny_050x_compressed.pth"
    torch.save({"model": sd}, bare)
    inferred = cli.main("classification", argv=base + ["--evaluate", "--pretrained", str(bare), "--infer_arch"])
    for other in (again, inferred):
        for key in ("acc1", "acc5", "n"):
            assert other["metrics"]["val"][key] == res["metrics"]["val"][key]
        assert other["params"] == res["params"]

    # And the logits agree exactly between the two loaders.
    config = json.loads(json.dumps(again["config_values"]))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = []
    for path, extra in ((st, {}), (str(bare), {"infer_arch": True})):
        model = tasks.classification.build_model(config).eval()
        tasks.classification.load_pretrained(model, path, {**config, **extra}, evaluate=True)
        with torch.no_grad():
            logits.append(model(x))
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- config, scripts


def test_the_deit_small_config_holds_the_seeds_recipe():
    _, config = registry.resolve("classification", REPO / "configs" / "deit_small_upop.yaml")
    assert config["vit"] == "deit_small" and config["image_size"] == 224 and config["recipe"] == "deit"
    assert config["batch_size_train"] == 512 and config["init_lr"] == pytest.approx(1e-4 * 8 * 512 / 512)
    assert (config["min_lr"], config["warmup_steps"], config["max_epoch"]) == (1e-5, 0, 300)
    assert config["grad_clip"] == 0 and config["no_decay_norm_bias"] and not config["model_ema"]
    tasks.classification.complete_config(config)  # the DeiT recipe fills the augmentation and mixing keys
    assert (config["mixup"], config["cutmix"], config["smoothing"], config["reprob"]) == (0.8, 1.0, 0.1, 0.25)
    assert config["repeated_aug"] and config["drop_path_rate"] == 0.1
    upop = config["upop"]
    assert upop["search_epochs"] == 60 and not upop["update_at_start"] and not upop["w_sp_divide_world"]
    assert (upop["w_sp_attn"], upop["w_sp_mlp"], upop["attn_cost"]) == (4.8e-3, 2e-4, None)


@pytest.mark.parametrize(
    "p, interval, top1",
    [("0.1", 1600, "81.1"), ("0.2", 1000, "80.8"), ("0.3", 800, "80.2"), ("0.4", 800, "79.6"), ("0.5", 800, "78.9")],
)
def test_each_published_deit_row_has_a_compress_and_an_evaluate_script(p, interval, top1):
    folder = REPO / "scripts" / "upop"
    compress = (folder / f"compress_deit_small_p{p}.sh").read_text()
    assert f"compress classification configs/deit_small_upop.yaml {p} 300 " in compress
    assert re.search(rf"--interval {interval}\b", compress) and f"top-1 {top1}" in compress
    evaluate = (folder / f"evaluate_deit_small_p{p}.sh").read_text()
    tag = f"{round(float(p) * 100):03d}"
    assert f"deit_small_patch16_224_{tag}x_compressed.pth" in evaluate and "--infer_arch" in evaluate
