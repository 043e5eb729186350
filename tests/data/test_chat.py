"""The Gemma 4 chat template: exact rendering, loss mask over model turns only, 106 vs 1, the prompt form."""

import json
import pathlib

import pytest
from tokenizers import Tokenizer, models

from mtp.data.chat import ChatTemplate, RowError, parse_row, strip_thinking
from mtp.data.tokenizer import TokenizerError

END_OF_TURN, EOS, BOS = 106, 1, 2
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What does `json.dumps` do?  "},
    {"role": "model", "content": "Serialize obj to a JSON str."},
    {"role": "user", "content": "And `json.loads`?"},
    {"role": "assistant", "content": "<|channel>thought\nrecall<channel|>Deserialize s to a Python object."},
]
RENDERED = (
    "<bos><|turn>system\nBe brief.<turn|>\n"
    "<|turn>user\nWhat does `json.dumps` do?<turn|>\n"
    "<|turn>model\nSerialize obj to a JSON str.<turn|>\n"
    "<|turn>user\nAnd `json.loads`?<turn|>\n"
    "<|turn>model\nDeserialize s to a Python object.<turn|>\n"
)


def _decode(template, ids):
    return template.tokenizer.decode(ids, skip_special_tokens=False)


# Renderings by Gemma 4's published chat_template.jinja (26B/31B form); see render_chat_fixtures.py for the command.
PUBLISHED = json.loads((pathlib.Path(__file__).parent / "fixtures" / "gemma4_chat.json").read_text())
PRIMER = "<|channel>thought\n<channel|>"


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_matches_the_published_chat_template(tiny_tokenizer, name):
    case = PUBLISHED[name]
    messages = case["messages"]
    last_model = max(i for i, m in enumerate(messages) if m["role"] in ("model", "assistant"))
    plain, primed = ChatTemplate(tiny_tokenizer), ChatTemplate(tiny_tokenizer, thought_primer=True)
    tokens = plain.format_conversation(messages)[0]
    assert _decode(plain, tokens) == case["conversation"]
    # The same ids as tokenizing the rendered string (transformers' apply_chat_template(tokenize=True)).
    assert tokens == tiny_tokenizer.encode(case["conversation"], add_special_tokens=False).ids
    # The E2B/E4B template is the same without the thought channel in the generation prompt.
    assert _decode(plain, plain.prompt_ids(messages[:last_model])) == case["prompt"].removesuffix(PRIMER)
    assert _decode(primed, primed.prompt_ids(messages[:last_model])) == case["prompt"]
    # Training with the primer: the conversation as the model produced its last turn after the generation prompt.
    answer = strip_thinking(messages[last_model]["content"])
    assert _decode(primed, primed.format_conversation(messages)[0]) == case["prompt"] + answer + "<turn|>\n"


def _masked_spans(tokens, mask):
    spans, current = [], []
    for token, learn in zip(tokens, mask, strict=True):
        if learn:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    return spans + ([current] if current else [])


def test_renders_exactly_the_gemma4_template(template):
    tokens, mask = template.format_conversation(CONVERSATION)
    assert len(tokens) == len(mask)
    assert tokens[0] == BOS and mask[0] == 0
    assert _decode(template, tokens) == RENDERED


def test_loss_mask_covers_exactly_model_contents_and_their_end_of_turn(template):
    tokens, mask = template.format_conversation(CONVERSATION)
    spans = _masked_spans(tokens, mask)
    assert [_decode(template, span) for span in spans] == [
        "Serialize obj to a JSON str.<turn|>",
        "Deserialize s to a Python object.<turn|>",
    ]
    assert all(span[-1] == END_OF_TURN for span in spans)
    # Five turns end with 106; only the two model turns' 106 are targets. EOS (1) never appears in a conversation.
    ends = [i for i, t in enumerate(tokens) if t == END_OF_TURN]
    assert len(ends) == 5 and [mask[i] for i in ends] == [0, 0, 1, 0, 1]
    assert EOS not in tokens


def test_end_of_turn_and_eos_are_not_confused(template):
    assert (template.ids.end_of_turn, template.ids.eos, template.ids.bos, template.ids.pad) == (106, 1, 2, 0)
    assert template.stop_tokens == (106, 1)
    text_tokens, text_mask = template.format_text("plain document")
    assert text_tokens[0] == BOS and text_tokens[-1] == EOS and END_OF_TURN not in text_tokens
    assert text_mask == [0] + [1] * (len(text_tokens) - 1)


def test_prompt_ids_end_with_the_model_turn_header_and_prefix_the_full_conversation(template):
    messages = CONVERSATION[:2]
    prompt = template.prompt_ids(messages)
    assert _decode(template, prompt) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nWhat does `json.dumps` do?<turn|>\n<|turn>model\n"
    )
    full, mask = template.format_conversation([*messages, {"role": "model", "content": "It serializes."}])
    assert full[: len(prompt)] == prompt  # the decode engine continues exactly where training data continues
    assert not any(mask[: len(prompt)])


def test_thought_primer_opens_model_turns_and_is_not_a_target(tiny_tokenizer):
    template = ChatTemplate(tiny_tokenizer, thought_primer=True)
    assert _decode(template, template.prompt_ids(CONVERSATION[1:2])).endswith(
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    tokens, mask = template.format_conversation(CONVERSATION[1:3])
    assert [_decode(template, s) for s in _masked_spans(tokens, mask)] == ["Serialize obj to a JSON str.<turn|>"]


def test_assistant_is_an_alias_of_model(template):
    as_model = template.format_conversation([{"role": "user", "content": "hi"}, {"role": "model", "content": "yo"}])
    as_assistant = template.format_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    assert as_model == as_assistant


def test_rows_of_each_kind(template):
    prompt_response = template.format_row({"prompt": "hi", "response": "yo"})
    assert prompt_response == template.format_conversation(
        [{"role": "user", "content": "hi"}, {"role": "model", "content": "yo"}]
    )
    assert template.format_row({"text": "abc", "messages": None}) == template.format_text("abc")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, "message 1 has role 'bot'"),
        ({"messages": [{"role": "user"}]}, "needs a string 'content'"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no model"),
        ({"messages": "hello"}, "must be a non-empty list"),
        ({"prompt": "hi"}, "'prompt' and 'response' must both be strings"),
        ({"txt": "typo"}, "needs 'messages'"),
        ({"prompt_ids": [2, 105], "answer_ids": []}, "'answer_ids' is empty"),
        ({"prompt_ids": [2, -1], "answer_ids": [7]}, "'prompt_ids' must be a list of non-negative token ids"),
    ],
)
def test_malformed_rows_say_what_is_wrong(row, message):
    with pytest.raises(RowError, match=message):
        parse_row(row)


def test_strip_thinking_matches_the_template_macro():
    assert strip_thinking(" a<|channel>thought\nx<channel|>b ") == "ab"
    assert strip_thinking("no thoughts") == "no thoughts"


def test_a_tokenizer_without_gemma4_control_tokens_is_refused():
    plain = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<bos>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    with pytest.raises(TokenizerError, match=r"<\|turn>.*<turn\|>"):
        ChatTemplate(plain)


def test_token_rows_are_read_as_the_model_produced_them(template):
    """Self-distillation's rows: the prompt ids as given, the answer ids (decoded, they would re-encode otherwise)
    are every training target."""
    tokens, mask = template.format_row({"prompt_ids": [2, 105, 300, 106, 105], "answer_ids": [301, 302, 106]})
    assert tokens == [2, 105, 300, 106, 105, 301, 302, 106]
    assert mask == [0, 0, 0, 0, 0, 1, 1, 1]
