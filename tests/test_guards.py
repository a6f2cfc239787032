"""Nothing lost, nothing silent: output folders, evaluation files, descriptions, heads, ratios, splits, resumes.

Each test drives the entry point in-process (``cli.main``, what ``python compress_*.py`` runs) or the function
it reaches, and checks both the behaviour and that the message names the culprit.
"""

import json
import shutil

import pytest
import test_runs
import tiny_blip
import torch
from test_engine import ToyTask, make_data
from test_runs import args_for

import cli
import compress_classification
import compress_nlvr
import tasks.classification
import utils
from data import create_dataset
from engine import CHECKPOINT_LAST, Engine, EngineConfig, NonFiniteLossError
from models.arch import architecture, fit_to_checkpoint, read_weights, save_compressed
from models.checkpoints import load_blip_checkpoint
from pruners.base import Pruner
from tasks import registry

world = test_runs.world  # the tiny synthetic world fixture
TASK = compress_classification.TASK


def main(*argv, task=TASK):
    return cli.main(task, argv=[str(a) for a in argv])


def refused(*argv, task=TASK) -> str:
    """The message of a run that must stop with an error."""
    with pytest.raises(SystemExit) as e:
        main(*argv, task=task)
    assert e.value.code not in (0, None)
    return str(e.value.code)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------------ 1, 2, 14: folders


def test_a_demo_run_into_a_folder_holding_a_run_is_refused(world, tmp_path):
    out = tmp_path / "run"
    main(*args_for(world, out, epochs=1))
    before = snapshot(out)
    message = refused(*args_for(world, out, epochs=1), "--seed", 7)
    assert str(out) in message and "--overwrite" in message and f"--resume {out / CHECKPOINT_LAST}" in message
    assert snapshot(out) == before


def test_evaluation_writes_its_own_file_and_leaves_the_run_alone(world, tmp_path):
    out = tmp_path / "run"
    res = main(*args_for(world, out, epochs=1))
    before = {name: (out / name).read_bytes() for name in ("results.json", "config.yaml", "log.jsonl")}
    ckpt = res["checkpoint"]
    for _ in range(2):
        main(*args_for(world, out), "--evaluate", "--pretrained", ckpt)
    assert {name: (out / name).read_bytes() for name in before} == before
    first = json.loads((out / "eval_checkpoint_best.json").read_text())
    second = json.loads((out / "eval_checkpoint_best.2.json").read_text())  # a second evaluation never replaces one
    assert first["metrics"] == second["metrics"] and first["checkpoint"] == ckpt
    assert first["metrics"]["val"]["acc1"] == pytest.approx(res["metrics"]["val"]["acc1"])
    assert first["config_values"]["pretrained"] == ckpt  # the evaluation's config is in its own file


def test_evaluate_without_weights_is_refused(world, tmp_path):
    message = refused(*args_for(world, tmp_path / "o"), "--evaluate")
    assert "--evaluate needs weights" in message and "--pretrained" in message


def test_half_written_files_of_a_killed_run_are_removed_at_the_next_start(world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    orphan = out / f".{CHECKPOINT_LAST}.k2j4d9.tmp"  # what utils.atomic_torch_save leaves when killed mid-write
    orphan.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp"  # not one of ours: no leading dot
    keep.write_text("mine")
    main(*args_for(world, out, epochs=1))
    assert not orphan.exists() and keep.exists()
    assert "half-written by an earlier run" in (out / "run.log").read_text()


# ------------------------------------------------------------------------------------------ 3: descriptions


def _compressed_vit(tmp_path):
    from models.vit import VisionTransformer

    def build():  # the world's 12 classes
        torch.manual_seed(0)
        return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=12)

    small = build()
    small.blocks[0].mlp.keep_neurons(torch.arange(40))
    small.blocks[1].attn.keep_head_dims(torch.arange(5))
    paths = save_compressed(tmp_path / "model_compressed", small.state_dict(), architecture(small))
    return build, small, paths


def test_compressed_weights_without_their_description_are_refused_unless_inference_is_asked(tmp_path):
    build, small, paths = _compressed_vit(tmp_path)
    lone = tmp_path / "copied" / "model_compressed.safetensors"
    lone.parent.mkdir()
    shutil.copy(paths["safetensors"], lone)  # copied without its .json
    sd, arch = read_weights(lone)
    assert arch is None
    with pytest.raises(utils.CheckpointError) as e:
        fit_to_checkpoint(build(), sd, arch, str(lone))
    message = str(e.value)
    assert str(lone.with_suffix(".json")) in message and "does not exist" in message and "--infer_arch" in message
    assert "blocks.0.mlp.neuron=40" in message

    model = build()
    fit_to_checkpoint(model, sd, None, str(lone), infer=True)  # asked for: widths from the shapes
    model.load_state_dict(sd)
    assert model.blocks[0].mlp.hidden == 40 and model.blocks[1].attn.head_dim == 5

    dense = build()  # a dense file needs no description
    assert fit_to_checkpoint(build(), dense.state_dict(), None, "dense.pth") is None


def test_the_entry_script_refuses_a_lone_compressed_file_and_names_the_flag(world, tmp_path):
    build, small, paths = _compressed_vit(tmp_path)
    lone = tmp_path / "lone.safetensors"
    shutil.copy(paths["safetensors"], lone)
    tiny = ["--set", "depth=2", "--set", "embed_dim=32", "--set", "num_heads=2", "--set", "patch_size=16"]
    argv = [*args_for(world, tmp_path / "ev"), *tiny, "--evaluate", "--pretrained", lone]
    with pytest.raises(utils.CheckpointError, match="no architecture description.*--infer_arch"):
        main(*argv)
    res = main(*argv, "--infer_arch", "--output_dir", tmp_path / "ev2")
    assert res["params"] == sum(p.numel() for p in small.parameters())


# ------------------------------------------------------------------------------------------ 4: task heads


def test_evaluating_a_checkpoint_without_the_task_head_is_refused(tmp_path):
    cfg = tiny_blip.tiny_config(tmp_path)
    sd = tiny_blip.layout_sd("nlvr")
    headless = {k: v for k, v in sd.items() if not k.startswith("cls_head.")}
    load_blip_checkpoint(tiny_blip.build("nlvr", cfg), headless, "nlvr")  # fine-tuning starts a fresh head
    with pytest.raises(utils.CheckpointError) as e:
        load_blip_checkpoint(tiny_blip.build("nlvr", cfg), headless, "nlvr", source="twin.pth", evaluate=True)
    message = str(e.value)
    assert "cannot evaluate twin.pth" in message and "cls_head.0.weight" in message and "random initial" in message
    load_blip_checkpoint(tiny_blip.build("nlvr", cfg), sd, "nlvr", evaluate=True)  # the whole file evaluates

    # Evaluating retrieval from a pre-trained file is fine: only the queue buffers are missing, never read.
    load_blip_checkpoint(tiny_blip.build("retrieval", cfg), tiny_blip.layout_sd("pretrain"), "retrieval", evaluate=True)


def test_the_nlvr_entry_script_refuses_to_evaluate_the_headless_demo_checkpoint(world, tmp_path):
    small_world = ["--set", f"world.dir={world}", "--set", "world.n=96", "--set", "world.image_size=32"]
    with pytest.raises(utils.CheckpointError, match="lacks 4 of the model's weights.*cls_head"):
        main("--demo", "--evaluate", "--output_dir", tmp_path / "o", *small_world, task=compress_nlvr.TASK)


# ------------------------------------------------------------------------------------------ 5, 6, 7, 9: options


def _config(*argv, task=TASK):
    return cli.resolve_config(task, cli.build_parser(task).parse_args([str(a) for a in argv]))


def test_p_means_the_pruned_fraction_for_platon_and_must_agree_with_final_threshold():
    config = _config("--demo", "--pruner", "platon", "--p", "0.5")
    assert config["platon"]["final_threshold"] == pytest.approx(0.5)  # beats the config file's 0.2
    assert _config("--demo", "--pruner", "platon")["platon"]["final_threshold"] == pytest.approx(0.2)
    assert _config("--demo", "--pruner", "platon", "--p", "0.8", "--final_threshold", "0.2")["platon"][
        "final_threshold"
    ] == pytest.approx(0.2)
    message = refused("--demo", "--pruner", "platon", "--p", "0.5", "--final_threshold", "0.2")
    assert "--p 0.5" in message and "--final_threshold gives 0.2" in message


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--pruner", "platon", "--final_threshold", "0"], "final_threshold (0.0)"),
        (["--pruner", "platon", "--final_threshold", "1.5"], "final_threshold (1.5)"),
        (["--pruner", "platon", "--p", "1"], "must be in [0, 1), got 1.0"),
        (["--pruner", "upop", "--p", "1.5"], "upop: p (--p) is the pruned share"),
        (["--pruner", "upop", "--set", "upop.search_epochs=0"], "upop.search_epochs must be at least 1"),
        (["--pruner", "platon", "--useID", "missing_ids.json"], "ID file missing_ids.json does not exist"),
        (["--p", "0.5"], "--p is a pruner's ratio and does nothing without --pruner"),
        (["--epoch", "0"], "--epoch must be at least 1, got 0"),
        (["--epoch", "-1"], "--epoch must be at least 1, got -1"),
        (["--set", "eval_every=0"], "config key 'eval_every'"),
        (["--set", "accum_steps=0"], "config key 'accum_steps'"),
    ],
)
def test_bad_options_stop_before_anything_is_built(world, tmp_path, monkeypatch, argv, words):
    def untouchable(*args, **kwargs):
        raise AssertionError("data or model built before the options were checked")

    monkeypatch.setattr(tasks.classification, "build_data", untouchable)
    monkeypatch.setattr(tasks.classification, "build_model", untouchable)
    out = tmp_path / "o"
    message = refused(*args_for(world, out), *argv)
    assert words in message
    assert not out.exists()  # no folder, no log: nothing happened


def test_a_config_file_with_zero_epochs_is_refused_naming_the_key_and_file(world, tmp_path):
    cfg = tmp_path / "zero.yaml"
    demo = cli.REPO / registry.lookup(TASK).demo_config
    cfg.write_text(demo.read_text().replace("max_epoch: 30", "max_epoch: 0"))
    argv = [a for a in args_for(world, tmp_path / "o") if a != "--demo"]
    argv = argv[: argv.index("--epoch")] + argv[argv.index("--epoch") + 2 :]
    message = refused("--demo", "--config", cfg, *argv)
    assert "config key 'max_epoch'" in message and str(cfg) in message and "at least 1, got 0" in message


# ------------------------------------------------------------------------------------------ 8: empty splits


def test_an_empty_evaluation_split_is_an_error_naming_its_file(world, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world / "annotation", copy / "annotation")
    (copy / "annotation" / "nlvr_dev.json").write_text("[]")
    config = {"image_size": 32, "image_root": str(world), "ann_root": str(copy / "annotation"), "seed": 0}
    with pytest.raises(ValueError, match=r"nlvr_dev\.json holds no entries"):
        create_dataset("nlvr", config)


# ------------------------------------------------------------------------------------------ 10, 11: resume, NaN


class _NamedToy(ToyTask):
    def __init__(self, name="toy", nan_at_step=None):
        super().__init__(nan_at_step)
        self.name = name


def _engine(out, task=None, pruner=None, **cfg):
    torch.manual_seed(0)
    base = dict(max_epoch=1, init_lr=0.05, weight_decay=0.0)
    base.update(cfg)
    return Engine(torch.nn.Linear(4, 1), task or _NamedToy(), EngineConfig(**base), utils.DistInfo(), out, pruner)


def test_resuming_another_tasks_checkpoint_is_refused_by_name(tmp_path):
    train, val = make_data()
    _engine(tmp_path).fit(train, {"val": val})
    ckpt = tmp_path / CHECKPOINT_LAST
    with pytest.raises(utils.CheckpointError) as e:
        _engine(tmp_path / "b", task=_NamedToy("nlvr")).fit(train, {"val": val}, resume=ckpt)
    message = str(e.value)
    assert str(ckpt) in message and "task toy with pruner none" in message and "this is a nlvr run" in message


def test_resuming_a_pruning_run_without_its_pruner_is_refused_by_name(tmp_path):
    class Named(Pruner):  # any pruner: the engine keeps its name and state
        name = "upop"

        def state_dict(self):
            return {"p": 0.5}

    train, val = make_data()
    _engine(tmp_path, pruner=Named({})).fit(train, {"val": val})
    with pytest.raises(utils.CheckpointError) as e:
        _engine(tmp_path / "b").fit(train, {"val": val}, resume=tmp_path / CHECKPOINT_LAST)
    message = str(e.value)
    assert "pruner upop (phase train, after epoch 0)" in message and "resume it with --pruner upop" in message


def test_a_checkpoint_that_does_not_fit_the_model_is_named(tmp_path):
    train, val = make_data()
    _engine(tmp_path).fit(train, {"val": val})
    ckpt = torch.load(tmp_path / CHECKPOINT_LAST, weights_only=True)
    del ckpt["task"], ckpt["pruner_name"]  # a file from before checkpoints said what they hold
    ckpt["model"] = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    bad = tmp_path / "old.pth"
    torch.save(ckpt, bad)
    with pytest.raises(utils.CheckpointError, match=rf"cannot resume from {bad} .*does not fit this run's model"):
        _engine(tmp_path / "b").fit(train, {"val": val}, resume=bad)


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_a_checkpoint(tmp_path):
    train, val = make_data()
    _engine(tmp_path, max_epoch=2).fit(train, {"val": val})
    (tmp_path / "results.json").write_text("{}")  # what the entry script adds
    (tmp_path / "model_compressed.json").write_text("{}")
    before = snapshot(tmp_path)

    with pytest.raises(NonFiniteLossError) as e:
        _engine(tmp_path, task=_NamedToy(nan_at_step=0)).fit(train, {"val": val})
    message = str(e.value)
    assert "this run wrote no checkpoint" in message and "last good checkpoint" not in message
    assert "log.jsonl" in message and snapshot(tmp_path) == before  # nothing of the earlier run moved

    # A NaN after this run's first checkpoint names that checkpoint, and the earlier run is gone by then.
    with pytest.raises(NonFiniteLossError, match=r"the last good checkpoint .* \(epoch 0\) is kept"):
        _engine(tmp_path, task=_NamedToy(nan_at_step=8), max_epoch=2).fit(train, {"val": val})
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "model_compressed.json").exists()
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [0]


# ------------------------------------------------------------------------------------------ 12, 13: messages


def test_a_pickle_with_code_is_refused_as_such(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(utils.CheckpointError) as e:
        utils.load_checkpoint_file(path)
    message = str(e.value)
    assert f"refused to load {path}" in message and "pickled Python objects" in message
    assert "GLOBAL posix.system" in message or "GLOBAL nt.system" in message
    assert "weights_only" not in message and "truncated" not in message


def test_a_wrong_value_given_with_set_names_set_not_the_file(world, tmp_path):
    message = refused(*args_for(world, tmp_path / "o"), "--set", "batch_size_train=big")
    assert "--set batch_size_train=big" in message and "expects int" in message
    assert ".yaml" not in message
