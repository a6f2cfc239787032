import pytest

from config import ConfigError, apply_overrides, dump_yaml, load_config, load_yaml, parse_override, validate

SCHEMA = {
    "init_lr": 1e-5,
    "max_epoch": 5,
    "amp": False,
    "image_root": "",
    "pretrained": None,
    "crop_scale": [0.5, 1.0],
    "world": {"dir": ".synthetic", "n": 600},
}


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_fills_defaults_and_types(tmp_path):
    p = write(tmp_path, "init_lr: 3e-5\nmax_epoch: 2\nworld:\n  n: 40\n")
    cfg = load_config(p, SCHEMA)
    assert cfg["init_lr"] == pytest.approx(3e-5) and isinstance(cfg["init_lr"], float)
    assert cfg["max_epoch"] == 2 and cfg["amp"] is False
    assert cfg["world"] == {"dir": ".synthetic", "n": 40}


def test_int_is_accepted_as_float(tmp_path):
    cfg = load_config(write(tmp_path, "init_lr: 1\n"), SCHEMA)
    assert cfg["init_lr"] == 1.0 and isinstance(cfg["init_lr"], float)


def test_unknown_key_names_itself_and_closest(tmp_path):
    p = write(tmp_path, "init_lrr: 1e-5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, SCHEMA)
    msg = str(e.value)
    assert "'init_lrr'" in msg and "'init_lr'" in msg and str(p) in msg


def test_unknown_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'world\.nn'.*'n'"):
        load_config(write(tmp_path, "world:\n  nn: 3\n"), SCHEMA)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'max_epoch'.*expects int.*str"):
        load_config(write(tmp_path, "max_epoch: five\n"), SCHEMA)
    with pytest.raises(ConfigError, match=r"'amp'.*expects bool"):
        load_config(write(tmp_path, "amp: 1\n"), SCHEMA)


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=str(missing)):
        load_config(missing, SCHEMA)


def test_bad_yaml_names_path(tmp_path):
    p = write(tmp_path, "a: [1, 2\n")
    with pytest.raises(ConfigError, match=str(p)):
        load_yaml(p)


def test_yaml_is_loaded_safely(tmp_path):
    # A Python object tag must not construct anything.
    p = write(tmp_path, "init_lr: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError):
        load_yaml(p)


@pytest.mark.parametrize(
    "item,expected",
    [
        ("init_lr=1e-5", 1e-5),
        ("max_epoch=3", 3),
        ("amp=true", True),
        ("image_root=/x/y", "/x/y"),
        ("crop_scale=[0.2, 1.0]", [0.2, 1.0]),
        ("pretrained=null", None),
    ],
)
def test_parse_override_types(item, expected):
    assert parse_override(item)[1] == expected


def test_overrides_apply_and_validate(tmp_path):
    p = write(tmp_path, "max_epoch: 2\n")
    cfg = load_config(p, SCHEMA, ["max_epoch=7", "world.n=12", "init_lr=2e-4"])
    assert cfg["max_epoch"] == 7 and cfg["world"]["n"] == 12 and cfg["init_lr"] == pytest.approx(2e-4)
    with pytest.raises(ConfigError, match=r"'max_epochs'.*'max_epoch'"):
        load_config(p, SCHEMA, ["max_epochs=3"])
    with pytest.raises(ConfigError, match=r"'max_epoch'.*expects int"):
        load_config(p, SCHEMA, ["max_epoch=0.5"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["max_epoch"], SCHEMA)


def test_dump_round_trip(tmp_path):
    cfg = validate({"max_epoch": 3}, SCHEMA)
    dump_yaml(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml", SCHEMA) == cfg


def test_flags_take_precedence_over_set(tmp_path):
    p = write(tmp_path, "max_epoch: 2\n")
    cfg = load_config(p, SCHEMA, ["max_epoch=7", "pretrained=a.pth"], flags={"pretrained": "b.pth"})
    assert cfg["max_epoch"] == 7 and cfg["pretrained"] == "b.pth"


NLVR_DENSE = "checkpoints/demo/blip_tiny_nlvr.pth"


@pytest.mark.parametrize(
    "argv, max_epoch, pretrained",
    [
        (["--demo", "--pruner", "upop", "--set", "upop.epochs=3"], 3, NLVR_DENSE),
        (["--demo", "--pruner", "upop", "--set", "upop.epochs=3", "--epoch", "5"], 5, NLVR_DENSE),
        (["--demo", "--set", "upop.epochs=3"], 36, "checkpoints/demo/blip_tiny_twin.pth"),  # no pruner, no effect
        (["--demo", "--pruner", "platon", "--pretrained", "x.pth"], 8, "x.pth"),
    ],
)
def test_pruner_section_sets_epochs_and_starting_model(argv, max_epoch, pretrained):
    import cli
    import compress_nlvr

    args = cli.build_parser(compress_nlvr.TASK).parse_args(argv)
    cfg = cli.resolve_config(compress_nlvr.TASK, args)
    assert cfg["max_epoch"] == max_epoch
    assert str(cfg["pretrained"]).endswith(pretrained)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--demo"], "output/demo/nlvr"),
        (["--demo", "--pruner", "upop"], "output/demo/upop_nlvr"),
        (["--pruner", "platon"], "output/platon_nlvr"),
        ([], "output/nlvr"),
    ],
)
def test_a_pruning_run_never_defaults_to_the_dense_runs_folder(argv, expected):
    import cli
    import compress_nlvr

    assert cli.default_output_dir(compress_nlvr.TASK, cli.build_parser(compress_nlvr.TASK).parse_args(argv)) == expected


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--demo"], "output/demo/retrieval"),
        (["--demo", "--config", "configs/demo/retrieval_clip.yaml"], "output/demo/retrieval_clip"),
        (
            ["--demo", "--config", "configs/demo/retrieval_clip.yaml", "--pruner", "upop"],
            "output/demo/upop_retrieval_clip",
        ),
    ],
)
def test_another_backbone_of_a_task_defaults_to_its_own_folder(argv, expected):
    import cli

    args = cli.build_parser("retrieval").parse_args(argv)
    backbone = cli.resolve_config("retrieval", args)["backbone"]
    assert cli.default_output_dir("retrieval", args, backbone) == expected
