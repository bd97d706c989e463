"""Write long prompts from the ShareGPT conversations SmolLM2's shipped draft never read.

    python prompts.py OUT.jsonl [MIN_TOKENS] [MAX_TOKENS]

Each of the last ``HELD_SHAREGPT`` usable conversations of the shipped ShareGPT file (the
draft's held-out set) gives at most one prompt: its turns from the first, labelled "User:" /
"Assistant:", up to the last user turn that keeps the whole within MAX_TOKENS (default 900)
tokens of SmolLM2's chat-formatted prompt, followed by an instruction to write the assistant's
next reply. Conversations that give fewer than MIN_TOKENS (default 600) are passed over.
"""

from __future__ import annotations

import json
import sys

from transformers import AutoTokenizer

from specee_compile import load as model_load
from specee_compile import resources
from specee_compile.calibrate import data
from specee_compile.drafts.train import HELD_SHAREGPT

INSTRUCTION = "\n\nWrite the assistant's next reply to the user's last message."
HEADER = "Here is a conversation between a user and an assistant.\n\n"


def main(out: str, low: int = 600, high: int = 900) -> None:
    conversations = list(data._usable(data._records(resources.wheel_member(*data.SHAREGPT_WHEEL))))
    tokenizer = AutoTokenizer.from_pretrained(model_load.resolve("smollm2"))

    def length(text: str) -> int:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return len(tokenizer(chat, add_special_tokens=False)["input_ids"])

    kept = []
    for turns in conversations[-HELD_SHAREGPT:]:
        parts, best = [], None
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt"):
                break
            label = "User" if turn["from"] == "human" else "Assistant"
            parts.append(f"{label}: {str(turn.get('value', '')).strip()}")
            text = HEADER + "\n\n".join(parts) + INSTRUCTION
            n = length(text)
            if n > high:
                break
            if label == "User" and n >= low:
                best = (text, n)
        if best is not None:
            kept.append(best)
    with open(out, "w", encoding="utf-8") as f:
        for text, _ in kept:
            f.write(json.dumps({"prompt": text}) + "\n")
    print(f"{len(kept)} prompts, {min(n for _, n in kept)}-{max(n for _, n in kept)} tokens")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
