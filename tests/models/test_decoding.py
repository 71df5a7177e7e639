"""Decoding: greedy = argmax of teacher-forced logits, beam 1 = greedy, the KV cache gives the
same logits as a full forward pass, EOS handling, prefix-LM prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.models import decoding
from moe.models.transformer import DecoderOnly, EncoderDecoder
from tests.models.helpers import decoder_model, encdec_batch, encdec_model, init_params, lm_batch


def _shift_right(tokens):
    return jnp.concatenate([jnp.zeros((tokens.shape[0], 1), tokens.dtype), tokens[:, :-1]], 1)


def test_encdec_greedy_is_argmax_of_teacher_forced_logits_and_beam1_is_greedy():
    model = encdec_model(eos_id=1)
    batch = encdec_batch()
    params = init_params(model, batch)
    greedy = model.predict_batch(params, batch)
    logits = jax.jit(model.module.apply)(
        {"params": params}, batch["encoder_input_tokens"], _shift_right(greedy)
    )
    argmax = np.asarray(jnp.argmax(logits, -1))
    greedy = np.asarray(greedy)
    for row, predicted in zip(argmax, greedy):
        eos = np.flatnonzero(predicted == 1)
        end = eos[0] + 1 if eos.size else len(predicted)
        np.testing.assert_array_equal(predicted[:end], row[:end])
        assert (predicted[end:] == 0).all()
    beam1 = model.predict_batch(params, batch, decode_method="beam", beam_size=1)
    np.testing.assert_array_equal(beam1, greedy)
    # The scores beam search reports (alpha 0: the log-likelihood) are those of the sequences
    # it returns, re-scored by a teacher-forced pass (checks the beam and cache bookkeeping).
    for size in (1, 4):
        sequences, scores = model.predict_batch(
            params, batch, decode_method="beam", beam_size=size, alpha=0.0, return_scores=True
        )
        np.testing.assert_allclose(
            scores, _teacher_forced_score(model, params, batch, sequences), rtol=1e-4
        )


def _teacher_forced_score(model, params, batch, sequences):
    """Sum of log p(token) up to and including the first EOS (every token is real)."""
    logits = jax.jit(model.module.apply)(
        {"params": params}, batch["encoder_input_tokens"], _shift_right(sequences)
    )
    token_ll = jnp.take_along_axis(jax.nn.log_softmax(logits), sequences[..., None], -1)[..., 0]
    is_eos = sequences == model.eos_id
    before_first_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0
    return jnp.sum(token_ll * before_first_eos, axis=1)


def test_kv_cache_logits_equal_full_forward():
    model = encdec_model()
    batch = encdec_batch()
    params = init_params(model, batch)
    full = jax.jit(model.module.apply)(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    )
    stepped, _ = _stepped_logits(model, params, batch)
    np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=1e-5)


def _stepped_logits(model, params, batch):
    """Logits [batch, length, vocab] from one cached decoding step per position (compiled),
    feeding the batch's decoder inputs; and how many positions each row prefilled."""

    @jax.jit
    def run(params, batch):
        step_fn, cache, prompt = model._decoding_setup(model.variables(params), batch, 1)
        tokens = batch["decoder_input_tokens"]
        prefilled = prompt.get("cache_prefilled", jnp.zeros((tokens.shape[0],), jnp.int32))

        def body(cache, p):
            token = jax.lax.dynamic_slice_in_dim(tokens, p, 1, axis=1)
            logits, cache = step_fn(cache, token, p < prefilled)
            return cache, logits

        _, logits = jax.lax.scan(body, cache, jnp.arange(tokens.shape[1]))
        return jnp.swapaxes(logits, 0, 1), prefilled

    return run(params, dict(batch))


@pytest.mark.parametrize("prefix", [pytest.param(False, marks=pytest.mark.slow), True])
def test_decoder_only_cache_and_greedy(prefix):
    model = decoder_model()
    prefix_lengths = [3, 5, 2] if prefix else None
    batch = lm_batch(prefix_lengths=prefix_lengths)
    params = init_params(model, batch)
    module_batch = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
    full = jax.jit(model.module.apply)({"params": params}, **module_batch)
    stepped, prefilled = _stepped_logits(model, params, batch)
    # Inside the prompt, steps read the prefilled cache; from the last prompt position on
    # (where the first target token is predicted) they must match the full forward pass.
    check = np.arange(stepped.shape[1])[None] >= np.asarray(prefilled)[:, None] - 1
    np.testing.assert_allclose(
        np.asarray(stepped)[check], np.asarray(full)[check], atol=1e-5, rtol=1e-5
    )

    greedy = model.predict_batch(params, batch)
    beam1 = model.predict_batch(params, batch, decode_method="beam", beam_size=1)
    np.testing.assert_array_equal(beam1, greedy)
    # Greedy = argmax of teacher forcing on prompt + predicted continuation.
    prompt_len = np.asarray(prefix_lengths or [0, 0, 0])
    targets = np.asarray(batch["decoder_target_tokens"]).copy()
    for i, n in enumerate(prompt_len):
        continuation = np.asarray(greedy[i])
        targets[i, n:] = continuation[: targets.shape[1] - n]
    forced = {**batch, "decoder_input_tokens": _shift_right(jnp.asarray(targets))}
    forced.pop("decoder_loss_weights", None)
    # No targets: a generated 0 is a token here, not padding (as in the decoding steps).
    forced.pop("decoder_target_tokens")
    argmax = np.asarray(jnp.argmax(jax.jit(model.module.apply)({"params": params}, **forced), -1))
    for i, n in enumerate(prompt_len):
        predicted = np.asarray(greedy[i])
        eos = np.flatnonzero(predicted == model.eos_id)
        end = eos[0] + 1 if eos.size else targets.shape[1] - n
        np.testing.assert_array_equal(predicted[:end], argmax[i, n : n + end])


@pytest.mark.slow
def test_sampling_with_topk_1_is_greedy_and_sampling_varies():
    model = encdec_model()
    batch = encdec_batch()
    params = init_params(model, batch)
    greedy = model.predict_batch(params, batch)
    top1 = model.predict_batch(
        params, batch, rng=jax.random.key(3), decode_method="sample", temperature=1.0, topk=1
    )
    np.testing.assert_array_equal(top1, greedy)
    samples = {
        tuple(np.asarray(model.predict_batch(
            params, batch, rng=jax.random.key(s), decode_method="sample", temperature=5.0
        )).ravel())
        for s in range(4)
    }
    assert len(samples) > 1


def test_eos_stops_decoding():
    def step_fn(cache, tokens, keep):
        # Always prefers token 1 (EOS) at step 2, token 5 otherwise.
        logits = jnp.where(cache == 2, jnp.eye(8)[1], jnp.eye(8)[5])
        return jnp.tile(logits[None], (tokens.shape[0], 1)), cache + 1

    out = decoding.temperature_sample(step_fn, jnp.zeros((), jnp.int32), 6, batch_size=2)
    np.testing.assert_array_equal(out, [[5, 5, 1, 0, 0, 0]] * 2)


def test_bad_decode_arguments_raise():
    model = encdec_model()
    batch = encdec_batch()
    params = init_params(model, batch)
    with pytest.raises(ValueError, match="Unknown decode_method"):
        model.predict_batch(params, batch, decode_method="nucleus")
    with pytest.raises(ValueError, match="needs an rng"):
        model.predict_batch(params, batch, decode_method="sample")
    packed = {**batch, "encoder_segment_ids": jnp.ones_like(batch["encoder_input_tokens"])}
    with pytest.raises(ValueError, match="packed"):
        model.predict_batch(params, packed)
    assert isinstance(model.module, EncoderDecoder)
    assert isinstance(decoder_model().module, DecoderOnly)
