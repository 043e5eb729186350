"""One jitted generation loop for plain and speculative decoding, entirely inside ``jax.lax.while_loop``.

Each round, the drafter (any family: ``mtp.drafter.interface``) proposes P tokens from the newest token, the
target's state that produced it (the ``Anchor``: last hidden state and the layers the drafter reads, taken from
the same verification forward) and the target's *committed* K/V (never the K/V of rejected drafts: transformers
hands its drafter the stale K/V of rejected drafts, which changes draft quality from the first partial rejection
on). The target then verifies the P + 1 positions in one forward; the longest agreeing prefix plus one token of
the target's own are kept, and the cache advances by exactly that many positions. With P = 0 the same loop is
plain decoding. Output tokens are the target's exactly: greedy by argmax, sampled by the speculative sampling rule.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.decoding import sampling as sampling_lib
from mtp.decoding.sampling import Sampling
from mtp.drafter.draft import draft
from mtp.drafter.interface import Anchor
from mtp.gemma4.cache import KVCache
from mtp.gemma4.layers import first_argmax
from mtp.gemma4.model import drafter_kv_from_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """Generated tokens and per-round statistics (``R`` rounds at most, one per generated token)."""

    tokens: jax.Array  # [B, max_new_tokens], valid up to num_generated
    num_generated: jax.Array  # [B]
    drafts: jax.Array  # [B, R, P] tokens the drafter proposed each round
    accepted: jax.Array  # [B, R] accepted drafts each round kept (none past a stop token or the token limit)
    produced: jax.Array  # [B, R] tokens each round added (accepted + 1, less at a stop or the limit)
    active: jax.Array  # [B, R] whether the row took part in the round
    target_forwards: jax.Array  # [B] target forwards after the prefill

    def acceptance_length(self) -> jax.Array:
        """τ per row: tokens generated after the prefill ÷ target forwards after the prefill."""
        return jnp.sum(self.produced, axis=1) / jnp.maximum(self.target_forwards, 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    cache: KVCache
    last_token: jax.Array
    anchor: Anchor
    result: DecodeResult
    done: jax.Array
    keys: jax.Array  # [B] one PRNG stream per row
    round: jax.Array


class StaticGraph:
    """An nnx ``GraphDef`` as a jit static argument, hashed once: jit hashes its static arguments on every call, and
    hashing a 12-layer model's GraphDef takes about 0.5 ms (measured), a sixth of one decode step of the embedded
    target."""

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (self.graphdef is other.graphdef or self.graphdef == other.graphdef)


def _append(buffer_BN: jax.Array, new_BT: jax.Array, start_B: jax.Array, count_B: jax.Array) -> jax.Array:
    """Writes the first ``count`` entries of each row of ``new`` at that row's ``start``."""
    index_T = jnp.arange(new_BT.shape[1])
    slots_BT = jnp.where(index_T < count_B[:, None], start_B[:, None] + index_T, buffer_BN.shape[1])
    rows_BT = jnp.broadcast_to(jnp.arange(new_BT.shape[0])[:, None], new_BT.shape)
    return buffer_BN.at[rows_BT, slots_BT].set(new_BT, mode="drop")


def _pick(logits_BV: jax.Array, sampling: Sampling, keys_B: jax.Array) -> jax.Array:
    if sampling.greedy:
        return first_argmax(logits_BV)
    probs = sampling_lib.target_probs(logits_BV[:, None], sampling)[:, 0]
    return sampling_lib.categorical_rows(keys_B, jnp.log(probs))


def _split(keys_B: jax.Array, num: int, sampling: Sampling) -> jax.Array:
    """``num`` fresh keys per row ``[num, B]``; greedy decoding draws nothing, so it skips the work."""
    return jnp.broadcast_to(keys_B, (num, *keys_B.shape)) if sampling.greedy else sampling_lib.split_rows(keys_B, num)


MAX_STOP_TOKENS = 8


def stop_token_array(stop_tokens: tuple[int, ...]) -> jax.Array:
    """Stop tokens as a fixed-size traced array (-1 pads), so a new stop set does not recompile the loop."""
    if len(stop_tokens) > MAX_STOP_TOKENS:
        raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stop_tokens)}.")
    return jnp.array(list(stop_tokens) + [-1] * (MAX_STOP_TOKENS - len(stop_tokens)), jnp.int32)


def round_counts(
    accepted_B: jax.Array, tokens_BT: jax.Array, stop: jax.Array, remaining_B: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What a round keeps: the tokens it adds (accepted drafts and the target's own token, cut after the first stop
    token and at the token limit), how many of those are drafts, and whether it stopped on a stop token."""
    count_B = accepted_B + 1
    is_stop_BT = jnp.isin(tokens_BT, stop) & (jnp.arange(tokens_BT.shape[1]) < count_B[:, None])
    hit_stop_B = jnp.any(is_stop_BT, axis=1)
    count_B = jnp.minimum(jnp.where(hit_stop_B, jnp.argmax(is_stop_BT, axis=1) + 1, count_B), remaining_B)
    return count_B, jnp.minimum(accepted_B, count_B), hit_stop_B


def _chunked_prefill(
    target, prompts_BL: jax.Array, lengths_B: jax.Array, cache: KVCache, chunk: int, layers: tuple[int, ...], dtype
) -> tuple[KVCache, Anchor]:
    """The prompts through the target ``chunk`` tokens at a time, each chunk attending to the cache the earlier ones
    filled: ceil(longest prompt ÷ chunk) forwards, so the work follows the prompts' real lengths and not the
    padded length that every prompt of a sweep shares (one compilation). Returns the filled cache and each row's
    anchor (the target's state at its last prompt token)."""
    batch = prompts_BL.shape[0]
    tokens_BL = jnp.pad(prompts_BL, ((0, 0), (0, -prompts_BL.shape[1] % chunk)))
    width = target.config.hidden_size
    anchor = Anchor(jnp.zeros((batch, width), dtype), jnp.zeros((batch, len(layers), width), dtype) if layers else None)

    def one_chunk(carry):
        index, cache, anchor = carry
        start = index * chunk
        valid_B = jnp.clip(lengths_B - start, 0, chunk)
        out, cache = target(
            jax.lax.dynamic_slice_in_dim(tokens_BL, start, chunk, axis=1),
            cache,
            num_valid_B=valid_B,
            return_logits=False,
            feature_layers=layers,
            dtype=dtype,
        )
        last_B = lengths_B - 1 - start
        here = Anchor.at(out, jnp.clip(last_B, 0, chunk - 1))
        anchor = anchor.keep_where((last_B < 0) | (last_B >= chunk), jax.tree.map(lambda x: x.astype(dtype), here))
        return index + 1, cache.commit(valid_B), anchor

    num_chunks = (jnp.max(lengths_B) + chunk - 1) // chunk
    _, cache, anchor = jax.lax.while_loop(
        lambda carry: carry[0] < num_chunks, one_chunk, (jnp.zeros((), jnp.int32), cache, anchor)
    )
    return cache, anchor


@functools.partial(
    jax.jit,
    static_argnames=(
        "target_graph",
        "drafter_graph",
        "draft_len",
        "max_new_tokens",
        "sampling",
        "dtype",
        "prefill_chunk",
    ),
)
def decode_loop(
    target_graph,
    target_state,
    drafter_graph,
    drafter_state,
    prompts_BL,
    lengths_B,
    stop,
    seed,
    row_ids_B,
    *,
    draft_len: int,
    max_new_tokens: int,
    sampling: Sampling,
    dtype: jnp.dtype,
    prefill_chunk: int | None = None,
    head_DV: jax.Array | None = None,
) -> DecodeResult:
    """Decodes a batch of right-padded prompts; the graphs are ``StaticGraph``s (``mtp.decoding.generate.Decoder``
    makes them once). ``prefill_chunk`` (static): prefill the prompts in chunks of this many tokens, as many as the
    longest prompt needs, instead of in one pass over the padded length. ``head_DV``: the target's tied table
    transposed, for the verification logits (``Gemma4.logits``; the Decoder passes it only with a drafter)."""
    target = nnx.merge(target_graph.graphdef, target_state)
    drafter = nnx.merge(drafter_graph.graphdef, drafter_state) if draft_len else None
    batch, prompt_len = prompts_BL.shape
    rows = jnp.arange(batch)
    chunked = prefill_chunk is not None and prefill_chunk < prompt_len
    cache = KVCache.init(
        target.config,
        batch,
        prompt_len + max_new_tokens + draft_len + 1,
        max_chunk=max(draft_len + 1, prefill_chunk if chunked else 1),
        dtype=dtype,
    )
    layers = drafter.feature_layers if draft_len else ()
    if chunked:
        cache, anchor = _chunked_prefill(target, prompts_BL, lengths_B, cache, prefill_chunk, layers, dtype)
    else:
        out, cache = target(
            prompts_BL,
            cache,
            num_valid_B=lengths_B,
            return_logits=False,
            prefill=True,
            feature_layers=layers,
            dtype=dtype,
        )
        cache = cache.commit(lengths_B)
        anchor = Anchor.at(out, lengths_B - 1)
    hidden_BD = anchor.hidden
    keys_B, first_keys_B = _split(sampling_lib.row_keys(seed, row_ids_B), 2, sampling)
    first_B = _pick(target.logits(hidden_BD[:, None])[:, 0].astype(jnp.float32), sampling, first_keys_B)
    rounds = max_new_tokens
    result = DecodeResult(
        tokens=jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first_B),
        num_generated=jnp.ones((batch,), jnp.int32),
        drafts=jnp.zeros((batch, rounds, draft_len), jnp.int32),
        accepted=jnp.zeros((batch, rounds), jnp.int32),
        produced=jnp.zeros((batch, rounds), jnp.int32),
        active=jnp.zeros((batch, rounds), bool),
        target_forwards=jnp.zeros((batch,), jnp.int32),
    )
    done = jnp.isin(first_B, stop) | (max_new_tokens <= 1)
    state = _State(cache, first_B, anchor, result, done, keys_B, jnp.zeros((), jnp.int32))

    def body(s: _State) -> _State:
        keys_B, draft_keys_B, verify_keys_B = _split(s.keys, 3, sampling)
        position_B = s.cache.length
        if draft_len:
            proposal = draft(
                drafter,
                target,
                s.last_token,
                s.anchor,
                position_B,
                drafter_kv_from_cache(target.config, s.cache),
                num_tokens=draft_len,
                temperature=sampling.temperature,
                keys_B=draft_keys_B,
                dtype=dtype,
                sample_logits=lambda logits_BV: sampling_lib.processed_logits(logits_BV[:, None], sampling)[:, 0],
            )
            drafts_BP = proposal.tokens_BP
        else:
            drafts_BP = jnp.zeros((batch, 0), jnp.int32)
        chunk_BT = jnp.concatenate([s.last_token[:, None], drafts_BP], axis=1)
        out, cache = target(chunk_BT, s.cache, feature_layers=layers, dtype=dtype, return_logits=head_DV is None)
        logits_BTV = (out.logits if head_DV is None else target.logits(out.hidden, head_DV=head_DV)).astype(jnp.float32)
        if sampling.greedy:
            accepted_B, tokens_BT = sampling_lib.verify_greedy(logits_BTV, drafts_BP)
        else:
            p_BTV = sampling_lib.target_probs(logits_BTV, sampling)
            q_BPV = sampling_lib.target_probs(proposal.logits_BPV, sampling) if draft_len else p_BTV[:, :0]
            accepted_B, tokens_BT = sampling_lib.verify_sampled(p_BTV, q_BPV, drafts_BP, verify_keys_B)
        r = s.result
        count_B, used_B, hit_stop_B = round_counts(accepted_B, tokens_BT, stop, max_new_tokens - r.num_generated)
        active_B = ~s.done
        count_B, used_B = jnp.where(active_B, count_B, 0), jnp.where(active_B, used_B, 0)
        result = DecodeResult(
            tokens=_append(r.tokens, tokens_BT, r.num_generated, count_B),
            num_generated=r.num_generated + count_B,
            drafts=r.drafts.at[:, s.round].set(jnp.where(active_B[:, None], drafts_BP, 0)),
            accepted=r.accepted.at[:, s.round].set(used_B),
            produced=r.produced.at[:, s.round].set(count_B),
            active=r.active.at[:, s.round].set(active_B),
            target_forwards=r.target_forwards + active_B,
        )
        done = s.done | hit_stop_B | (result.num_generated >= max_new_tokens)
        return _State(
            cache=cache.commit(jnp.where(s.done, 0, accepted_B + 1)),
            last_token=jnp.where(s.done, s.last_token, tokens_BT[rows, accepted_B]),
            anchor=s.anchor.keep_where(s.done, Anchor.at(out, accepted_B)),
            result=result,
            done=done,
            keys=keys_B,
            round=s.round + 1,
        )

    final = jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.round < rounds), body, state)
    return final.result
