"""Prompt sets: named lists of chat prompts, each with a category (``"all"`` is reserved for the overall figure)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mtp.data.chat import ChatTemplate, prompt_messages

EMBEDDED_HELD_OUT = "embedded_held_out"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its category and the token ids generation continues from."""

    category: str
    token_ids: list[int]


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
