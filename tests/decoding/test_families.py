"""The decode loop with the Medusa and EAGLE-3 drafters: greedy output is the target's own, sampled output is
distributed as the target's (the Gemma 4 drafter's are ``test_engine.py`` and ``test_lossless.py``)."""

import numpy as np
import pytest
from flax import nnx

from mtp.decoding.generate import generate
from mtp.decoding.sampling import Sampling
from mtp.gemma4.config import FULL, SLIDING, Gemma4Config
from mtp.gemma4.model import Gemma4
from tests.decoding.test_lossless import FIT, NEW, PROMPT, SAMPLES, VOCAB, counts_of, exact_probs, fit_p_value
from tests.drafter.families import NEW_FAMILIES, make_drafter, tiny_target

MAX_NEW = 16


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_greedy_speculative_equals_plain_at_batch_1_and_4(target, family):
    drafter = make_drafter(family, target)
    rng = np.random.default_rng(3)
    for lengths in ([9], [11, 4, 17, 1]):
        prompts = [rng.integers(3, target.config.vocab_size, n).tolist() for n in lengths]
        plain, _ = generate(target, None, prompts, max_new_tokens=MAX_NEW, stop_tokens=())
        spec, _ = generate(target, drafter, prompts, draft_len=3, max_new_tokens=MAX_NEW, stop_tokens=())
        for a, b in zip(plain, spec, strict=True):
            assert a.token_ids == b.token_ids, (family, len(prompts))
            assert sum(b.produced_per_round) == MAX_NEW - 1
    # Prefilled 4 tokens at a time (5 chunks for the longest prompt, fewer for the others): each row's anchor (its
    # last prompt position's hidden state and fused layers) comes from the chunk that holds it, so every draft is
    # the same as after the one-pass prefill.
    chunked, _ = generate(
        target, drafter, prompts, draft_len=3, max_new_tokens=MAX_NEW, stop_tokens=(), prefill_chunk=4
    )
    assert [o.drafted_per_round for o in chunked] == [o.drafted_per_round for o in spec], family
    assert [o.token_ids for o in chunked] == [o.token_ids for o in spec], family


@pytest.fixture(scope="module")
def small_vocab_target():
    """test_lossless's target: 4 tokens, so each 3-token continuation's exact probability is enumerable."""
    config = Gemma4Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        global_head_dim=8,
        layer_types=(SLIDING, FULL),
        sliding_window=4,
        final_logit_softcapping=None,
    )
    target = Gemma4(config, rngs=nnx.Rngs(3))
    target.embed[...] = target.embed[...] * 0.3
    return target


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_speculative_sampling_matches_the_target(small_vocab_target, family):
    target = small_vocab_target
    sampling = Sampling(temperature=1.0)
    drafter = make_drafter(family, target, max_draft_len=2, seed=5)
    outputs, result = generate(
        target, drafter, [PROMPT] * SAMPLES, draft_len=2, max_new_tokens=NEW, sampling=sampling, stop_tokens=(), seed=11
    )
    assert fit_p_value(counts_of(outputs), exact_probs(target, sampling)) > FIT
    accepted = np.asarray(result.accepted)[np.asarray(result.active)]
    assert 0 < np.mean(accepted) < 2, "both paths run: some drafts accepted, some rejected"
