"""seqio data for the trainer: determinism, resumption at a batch count, sharding, errors."""

import numpy as np
import pytest

from moe import data
from tests.trainer import toy


def _cfg(**kw):
    kw = {"batch_size": 4, **kw}
    return data.DatasetConfig(toy.TOY_TASK, {"targets": 16}, module=None, **kw)


def _iterator(cfg, consumed=0, shard=(0, 1)):
    conv = toy.ToyModel.feature_converter_cls(pack=cfg.pack)
    return data.ResumableIterator(lambda: data.get_dataset(cfg, conv, *shard), consumed)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_order():
    a, b = _take(_iterator(_cfg()), 5), _take(_iterator(_cfg()), 5)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = _take(_iterator(_cfg(seed=7)), 5)
    assert any(not np.array_equal(x["decoder_target_tokens"], y["decoder_target_tokens"])
               for x, y in zip(a, c))


def test_close_stops_the_pipeline_thread_with_or_without_batches_consumed():
    # A run resumed at its last step closes the iterator before taking any batch; one that
    # trained leaves the thread blocked on a full queue. Either way close() ends the thread.
    for taken in (0, 3):
        it = _iterator(_cfg())
        _take(it, taken)
        it.close()
        assert not it._thread.is_alive()
        assert it.get_state() == {"batches_consumed": taken}


def test_resume_continues_on_the_same_examples():
    # 64 examples / batch 4 = 16 batches per epoch: resuming across the epoch boundary too.
    full = _take(_iterator(_cfg()), 24)
    it = _iterator(_cfg())
    _take(it, 13)
    assert it.get_state() == {"batches_consumed": 13}
    resumed = _take(_iterator(_cfg(), consumed=it.get_state()["batches_consumed"]), 11)
    for x, y in zip(full[13:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_shards_are_disjoint_halves():
    cfg = _cfg(shuffle=False, num_epochs=1)
    seen = []
    for shard in ((0, 2), (1, 2)):
        batches = list(_iterator(cfg, shard=shard))
        assert all(b["decoder_target_tokens"].shape[0] == 2 for b in batches)
        seen.append({tuple(row) for b in batches for row in b["decoder_target_tokens"]})
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) == 64


def test_eval_batches_are_padded_not_dropped():
    cfg = _cfg(split="validation", shuffle=False, num_epochs=1, batch_size=5)
    conv = toy.ToyModel.feature_converter_cls(pack=False)
    batches = list(data.get_dataset(cfg, conv, drop_remainder=False).as_numpy_iterator())
    assert len(batches) == 3  # 12 examples -> 5 + 5 + 2 real (+ 3 zero rows)
    last = batches[-1]
    assert last["decoder_target_tokens"].shape == (5, 16)
    assert last["decoder_loss_weights"][2:].sum() == 0
    assert last["decoder_loss_weights"][:2].sum() > 0


def test_unknown_task_names_close_matches():
    with pytest.raises(data.UnknownTaskError, match="toy_trainer_lm"):
        data.get_task(data.DatasetConfig("toy_trainer_lmm", {"targets": 8}, module=None))
