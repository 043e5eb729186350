"""Renders the test conversations with Gemma 4's published chat template (jinja2, as transformers renders it).

    python tests/data/render_chat_fixtures.py --template /models/gemma-4-31B-it/chat_template.jinja

writes ``tests/data/fixtures/gemma4_chat.json``, which ``test_chat.py`` compares our renderer against. The file
checked in was rendered from the 26B/31B template (its generation prompt ends with an empty thought channel,
``<|channel>thought\\n<channel|>``; the E2B/E4B template lacks exactly that branch), with ``enable_thinking`` unset.
"""

import argparse
import json
import pathlib

import jinja2.ext
import jinja2.sandbox

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "gemma4_chat.json"
CONVERSATIONS = {
    "single_turn": [
        {"role": "user", "content": "What does `json.dumps` do?"},
        {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
    ],
    "system_and_whitespace": [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "\n  Explain `heapq.heappush`.  "},
        {"role": "model", "content": "  Push item onto heap, maintaining the heap invariant.\n\n"},
    ],
    "multi_turn_with_thinking": [
        {"role": "developer", "content": "You answer questions about the Python standard library."},
        {"role": "user", "content": "What does `json.dumps` do?"},
        {"role": "assistant", "content": "Serialize obj to a JSON str."},
        {"role": "user", "content": "And `json.loads`?"},
        {
            "role": "assistant",
            "content": "<|channel>thought\nrecall the docs<channel|>Deserialize s to a Python object.",
        },
    ],
    "unicode_and_code": [
        {"role": "user", "content": "Continue:\n```python\ndef área(r):\n    return"},
        {"role": "assistant", "content": "math.pi * r ** 2  # π r²\n```"},
    ],
}


def render(template: jinja2.Template, messages: list[dict], generation_prompt: bool) -> str:
    return template.render(
        messages=messages, add_generation_prompt=generation_prompt, bos_token="<bos>", eos_token="<eos>", tools=None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", required=True, type=pathlib.Path, help="a Gemma 4 chat_template.jinja")
    parser.add_argument("--out", type=pathlib.Path, default=FIXTURE)
    args = parser.parse_args()
    # The environment transformers' apply_chat_template uses.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    template = env.from_string(args.template.read_text())
    fixtures = {}
    for name, messages in CONVERSATIONS.items():
        last_model = max(i for i, m in enumerate(messages) if m["role"] in ("model", "assistant"))
        fixtures[name] = {
            "messages": messages,
            "conversation": render(template, messages, generation_prompt=False),
            "prompt": render(template, messages[:last_model], generation_prompt=True),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixtures, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(fixtures)} renderings to {args.out}")


if __name__ == "__main__":
    main()
