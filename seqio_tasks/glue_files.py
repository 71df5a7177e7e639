"""Readers for the official GLUE (TSV) and SuperGLUE (JSONL) files, giving TFDS's features.

Each reader yields the same feature dicts as `tfds` `glue/<cfg>` and `super_glue/<cfg>`, so one
set of text preprocessors serves both sources. Layout expected under the configured directory:
the folders of the official zips (`CoLA/train.tsv`, `MNLI/dev_matched.tsv`, `BoolQ/val.jsonl`,
`AX-b/AX-b.jsonl`, ...). Missing labels (test splits) become -1, as in TFDS.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from seqio_tasks import config
from seqio_tasks.errors import DataFileError, MissingDataError

Example = dict[str, Any]

GLUE_SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
SUPER_GLUE_SPLIT_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}


def _require_file(path: str, what: str, local_dir_field: str) -> str:
    if not os.path.exists(path):
        raise MissingDataError(
            f"{what}: expected the official file at {path}. Unzip the official benchmark "
            "archive there, or unset the local directory to read prepared TFDS data instead "
            f"(it was set with seqio_tasks.config.data_paths.{local_dir_field} or "
            f"{config.ENV_VARS[local_dir_field]})."
        )
    return path


def _is_labeled(split: str) -> bool:
    """Train and validation files carry labels; test files (`test`, `test_matched`, ...) don't."""
    return not split.startswith("test")


def _label_index(value: Any, label_names: Sequence[str] | None, where: str) -> int:
    """Maps an official label (name, index or bool) to TFDS's int; absent/empty -> -1.

    Anything else is a `DataFileError` naming `where` (file:line), the value and the known
    labels: a label that silently became -1 would be scored as `<unk>`.
    """
    if value is None or value == "":
        return -1
    if isinstance(value, bool):
        return int(value)
    if label_names is not None and value in label_names:
        return list(label_names).index(value)
    is_integer = isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
    index = int(value) if is_integer else -1
    if index < 0 or (label_names is not None and index >= len(label_names)):
        known = "an integer"
        if label_names is not None:
            known = f"one of {list(label_names)} or their index 0..{len(label_names) - 1}"
        raise DataFileError(f"{where}: unknown label {value!r}; a label here is {known}.")
    return index


# GLUE: task -> (folder, {feature: tsv column}, label column).
GLUE_COLUMNS: dict[str, tuple[str, dict[str, str], str]] = {
    "sst2": ("SST-2", {"sentence": "sentence"}, "label"),
    "mrpc": ("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
    "qqp": ("QQP", {"question1": "question1", "question2": "question2"}, "is_duplicate"),
    "stsb": ("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2"}, "score"),
    "mnli": ("MNLI", {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label"),
    "qnli": ("QNLI", {"question": "question", "sentence": "sentence"}, "label"),
    "rte": ("RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
    "wnli": ("WNLI", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
    "ax": ("diagnostic", {"premise": "sentence1", "hypothesis": "sentence2"}, "label"),
}
MNLI_SPLIT_FILES = {
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}
# CoLA's train and dev files have no header: source, label, original judgement, sentence.
COLA_COLUMNS = 4


def _glue_file(glue_dir: str, task: str, split: str) -> str:
    if task == "cola":
        folder, name = "CoLA", GLUE_SPLIT_FILES[split]
    elif task == "ax":
        folder, name = "diagnostic", "diagnostic.tsv"
    elif task.startswith("mnli"):
        folder = "MNLI"
        if task in ("mnli_matched", "mnli_mismatched"):
            split = f"{split}_{task.split('_')[1]}"
        name = MNLI_SPLIT_FILES.get(split) or GLUE_SPLIT_FILES[split]
    else:
        folder, name = GLUE_COLUMNS[task][0], GLUE_SPLIT_FILES[split]
    path = os.path.join(glue_dir, folder, name)
    return _require_file(path, f"GLUE {task} {split}", "glue_dir")


def _tsv_rows(path: str, header: bool) -> Iterator[tuple[int, Any]]:
    """(line number, row) of a TSV file: dicts by column with `header` (then the first item is
    `(1, the column names)`), else lists.

    `utf-8-sig` drops a leading byte-order mark (the GLUE download script keeps MRPC's), which
    would otherwise become part of the first column's name.
    """
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = (csv.DictReader if header else csv.reader)(
            f, delimiter="\t", quoting=csv.QUOTE_NONE
        )
        if header:
            yield 1, reader.fieldnames or []
        for row in reader:
            yield reader.line_num, row


def _require_columns(path: str, header: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataFileError(
            f"{path}:1: the header has no column {missing[0]!r} (columns: {list(header)}); "
            "expected the official GLUE file."
        )


def _read_cola(path: str, split: str) -> Iterator[Example]:
    if not _is_labeled(split):  # header: index, sentence
        rows = _tsv_rows(path, header=True)
        _require_columns(path, next(rows)[1], ["sentence"])
        for i, (_, row) in enumerate(rows):
            yield {"sentence": row["sentence"], "label": -1, "idx": i}
        return
    for i, (line, row) in enumerate(_tsv_rows(path, header=False)):
        if len(row) != COLA_COLUMNS:
            raise DataFileError(
                f"{path}:{line}: expected {COLA_COLUMNS} tab-separated columns (source, label, "
                f"original judgement, sentence), got {len(row)}."
            )
        yield {"sentence": row[3], "label": _label_index(row[1], ("0", "1"), f"{path}:{line}"),
               "idx": i}  # fmt: skip


def read_glue(
    glue_dir: str, task: str, split: str, label_names: Sequence[str] | None
) -> Iterator[Example]:
    """Yields TFDS-style examples of GLUE task `task` from the official TSV files.

    As TFDS does, a row with a missing value (fewer fields than the header, or an empty label
    in a labeled split) is skipped, with one warning per file; `idx` still counts it.
    """
    path = _glue_file(glue_dir, task, split)
    if task == "cola":
        yield from _read_cola(path, split)
        return
    _, columns, label_column = GLUE_COLUMNS["mnli" if task.startswith("mnli") else task]
    labeled = _is_labeled(split)
    rows = _tsv_rows(path, header=True)
    required = [*columns.values(), label_column] if labeled else list(columns.values())
    _require_columns(path, next(rows)[1], required)
    skipped: list[int] = []
    for i, (line, row) in enumerate(rows):
        example: Example = {feature: row[column] for feature, column in columns.items()}
        raw_label = row.get(label_column) if labeled else None
        if None in example.values() or (labeled and raw_label in (None, "")):
            skipped.append(line)
            continue
        example["label"] = _glue_label(raw_label, task, label_names, f"{path}:{line}")
        example["idx"] = i
        yield example
    if skipped:
        logging.warning("%s: skipped %d rows with a missing value (first at line %d), as TFDS "
                        "does.", path, len(skipped), skipped[0])  # fmt: skip


def _glue_label(raw_label: str | None, task: str, label_names, where: str) -> float | int:
    if task != "stsb":
        return _label_index(raw_label, label_names, where)
    if raw_label is None:
        return -1.0
    try:
        return float(raw_label)
    except ValueError:
        raise DataFileError(f"{where}: the STS-B score {raw_label!r} is not a number.") from None


SUPER_GLUE_FOLDERS = {
    "boolq": "BoolQ",
    "cb": "CB",
    "copa": "COPA",
    "multirc": "MultiRC",
    "record": "ReCoRD",
    "rte": "RTE",
    "wic": "WiC",
    "wsc.fixed": "WSC",
    "axb": "AX-b",
    "axg": "AX-g",
}
# Plain tasks: task -> fields copied as they are (besides label and idx).
SUPER_GLUE_FIELDS = {
    "boolq": ("question", "passage"),
    "cb": ("premise", "hypothesis"),
    "copa": ("premise", "choice1", "choice2", "question"),
    "rte": ("premise", "hypothesis"),
    "wic": ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2"),
    "axb": ("sentence1", "sentence2"),
    "axg": ("premise", "hypothesis"),
}


WSC_SPAN_FIELDS = ("span1_index", "span2_index", "span1_text", "span2_text")
# The fields a row must have, as a reader is told when one is missing.
SUPER_GLUE_ROW_FIELDS = {
    **{task: ", ".join([*fields, "idx", "label (train and validation)"])
       for task, fields in SUPER_GLUE_FIELDS.items()},
    "multirc": "idx, passage.text, passage.questions[].{question, idx, answers[].{text, idx, "
               "label (train and validation)}}",
    "record": "idx, passage.text, passage.entities[].{start, end}, qas[].{query, idx}",
    "wsc.fixed": "idx, text, target.{span1_index, span2_index, span1_text, span2_text}, "
                 "label (train and validation)",
}  # fmt: skip


def _read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSON-lines file; a line that is not a JSON object is an error."""
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{line_number}: not valid JSON ({e}).") from e
            if not isinstance(row, dict):
                raise DataFileError(
                    f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}."
                )
            yield line_number, row


def _super_glue_file(super_glue_dir: str, task: str, split: str) -> str:
    folder = SUPER_GLUE_FOLDERS[task]
    name = f"{folder}.jsonl" if task in ("axb", "axg") else SUPER_GLUE_SPLIT_FILES[split]
    path = os.path.join(super_glue_dir, folder, name)
    return _require_file(path, f"SuperGLUE {task} {split}", "super_glue_dir")


def _fix_wsc_span(example: Example, key: str) -> None:
    """TFDS's `wsc.fixed` repair: make a span's text a substring of the text when possible."""
    text = example[f"{key}_text"]
    if text in example["text"] or text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
        return
    if "theyscold" in text:
        example["span2_index"] = 10
    first_word = example["text"].split()[example[f"{key}_index"]]
    text = (text[0].lower() if first_word[0].islower() else text[0].upper()) + text[1:]
    example[f"{key}_text"] = text.rstrip(".").replace("\n", " ")


def read_super_glue(
    super_glue_dir: str, task: str, split: str, label_names: Sequence[str] | None
) -> Iterator[Example]:
    """Yields TFDS-style examples of SuperGLUE task `task` from the official JSONL files.

    A row missing a field the task needs is a `DataFileError` naming the file, the line and the
    field (a label is needed in train and validation files, as TFDS needs it).
    """
    path = _super_glue_file(super_glue_dir, task, split)
    for line_number, row in _read_jsonl(path):
        where = f"{path}:{line_number}"
        try:
            examples = list(_super_glue_examples(row, task, _is_labeled(split), label_names, where))
        except KeyError as e:
            raise DataFileError(
                f"{where}: the row has no field {e.args[0]!r}; SuperGLUE {task} rows need "
                f"{SUPER_GLUE_ROW_FIELDS[task]}."
            ) from None
        yield from examples


def _label(container: dict[str, Any], labeled: bool, label_names, where: str) -> int:
    """The label of a row (or MultiRC answer): required in labeled splits, -1 in test files."""
    value = container["label"] if labeled else container.get("label")
    return _label_index(value, label_names, where)


def _super_glue_examples(row, task, labeled, label_names, where) -> Iterator[Example]:
    """The TFDS-style examples of one JSONL row (MultiRC and ReCoRD rows hold several)."""
    if task == "multirc":
        passage = row["passage"]
        for question in passage["questions"]:
            for answer in question["answers"]:
                yield {
                    "paragraph": passage["text"],
                    "question": question["question"],
                    "answer": answer["text"],
                    "label": _label(answer, labeled, None, where),
                    "idx": {
                        "paragraph": row["idx"],
                        "question": question["idx"],
                        "answer": answer["idx"],
                    },
                }
    elif task == "record":
        text = row["passage"]["text"]
        entities = sorted({text[e["start"] : e["end"] + 1] for e in row["passage"]["entities"]})
        for qa in row["qas"]:
            yield {
                "passage": text,
                "query": qa["query"],
                "entities": entities,
                "answers": sorted({a["text"] for a in qa.get("answers", [])}),
                "idx": {"passage": row["idx"], "query": qa["idx"]},
            }
    elif task == "wsc.fixed":
        example = {"text": row["text"], **{key: row["target"][key] for key in WSC_SPAN_FIELDS}}
        _fix_wsc_span(example, "span1")
        _fix_wsc_span(example, "span2")
        example["label"] = _label(row, labeled, None, where)
        example["idx"] = row["idx"]
        yield example
    else:
        example = {field: row[field] for field in SUPER_GLUE_FIELDS[task]}
        example["label"] = _label(row, labeled, label_names, where)
        example["idx"] = row["idx"]
        yield example


DPR_FOLDER = "DPR"
DPR_SPLIT_FILES = {"train": "train.c.txt", "test": "test.c.txt"}


def read_dpr(directory: str, split: str) -> Iterator[Example]:
    """Definite Pronoun Resolution (Rahman & Ng 2012) from its original `<split>.c.txt`.

    Records of four lines (sentence, pronoun, comma-separated candidates, answer) and a blank
    line, read as TFDS `definite_pronoun_resolution` reads them. Kept under the SuperGLUE
    directory (`DPR/`) since its only use here is `super_glue_v102_proportional`.
    """
    path = os.path.join(directory, DPR_FOLDER, DPR_SPLIT_FILES[split])
    _require_file(path, f"DPR {split}", "super_glue_dir")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    for record, start in enumerate(range(0, len(lines), 5)):
        sentence, pronoun, candidates, correct = [*lines[start : start + 4], "", "", "", ""][:4]
        if not sentence:
            break
        names = [c.strip() for c in candidates.split(",")]
        if correct not in names or len(names) != 2:
            raise DataFileError(
                f"{path}: record {record} (line {start + 1}): answer {correct!r} is not one of "
                f"the two candidates {names}."
            )
        yield {"sentence": sentence, "pronoun": pronoun, "candidates": names,
               "label": names.index(correct)}  # fmt: skip
