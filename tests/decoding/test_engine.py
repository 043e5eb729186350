"""The decode engine: speculative output is the target's, for every kind, batch shape and acceptance path."""

import numpy as np
import pytest

from mtp.checkpoint import load_target
from mtp.decoding.generate import DecodeInputError, generate, summarize
from tests import hf_oracle
from tests.decoding.drafters import copy_drafter, random_drafter

MAX_NEW = 24


@pytest.fixture(scope="module", params=hf_oracle.TARGET_KINDS)
def target_pair(request, tmp_path_factory):
    hf_model = hf_oracle.build_target(request.param, seed=1)
    path = tmp_path_factory.mktemp(request.param)
    hf_oracle.save_target(hf_model, path)
    return request.param, hf_model, load_target(path)


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
    kind, _, target = target_pair
    prompts = prompts_of(batch, seed=batch)
    plain, _ = generate(target, None, prompts, max_new_tokens=MAX_NEW, stop_tokens=())
    drafter = make_drafter(target)
    spec, _ = generate(target, drafter, prompts, draft_len=3, max_new_tokens=MAX_NEW, stop_tokens=())
    for a, b in zip(plain, spec, strict=True):
        assert a.token_ids == b.token_ids, kind
        assert sum(b.produced_per_round) == MAX_NEW - 1
    accepted = [n for o in spec for n in o.accepted_per_round]
    if make_drafter is copy_drafter:
        assert max(accepted) >= 1, "the copying drafter should get drafts accepted"
        assert min(accepted) < 3, "and some rejected, so every acceptance path runs"


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


def test_bad_inputs_fail_before_any_work(target_pair):
    _, _, target = target_pair
    drafter = random_drafter(target)
    cases = [
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[5, 99999]]), "outside the vocabulary"),
        (dict(prompts=[[5]], draft_len=drafter.config.max_draft_len + 1), "max_draft_len"),
        (dict(prompts=[[5] * 30], max_cache_len=40), "max_cache_len"),
        (dict(prompts=[[5]], draft_len=2, drafter=None), "needs a drafter"),
    ]
    for kwargs, message in cases:
        call = dict(drafter=drafter, draft_len=2, max_new_tokens=16) | kwargs
        with pytest.raises(DecodeInputError, match=message):
            generate(target, call.pop("drafter"), call.pop("prompts"), **call)
