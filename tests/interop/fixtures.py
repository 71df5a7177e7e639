"""Checkpoints and logits written by other codebases (T5X/flaxformer, Hugging Face
transformers): `../shared/fixtures` next to the repository root. Tests that need them skip
with a reason when they are absent."""

import pathlib

import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
T5X_TINY = FIXTURES / "t5x" / "tokens_choose_tiny"
HF_SWITCH_TINY = FIXTURES / "hf" / "hf_switch_tiny"
HF_T5_V1_1_TINY = FIXTURES / "hf" / "hf_t5_v1_1_tiny"


def require(path: pathlib.Path) -> pathlib.Path:
    """`path`, or skip the test when the shared fixtures are not on this machine."""
    if not path.exists():
        pytest.skip(f"fixture {path} is absent (the shared fixtures are not on this machine)")
    return path
