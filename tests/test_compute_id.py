"""compute_id.py and pruners/targets.py: which modules are measured (real-size counts, the seed's name
filters), one ID per target in order, grouped passes equal to one pass, and the CLI end to end."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_blip import DEPTH, HEADS, PATCH, SIZE, WIDTH, tiny_config, write_vocab

import compute_id
from models.blip_caption import BlipCaption
from models.blip_nlvr import BlipNLVR
from models.vit import VisionTransformer
from pruners.intrinsic_dim import pairwise_distances, seed_id
from pruners.targets import target_modules, targets

# The seed's pruners pick parameters by substring (ID_pruner.py; ID_pruner_nlvr.py adds merge_layer).
SEED_CAPTION = [
    "attn.qkv",
    "attn.proj",
    "mlp.fc1",
    "mlp.fc2",
    "attention.self",
    "crossattention.self",
    ".attention.output.dense",
    "crossattention.output.dense",
    "intermediate.dense",
    "output.dense",
]
SEED_NLVR = [*SEED_CAPTION, "merge_layer"]


def seed_selection(model, patterns):
    names = [n for n, p in model.named_parameters() if any(s in n for s in patterns)]
    return [n.rsplit(".", 1)[0] for n in names if n.endswith(".weight")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("tiny_id"))


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ targets


@pytest.mark.parametrize("cls, count", [(BlipCaption, 168), (BlipNLVR, 222)])
def test_real_size_target_counts(tmp_path, cls, count):
    tok = write_vocab(tmp_path / "bert", 30522)
    cfg = {"vit": "base", "med_config": "configs/med_config.json", "tokenizer": str(tok)}
    with torch.device("meta"):
        model = cls(cfg, 384)
    found = target_modules(model)
    assert len(found) == count
    assert [m for _, m in found] == ["vision"] * 48 + ["text"] * (count - 48)
    assert found[0] == ("visual_encoder.blocks.0.attn.qkv", "vision")
    tower = "text_decoder.bert" if cls is BlipCaption else "text_encoder"
    assert found[48] == (f"{tower}.encoder.layer.0.attention.self.query", "text")
    if cls is BlipNLVR:
        assert found[-3:] == [
            ("text_encoder.encoder.layer.11.crossattention.output.merge_layer", "text"),
            ("text_encoder.encoder.layer.11.intermediate.dense", "text"),
            ("text_encoder.encoder.layer.11.output.dense", "text"),
        ]
        assert sum("merge_layer" in n for n, _ in found) == 6


@pytest.mark.parametrize("cls, patterns", [(BlipCaption, SEED_CAPTION), (BlipNLVR, SEED_NLVR)])
def test_targets_are_the_seed_pruners_selection_in_order(tiny, cls, patterns):
    model = cls(tiny, SIZE)
    assert [t.name for t in targets(model)] == seed_selection(model, patterns)
    kv = [t.name for t in targets(model) if t.tokens == "image" and t.modality == "text"]
    assert kv and all(n.endswith((".key", ".value")) and ".crossattention." in n for n in kv)


def test_vit_classifier_targets_exclude_the_head():
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=24, depth=3, num_heads=2, num_classes=5)
    names = [n for n, _ in target_modules(vit)]
    assert names == [f"blocks.{i}.{m}" for i in range(3) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    with pytest.raises(TypeError, match="Linear has no VisionTransformer blocks"):
        targets(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ measure


def caption_batches(n, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "circle", "two", "of"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]  # in write_vocab
    rng = random.Random(seed)
    out = []
    for b0 in range(0, n, bs):
        # distinct captions: a repeated caption gives exact duplicates in the first text layer
        caps = [f"a picture of {' '.join(rng.sample(words, 4))}" for _ in range(bs)]
        out.append((torch.randn(bs, 3, SIZE, SIZE, generator=g), caps, torch.arange(b0, b0 + bs)))
    return out


def test_measure_gives_one_id_per_target_in_order(tiny):
    torch.manual_seed(0)
    model = BlipCaption(tiny, SIZE)
    data = caption_batches(96)
    res = compute_id.measure(
        model, compute_id.ADAPTERS["caption"], lambda: data, 96, progress=False, log=lambda s: None
    )
    assert [m.name for m in res.modules] == [t.name for t in targets(model)]
    assert len(res.modules) == DEPTH * 4 + DEPTH * 10
    assert all(np.isfinite(m.id) and m.id > 0 and len(m.per_b) == 20 for m in res.modules)
    assert len(res.passes) == 1 and res.peak_activation_bytes > 0


def test_grouped_passes_equal_one_pass(tiny):
    torch.manual_seed(0)
    model = BlipCaption(tiny, SIZE)
    data = caption_batches(96)
    kw = {"progress": False, "log": lambda s: None, "chunk_bytes": 2**16}
    one = compute_id.measure(model, compute_id.ADAPTERS["caption"], lambda: data, 96, **kw)
    budget = one.reserve_bytes + 1_200_000  # room for a few modules per pass
    many = compute_id.measure(model, compute_id.ADAPTERS["caption"], lambda: data, 96, max_memory=budget, **kw)
    assert len(many.passes) > 2
    assert many.peak_activation_bytes <= 1_200_000 < one.peak_activation_bytes
    assert [(m.name, m.id, m.std_b20) for m in many.modules] == [(m.name, m.id, m.std_b20) for m in one.modules]
    tb = compute_id.measure(model, compute_id.ADAPTERS["caption"], lambda: data, 96, estimator="textbook", **kw)
    assert [m.name for m in tb.modules] == [m.name for m in one.modules] and tb.modules[0].per_b is None


def test_passes_with_other_inputs_are_refused(tiny):
    model = BlipCaption(tiny, SIZE)
    calls = []

    def batches():
        calls.append(1)
        return caption_batches(96, seed=len(calls))  # a new augmentation on every call: the seed's bug

    with pytest.raises(RuntimeError, match="pass 2 got other inputs than pass 1 at batch 0"):
        compute_id.measure(
            model,
            compute_id.ADAPTERS["caption"],
            batches,
            96,
            max_memory=10**6,
            chunk_bytes=2**16,
            progress=False,
            log=lambda s: None,
        )


def test_a_failed_module_leaves_the_permutations_of_the_next_ones_unchanged():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=2, num_heads=HEADS, num_classes=3)
    data = [(torch.randn(16, 3, SIZE, SIZE), torch.zeros(16, dtype=torch.long)) for _ in range(6)]
    adapter = compute_id.ADAPTERS["classification"]
    res = compute_id.measure(
        vit, adapter, lambda: data, 96, kind="cls", keep_going=True, progress=False, log=lambda s: None
    )
    assert np.isnan(res.modules[0].id) and "does not depend on the input" in res.modules[0].error
    # by hand: the same representations, the seed's stream with module 0's 20 permutations drawn
    found = targets(vit)
    collector = compute_id.Collector(vit, found, "cls")
    collector.storing = {t.name for t in found}
    with torch.no_grad():
        for batch in data:
            collector.samples = 16
            adapter.forward(vit.eval(), batch, "cpu")
    collector.close()
    rng = np.random.RandomState(999)
    for _ in range(20):
        rng.permutation(96)
    for m, t in zip(res.modules[1:], found[1:]):
        assert m.id == seed_id(pairwise_distances(collector.store[t.name]), rng).id


def test_nlvr_keeps_both_images_of_a_sample_in_one_row(tiny):
    model = BlipNLVR(tiny, SIZE).eval()
    found = targets(model)
    collector = compute_id.Collector(model, found, "flatten")
    collector.storing = {found[0].name, "text_encoder.encoder.layer.0.crossattention.self1.key"}
    collector.samples = 3
    i0, i1 = torch.randn(3, 3, SIZE, SIZE), torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        compute_id.ADAPTERS["nlvr"].forward(model, (i0, i1, ["a", "b c", "d"], torch.tensor([0, 1, 0])), "cpu")
        qkv = model.visual_encoder.blocks[0].attn.qkv
        x = model.visual_encoder.patch_embed(torch.cat([i0, i1]))[0]
    collector.close()
    tokens = (SIZE // PATCH) ** 2 + 1
    rows = collector.store[found[0].name][0]
    assert rows.shape == (3, 2 * tokens * 3 * WIDTH)
    x = torch.cat([model.visual_encoder.cls_token.expand(6, -1, -1), x], 1) + model.visual_encoder.pos_embed
    per_image = qkv(model.visual_encoder.blocks[0].norm1(x)).flatten(1)
    torch.testing.assert_close(rows[1], torch.cat([per_image[1], per_image[4]]))
    assert collector.store["text_encoder.encoder.layer.0.crossattention.self1.key"][0].shape == (3, tokens * WIDTH)


def test_seeded_samples_repeat_and_restore_the_global_generators():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return torch.rand(2), float(np.random.rand()), random.random()

    ds = compute_id.SeededSamples(Noisy(), [7, 3, 7], seed=999)
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    first = [ds[k] for k in range(3)]
    assert torch.equal(torch.rand(1), before)  # the caller's stream is untouched
    again = [ds[k] for k in range(3)]
    for a, b in zip(first, again):
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert torch.equal(first[0][0], first[2][0]) and not torch.equal(first[0][0], first[1][0])


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    from data.synthetic import ensure_world

    root = tmp_path_factory.mktemp("id_world")
    ensure_world(root / "world", n=96, image_size=32, seed=0, progress=False)
    return root


def cli_args(world, out, task, *extra, **sets):
    sets = {"world.dir": world / "world", "world.n": 96, "world.image_size": 32, "image_size": 32, **sets}
    args = ["--demo", "--task", task, "--cpu", "--pretrained", "", "-n", "96", "--output", str(out), *extra]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def tiny_blip_sets(tiny):
    # randaug: the seed's augmentation, which every pass must repeat exactly
    keys = ("med_config", "vit_patch_size", "vit_embed_dim", "vit_depth", "vit_heads")
    return {k: tiny[k] for k in keys} | {"randaug": True}


def test_cli_caption_ids_do_not_depend_on_the_number_of_passes(world, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # The synthetic captions repeat, so the first text layers hold exact duplicates; the textbook
    # estimator drops them, where the seed's 20 blocks of 4 points would run out of valid points.
    sets = tiny_blip_sets(tiny)
    one = compute_id.main(cli_args(world, tmp_path / "one", "caption", "--estimator", "textbook", **sets))
    many = compute_id.main(
        cli_args(world, tmp_path / "many", "caption", "--estimator", "textbook", "--max-memory", "20MB", **sets)
    )
    assert len(one.passes) == 1 and len(many.passes) > 1
    ids = json.loads((tmp_path / "one" / "ids.json").read_text())
    assert ids == json.loads((tmp_path / "many" / "ids.json").read_text())
    model = BlipCaption({**tiny, "tokenizer": str(world / "world" / "tokenizer")}, SIZE)
    names = [t.name for t in targets(model)]
    assert list(ids) == names and all(set(v) == {"id"} for v in ids.values())
    lines = (tmp_path / "one" / "result_id.txt").read_text().splitlines()
    assert [float(v) for v in lines] == [ids[n]["id"] for n in names]
    assert not (tmp_path / "one" / "result_bar.txt").exists()
    csv_rows = (tmp_path / "one" / "ids.csv").read_text().splitlines()
    assert csv_rows[0] == "name,modality,id" and csv_rows[1].startswith(f"{names[0]},vision,")
    assert (tmp_path / "one" / "ID.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((tmp_path / "many" / "run.json").read_text())
    assert run["passes"] == len(many.passes) and run["n"] == 96 and run["peak_activation_bytes"] > 0


def test_cli_seed_estimator_files_on_a_classifier(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    arch = {"patch_size": PATCH, "embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS}
    res = compute_id.main(cli_args(world, tmp_path, "classification", **arch))
    ids = json.loads((tmp_path / "ids.json").read_text())
    assert list(ids) == [
        f"blocks.{i}.{m}" for i in range(DEPTH) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert [m.id for m in res.modules] == [v["id"] for v in ids.values()]
    assert all(len(v["per_b"]) == 20 and v["id"] == pytest.approx(np.mean(v["per_b"])) for v in ids.values())
    bars = (tmp_path / "result_bar.txt").read_text().splitlines()
    assert [float(b) for b in bars] == [v["std_b20"] for v in ids.values()]
    assert (tmp_path / "ID.txt").read_text().splitlines()[0] == "name: blocks.0.attn.qkv, modality: vision"


def test_cli_records_a_module_without_an_id_and_goes_on(world, tmp_path, monkeypatch):
    """Block 0's qkv at the CLS token sees no image yet: every sample gives the same vector."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    arch = {"patch_size": PATCH, "embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS}
    with pytest.raises(SystemExit, match="1 of 8 modules have no ID.*blocks.0.attn.qkv.*does not depend on the input"):
        compute_id.main(cli_args(world, tmp_path, "classification", "--repr", "cls", **arch))
    ids = json.loads((tmp_path / "ids.json").read_text())
    assert ids["blocks.0.attn.qkv"]["id"] is None and "96 have an exact duplicate" in ids["blocks.0.attn.qkv"]["error"]
    assert all(v["id"] > 0 for k, v in ids.items() if k != "blocks.0.attn.qkv")
    assert (tmp_path / "result_id.txt").read_text().splitlines()[0] == "nan"


def test_cli_errors_name_the_problem(world, tiny, tmp_path):
    sets = tiny_blip_sets(tiny)
    with pytest.raises(SystemExit, match="9600 samples requested but the training split has only 480"):
        compute_id.main(cli_args(world, tmp_path, "caption", "-n", "9600", **sets))
    with pytest.raises(SystemExit, match="--max-memory: cannot read memory size 'lots'"):
        compute_id.main(cli_args(world, tmp_path, "caption", "--max-memory", "lots", **sets))
    with pytest.raises(SystemExit, match="leaves nothing for activations"):
        compute_id.main(cli_args(world, tmp_path, "caption", "--max-memory", "10KB", **sets))
    with pytest.raises(SystemExit, match="cannot tell the task from the config file name"):
        compute_id.main(["--config", str(Path(tiny["med_config"]))])


def test_cli_nlvr_takes_one_sample_per_statement_though_the_demo_batches_pairs(world, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    sets = tiny_blip_sets(tiny) | {"randaug": False, "nlvr_group_pairs": True}
    # A random text encoder maps the world's few distinct sentences to duplicates, so some text modules get no ID;
    # what matters here is that 96 statements, each with its two pictures, were measured.
    with pytest.raises(SystemExit, match=r"modules have no ID .*of 96: "):
        compute_id.main(cli_args(world, tmp_path, "nlvr", "--estimator", "textbook", **sets))
    ids = json.loads((tmp_path / "ids.json").read_text())
    vision = {k: v for k, v in ids.items() if k.startswith("visual_encoder.")}
    assert len(vision) == 8 and all(v["id"] > 0 for v in vision.values())
    assert ids["text_encoder.encoder.layer.1.crossattention.self1.key"]["id"] > 0
