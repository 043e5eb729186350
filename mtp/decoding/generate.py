"""Host-side entry to the decode engine: validates inputs before any work, batches ragged prompts, times runs."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.data.tokenizer import GEMMA4_STOP_TOKENS
from mtp.decoding.engine import DecodeResult, StaticGraph, decode_loop, stop_token_array
from mtp.decoding.sampling import Sampling
from mtp.errors import UserError
from mtp.gemma4.model import Gemma4

GREEDY = Sampling()


class DecodeInputError(UserError):
    """Bad decoding input, reported before any work starts."""


@dataclasses.dataclass
class Generation:
    """One prompt's output and its per-round statistics."""

    token_ids: list[int]
    drafted_per_round: list[list[int]]
    accepted_per_round: list[int]
    produced_per_round: list[int]
    target_forwards: int


def padded_length(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple: prompts are padded to it so that batches share compilations."""
    return -(-n // multiple) * multiple


def check_inputs(
    target: Gemma4,
    drafter: nnx.Module | None,
    prompts: Sequence[Sequence[int]],
    *,
    draft_len: int,
    max_new_tokens: int,
    max_cache_len: int | None,
) -> None:
    """Every reason a request cannot run, as a clear error, before compiling anything."""
    vocab = target.config.vocab_size
    if max_new_tokens < 1:
        raise DecodeInputError(f"max_new_tokens={max_new_tokens}; it must be at least 1.")
    if draft_len < 0:
        raise DecodeInputError(f"draft_len={draft_len}; use 0 for plain decoding or a positive draft length.")
    if draft_len:
        if drafter is None:
            raise DecodeInputError(f"draft_len={draft_len} needs a drafter; pass one or set draft_len=0.")
        if draft_len > drafter.config.max_draft_len:
            raise DecodeInputError(
                f"draft_len={draft_len} is above the drafter's max_draft_len={drafter.config.max_draft_len}."
            )
        drafter.config.validate_against(target.config)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise DecodeInputError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS=2).")
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise DecodeInputError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}.")
        needed = len(prompt) + max_new_tokens + draft_len + 1
        if max_cache_len is not None and needed > max_cache_len:
            raise DecodeInputError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} and draft_len={draft_len} "
                f"it needs a cache of {needed} > max_cache_len={max_cache_len}. Shorten it or raise max_cache_len."
            )


def committed_states(*states: nnx.State | None) -> tuple[nnx.State | None, ...]:
    """``states`` with every uncommitted array committed to the one device all of them live on.

    jit keys its compilations on whether each argument is committed to a device: a drafter whose weights were
    partly edited with arrays from a loaded checkpoint (committed) and partly freshly made (uncommitted) would
    otherwise compile the whole decode loop again for the same shapes. Arrays on several devices (a sharded
    target) are left as they are.
    """
    leaves = [x for state in states if state is not None for x in jax.tree.leaves(state)]
    devices = {d for x in leaves if isinstance(x, jax.Array) for d in x.devices()}
    if len(devices) != 1:
        return states
    sharding = jax.sharding.SingleDeviceSharding(devices.pop())

    def commit(x):
        return jax.device_put(x, sharding) if isinstance(x, jax.Array) and not x.committed else x

    return tuple(None if state is None else jax.tree.map(commit, state) for state in states)


class Decoder:
    """A target, and optionally a drafter, prepared once for many ``generate`` calls on their current weights.

    Preparing splits each module into graph and state, commits the state to its device (``committed_states``) and
    hashes the graphs for jit: about 6 ms of host work (measured on the embedded 12-layer target), as much as two
    of its decode steps, which a sweep of single-prompt calls would otherwise pay on every call. A Decoder decodes
    with the weights as they were when it was made: make a new one after changing them.
    """

    def __init__(self, target: Gemma4, drafter: nnx.Module | None = None, *, transposed_head: bool | None = None):
        """``transposed_head``: keep a [D, V] copy of the target's tied table for the verification logits, which
        XLA:CPU computes about twice as fast from it (one more table's worth of memory). Default: with a drafter,
        on CPU."""
        self.target, self.drafter = target, drafter
        target_graph, target_state = nnx.split(target)
        drafter_graph, drafter_state = nnx.split(drafter) if drafter is not None else (None, None)
        self._target_state, self._drafter_state = committed_states(target_state, drafter_state)
        self._target_graph = StaticGraph(target_graph)
        self._drafter_graph = StaticGraph(drafter_graph) if drafter is not None else None
        if transposed_head is None:
            transposed_head = drafter is not None and jax.default_backend() == "cpu"
        self._head_DV = jnp.swapaxes(target.embed[...], 0, 1) if transposed_head else None

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        draft_len: int = 0,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        stop_tokens: Sequence[int] = GEMMA4_STOP_TOKENS,
        seed: int = 0,
        first_row: int = 0,
        max_cache_len: int | None = None,
        pad_multiple: int = 16,
        dtype: jnp.dtype | None = None,
        prefill_chunk: int | None = None,
    ) -> tuple[list[Generation], DecodeResult]:
        """Decodes one batch of ragged prompts (right-padded to a multiple of ``pad_multiple`` to reuse compilations).

        Sampling draws row i from its own stream ``fold_in(key(seed), first_row + i)``: a caller that splits a prompt
        list into batches passes each batch's offset in the list, so a prompt's samples depend on the seed and its
        place in the list, never on the batch size, and no two prompts share a stream.

        ``dtype`` (default: the target's parameter dtype, i.e. the checkpoint's as loaded) is the compute and KV-cache
        dtype; logits, softmax and the acceptance test always run in float32. On CPU load and decode in float32 (a
        bf16 dot with one row takes a slow XLA:CPU path); on GPU/TPU, bf16.

        ``prefill_chunk``: prefill in chunks of this many tokens, as many as the longest prompt of the batch needs,
        so prompts padded to a long shared length (one compilation for a whole prompt set) cost what their own
        length costs; ``None`` prefills the padded prompts in one pass (best on accelerators, and for prompts near
        the padded length). The tokens are the same either way.
        """
        check_inputs(
            self.target,
            self.drafter,
            prompts,
            draft_len=draft_len,
            max_new_tokens=max_new_tokens,
            max_cache_len=max_cache_len,
        )
        if prefill_chunk is not None and prefill_chunk < 1:
            raise DecodeInputError(f"prefill_chunk={prefill_chunk}; give a positive token count, or None for one pass.")
        lengths = np.array([len(p) for p in prompts], np.int32)
        padded = np.zeros((len(prompts), padded_length(int(lengths.max()), pad_multiple)), np.int32)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = prompt
        speculative = draft_len > 0
        result = decode_loop(
            self._target_graph,
            self._target_state,
            self._drafter_graph if speculative else None,
            self._drafter_state if speculative else None,
            padded,
            lengths,
            stop_token_array(tuple(stop_tokens)),
            np.uint32(seed),
            np.arange(first_row, first_row + len(prompts), dtype=np.int32),
            draft_len=draft_len,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            dtype=jnp.dtype(dtype or self.target.embed[...].dtype),
            prefill_chunk=prefill_chunk,
            head_DV=self._head_DV if speculative else None,
        )
        result = jax.device_get(result)
        outputs = []
        for row in range(len(prompts)):
            active = np.asarray(result.active[row])
            outputs.append(
                Generation(
                    token_ids=result.tokens[row, : result.num_generated[row]].tolist(),
                    drafted_per_round=result.drafts[row][active].tolist(),
                    accepted_per_round=result.accepted[row][active].tolist(),
                    produced_per_round=result.produced[row][active].tolist(),
                    target_forwards=int(result.target_forwards[row]),
                )
            )
        return outputs, result


def generate(
    target: Gemma4, drafter: nnx.Module | None, prompts: Sequence[Sequence[int]], **kwargs
) -> tuple[list[Generation], DecodeResult]:
    """One batch through a ``Decoder`` made for this call; see ``Decoder.generate`` for the arguments."""
    return Decoder(target, drafter if kwargs.get("draft_len") else None).generate(prompts, **kwargs)


def generate_in_batches(
    target: Gemma4, drafter: nnx.Module | None, prompts: Sequence[Sequence[int]], *, batch_size: int, **kwargs
) -> list[Generation]:
    """``generate`` over consecutive batches of ``batch_size`` prompts, each row keeping its list index's stream."""
    decoder = Decoder(target, drafter if kwargs.get("draft_len") else None)
    outputs: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        outputs += decoder.generate(prompts[start : start + batch_size], first_row=start, **kwargs)[0]
    return outputs


def summarize(outputs: Sequence[Generation], draft_len: int, wall_seconds: float) -> dict:
    """τ (tokens after the prefill ÷ target forwards after it), per-position acceptance, throughput."""
    produced = sum(sum(o.produced_per_round) for o in outputs)
    forwards = sum(o.target_forwards for o in outputs)
    rounds = [n for o in outputs for n in o.accepted_per_round]
    per_position = [float(np.mean([n >= i for n in rounds])) if rounds else 0.0 for i in range(1, draft_len + 1)]
    total_tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "acceptance_length": produced / forwards if forwards else 1.0,
        "per_position_acceptance": per_position,
        "tokens_generated": total_tokens,
        "target_forwards": forwards,
        "tokens_per_second": total_tokens / wall_seconds if wall_seconds > 0 else 0.0,
        "wall_seconds": wall_seconds,
    }


def timed_generate(*args, **kwargs) -> tuple[list[Generation], float]:
    """``generate`` after one warm-up call with the same shapes, so the time excludes compilation."""
    generate(*args, **kwargs)
    start = time.perf_counter()
    outputs, _ = generate(*args, **kwargs)
    return outputs, time.perf_counter() - start
