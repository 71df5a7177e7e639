"""The entry points print what a user acts on: TensorFlow's start-up lines, the cuInit failure
and Orbax's missing-metadata warning are gone, everything else stays."""

import logging
import os
import subprocess
import sys

import pytest

from moe import quiet_logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("oneDNN custom operations", "Could not find cuda drivers", "cuInit",
         "absl::InitializeLog", "Metadata file does not exist", "cpu_feature_guard",
         "TPU accelerator type", "TPU worker hostnames", "libtpu")


def _user_env():
    """A user's shell: without the variables the test suite sets (quieter logs, 8 devices)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS",
                         "XLA_FLAGS")}
    return env


def _python(code, env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_native_lines_are_filtered_and_the_rest_written_back(capfd):
    with quiet_logs.native_stderr_without(quiet_logs.NATIVE_START_UP_NOISE):
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see...\n")
        os.write(2, b"a line that matters\n")
        os.write(2, b"E0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
        os.write(2, b"E0000 some.cc:1] an error that matters\n")
    err = capfd.readouterr().err
    assert err == "a line that matters\nE0000 some.cc:1] an error that matters\n"


def test_known_python_warnings_are_dropped_and_others_kept(caplog):
    quiet_logs.filter_python_noise()
    quiet_logs.filter_python_noise()  # idempotent: one filter
    absl_logger = logging.getLogger("absl")
    assert sum(isinstance(f, quiet_logs.DropNoise) for f in absl_logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl_logger.warning("Metadata file does not exist: %s", "/tmp/x/_CHECKPOINT_METADATA")
        absl_logger.warning("Checkpoint step 7 is missing")
    assert [r.getMessage() for r in caplog.records] == ["Checkpoint step 7 is missing"]


def test_environment_defaults_do_not_override_the_user(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    quiet_logs.apply_environment_defaults()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    quiet_logs.apply_environment_defaults()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


def test_importing_it_first_silences_tensorflow_start_up():
    code = ("import moe.quiet_logs\n"
            "import tensorflow as tf\n"
            "list(tf.data.Dataset.range(2).map(lambda x: x + 1).as_numpy_iterator())\n"
            "from absl import logging\n"
            "logging.warning('Metadata file does not exist: /tmp/m')\n"
            "logging.warning('a warning that matters')\n")
    result = _python(code, _user_env())
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if any(n in line for n in NOISE)]
    assert "a warning that matters" in result.stderr


@pytest.mark.skipif(not quiet_logs._no_tpu_here(),
                    reason="needs libtpu installed on a machine without a TPU or GPU plugin")
def test_installed_libtpu_without_a_tpu_stays_silent():
    code = "import jax\nprint(jax.devices()[0].platform)\n"
    # Control: with libtpu installed and no TPU, JAX's start-up prints libtpu's errors.
    plain = _python(code, _user_env())
    assert "TPU" in plain.stderr, plain.stderr
    quiet = _python("import moe.quiet_logs\n" + code, _user_env())
    assert quiet.returncode == 0 and quiet.stdout.strip() == "cpu", quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if any(n in line for n in NOISE)]
    # A user's own choice of platforms is left alone.
    chosen = _python("import moe.quiet_logs, os\nprint(os.environ['JAX_PLATFORMS'])\n",
                     {**_user_env(), "JAX_PLATFORMS": "cpu,tpu"})
    assert chosen.stdout.strip() == "cpu,tpu"


@pytest.mark.slow
def test_tiny_quickstart_prints_only_useful_lines(tmp_path):
    # Control: without the module TensorFlow does print its start-up lines here.
    plain = _python("import tensorflow as tf\ntf.config.list_physical_devices()\n", _user_env())
    assert "oneDNN custom operations" in plain.stderr or "cuda drivers" in plain.stderr

    first, second = tmp_path / "first", tmp_path / "second"
    runs = [("--gin.TRAIN_STEPS=2", f"--gin.MODEL_DIR='{first}'"),
            # Initialized from the first run's checkpoint: Orbax restores a step.
            ("--gin.TRAIN_STEPS=1", f"--gin.MODEL_DIR='{second}'",
             f"--gin.train.initial_checkpoint_path='{first / 'checkpoints'}'"),
            # The first run again: resumed at its last step, it trains nothing and exits
            # cleanly (its input pipeline thread, still building the dataset, is stopped).
            ("--gin.TRAIN_STEPS=2", f"--gin.MODEL_DIR='{first}'")]
    outputs = []
    for flags in runs:
        result = subprocess.run(
            [sys.executable, "-m", "moe.train", "--gin_file=runs/quickstart.gin",
             "--gin.EVAL_STEPS=1", "--gin.BATCH_SIZE=4", *flags],
            cwd=ROOT, env=_user_env(), capture_output=True, text=True, timeout=600,
        )
        outputs.append(result.stdout + result.stderr)
        assert result.returncode == 0, outputs[-1]
    output = "\n".join(outputs)
    assert not [line for line in output.splitlines() if any(n in line for n in NOISE)], output
    for useful in ("Total parameters:", "[train] step 1/2", "[train] step 2/2", "[eval] step 2",
                   "Training done at step 2.", f"Initialized from {first / 'checkpoints'}",
                   "[train] step 1/1", "Training done at step 1.",
                   f"Resuming from step 2 in {first}."):
        assert useful in output
