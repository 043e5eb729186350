"""Our speculative decoding against transformers' assisted generation on the same tiny HF checkpoints.

Greedy, batch 1, constant draft length K: the generated tokens must be identical, and so must the first round's
drafted tokens and accepted count. Later rounds may differ by design: transformers' drafter sees the stale K/V of
rejected drafts, ours only the committed K/V (mtp/decoding/engine.py); only the first round starts from the clean
prompt K/V on both sides. Interop runs both ways: a random transformers-built assistant loaded with
``load_drafter`` (its drafts are almost all rejected), and the same drafter turned into a copying one on our side and
exported with ``save_drafter`` (its drafts get accepted). Both share one config per kind, so one compilation.
The centroid (ordered-embedding) head is on for two of the four kinds.

transformers is instrumented by wrapping ``SinglePositionMultiTokenCandidateGenerator``: ``get_candidates``
records each round's drafts, ``update_candidate_strategy`` each round's accepted count. transformers clips the
draft length to ``max_length - cur_len - 1``; MAX_NEW keeps the first round unclipped.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

from mtp.checkpoint.hf_drafter import load_drafter, save_drafter
from mtp.decoding.generate import generate
from tests import hf_oracle

DRAFT_LEN, MAX_NEW, PROMPT_LEN = 3, 20, 12  # PROMPT_LEN > sliding window 8: the drafter's window mask matters
ORDERED_KINDS = ("e2b_like", "keqv_like")
NUM_CANDIDATE_PROMPTS = 32


def candidate_prompt(seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, hf_oracle.VOCAB, PROMPT_LEN).tolist()


@pytest.fixture(scope="module", params=hf_oracle.TARGET_KINDS)
def pair(request, tmp_path_factory, oracle_target):
    """(kind, HF target reloaded from its checkpoint, our target from the same checkpoint, assistant dir)."""
    kind = request.param
    _, path, target = oracle_target(kind)
    assistant = tmp_path_factory.mktemp(f"assistant_{kind}")
    hf_model = hf_oracle.build_assistant(kind, ordered=kind in ORDERED_KINDS, seed=2)
    hf_oracle.save_assistant(hf_model, assistant, num_assistant_tokens=DRAFT_LEN)
    return kind, hf_oracle.load_target(path), target, assistant


@pytest.fixture
def hf_rounds(monkeypatch):
    """Drafts and accepted counts of every round of transformers' MTP-assisted generation, as it runs."""
    rounds = {"drafts": [], "accepted": []}
    get_candidates = SinglePositionMultiTokenCandidateGenerator.get_candidates
    update = SinglePositionMultiTokenCandidateGenerator.update_candidate_strategy

    def recording_get_candidates(self, input_ids, **kwargs):
        candidate_ids, candidate_logits = get_candidates(self, input_ids, **kwargs)
        if candidate_logits is not None:  # None: the prefill iteration, or no room left to draft
            rounds["drafts"].append(candidate_ids[0, input_ids.shape[1] :].tolist())
        return candidate_ids, candidate_logits

    def recording_update(self, input_ids, scores, num_matches):
        if scores.shape[1] > 1:  # scores cover drafts + 1 positions: 1 means nothing was drafted
            rounds["accepted"].append(int(num_matches))
        return update(self, input_ids, scores, num_matches)

    monkeypatch.setattr(SinglePositionMultiTokenCandidateGenerator, "get_candidates", recording_get_candidates)
    monkeypatch.setattr(SinglePositionMultiTokenCandidateGenerator, "update_candidate_strategy", recording_update)
    return rounds


def make_copying(drafter, target):
    """``copy_drafter``'s recipe (tests/decoding/drafters.py) on a drafter of any config, in numpy (no compiling).

    Layers pass the residual through, the pre-projection keeps an orthonormal projection M of the token embedding
    and the head is the target's embedding through M, so the drafter proposes its input token again. With the
    centroid head, each centroid is the sum of its cluster's head rows, so the input token's cluster usually makes
    the top-J and the copy survives the mask (when it does not, the masked head drafts another token).
    """
    config = drafter.config
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(config.backbone_hidden_size,) * 2))
    m = q[:, : config.hidden_size].astype(np.float32)
    head = np.asarray(target.embed[...]) @ m
    drafter.pre_projection[...] = jnp.asarray(np.concatenate([m, np.zeros_like(m)]))
    drafter.embed[...] = jnp.asarray(head)
    drafter.final_norm.weight[...] = jnp.asarray(np.ones(drafter.final_norm.weight.shape, np.float32))
    for layer in drafter.layers:
        layer.attn.o[...] = jnp.asarray(np.zeros(layer.attn.o.shape, np.float32))
        layer.mlp.down[...] = jnp.asarray(np.zeros(layer.mlp.down.shape, np.float32))
    if config.use_ordered_embeddings:
        clusters_CRD = head[np.asarray(drafter.token_ordering[...])].reshape(config.num_centroids, -1, m.shape[1])
        drafter.centroids[...] = jnp.asarray(clusters_CRD.sum(axis=1).T)
    return drafter


def hf_assisted(hf_target, assistant, prompt, rounds) -> tuple[list[int], list[int], int]:
    """transformers' tokens, first-round drafts and first-round accepted count."""
    rounds["drafts"].clear()
    rounds["accepted"].clear()
    tokens = hf_oracle.reference_assisted_greedy(hf_target, assistant, np.array([prompt]), MAX_NEW)[0].tolist()
    assert len(rounds["drafts"][0]) == DRAFT_LEN, "transformers clipped the first round; raise MAX_NEW"
    return tokens, rounds["drafts"][0], rounds["accepted"][0]


def assert_same_as_transformers(target, drafter, prompt, hf_tokens, hf_drafts, hf_accepted, kind):
    (ours,), _ = generate(target, drafter, [prompt], draft_len=DRAFT_LEN, max_new_tokens=MAX_NEW, stop_tokens=())
    assert ours.token_ids == hf_tokens, kind
    assert ours.drafted_per_round[0] == hf_drafts, kind
    assert ours.accepted_per_round[0] == hf_accepted, kind
    assert sum(ours.produced_per_round) == MAX_NEW - 1


def test_transformers_assistant_loaded_by_us(pair, hf_rounds):
    """HF -> ours: a random assistant; its drafts are rejected, the tokens are the target's on both sides."""
    kind, hf_target, target, assistant_dir = pair
    prompt = candidate_prompt(0)
    expected = hf_assisted(hf_target, hf_oracle.load_assistant(assistant_dir), prompt, hf_rounds)
    drafter = load_drafter(assistant_dir, target_config=target.config)
    assert_same_as_transformers(target, drafter, prompt, *expected, kind)


def test_our_copying_drafter_exported_to_transformers(pair, hf_rounds, tmp_path):
    """Ours -> HF: drafts get accepted, so the acceptance path and the cache crop run in the first round."""
    kind, hf_target, target, assistant_dir = pair
    drafter = make_copying(load_drafter(assistant_dir, target_config=target.config), target)
    save_drafter(drafter, tmp_path, num_assistant_tokens=DRAFT_LEN)
    assistant = hf_oracle.load_assistant(tmp_path)
    # The first candidate prompt on which transformers accepts a first-round draft (chosen by the oracle alone).
    for seed in range(NUM_CANDIDATE_PROMPTS):
        prompt = candidate_prompt(seed)
        expected = hf_assisted(hf_target, assistant, prompt, hf_rounds)
        if expected[2] >= 1:
            break
    else:
        pytest.fail(f"{kind}: transformers accepted no first-round draft of the copying drafter on any prompt")
    reloaded = load_drafter(tmp_path, target_config=target.config)
    assert reloaded.config == drafter.config
    assert_same_as_transformers(target, reloaded, prompt, *expected, kind)
