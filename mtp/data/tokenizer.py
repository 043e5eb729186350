"""Tokenizers: a model's ``tokenizer.json``, or a tiny byte-level BPE whose special tokens sit at Gemma 4's ids."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mtp.errors import UserError

# Gemma 4's control tokens and their ids (google-deepmind/gemma gm/text/_tokenizer.py `_Gemma4SpecialTokens`, and
# the added_tokens of google/gemma-4-*-it tokenizer.json). The tiny tokenizer reproduces them so that every part
# of mtp uses one set of ids for tiny and real models.
GEMMA4_SPECIAL_TOKENS: dict[int, str] = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
# Generation ends at end of text or at the end of the model's turn (the -it checkpoints' eos_token_id [1, 106]).
GEMMA4_STOP_TOKENS: tuple[int, ...] = tuple(i for i, t in GEMMA4_SPECIAL_TOKENS.items() if t in ("<eos>", "<turn|>"))
NUM_CONTROL_IDS = max(GEMMA4_SPECIAL_TOKENS) + 1  # ids below this are control tokens in the tiny tokenizer
_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


class TokenizerError(UserError):
    """A tokenizer file is missing, unreadable, or lacks a token mtp needs."""


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """Loads ``tokenizer.json`` from a model directory, or the file itself."""
    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        where = f"the directory {path} has no tokenizer.json" if path.is_dir() else f"{path} does not exist"
        raise TokenizerError(
            f"Cannot load a tokenizer: {where}. Give a Hugging Face model directory holding tokenizer.json "
            "(a SentencePiece tokenizer.model alone is not supported) or the path of a tokenizer.json."
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{file} is not a valid tokenizer.json: {e}") from e


def tiny_special_tokens() -> list[str]:
    """The tiny tokenizer's first ``NUM_CONTROL_IDS`` tokens, in id order; unassigned ids become reserved tokens."""
    return [GEMMA4_SPECIAL_TOKENS.get(i, f"<reserved_{i}>") for i in range(NUM_CONTROL_IDS)]


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Trains a byte-level BPE on ``texts``; ids 0..106 are Gemma 4's control tokens, the rest bytes and merges.

    Merges may differ between runs on count ties (a ``tokenizers`` trainer issue); the control ids never do.
    """
    minimum = NUM_CONTROL_IDS + len(_BYTE_ALPHABET)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {NUM_CONTROL_IDS} control ids + 256 bytes = {minimum}."
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no post-processor: the chat template adds <bos> itself, as Gemma's does.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=tiny_special_tokens(),  # the trainer gives special tokens ids 0.. in list order
        initial_alphabet=_BYTE_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for token_id, text in GEMMA4_SPECIAL_TOKENS.items():
        if tokenizer.token_to_id(text) != token_id:
            raise AssertionError(f"tokenizers placed {text!r} at {tokenizer.token_to_id(text)}, not {token_id}.")
    return tokenizer
