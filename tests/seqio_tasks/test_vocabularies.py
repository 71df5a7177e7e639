"""Vocabularies: byte default, SentencePiece by path, and the T5-convention trainer."""

import pytest
import seqio

from seqio_tasks import pretraining, train_sentencepiece, vocabularies


def test_byte_vocabulary_is_the_default():
    vocab = vocabularies.get_vocabulary("byte")
    assert isinstance(vocab, seqio.ByteVocabulary)
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.vocab_size) == (0, 1, 2, 259)


def test_unknown_name_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="'byte', 't5' or the path"):
        vocabularies.get_vocabulary("bytes")
    with pytest.raises(FileNotFoundError, match="train_sentencepiece"):
        vocabularies.get_vocabulary(str(tmp_path / "missing.model"))


def test_trained_sentencepiece_has_t5_ids_and_extra_ids(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(pretraining.pydoc_topics_documents("train")[:20]))
    prefix = str(tmp_path / "spm")
    train_sentencepiece.main([f"--input={corpus}", f"--model_prefix={prefix}", "--vocab_size=300"])
    vocab = vocabularies.get_vocabulary(prefix + ".model")
    assert isinstance(vocab, seqio.SentencePieceVocabulary)
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.tokenizer.bos_id() == -1
    assert vocab.vocab_size == 300 + vocabularies.DEFAULT_EXTRA_IDS
    text = "The try statement specifies exception handlers"
    assert vocab.decode(vocab.encode(text)) == text


def test_t5_vocabulary_is_the_gcs_model_with_100_extra_ids():
    vocab = vocabularies.get_vocabulary("t5")  # Constructed lazily: no network here.
    assert vocab.sentencepiece_model_file == vocabularies.T5_SENTENCEPIECE_PATH
    assert vocab.extra_ids == 100


def test_moe_vocabulary_registers_every_task_with_that_vocabulary(tmp_path):
    """What fine-tuning a published checkpoint needs: its SentencePiece model for the tasks."""
    import os
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(pretraining.pydoc_topics_documents("train")[:20]))
    prefix = str(tmp_path / "spm")
    train_sentencepiece.main([f"--input={corpus}", f"--model_prefix={prefix}", "--vocab_size=300"])
    probe = ("import seqio, seqio_tasks\n"
             "for name in ('super_glue_boolq_v102', 'glue_cola_v002', "
             "'pydoc_topics_span_corruption'):\n"
             "    vocab = seqio.get_mixture_or_task(name).output_features['inputs'].vocabulary\n"
             "    print(name, type(vocab).__name__, vocab.vocab_size)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "MOE_VOCABULARY": prefix + ".model"}, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all("SentencePieceVocabulary 400" in line for line in lines), out
