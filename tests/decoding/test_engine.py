"""The decode engine: speculative output is the target's, for every kind, batch shape and acceptance path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.decoding import engine
from mtp.decoding.engine import round_counts, stop_token_array
from mtp.decoding.generate import GREEDY, DecodeInputError, Decoder, generate, summarize
from mtp.gemma4.config import FULL, SLIDING, Gemma4Config
from mtp.gemma4.model import Gemma4
from tests import hf_oracle
from tests.decoding.drafters import copy_drafter, random_drafter

MAX_NEW = 24


@pytest.fixture(scope="module", params=hf_oracle.TARGET_KINDS)
def target_pair(request, oracle_target):
    hf_model, _, target = oracle_target(request.param)
    return request.param, hf_model, target


def prompts_of(batch: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = [11, 4, 17, 1][:batch] if batch > 1 else [9]
    return [rng.integers(3, hf_oracle.VOCAB, n).tolist() for n in lengths]


def test_plain_decoding_equals_transformers_greedy(target_pair):
    kind, hf_model, target = target_pair
    prompts = prompts_of(4)
    outputs, _ = generate(target, None, prompts, max_new_tokens=MAX_NEW, stop_tokens=())
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = hf_oracle.reference_greedy(hf_model, np.array([prompt]), MAX_NEW).reshape(-1).tolist()
        assert output.token_ids == expected, kind
        assert output.target_forwards == MAX_NEW - 1  # tau = 1 for plain decoding
    assert summarize(outputs, 0, 1.0)["acceptance_length"] == 1.0


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("make_drafter", [random_drafter, copy_drafter], ids=["random", "copy"])
def test_greedy_speculative_equals_greedy_autoregressive(target_pair, batch, make_drafter):
    kind, hf_model, target = target_pair
    prompts = prompts_of(batch, seed=batch)
    if batch > 1:
        plain = [o.token_ids for o in generate(target, None, prompts, max_new_tokens=MAX_NEW, stop_tokens=())[0]]
    else:  # transformers' greedy tokens (as in test_plain_decoding_...): one plain loop fewer to compile
        plain = hf_oracle.reference_greedy(hf_model, np.array(prompts), MAX_NEW).tolist()
    drafter = make_drafter(target)
    # The copying drafter (accepted drafts) on the ragged batch: draft length 4 for every kind, and 1 and 2 too on
    # the dense one (the loop's draft-length logic is the same for every kind; each length is a compilation),
    # prefilled in chunks of 8 tokens (the sliding window), so the chunked prefill meets every kind's layers.
    # Draft length 3 everywhere else, prefilled in one pass.
    sweep = (1, 2, 4) if kind == "dense" else (4,)
    chunked = make_drafter is copy_drafter and batch > 1
    for draft_len in sweep if chunked else (3,):
        spec, _ = generate(
            target,
            drafter,
            prompts,
            draft_len=draft_len,
            max_new_tokens=MAX_NEW,
            stop_tokens=(),
            prefill_chunk=hf_oracle.SLIDING_WINDOW if chunked else None,
        )
        for a, b in zip(plain, spec, strict=True):
            assert a == b.token_ids, (kind, draft_len)
            assert sum(b.produced_per_round) == MAX_NEW - 1
        accepted = [n for o in spec for n in o.accepted_per_round]
        if make_drafter is copy_drafter and draft_len in (3, 4):
            assert max(accepted) >= 1, "the copying drafter should get drafts accepted"
            assert min(accepted) < draft_len, "and some rejected, so every acceptance path runs"


def test_the_transposed_verification_head_changes_nothing(oracle_target):
    """On CPU a Decoder keeps the tied table transposed for the verification logits; with or without it the logits
    agree and the speculative loop gives the same tokens and the same acceptance."""
    _, _, target = oracle_target("dense")
    hidden_BTD = jax.random.normal(jax.random.key(0), (2, 5, target.config.hidden_size))
    embed_VD = target.embed[...]
    np.testing.assert_allclose(
        target.logits(hidden_BTD, head_DV=embed_VD.T), target.logits(hidden_BTD), rtol=1e-5, atol=1e-5
    )
    drafter, prompts = copy_drafter(target), prompts_of(4, seed=3)
    kwargs = dict(draft_len=3, max_new_tokens=MAX_NEW, stop_tokens=())
    transposed = Decoder(target, drafter)
    assert transposed._head_DV is not None and transposed._head_DV.shape == embed_VD.shape[::-1]
    plain_head = Decoder(target, drafter, transposed_head=False)
    assert plain_head._head_DV is None
    for a, b in zip(transposed.generate(prompts, **kwargs)[0], plain_head.generate(prompts, **kwargs)[0], strict=True):
        assert a.token_ids == b.token_ids
        assert a.accepted_per_round == b.accepted_per_round


def test_stop_tokens_end_each_row_on_its_own(target_pair):
    kind, _, target = target_pair
    prompts = prompts_of(4, seed=7)
    free, _ = generate(target, None, prompts, max_new_tokens=MAX_NEW, stop_tokens=())
    stop = free[0].token_ids[5]
    drafter = copy_drafter(target)
    for draft_len, d in ((0, None), (3, drafter)):
        outputs, _ = generate(target, d, prompts, draft_len=draft_len, max_new_tokens=MAX_NEW, stop_tokens=(stop,))
        for reference, output in zip(free, outputs, strict=True):
            cut = reference.token_ids.index(stop) + 1 if stop in reference.token_ids else MAX_NEW
            assert output.token_ids == reference.token_ids[:cut], (kind, draft_len)


def test_acceptance_counts_no_draft_past_a_stop_token_or_the_limit(target_pair):
    """Each round's accepted drafts are among the tokens it kept: produced = accepted + 1, except in a round cut by
    a stop token or the token limit, where accepted <= produced (and the cut drafts are not counted)."""
    kind, _, target = target_pair
    prompts = prompts_of(4, seed=7)
    drafter = copy_drafter(target)
    free, _ = generate(target, drafter, prompts, draft_len=4, max_new_tokens=MAX_NEW, stop_tokens=())
    stop = free[0].token_ids[5]
    for max_new in (MAX_NEW, 7) if kind == "dense" else (MAX_NEW,):  # a token limit cutting a round: dense only
        outputs, _ = generate(target, drafter, prompts, draft_len=4, max_new_tokens=max_new, stop_tokens=(stop,))
        for output in outputs:
            *middle, last = zip(output.accepted_per_round, output.produced_per_round, strict=True)
            assert all(produced == accepted + 1 for accepted, produced in middle), kind
            assert last[0] <= last[1] and sum(output.produced_per_round) == len(output.token_ids) - 1, kind


def test_round_counts_cut_at_a_stop_token_and_at_the_limit():
    stop = stop_token_array((9,))
    accepted = jnp.array([3, 3, 3, 1, 0])
    tokens = jnp.array([[5, 9, 7, 8], [5, 6, 7, 8], [5, 6, 7, 9], [9, 6, 7, 8], [5, 6, 7, 8]])
    remaining = jnp.array([10, 2, 10, 10, 10])
    count, used, hit_stop = round_counts(accepted, tokens, stop, remaining)
    # stop at draft 2 of 3 accepted; limit of 2 cuts 3 accepted drafts; stop on the target's own token;
    # stop on the first (accepted) draft; stop tokens after the kept ones are ignored.
    assert count.tolist() == [2, 2, 4, 1, 1]
    assert used.tolist() == [2, 2, 3, 1, 0]
    assert hit_stop.tolist() == [True, False, True, True, False]


def in_dtype(module: nnx.Module, dtype) -> nnx.Module:
    graph, state = nnx.split(module)
    return nnx.merge(
        graph, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    )


def test_a_bf16_target_decodes_in_bf16_and_matches_float32():
    """The loop runs in the checkpoint's dtype (bf16 cache and compute, float32 logits) and, on a fixture whose
    greedy choices have clear margins, picks the same tokens as float32."""
    config = Gemma4Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        global_head_dim=16,
        layer_types=(SLIDING, FULL),
        sliding_window=4,
    )
    f32 = Gemma4(config, rngs=nnx.Rngs(2))
    f32.final_norm.weight[...] = f32.final_norm.weight[...] * 3.0  # sharper logits: wide greedy margins
    bf16 = in_dtype(f32, jnp.bfloat16)
    prompts = [np.random.default_rng(3).integers(3, 64, n).tolist() for n in (11, 4, 17, 1)]
    want, _ = generate(target=f32, drafter=None, prompts=prompts, max_new_tokens=12, stop_tokens=())
    # Clear margins: along the float32 path, every greedy choice beats the runner-up by a wide logit gap.
    rows = [prompt + output.token_ids for prompt, output in zip(prompts, want, strict=True)]
    padded = np.zeros((len(rows), max(map(len, rows))), np.int32)  # right padding: causal, so rows are unchanged
    for row, tokens in zip(padded, rows, strict=True):
        row[: len(tokens)] = tokens
    logits = np.asarray(f32(jnp.asarray(padded))[0].logits)
    margins = []
    for row, (prompt, tokens) in enumerate(zip(prompts, rows, strict=True)):
        top2 = np.sort(logits[row, len(prompt) - 1 : len(tokens) - 1], axis=-1)[:, -2:]
        margins.append(np.min(top2[:, 1] - top2[:, 0]))
    assert min(margins) > 1.0, f"fixture margins too small for a bf16 comparison: {margins}"
    drafter = in_dtype(random_drafter(f32), jnp.bfloat16)
    for draft_len, d in ((0, None), (3, drafter)):
        got, _ = generate(bf16, d, prompts, draft_len=draft_len, max_new_tokens=12, stop_tokens=())
        assert [o.token_ids for o in got] == [o.token_ids for o in want], draft_len
    target_graph, target_state = nnx.split(bf16)
    traced = engine.decode_loop.trace(
        engine.StaticGraph(target_graph),
        target_state,
        None,
        None,
        jnp.zeros((1, 16), jnp.int32),
        jnp.array([5]),
        stop_token_array((1,)),
        np.uint32(0),
        jnp.zeros((1,), jnp.int32),
        draft_len=0,
        max_new_tokens=12,
        sampling=GREEDY,
        dtype=jnp.dtype(jnp.bfloat16),
    )
    loop = next(e for e in traced.jaxpr.eqns if e.primitive.name == "while")
    caches = [v.aval.dtype for v in loop.outvars if v.aval.ndim == 4]  # K/V cache [B, K, S, H]
    assert caches and all(dtype == jnp.bfloat16 for dtype in caches)
    hidden = [v.aval.dtype for v in loop.outvars if v.aval.shape == (1, config.hidden_size)]  # the compute dtype
    assert hidden == [jnp.bfloat16]


def test_a_drafter_with_some_committed_weights_reuses_the_compiled_loop(oracle_target):
    """A drafter edited with arrays computed from the loaded target's (committed to a device) next to fresh ones
    (uncommitted) must not compile the decode loop again for the same shapes (nor look it up in the persistent
    compilation cache the tests use)."""
    _, _, target = oracle_target("dense")
    compiles = []

    def count(event, *args, **kwargs):
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/compile_requests_use_cache"):
            compiles.append(event)

    prompts = prompts_of(1, seed=11)
    fresh, edited = random_drafter(target), random_drafter(target)
    edited.embed[...] = target.embed[...][:, : edited.embed.shape[1]] * 1.0  # committed, like the target's
    assert edited.embed[...].committed and not fresh.embed[...].committed
    generate(target, fresh, prompts, draft_len=2, max_new_tokens=9, stop_tokens=())
    jax.monitoring.register_event_duration_secs_listener(count)
    jax.monitoring.register_event_listener(count)
    try:
        generate(target, edited, prompts, draft_len=2, max_new_tokens=9, stop_tokens=())
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
        jax.monitoring.unregister_event_listener(count)
    assert compiles == [], f"{compiles}: the loop was compiled again for a drafter of the same shapes"


def test_bad_inputs_fail_before_any_work(target_pair):
    _, _, target = target_pair
    drafter = random_drafter(target)
    cases = [
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[5, 99999]]), "outside the vocabulary"),
        (dict(prompts=[[5]], draft_len=drafter.config.max_draft_len + 1), "max_draft_len"),
        (dict(prompts=[[5] * 30], max_cache_len=40), "max_cache_len"),
        (dict(prompts=[[5]], draft_len=2, drafter=None), "needs a drafter"),
        (dict(prompts=[[5]], prefill_chunk=0), "prefill_chunk"),
    ]
    for kwargs, message in cases:
        call = dict(drafter=drafter, draft_len=2, max_new_tokens=16) | kwargs
        with pytest.raises(DecodeInputError, match=message):
            generate(target, call.pop("drafter"), call.pop("prompts"), **call)
