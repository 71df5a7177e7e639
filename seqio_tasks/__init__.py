"""SeqIO tasks of the project; importing the package registers them.

`import seqio_tasks` registers GLUE and SuperGLUE under the `t5` package's names and the
pretraining tasks (`pydoc_topics_*`, `python_docs_*`, `c4_en_*`), with the vocabulary
`MOE_VOCABULARY` names ('byte' by default, 't5', or a SentencePiece `.model` path).
BIG-bench tasks are registered here only when a BIG-bench folder is configured
(`MOE_BIGBENCH_DIR` or `seqio_tasks.config.data_paths`) and exists; otherwise call
`seqio_tasks.bigbench.register_bigbench_tasks(path)` (no path: the installed `bigbench`
package). `ensure_registered(name)` is what a program calls once its configuration is parsed
and before it looks a task up: it registers the BIG-bench task `name` refers to from the
folder configured then, so that a gin binding of `seqio_tasks.config.data_paths.bigbench_dir`
works although the gin file imported this package before the binding was read.
`aggregate_metrics(name, results)` gives the scores of a mixture as a whole that the evaluator
does not (BIG-bench's aggregate of a task with subtasks).
Registration reads no GLUE/SuperGLUE/pretraining data: their sources open files when a dataset
is built.
"""

import os
from collections.abc import Mapping

from seqio_tasks import bigbench, config, glue, pretraining, super_glue, vocabularies
from seqio_tasks.bigbench import ensure_registered

# MOE_VOCABULARY picks the vocabulary (byte by default): a published T5X or Hugging Face
# checkpoint is fine-tuned with the SentencePiece model it was trained with.
_vocabulary = config.task_vocabulary()
glue.register_glue_tasks(_vocabulary)
super_glue.register_super_glue_tasks(_vocabulary)
pretraining.register_default_pretraining_tasks(_vocabulary)

_bigbench_dir = config.data_paths().bigbench_dir
if _bigbench_dir and os.path.isdir(_bigbench_dir):
    # Lenient here: a malformed task is logged and skipped rather than breaking the import.
    bigbench.register_bigbench_tasks(_bigbench_dir, strict=False)


def aggregate_metrics(name: str, results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """`{metric: value}` of the mixture `name` as a whole from its evaluated tasks'
    `{task: {metric: value}}`: BIG-bench's aggregate for a BIG-bench task with subtasks, `{}`
    for any other name."""
    return bigbench.parent_aggregate(name, results)


__all__ = [
    "aggregate_metrics",
    "bigbench",
    "config",
    "ensure_registered",
    "glue",
    "pretraining",
    "super_glue",
    "vocabularies",
]
