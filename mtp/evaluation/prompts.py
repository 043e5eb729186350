"""Prompt sets: named lists of chat prompts, each with a category (``"all"`` is reserved for the overall figure).

Three sources: the embedded (or a training run's) held-out conversations, Spec-Bench's ``question.jsonl``
(``question_id``, ``category``, ``turns``: user turns asked one at a time, each after the model's answer to the one
before; ``reference`` is ignored), and JSONL of ``{"text": ...}`` or ``{"token_ids": [...]}`` prompts (category
``"all"`` unless a line names one).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

from mtp.data.chat import ChatTemplate, prompt_messages
from mtp.decoding.cli import read_jsonl
from mtp.errors import UserError

EMBEDDED_HELD_OUT = "embedded_held_out"
ALL = "all"


class PromptSetError(UserError):
    """A prompt set that cannot be evaluated: a malformed line, an unknown category, no prompts."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its category, the token ids of its first turn, and (Spec-Bench) the text of every user turn."""

    category: str
    token_ids: list[int]
    turns: tuple[str, ...] = ()

    @property
    def num_turns(self) -> int:
        return max(1, len(self.turns))

    def turn_ids(self, turn: int, answers: Sequence[str], template: ChatTemplate) -> list[int]:
        """The prompt of turn ``turn`` (0-based): the earlier user turns, each followed by its answer."""
        if turn == 0:
            return self.token_ids
        messages = []
        for i in range(turn):
            messages += [{"role": "user", "content": self.turns[i]}, {"role": "model", "content": answers[i]}]
        return template.prompt_ids([*messages, {"role": "user", "content": self.turns[turn]}])


def conversation_prompts(rows: Sequence, template: ChatTemplate, num_prompts: int) -> list[Prompt]:
    """Up to ``num_prompts`` prompts (each row up to its last model turn), taken round-robin over the categories.

    A row's category is its ``category`` field (``"chat"`` without one); the order is the rows' order, so the
    same rows give the same prompts on every machine.
    """
    by_category: dict[str, list[list[int]]] = {}
    for row in rows:
        if (messages := prompt_messages(row)) is not None:
            by_category.setdefault(row.get("category") or "chat", []).append(template.prompt_ids(messages))
    prompts: list[Prompt] = []
    queues = [(category, iter(ids)) for category, ids in sorted(by_category.items())]
    while queues and len(prompts) < num_prompts:
        for category, queue in list(queues):
            ids = next(queue, None)
            if ids is None:
                queues.remove((category, queue))
            elif len(prompts) < num_prompts:
                prompts.append(Prompt(category, ids))
    return prompts


def _category(row: dict, where: str) -> str:
    category = row.get("category", ALL)
    if not isinstance(category, str) or not category:
        raise PromptSetError(f"{where}: 'category' must be a non-empty string, got {category!r:.60}.")
    return category


def _line_prompt(row: dict, where: str, template: ChatTemplate) -> Prompt:
    if "turns" in row:  # Spec-Bench
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise PromptSetError(f"{where}: 'turns' must be a non-empty list of non-empty strings.")
        first = template.prompt_ids([{"role": "user", "content": turns[0]}])
        return Prompt(_category(row, where), first, tuple(turns))
    if ("text" in row) == ("token_ids" in row):
        raise PromptSetError(
            f"{where}: a line needs 'turns' (Spec-Bench), 'text' or 'token_ids' (exactly one); it has {sorted(row)}."
        )
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise PromptSetError(f"{where}: 'text' must be a non-empty string.")
        return Prompt(_category(row, where), template.prompt_ids([{"role": "user", "content": row["text"]}]))
    ids = row["token_ids"]
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise PromptSetError(f"{where}: 'token_ids' must be a non-empty list of integers.")
    return Prompt(_category(row, where), list(ids))


def read_prompt_file(path: str | pathlib.Path, template: ChatTemplate) -> list[Prompt]:
    """Every line of a Spec-Bench ``question.jsonl`` or a ``{"text"}`` / ``{"token_ids"}`` JSONL, in file order."""
    return [_line_prompt(row, f"{path}:{number}", template) for number, row in read_jsonl(path)]


def select(prompts: Sequence[Prompt], categories: str, source: str) -> list[Prompt]:
    """The prompts of the comma-separated ``categories`` (all when empty); an unknown category or none left fails."""
    wanted = [c.strip() for c in categories.split(",") if c.strip()]
    present = sorted({p.category for p in prompts})
    unknown = [c for c in wanted if c not in present and c != ALL]
    if unknown:
        raise PromptSetError(
            f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {unknown} in {source}; it has {present}."
        )
    chosen = [p for p in prompts if not wanted or ALL in wanted or p.category in wanted]
    if not chosen:
        raise PromptSetError(f"{source} holds no prompts; give a file with at least one prompt line.")
    return chosen


def prompt_set_name(prompts_file: str) -> str:
    """``prompt_set`` in the records: the file's stem (``question`` for Spec-Bench's question.jsonl)."""
    return pathlib.Path(prompts_file).stem
