"""Prompt sets: Spec-Bench's question.jsonl (categories, multi-turn), text / token-id JSONL, category filters, and
bad files named by file and line."""

import json

import pytest

from mtp.errors import UserError
from mtp.evaluation.prompts import ALL, Prompt, prompt_set_name, read_prompt_file, select

SPEC_BENCH = [
    {
        "question_id": 1,
        "category": "writing",
        "turns": ["What does json.dumps do?", "And json.loads?"],
        "reference": [],
    },
    {"question_id": 2, "category": "coding", "turns": ["Write a function that reverses a list in place."]},
    {"question_id": 3, "category": "writing", "turns": ["Explain itertools.chain in one long sentence, please."]},
]


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def test_spec_bench_turns_are_asked_one_at_a_time_after_each_answer(tmp_path, template):
    path = write_jsonl(tmp_path / "question.jsonl", SPEC_BENCH)
    prompts = read_prompt_file(path, template)
    assert [p.category for p in prompts] == ["writing", "coding", "writing"] and prompt_set_name(path) == "question"
    assert [p.num_turns for p in prompts] == [2, 1, 1]
    first = prompts[0]
    assert first.token_ids == template.prompt_ids([{"role": "user", "content": "What does json.dumps do?"}])
    second = first.turn_ids(1, ["It serialises an object."], template)
    assert second == template.prompt_ids(
        [
            {"role": "user", "content": "What does json.dumps do?"},
            {"role": "model", "content": "It serialises an object."},
            {"role": "user", "content": "And json.loads?"},
        ]
    )
    assert second[: len(first.token_ids) - 2] == first.token_ids[:-2]  # the first turn, then its answer


def test_text_and_token_id_lines_are_category_all(tmp_path, template):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"text": "Hello?"}, {"token_ids": [2, 5, 9]}], ["\n"])
    prompts = read_prompt_file(path, template)
    assert prompts[1] == Prompt(ALL, [2, 5, 9]) and prompts[0].category == ALL
    assert select(prompts, "", "mine") == prompts


def test_categories_filter(tmp_path, template):
    prompts = read_prompt_file(write_jsonl(tmp_path / "q.jsonl", SPEC_BENCH), template)
    assert [p.category for p in select(prompts, "coding", "q")] == ["coding"]
    assert len(select(prompts, "coding, writing", "q")) == 3


@pytest.mark.parametrize(
    "lines, message",
    [
        ([json.dumps(SPEC_BENCH[0]) + "\n", '{"turns": ["a"\n'], r"q.jsonl:2: not valid JSON"),
        (["\n", '{"turns": []}\n'], r"q.jsonl:2: 'turns' must be a non-empty list"),
        (['{"text": "a", "token_ids": [1]}\n'], r"q.jsonl:1: a line needs 'turns' \(Spec-Bench\), 'text' or"),
        (['{"token_ids": [1, "x"]}\n'], r"q.jsonl:1: 'token_ids' must be a non-empty list of integers"),
        (["[1, 2]\n"], r"q.jsonl:1: each line must be a JSON object"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, template, lines, message):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(lines))
    with pytest.raises(UserError, match=message) as error:
        read_prompt_file(path, template)
    assert "\n" not in str(error.value)


def test_an_unknown_category_or_an_empty_set_is_refused(tmp_path, template):
    prompts = read_prompt_file(write_jsonl(tmp_path / "q.jsonl", SPEC_BENCH), template)
    with pytest.raises(UserError, match=r"unknown category \['math'\] in q; it has \['coding', 'writing'\]"):
        select(prompts, "coding,math", "q")
    empty = read_prompt_file(write_jsonl(tmp_path / "empty.jsonl", [], ["\n", "  \n"]), template)
    with pytest.raises(UserError, match=r"empty\.jsonl holds no prompts"):
        select(empty, "", str(tmp_path / "empty.jsonl"))
