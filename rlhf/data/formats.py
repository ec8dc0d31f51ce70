"""Read preference, SFT, step-3 prompt and hh-rlhf records from JSON / JSONL / .jsonl.gz files or a `datasets`
directory.

Every format is normalised to one record type, ``Example(prompt, chosen, rejected)``; ``rejected`` is None
for SFT-only records, and ``chosen`` too for step-3 prompts. The format is detected per record from its fields:

- ``prompt, chosen, rejected``            preference (DeepSpeed-Chat's local json)
- ``prompt, response`` / ``prompt, chosen`` SFT demonstration
- ``prompt`` without an answer            a step-3 prompt; its other fields (``answer``, ``tests``, ...) go to the
                                          reward function. ``prompt`` may be messages ending in a user turn, and
                                          so may ``messages``.
- ``chosen, rejected`` (no prompt)        Anthropic hh-rlhf dialogue: the prompt is everything up to and
                                          including the last ``"\\n\\nAssistant:"`` of ``chosen``.
- conversational (TRL's layout, e.g. UltraFeedback): fields that are lists of ``{"role", "content"}`` messages.
  ``messages`` (SFT), or ``chosen``/``rejected`` conversations ending in the assistant's answer, with the
  prompt either given (``prompt``: a string or messages) or the turns before the answer. The prompt's turns
  are kept (``Example.messages``) for the tokenizer's chat template, and written hh-rlhf style as
  ``Example.prompt`` for tokenizers without one (and for reward functions).

A file holds either step-3 prompts or records with answers, not both: a record that lost its answer field to a
typo would otherwise leave the pairs for step 3 without a word.

A bad record raises ``DataError`` whose one-line message names the file, the line and the field.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HH_ASSISTANT = "\n\nAssistant:"
EXPECTED = ("expected prompt+chosen+rejected, prompt+response, prompt alone (step 3), hh-rlhf chosen/rejected, or "
            "conversational messages / chosen+rejected message lists")
ANSWERS = ("chosen", "rejected", "response")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file or record that cannot be used; the message names file, line and field."""


@dataclass(frozen=True)
class Example:
    prompt: str
    chosen: str | None  # the demonstration for SFT, the preferred answer for the reward model; None: a step-3 prompt
    rejected: str | None = None  # None for SFT-only records and step-3 prompts
    # The record's other fields (a reference answer, a task id, ...), handed to a step-3 reward function.
    fields: dict = field(default_factory=dict, compare=False)
    # A conversational record's prompt as turns ((role, content), ...), for the tokenizer's chat template;
    # ``prompt`` then holds the same turns written hh-rlhf style.
    messages: tuple = field(default=(), compare=False)
    where: str = field(default="", compare=False)  # "file:line" of the record, for errors found after parsing

    @property
    def is_pair(self) -> bool:
        return self.rejected is not None

    @property
    def is_prompt(self) -> bool:
        """A step-3 prompt: no answer to learn from, only fields for a reward function."""
        return self.chosen is None


def split_hh_dialogue(text: str) -> tuple[str, str] | None:
    """Split an hh-rlhf dialogue into (prompt up to and including the last "\\n\\nAssistant:", answer)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:].lstrip(" ")


def _field(record: dict, name: str, where: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _other_fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "response", "messages")}


def _messages(record: dict, name: str, where: str) -> tuple[tuple[str, str], ...]:
    value = record[name]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of messages")
    turns = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: field '{name}'[{i}]: expected a message {{\"role\": ..., \"content\": ...}} "
                            "with string values")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{name}'[{i}]: role '{m['role']}', expected one of {', '.join(ROLES)}")
        turns.append((m["role"], m["content"]))
    return tuple(turns)


def _answer(turns: tuple, name: str, where: str) -> str:
    role, content = turns[-1]
    if role != "assistant":
        raise DataError(f"{where}: field '{name}' must end with the assistant's answer, ends with a '{role}' message")
    if not content.strip():
        raise DataError(f"{where}: field '{name}': the assistant's answer is empty")
    return content


def render_dialogue(turns: tuple) -> str:
    """A conversation awaiting the assistant, hh-rlhf style: "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:"
    (a system message leads as it is)."""
    text = "".join(content if role == "system" else f"\n\n{'Human' if role == 'user' else 'Assistant'}: {content}"
                   for role, content in turns)
    return text + HH_ASSISTANT


def _conversational(record: dict, where: str) -> Example:
    """TRL's conversational records: ``messages``, or ``chosen`` (+ ``rejected``) conversations that end in the
    assistant's answer, with ``prompt`` given or the turns before the answer."""
    name = next((n for n in ("messages", "chosen", "response") if n in record), None)
    if name is None:
        if "rejected" in record or not isinstance(record.get("prompt"), list):
            raise DataError(f"{where}: field 'chosen' missing ({EXPECTED})")
        name = "prompt"
    turns = _messages(record, name, where)
    if name in ("messages", "prompt") and not any(k in record for k in ANSWERS) and turns[-1][0] == "user":
        return _prompt_example(turns, record, where)  # a conversation awaiting the assistant: a step-3 prompt
    if name == "prompt":
        raise DataError(f"{where}: field 'prompt' must end with a user message (a step-3 prompt awaiting the answer), "
                        f"ends with a '{turns[-1][0]}' message")
    answer, prompt_turns, rejected = _answer(turns, name, where), turns[:-1], None
    if name != "messages":  # a "messages" record is an SFT demonstration
        if "rejected" in record:
            other = _messages(record, "rejected", where)
            rejected = _answer(other, "rejected", where)
            if other[:-1] != prompt_turns:
                raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their last message (expected "
                                "the same conversation with two answers)")
        if not prompt_turns:  # the answers alone: the prompt is its own field
            if "prompt" not in record:
                raise DataError(f"{where}: field 'prompt' missing (the '{name}' conversation holds only the answer)")
            prompt_turns = (_messages(record, "prompt", where) if isinstance(record["prompt"], list)
                            else (("user", _field(record, "prompt", where)),))
    if not any(role == "user" for role, _ in prompt_turns):
        raise DataError(f"{where}: the conversation has no user message before the answer")
    return Example(render_dialogue(prompt_turns), answer, rejected, _other_fields(record), prompt_turns, where)


def _prompt_example(turns: tuple, record: dict, where: str) -> Example:
    return Example(render_dialogue(turns), None, None, _other_fields(record), turns, where)


def parse_record(record: object, where: str) -> Example:
    """Normalise one record; ``where`` ("file:line") prefixes every error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(record).__name__}")
    if any(isinstance(record.get(k), list) for k in ("messages", "prompt", "chosen", "rejected", "response")):
        return _conversational(record, where)
    if "prompt" in record:
        prompt = _field(record, "prompt", where)
        if "rejected" in record:
            if "chosen" not in record:
                raise DataError(f"{where}: field 'chosen' missing ({EXPECTED})")
            return Example(prompt, _field(record, "chosen", where), _field(record, "rejected", where),
                           _other_fields(record), where=where)
        for answer in ("response", "chosen"):
            if answer in record:
                return Example(prompt, _field(record, answer, where), fields=_other_fields(record), where=where)
        return Example(prompt, None, fields=_other_fields(record), where=where)  # a step-3 prompt
    if "chosen" in record and "rejected" in record:
        chosen, rejected = _field(record, "chosen", where), _field(record, "rejected", where)
        chosen_split, rejected_split = split_hh_dialogue(chosen), split_hh_dialogue(rejected)
        if chosen_split is None:  # no dialogue to take the prompt from: the prompt is what is missing
            raise DataError(f"{where}: field 'prompt' missing (without one, 'chosen' and 'rejected' must be hh-rlhf "
                            "dialogues, and 'chosen' has no '\\n\\nAssistant:' turn)")
        if rejected_split is None:
            raise DataError(
                f"{where}: field 'rejected' has no '\\n\\nAssistant:' turn (hh-rlhf dialogue expected)"
            )
        return Example(chosen_split[0], chosen_split[1], rejected_split[1], _other_fields(record), where=where)
    missing = "chosen" if "rejected" in record else "prompt"
    raise DataError(f"{where}: field '{missing}' missing ({EXPECTED})")


def _iter_json_records(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line number, record). A JSON list is numbered by the line its element starts on."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: file is empty")
    if stripped.startswith("["):
        yield from _iter_json_list(path, text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from e


def _iter_json_list(path: Path, text: str) -> Iterator[tuple[int, object]]:
    # Decode element by element so each record keeps the line number it starts on.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fail(pos: int, what: str) -> DataError:
        lineno = text.count("\n", 0, pos) + 1
        return DataError(f"{path}:{lineno}: bad JSON ({what})")

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from e
        yield text.count("\n", 0, pos) + 1, record
        pos = skip(end)
        if pos >= len(text):
            raise fail(pos, "unterminated list")
        if text[pos] == "]":
            return
        if text[pos] != ",":
            raise fail(pos, "expected ',' or ']'")
        pos = skip(pos + 1)


def _load_dataset_dir(path: Path) -> list[Example]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: is a directory; reading a dataset directory needs the `datasets` package") from e
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):  # prefer the train split of a saved DatasetDict
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    return [parse_record(row, f"{path}:{i + 1}") for i, row in enumerate(dataset)]


def load_examples(path: str | Path) -> list[Example]:
    """Read every record of a JSON list, JSONL (optionally gzipped) file, or a `datasets` directory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        examples = _load_dataset_dir(path)
    else:
        examples = [parse_record(record, f"{path}:{lineno}") for lineno, record in _iter_json_records(path)]
    if not examples:
        raise DataError(f"{path}: no records")
    _require_one_kind(examples)
    return examples


def _require_one_kind(examples: list[Example]) -> None:
    """A file of step-3 prompts holds only prompts, and a file of answered records no bare prompt (a typo in
    'chosen' would otherwise make a pair a prompt, silently)."""
    first_is_prompt = examples[0].is_prompt
    odd = next((e for e in examples if e.is_prompt != first_is_prompt), None)
    if odd is None:
        return
    if first_is_prompt:
        raise DataError(f"{odd.where}: a record with an answer in a file of step-3 prompts (from {examples[0].where}); "
                        "expected prompts only (a file of their own for SFT or pair records)")
    raise DataError(f"{odd.where}: field 'chosen' missing (a prompt alone in a file of records with answers; "
                    "step-3 prompts go in a file of their own)")
