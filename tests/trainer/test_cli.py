"""The command lines `python -m moe.train / moe.eval / moe.infer`: clear errors before any
training, exact resumption after SIGKILL, clean stop on SIGTERM, and the end-to-end path
pretrain -> fine-tune -> seqio.Evaluator metrics -> JSONL predictions."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe import train
from moe.metrics_writer import read_jsonl_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "seqio_tasks", "fixtures")
TOY = ["--gin_file=tests/trainer/toy_model.gin", "--gin_file=runs/pretrain.gin",
       "--gin.MIXTURE_OR_TASK_NAME='toy_trainer_lm'", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}",
       "--gin.BATCH_SIZE=8", "--gin.rsqrt_decay_schedule.warmup_steps=4"]


pytestmark = pytest.mark.usefixtures("clean_gin")


def _main(args, capsys):
    code = train.main(args)
    return code, capsys.readouterr().err


def test_unwritable_model_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _main([*TOY, f"--gin.MODEL_DIR='{blocker}/run'", "--gin.TRAIN_STEPS=1"], capsys)
    assert code == 2 and "not writable" in err and "MODEL_DIR" in err


def test_unknown_task_fails_before_training(tmp_path, capsys):
    code, err = _main([*TOY, f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=1",
                       "--gin.MIXTURE_OR_TASK_NAME='toy_trainer_l'"], capsys)
    assert code == 2 and "toy_trainer_l" in err and "Close names: ['toy_trainer_lm']" in err
    assert not os.path.exists(tmp_path / "checkpoints")


def test_malformed_gin_and_unknown_gin_file(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("train.model = @NoSuchModel()\n")
    code, err = _main([f"--gin_file={bad}"], capsys)
    assert code == 2 and "bad.gin" in err and "NoSuchModel" in err
    code, err = _main(["--gin_file=runs/no_such_run.gin"], capsys)
    assert code == 2 and "runs/no_such_run.gin" in err and "runs/pretrain.gin" in err


def _run(module, args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, **kw)


def _losses(model_dir):
    out = {}
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            out[record["step"]] = record["loss"]  # a rerun step overwrites the killed run's
    return out


def _wait_for_step(model_dir, step, proc, timeout=300):
    path = os.path.join(model_dir, "train", "metrics.jsonl")
    start = time.time()
    while time.time() - start < timeout:
        # The run is appending to the log: its last line may be half written, so this reads
        # it as the trainer does on a restart (a line that is not JSON yet is passed over).
        records = read_jsonl_records(path)[0] if os.path.exists(path) else []
        if max((record["step"] for record in records), default=0) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def train_straight_and_killed(tmp_path, args, kill_after):
    """Train `args` once straight through (in tmp_path/a) and once killed with SIGKILL after
    step `kill_after`, then restarted (in tmp_path/b). Returns (a, b, the restarted run's
    output, the last checkpoint step before the restart)."""
    straight_dir, killed_dir = tmp_path / "a", tmp_path / "b"
    straight = _run("moe.train", [*args, f"--gin.MODEL_DIR='{straight_dir}'"])
    assert straight.wait() == 0, straight.stdout.read()
    proc = _run("moe.train", [*args, f"--gin.MODEL_DIR='{killed_dir}'"])
    _wait_for_step(killed_dir, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(s) for s in os.listdir(killed_dir / "checkpoints") if s.isdigit())
    assert steps
    resumed = _run("moe.train", [*args, f"--gin.MODEL_DIR='{killed_dir}'"])
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert f"Resuming from step {steps[-1]}" in output
    return straight_dir, killed_dir, output, steps[-1]


@pytest.mark.slow
def test_sigkill_then_restart_gives_the_uninterrupted_losses(tmp_path):
    common = [*TOY, "--gin.TRAIN_STEPS=40", "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=10",
              "--gin.EVAL_PERIOD=1000"]
    straight_dir, killed_dir, _, last_checkpoint = train_straight_and_killed(tmp_path, common, 25)
    assert last_checkpoint < 40
    a, b = _losses(straight_dir), _losses(killed_dir)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    # The rows the killed run logged past its checkpoint were dropped on resume.
    with open(killed_dir / "train" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 41))
    for step in range(1, 41):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _run("moe.train", [*TOY, "--gin.TRAIN_STEPS=100000", "--gin.LOG_PERIOD=1",
                              "--gin.CHECKPOINT_PERIOD=100000", f"--gin.MODEL_DIR='{tmp_path}'"])
    _wait_for_step(tmp_path, 5, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "Preempted at step" in output
    steps = [s for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and int(steps[0]) >= 5
    resumed = _run("moe.train", [*TOY, f"--gin.TRAIN_STEPS={int(steps[0]) + 2}",
                                 f"--gin.MODEL_DIR='{tmp_path}'"])
    output = resumed.communicate()[0]
    assert resumed.returncode == 0 and f"Resuming from step {steps[0]}" in output, output


@pytest.mark.slow
def test_pretrain_finetune_evaluate_infer_from_the_command_line(tmp_path):
    model = "--gin_file=models/experts_choose_tiny.gin"
    lengths = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}"
    env = {"MOE_SUPER_GLUE_DIR": os.path.join(FIXTURES, "super_glue")}
    pre = _run("moe.train", [model, "--gin_file=runs/pretrain.gin",
                             f"--gin.MODEL_DIR='{tmp_path / 'pre'}'",
                             "--gin.MIXTURE_OR_TASK_NAME='pydoc_topics_span_corruption'",
                             "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                             "--gin.TRAIN_STEPS=20", "--gin.BATCH_SIZE=8",
                             "--gin.EVAL_PERIOD=20", "--gin.EVAL_STEPS=2"], env)
    output = pre.communicate()[0]
    assert pre.returncode == 0, output
    assert os.path.exists(tmp_path / "pre" / "training.png")

    boolq = "--gin.MIXTURE_OR_TASK_NAME='super_glue_boolq_v102'"
    ft = _run("moe.train", [model, "--gin_file=runs/finetune.gin",
                            f"--gin.MODEL_DIR='{tmp_path / 'ft'}'",
                            f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'pre' / 'checkpoints'}'",
                            boolq, lengths, "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8",
                            "--gin.EVAL_PERIOD=4", "--gin.EVAL_STEPS=1"], env)
    output = ft.communicate()[0]
    assert ft.returncode == 0, output
    assert "Initialized from" in output and "parameters restored, fresh: []" in output
    eval_log = tmp_path / "ft" / "training_eval" / "super_glue_boolq_v102" / "metrics.jsonl"
    last = json.loads(eval_log.read_text().splitlines()[-1])
    assert 0.0 <= last["inference_eval/super_glue_boolq_v102/accuracy"] <= 100.0

    ev = _run("moe.eval", [model, "--gin_file=runs/eval.gin", boolq, lengths,
                           f"--gin.CHECKPOINT_PATH='{tmp_path / 'ft' / 'checkpoints'}'",
                           f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'", "--gin.BATCH_SIZE=8"],
              env)
    output = ev.communicate()[0]
    assert ev.returncode == 0, output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["super_glue_boolq_v102/accuracy"] <= 100.0

    inf = _run("moe.infer", [model, "--gin_file=runs/infer.gin", boolq, lengths,
                             f"--gin.CHECKPOINT_PATH='{tmp_path / 'ft' / 'checkpoints'}'",
                             f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'",
                             "--gin.BATCH_SIZE=8"], env)
    output = inf.communicate()[0]
    assert inf.returncode == 0, output
    lines = (tmp_path / "infer" / "super_glue_boolq_v102-validation.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert record["inputs"].startswith("boolq") and "prediction" in record
    assert record["targets"] in ("True", "False")
