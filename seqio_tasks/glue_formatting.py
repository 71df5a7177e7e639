"""GLUE/SuperGLUE examples -> text-to-text strings, exactly as the `t5` package formats them.

`"<benchmark> <key>: <text> <key>: <text>"` with keys sorted alphabetically unless a task fixes
the order; targets are label names, `<unk>` for unlabeled (-1) test examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import seqio
import tensorflow as tf

UNKNOWN_LABEL = "<unk>"
NON_TEXT_FEATURES = ("label", "idx")


def _label_name(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
    label = tf.cast(label, tf.int64)
    return tf.cond(
        tf.equal(label, -1),
        lambda: tf.constant(UNKNOWN_LABEL),
        lambda: tf.gather(tf.constant(list(label_names)), label),
    )


def glue_text(
    x: dict[str, tf.Tensor],
    benchmark_name: str,
    label_names: Sequence[str],
    feature_names: Sequence[str] | None = None,
) -> dict[str, tf.Tensor]:
    """One example -> {'inputs', 'targets', 'idx' (or 'idx/<field>' for MultiRC), 'label'}."""
    keys = list(feature_names or sorted(set(x) - set(NON_TEXT_FEATURES)))
    parts = []
    for key in keys:
        parts += [f"{key}:", x[key]]
    joined = tf.strings.join(parts, separator=" ")
    out = {}
    if benchmark_name == "multirc":
        joined = tf.strings.regex_replace(joined, "<br>", " ")
        joined = tf.strings.regex_replace(joined, "<(/)?b>", "")
        for field in ("paragraph", "question", "answer"):
            out[f"idx/{field}"] = x["idx"][field]
    else:
        out["idx"] = x["idx"]
    out["inputs"] = tf.strings.join([benchmark_name, joined], separator=" ")
    out["targets"] = _label_name(x["label"], label_names)
    out["label"] = tf.cast(x["label"], tf.int64)
    return out


def stsb_text(x: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """STS-B: targets are the score rounded to the nearest 0.2, printed with one decimal."""
    joined = tf.strings.join(
        ["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]], separator=" "
    )
    label = tf.cast(x["label"], tf.float32)
    return {
        "inputs": joined,
        "targets": tf.strings.as_string(tf.round(label * 5) / 5, precision=1),
        "idx": x["idx"],
    }


def record_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """ReCoRD: one example per answer (one `<unk>` example when there is none)."""

    def one_per_answer(x):
        num_answers = tf.size(x["answers"])
        copies = tf.maximum(num_answers, 1)
        targets = tf.cond(
            num_answers > 0, lambda: x["answers"], lambda: tf.constant([UNKNOWN_LABEL])
        )
        passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
        passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
        inputs = tf.strings.join(
            [
                "record query:",
                x["query"],
                "entities:",
                tf.strings.reduce_join(x["entities"], separator=", "),
                "passage:",
                passage,
            ],
            separator=" ",
        )

        def repeat(t):
            return tf.broadcast_to(t, tf.concat([[copies], tf.shape(t)], axis=0))

        return tf.data.Dataset.from_tensor_slices(
            {
                "inputs": repeat(inputs),
                "targets": targets,
                "idx/passage": repeat(x["idx"]["passage"]),
                "idx/query": repeat(x["idx"]["query"]),
                "answers": repeat(x["answers"]),
            }
        )

    return dataset.flat_map(one_per_answer)


# Two WSC texts whose span2_index points at the wrong word; the `t5` package special-cases them.
_WSC_SPECIAL_CASES = {
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed "
    'out quite loud. "Good for him," he said. ': "The boy continued to whip the pony , and "
    'eventually the pony threw him over. John laughed out quite loud. "Good for X ," he said.',
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic "
    "pebble in an iron safe . Some day they might want to use it , but really for now, what more "
    "could they wish for?": "When they had eventually calmed down a bit , and had gotten home, "
    "Mr. Farley put the magic pebble in an iron safe . Some day they might want to use X , but "
    "really for now, what more could they wish for?",
}


def _wsc_text_with_placeholder(x: dict[str, tf.Tensor]) -> tf.Tensor:
    """The text with the pronoun (span2, by word index) replaced by ' X '."""
    words = tf.strings.split(x["text"], sep=" ")
    index = tf.cast(x["span2_index"], tf.int32)
    placeholder = tf.strings.join(
        [
            tf.strings.reduce_join(words[:index], separator=" "),
            "X",
            tf.strings.reduce_join(words[index + 1 :], separator=" "),
        ],
        separator=" ",
    )
    for text, fixed in _WSC_SPECIAL_CASES.items():
        placeholder = tf.where(tf.equal(x["text"], text), tf.constant(fixed), placeholder)
    return placeholder


def wsc_simple_text(
    dataset: tf.data.Dataset, correct_referent_only: bool = False
) -> tf.data.Dataset:
    """WSC as 'wsc: text with *pronoun* marked' -> the referent (span1).

    For training, `correct_referent_only` keeps only examples whose span1 is the referent.
    """

    def to_text(x):
        with_placeholder = _wsc_text_with_placeholder(x)
        marked = tf.strings.regex_replace(
            with_placeholder, " X ", tf.strings.join([" *", x["span2_text"], "* "])
        )
        return {
            "inputs": tf.strings.join(["wsc:", marked], separator=" "),
            "targets": x["span1_text"],
            "label": tf.cast(x["label"], tf.int64),
            "idx": x["idx"],
        }

    if correct_referent_only:
        dataset = dataset.filter(lambda x: tf.equal(tf.cast(x["label"], tf.int64), 1))
    return dataset.map(to_text, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset
def dpr_simple_text(x: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """DPR as WSC: the first occurrence of the pronoun is marked, targets the referent."""
    marked = tf.strings.regex_replace(
        x["sentence"],
        tf.strings.join([r" (", x["pronoun"], r")( |\.|,)"]),
        r" *\1*\2",
        replace_global=False,
    )
    return {
        "inputs": tf.strings.join(["wsc:", marked], separator=" "),
        "targets": x["candidates"][tf.cast(x["label"], tf.int32)],
    }


def rank_classification_expand(
    dataset: tf.data.Dataset, label_names: Sequence[str]
) -> tf.data.Dataset:
    """One formatted example -> one example per candidate label, for scoring.

    Each copy keeps `inputs` and `idx`, takes one label name as `targets`, and says with
    `is_correct` whether that candidate is the gold label. Scoring all candidates with the
    model's log-likelihood and taking the argmax is rank classification.
    """
    names = tf.constant(list(label_names))
    num = len(label_names)

    def expand(x):
        return tf.data.Dataset.from_tensor_slices(
            {
                "inputs": tf.repeat(x["inputs"][None], num),
                "targets": names,
                "idx": tf.repeat(tf.cast(x["idx"], tf.int32)[None], num),
                "is_correct": tf.equal(tf.range(num, dtype=tf.int64), x["label"]),
            }
        )

    return dataset.flat_map(expand)
