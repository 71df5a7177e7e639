"""The T5X-style command line: gin files, bindings, --gin.X=Y, search paths, clear errors."""

import gin
import pytest

from moe import gin_cli


@gin.configurable
def _configured(value=0, name="default"):
    return value, name


pytestmark = pytest.mark.usefixtures("clean_gin")


def _parse(argv):
    return gin_cli.parse_command_line(argv, gin_cli.make_parser("test"))


def test_shorthand_and_bindings(tmp_path):
    (tmp_path / "run.gin").write_text("VALUE = 1\n_configured.value = %VALUE\n")
    args = _parse([f"--gin_file={tmp_path / 'run.gin'}", "--gin.VALUE=7",
                   "--gin_bindings=_configured.name = 'x'"])
    assert _configured() == (7, "x")
    assert args.gin_bindings == ("VALUE = 7", "_configured.name = 'x'")


def test_search_paths_and_includes(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "base.gin").write_text("_configured.value = 3\n")
    (tmp_path / "runs" / "child.gin").write_text("include 'base.gin'\n_configured.name = 'c'\n")
    _parse(["--gin_file=runs/child.gin", f"--gin_search_paths={tmp_path},/nonexistent"])
    assert _configured() == (3, "c")


def test_an_earlier_parse_search_paths_are_not_searched(tmp_path):
    """An `include` resolves under this command line's search paths, not under a folder an
    earlier parse in the same process searched (which also holds a base.gin)."""
    earlier, now = tmp_path / "earlier", tmp_path / "now"
    for folder, value in ((earlier, 1), (now, 3)):
        (folder / "runs").mkdir(parents=True)
        (folder / "base.gin").write_text(f"_configured.value = {value}\n")
        (folder / "runs" / "child.gin").write_text("include 'base.gin'\n")
    _parse(["--gin_file=runs/child.gin", f"--gin_search_paths={earlier}"])
    assert _configured() == (1, "default")
    gin.clear_config()
    _parse([f"--gin_file={now / 'runs' / 'child.gin'}", f"--gin_search_paths={now}"])
    assert _configured() == (3, "default")


def test_installed_gin_configs_are_always_searched():
    files = gin_cli.parse_gin([], [], [], finalize=False)
    assert files == []
    assert gin_cli.installed_gin_dir().endswith("gin_configs")


def test_unknown_gin_file_names_the_file():
    with pytest.raises(gin_cli.GinConfigError, match=r"runs/nope\.gin.*not found"):
        _parse(["--gin_file=runs/nope.gin"])


def test_malformed_gin_file(tmp_path):
    (tmp_path / "bad.gin").write_text("_configured.value = (\n")
    with pytest.raises(gin_cli.GinConfigError, match=r"bad\.gin cannot be parsed"):
        _parse([f"--gin_file={tmp_path / 'bad.gin'}"])


def test_unknown_configurable_in_binding():
    with pytest.raises(gin_cli.GinConfigError, match=r"no_such_thing\.value"):
        _parse(["--gin.no_such_thing.value=1"])


def test_bad_shorthand():
    with pytest.raises(gin_cli.GinConfigError, match=r"--gin\.NAME=VALUE"):
        _parse(["--gin.TRAIN_STEPS"])


# --- A binding must change something: typos are named with the closest name in use ----------


def test_gin_keeps_its_parsed_bindings_where_the_checks_read_them():
    """The typo checks read gin's parsed config; a gin-config upgrade that moves it fails here
    instead of silently turning the checks off."""
    _parse(["--gin.TRAIN_STEPS=3", "--gin_file=runs/quickstart.gin"])
    config = gin_cli._parsed_config()
    assert config is not None and config[("TRAIN_STEPS", "gin.macro")] == {"value": 3}
    assert gin_cli._gin_registry().matching_selectors("moe.train.train")


@pytest.mark.parametrize("flag", ["--gin.TRAIN_STPES=10", "--gin_bindings=TRAIN_STPES = 10"])
def test_misspelled_macro_with_a_default_in_the_run_gin_is_refused(flag):
    # quickstart.gin sets TRAIN_STEPS = 800, so gin alone would define TRAIN_STPES and train 800.
    with pytest.raises(gin_cli.GinConfigError, match=r"TRAIN_STPES.*Did you mean TRAIN_STEPS"):
        _parse(["--gin_file=runs/quickstart.gin", flag])


def test_misspelled_macro_without_a_default_is_named_not_the_missing_one():
    # pretrain.gin marks TRAIN_STEPS required: without the check gin's finalize error is about
    # whichever required macro it meets first.
    with pytest.raises(gin_cli.GinConfigError, match=r"TRAIN_STPES.*TRAIN_STEPS"):
        _parse(["--gin_file=models/switch_tiny.gin", "--gin_file=runs/pretrain.gin",
                "--gin.TRAIN_STPES=10", "--gin.MODEL_DIR='/tmp/run'"])


def test_lowercase_macro_suggests_the_uppercase_one():
    with pytest.raises(gin_cli.GinConfigError, match=r"train_steps.*Did you mean TRAIN_STEPS"):
        _parse(["--gin_file=runs/quickstart.gin", "--gin.train_steps=10"])


def test_macro_set_and_used_on_the_command_line_is_accepted(tmp_path):
    (tmp_path / "run.gin").write_text("_configured.name = 'n'\n")
    _parse([f"--gin_file={tmp_path / 'run.gin'}", "--gin.MY_VALUE=5",
            "--gin._configured.value=%MY_VALUE"])
    assert _configured() == (5, "n")


def test_macro_a_file_sets_but_nothing_uses_may_be_overridden(tmp_path):
    (tmp_path / "run.gin").write_text("UNUSED = 1\n")
    _parse([f"--gin_file={tmp_path / 'run.gin'}", "--gin.UNUSED=2"])


def test_unknown_parameter_names_the_closest_parameter():
    with pytest.raises(gin_cli.GinConfigError,
                       match=r"train\.eval_step = 3.*no parameter 'eval_step'.*'eval_steps'"):
        _parse(["--gin_file=runs/quickstart.gin", "--gin.train.eval_step=3"])


def test_unknown_configurable_names_the_closest_configurable():
    with pytest.raises(gin_cli.GinConfigError, match=r"no configurable named trian.*'train'"):
        _parse(["--gin_file=runs/quickstart.gin", "--gin.trian.eval_steps=3"])
    with pytest.raises(gin_cli.GinConfigError, match=r"@DatasetConfg.*'DatasetConfig'"):
        _parse(["--gin_file=runs/quickstart.gin", "--gin.train.eval_dataset_cfg=@DatasetConfg()"])


def test_unknown_scope_names_the_closest_scope():
    with pytest.raises(gin_cli.GinConfigError, match=r"scope 'trian'.*Did you mean 'train'"):
        _parse(["--gin_file=runs/quickstart.gin", "--gin.trian/DatasetConfig.shuffle=False"])


def test_scope_introduced_by_another_binding_is_accepted():
    _parse(["--gin_file=runs/quickstart.gin", "--gin.train.eval_dataset_cfg=@mine/DatasetConfig()",
            "--gin.mine/DatasetConfig.split='validation'", *_dataset_bindings("mine")])


def _dataset_bindings(scope):
    return [f"--gin.{scope}/DatasetConfig.{name}={value}" for name, value in (
        ("mixture_or_task_name", "%MIXTURE_OR_TASK_NAME"),
        ("task_feature_lengths", "%TASK_FEATURE_LENGTHS"), ("batch_size", "%BATCH_SIZE"))]


def test_misspelled_macro_reference_names_the_closest_macro():
    with pytest.raises(gin_cli.GinConfigError,
                       match=r"%EVAL_STPES is used \(by train\.eval_steps\).*%EVAL_STEPS"):
        _parse(["--gin_file=runs/quickstart.gin", "--gin.train.eval_steps=%EVAL_STPES"])


def test_run_gin_without_model_gin_says_to_add_one():
    with pytest.raises(gin_cli.GinConfigError, match=r"%MODEL .*--gin_file=models/"):
        _parse(["--gin_file=runs/pretrain.gin", "--gin.TRAIN_STEPS=1"])


def test_required_macro_not_set_names_the_flag():
    with pytest.raises(gin_cli.GinConfigError,
                       match=r"MIXTURE_OR_TASK_NAME is required.*--gin\.MIXTURE_OR_TASK_NAME="):
        _parse(["--gin_file=models/switch_tiny.gin", "--gin_file=runs/pretrain.gin",
                "--gin.TRAIN_STEPS=10", "--gin.MODEL_DIR='/tmp/run'",
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}"])


SIZES = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}"
TASK = "--gin.MIXTURE_OR_TASK_NAME='pydoc_topics_span_corruption'"


@pytest.mark.parametrize("argv", [
    ["--gin_file=runs/quickstart.gin", "--gin.MODEL_DIR='/tmp/r'", "--gin.TRAIN_STEPS=2",
     "--gin.EVAL_STEPS=1", "--gin.rsqrt_decay_schedule.warmup_steps=1"],
    ["--gin_file=models/tokens_choose_tiny.gin", "--gin_file=runs/pretrain.gin",
     "--gin.MODEL_DIR='/tmp/r'", TASK, SIZES, "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
     "--gin.NUM_EXPERT_PARTITIONS=2", "--gin.EMBED_DIM=32", "--gin.NUM_HEADS=2",
     "--gin.train/DatasetConfig.shuffle=False", "--gin.encoder/TokenChoice.jitter_noise=0.0"],
    ["--gin_file=models/switch_tiny.gin", "--gin_file=runs/finetune.gin",
     "--gin.MODEL_DIR='/tmp/ft'", "--gin.INITIAL_CHECKPOINT_PATH='/tmp/r/checkpoints'", TASK,
     SIZES, "--gin.TRAIN_STEPS=2", "--gin.DROPOUT_RATE=0.0", "--gin.train.inference_eval=False"],
    ["--gin_file=models/experts_choose_tiny.gin", "--gin_file=runs/eval.gin",
     "--gin.CHECKPOINT_PATH='/tmp/r/checkpoints'", "--gin.EVAL_OUTPUT_DIR='/tmp/e'", TASK,
     SIZES, "--gin.SPLIT='validation'", "--gin.NUM_EXAMPLES=4"],
    ["--gin_file=models/decoder_only_tiny.gin", "--gin_file=runs/infer.gin",
     "--gin.CHECKPOINT_PATH='/tmp/r/checkpoints'", "--gin.INFER_OUTPUT_DIR='/tmp/i'",
     "--gin.MIXTURE_OR_TASK_NAME='pydoc_topics_prefix_lm'", "--gin.TASK_FEATURE_LENGTHS="
     "{'inputs': 64, 'targets': 8}", "--gin.BATCH_SIZE=4"],
], ids=["quickstart", "pretrain", "finetune", "eval", "infer"])
def test_the_run_gins_documented_bindings_are_accepted(argv):
    _parse(argv)


def test_train_entry_point_exits_2_on_a_misspelled_macro_before_training(tmp_path, capsys):
    from moe import train

    model_dir = tmp_path / "run"
    code = train.main(["--gin_file=runs/quickstart.gin", "--gin.TRAIN_STPES=10",
                       f"--gin.MODEL_DIR='{model_dir}'"])
    err = capsys.readouterr().err
    assert code == 2 and "TRAIN_STPES" in err and "TRAIN_STEPS" in err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not model_dir.exists()
