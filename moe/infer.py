"""Inference: predictions (and scores) for a seqio task, written as JSON lines.

    python -m moe.infer --gin_file=models/<model>.gin --gin_file=runs/infer.gin \
        --gin.CHECKPOINT_PATH="'/tmp/run/checkpoints'" --gin.INFER_OUTPUT_DIR="'/tmp/infer'" \
        --gin.MIXTURE_OR_TASK_NAME="'super_glue_boolq_v102'" --gin.TASK_FEATURE_LENGTHS=...

The helpers `predict_fn` and `score_fn` have the signatures `seqio.Evaluator` expects
(an enumerated dataset of model features in, `[(index, tokens)]` / `[(index, score)]` out), so
evaluation and inference run the model the same way.
"""

import sys

if __name__ == "__main__":
    from moe.infer import main  # gin registers the importable module's configurables once

    sys.exit(main())

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from moe import checkpoints, data
from moe.entry_point import run_entry_point
from moe.partitioning import Partitioner
from moe.trainer import Trainer


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    return np.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _batches(dataset: tf.data.Dataset, batch_size: int):
    """(indices, padded feature batch, number of real rows) from an enumerated dataset."""
    for indices, features in dataset.padded_batch(batch_size).as_numpy_iterator():
        n = len(indices)
        padded = {k: _pad_rows(v, batch_size) for k, v in features.items()}
        yield indices, padded, n


def make_predict_fn(model: Any, params: Any, partitioner: Partitioner, batch_size: int,
                    **predict_kwargs) -> Callable[[tf.data.Dataset], list]:
    """A seqio `predict_fn`: greedy (or configured) decoding with `model.predict_batch`."""

    def predict_fn(dataset):
        out = []
        for indices, batch, n in _batches(dataset, batch_size):
            with partitioner.context():
                tokens = model.predict_batch(params, batch, **predict_kwargs)
            tokens = np.asarray(jax.device_get(tokens))[:n]
            out += [(int(i), t.tolist()) for i, t in zip(indices, tokens)]
        return out

    return predict_fn


def make_score_fn(model: Any, params: Any, partitioner: Partitioner, batch_size: int
                  ) -> Callable[[tf.data.Dataset], list]:
    """A seqio `score_fn`: sum of target log-likelihoods with `model.score_batch`."""

    def score_fn(dataset):
        out = []
        for indices, batch, n in _batches(dataset, batch_size):
            with partitioner.context():
                scores = model.score_batch(params, batch)
            scores = np.asarray(jax.device_get(scores))[:n]
            out += [(int(i), float(s)) for i, s in zip(indices, scores)]
        return out

    return score_fn


def load_params(model: Any, checkpoint_path: str, cfg: data.DatasetConfig,
                partitioner: Partitioner, step: int | None = None) -> Any:
    """The parameters of the checkpoint at `checkpoint_path`, in this mesh's shardings."""
    converter = model.feature_converter_cls(pack=False)
    lengths = converter.get_model_feature_lengths(dict(cfg.task_feature_lengths))
    shapes = {name: (cfg.batch_size, length) for name, length in lengths.items()}
    trainer = Trainer(model=model, partitioner=partitioner, input_shapes=shapes)
    params, _ = checkpoints.restore_params_from(
        checkpoint_path, trainer.abstract_state["params"], step=step,
        model_config=getattr(model.module, "config", None),
    )
    return params


@gin.configurable
def infer(
    model: Any = gin.REQUIRED,
    checkpoint_path: str = gin.REQUIRED,
    dataset_cfg: data.DatasetConfig = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    num_expert_partitions: int = 1,
    num_model_partitions: int = 1,
    checkpoint_step: int | None = None,
    num_examples: int | None = None,
    decode_method: str = "greedy",
) -> str:
    """Write `output_dir/<task>-<split>.jsonl`: one line per example with its inputs, target and
    prediction (decoded with the task's vocabulary). Returns the path."""
    checkpoints.directory_is_writable(output_dir)
    task = data.get_task(dataset_cfg)
    partitioner = Partitioner(num_expert_partitions, num_model_partitions)
    params = load_params(model, checkpoint_path, dataset_cfg, partitioner, checkpoint_step)
    evaluator = seqio.Evaluator(
        dataset_cfg.mixture_or_task_name,
        feature_converter=model.feature_converter_cls(pack=False),
        eval_split=dataset_cfg.split,
        use_cached=dataset_cfg.use_cached,
        sequence_length=dict(dataset_cfg.task_feature_lengths),
        num_examples=num_examples,
    )
    predict = make_predict_fn(model, params, partitioner, dataset_cfg.batch_size,
                              decode_method=decode_method)
    path = os.path.join(output_dir, f"{task.name}-{dataset_cfg.split}.jsonl")
    with open(path, "w") as f:
        for sub_task in evaluator.eval_tasks:
            vocab = sub_task.output_features["targets"].vocabulary
            ds = evaluator.cached_model_datasets[sub_task.name]
            examples = list(evaluator.cached_task_datasets[sub_task.name].as_numpy_iterator())
            for index, tokens in sorted(predict(ds)):
                example = examples[index]
                record = {"task": sub_task.name, "index": index,
                          "prediction": vocab.decode(_until_eos(tokens, vocab))}
                for feature in ("inputs", "targets"):
                    if feature in example:
                        record[feature] = vocab.decode(
                            [int(t) for t in example[feature] if t != 0])
                f.write(json.dumps(record) + "\n")
    print(f"Wrote predictions to {path}", flush=True)
    return path


def _until_eos(tokens: Sequence[int], vocab: seqio.Vocabulary) -> list[int]:
    out = []
    for t in tokens:
        if t == vocab.eos_id:
            break
        out.append(int(t))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry_point("Write a model's predictions for a seqio task as JSONL.", infer, argv)[0]
