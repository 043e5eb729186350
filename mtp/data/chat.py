"""The Gemma 4 chat template as token ids, with a loss mask over the model's turns.

Gemma 4 (``chat_template.jinja`` of google/gemma-4-*-it; ai.google.dev/gemma/docs/core/prompt-formatting-gemma4)::

    <bos><|turn>system\\n{system}<turn|>\\n<|turn>user\\n{user}<turn|>\\n<|turn>model\\n{answer}<turn|>\\n

``<|turn>`` (105) opens a turn and ``<turn|>`` (106) ends it; the role is plain text. ``<eos>`` (1) never appears
in a conversation: it ends plain-text documents. Contents are trimmed and thinking blocks
(``<|channel>...<channel|>``) are dropped from model turns, as the template does. The generation prompt ends with
``<|turn>model\\n``. Loss mask convention: ``loss_mask[t] = 1`` when ``tokens[t]`` is a training target, i.e. the
model turns' content and their ``<turn|>``; never the ``<turn|>`` of a user turn, nor ``<eos>`` in a conversation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from tokenizers import Tokenizer

from mtp.data.tokenizer import TokenizerError
from mtp.errors import UserError

ROLE_ALIASES = {"user": "user", "model": "model", "assistant": "model", "system": "system", "developer": "system"}
# What the 26B/31B templates append to the generation prompt when thinking is off (an empty thought channel).
THOUGHT_PRIMER = "<|channel>thought\n<channel|>"


class RowError(UserError):
    """A data row or conversation is malformed; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class TokenRow:
    """A conversation kept as the model's own token ids (self-distillation): the prompt it was given, exactly as
    tokenised, and the answer it produced; the answer is the training target, with no decode and re-encode."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def _ids(row: Mapping, key: str) -> tuple[int, ...]:
    ids = row.get(key)
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise RowError(f"'{key}' must be a list of non-negative token ids, got {ids!r:.80}.")
    return tuple(ids)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The control-token ids the template and the trainer rely on."""

    pad: int
    eos: int
    bos: int
    start_of_turn: int
    end_of_turn: int


def strip_thinking(text: str) -> str:
    """Drops ``<|channel>...<channel|>`` blocks, as the template's ``strip_thinking`` macro does."""
    parts = [part.split("<|channel>")[0] for part in text.split("<channel|>")]
    return "".join(parts).strip()


def check_messages(messages: object) -> list[dict[str, str]]:
    """Validated messages with canonical roles (user / model / system)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise RowError(f"'messages' must be a non-empty list of {{role, content}}, got {type(messages).__name__}.")
    checked = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise RowError(f"message {number} must be an object with 'role' and 'content', got {message!r:.80}.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_ALIASES:
            raise RowError(f"message {number} has role {role!r}; expected one of {sorted(ROLE_ALIASES)}.")
        if not isinstance(content, str):
            raise RowError(f"message {number} ({role}) needs a string 'content', got {type(content).__name__}.")
        checked.append({"role": ROLE_ALIASES[role], "content": content})
    return checked


def parse_row(row: Mapping) -> list[dict[str, str]] | str | TokenRow:
    """A training row as messages ("messages", or "prompt" + "response"), as plain text ("text"), or as token ids
    ("prompt_ids" + "answer_ids", as self-distillation writes them)."""
    if not isinstance(row, Mapping):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}.")
    if row.get("answer_ids") is not None:
        answer = _ids(row, "answer_ids")
        if not answer:
            raise RowError("'answer_ids' is empty, so nothing to learn from.")
        return TokenRow(_ids(row, "prompt_ids"), answer)
    if row.get("messages") is not None:
        messages = check_messages(row["messages"])
        if not any(m["role"] == "model" for m in messages):
            raise RowError("the conversation has no model (assistant) turn, so nothing to learn from.")
        return messages
    if row.get("prompt") is not None or row.get("response") is not None:
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise RowError("'prompt' and 'response' must both be strings.")
        return [{"role": "user", "content": row["prompt"]}, {"role": "model", "content": row["response"]}]
    if row.get("text") is not None:
        if not isinstance(row["text"], str):
            raise RowError(f"'text' must be a string, got {type(row['text']).__name__}.")
        return row["text"]
    keys = sorted(k for k, v in row.items() if v is not None)
    raise RowError(
        f"a row needs 'messages' (list of {{role, content}}), 'text', 'prompt' + 'response', or 'prompt_ids' + "
        f"'answer_ids'; has {keys}."
    )


def prompt_messages(row: Mapping) -> list[dict[str, str]] | None:
    """A row's conversation up to (not including) its last model turn (a token row's "messages": its prompt);
    None for plain text or a malformed row."""
    try:
        messages = parse_row(row)
        if isinstance(messages, TokenRow):
            return check_messages(row["messages"]) if row.get("messages") else None
    except RowError:
        return None
    if isinstance(messages, str):
        return None
    last_model = max(i for i, m in enumerate(messages) if m["role"] == "model")
    return messages[:last_model]


class ChatTemplate:
    """Formats conversations and text with a tokenizer whose control tokens are Gemma 4's."""

    def __init__(self, tokenizer: Tokenizer, *, thought_primer: bool = False):
        """``thought_primer``: open model turns with an empty thought channel, as 26B/31B templates do."""
        self.tokenizer = tokenizer
        needed = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "start_of_turn": "<|turn>", "end_of_turn": "<turn|>"}
        if thought_primer:
            needed |= {"channel_open": "<|channel>", "channel_close": "<channel|>"}
        ids = {name: tokenizer.token_to_id(text) for name, text in needed.items()}
        missing = [needed[name] for name, token_id in ids.items() if token_id is None]
        if missing:
            raise TokenizerError(f"The tokenizer lacks Gemma 4 control tokens {missing}; is it a Gemma 4 tokenizer?")
        self.ids = SpecialIds(**{k: ids[k] for k in ("pad", "eos", "bos", "start_of_turn", "end_of_turn")})
        self.thought_primer = thought_primer

    @property
    def stop_tokens(self) -> tuple[int, int]:
        """Generation ends at the end of the model's turn or at end of text."""
        return (self.ids.end_of_turn, self.ids.eos)

    def _encode(self, text: str) -> list[int]:
        # add_special_tokens=False: Gemma's tokenizer.json would otherwise prepend a second <bos>.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _turn(self, role: str, content: str, primed: bool = False) -> tuple[list[int], list[int]]:
        """One turn's ids and loss mask; header and content are encoded together, as the template renders them."""
        header = f"{role}\n" + (THOUGHT_PRIMER if primed else "")
        content = strip_thinking(content) if role == "model" else content.strip()
        encoding = self.tokenizer.encode(header + content, add_special_tokens=False)
        learn = role == "model"
        # A token that ends past the header covers content (a merge may straddle the boundary).
        body_mask = [int(learn and end > len(header)) for _, end in encoding.offsets]
        ids = [self.ids.start_of_turn, *encoding.ids, self.ids.end_of_turn]
        mask = [0, *body_mask, int(learn)]
        newline = self._encode("\n")
        return ids + newline, mask + [0] * len(newline)

    def format_conversation(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """``<bos>`` then every turn; the mask covers the model turns' content and their ``<turn|>``.

        With ``thought_primer`` the last model turn opens with the empty thought channel, exactly as the model
        produced it after the generation prompt; earlier model turns are history, which the template renders bare.
        """
        return self._format(messages, prime_last_model_turn=self.thought_primer)

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The conversation so far plus the model-turn header: what generation continues from."""
        tokens, _ = self._format(messages, prime_last_model_turn=False)
        header = "model\n" + (THOUGHT_PRIMER if self.thought_primer else "")
        return [*tokens, self.ids.start_of_turn, *self._encode(header)]

    def _format(
        self, messages: Sequence[Mapping[str, str]], prime_last_model_turn: bool
    ) -> tuple[list[int], list[int]]:
        messages = check_messages(messages)
        last_model = max((i for i, m in enumerate(messages) if m["role"] == "model"), default=-1)
        tokens, mask = [self.ids.bos], [0]
        for i, message in enumerate(messages):
            turn_tokens, turn_mask = self._turn(
                message["role"], message["content"], prime_last_model_turn and i == last_model
            )
            tokens += turn_tokens
            mask += turn_mask
        return tokens, mask

    def format_text(self, text: str) -> tuple[list[int], list[int]]:
        """A plain language-modelling document: ``<bos> text <eos>``, every token after ``<bos>`` a target."""
        tokens = [self.ids.bos, *self._encode(text), self.ids.eos]
        return tokens, [0] + [1] * (len(tokens) - 1)

    def format_row(self, row: Mapping) -> tuple[list[int], list[int]]:
        """A data row ("messages", "prompt" + "response", "text", or token ids) as ids and loss mask."""
        parsed = parse_row(row)
        if isinstance(parsed, TokenRow):  # the answer is every target, as the model produced it (through <turn|>)
            return [*parsed.prompt_ids, *parsed.answer_ids], [0] * len(parsed.prompt_ids) + [1] * len(parsed.answer_ids)
        return self.format_text(parsed) if isinstance(parsed, str) else self.format_conversation(parsed)
