"""Record formats: turn one raw record into a `Sample`, or say exactly what is wrong with it.

| format   | fields                                              |
|----------|-----------------------------------------------------|
| alpaca   | instruction, input (optional), output               |
| dolly    | instruction, context (optional), response           |
| chat     | messages: [{role, content}, ...]                    |
| sharegpt | conversations: [{from, value}, ...]                 |
| text     | text (raw text, every token is learned)             |

"auto" picks the format from the first record's fields (see `detect_format`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from lorakit.errors import LorakitError

FORMATS = ("auto", "alpaca", "dolly", "chat", "sharegpt", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system", "tool": "tool"}


class BadRecordError(ValueError):
    """Raised by a parser for one record; the caller adds the location."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Sample:
    """A validated record, in one of three shapes the tokenizer knows how to render.

    - an instruction (`instruction`, `input`, `output`): alpaca and dolly records;
    - a conversation (`messages`): chat and sharegpt records;
    - raw `text`.
    """

    where: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: tuple[Message, ...] = field(default=())
    text: str = ""

    @property
    def kind(self) -> str:
        if self.messages:
            return "chat"
        return "instruction" if self.instruction else "text"


def detect_format(record: Any) -> str:
    """The format a record's fields say it is in.

    Raises:
        LorakitError: no known set of fields is present.
    """
    if isinstance(record, dict):
        keys = set(record)
        if "messages" in keys:
            return "chat"
        if "conversations" in keys:
            return "sharegpt"
        if "instruction" in keys and "output" in keys:
            return "alpaca"
        if "instruction" in keys and "response" in keys:
            return "dolly"
        if "text" in keys:
            return "text"
        fields = ", ".join(sorted(map(str, keys))) or "no fields"
    else:
        fields = f"a {type(record).__name__}, not an object"
    raise LorakitError(
        f"cannot detect the data format from the first record ({fields}); expected alpaca (instruction, input, output), "
        "dolly (instruction, context, response), chat (messages), sharegpt (conversations) or text; "
        "or name it with format=..."
    )


def parse_record(record: Any, where: str, format: str) -> Sample:
    """One raw record -> a `Sample` in `format` (not "auto").

    Raises:
        BadRecordError: a field is missing, empty where it must not be, or of the wrong type.
    """
    if not isinstance(record, dict):
        raise BadRecordError(f"expected a JSON object with fields, got a {type(record).__name__}")
    return PARSERS[format](record, where)


def _string(record: dict, name: str, required: bool = True) -> str:
    """A string field; None and missing are "" for optional fields."""
    value = record.get(name)
    if value is None:
        if required:
            present = ", ".join(sorted(map(str, record))) or "none"
            raise BadRecordError(f"missing field {name!r} (fields present: {present})")
        return ""
    if not isinstance(value, str):
        raise BadRecordError(f"field {name!r} must be a string, got {type(value).__name__} {_short(value)}")
    if required and not value.strip():
        raise BadRecordError(f"field {name!r} is empty")
    return value


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_alpaca(record: dict, where: str) -> Sample:
    return Sample(where, instruction=_string(record, "instruction"), input=_string(record, "input", required=False), output=_string(record, "output"))


def _parse_dolly(record: dict, where: str) -> Sample:
    return Sample(where, instruction=_string(record, "instruction"), input=_string(record, "context", required=False), output=_string(record, "response"))


def _parse_text(record: dict, where: str) -> Sample:
    return Sample(where, text=_string(record, "text"))


def _parse_chat(record: dict, where: str) -> Sample:
    turns = _turn_list(record, "messages")
    messages = tuple(_message(turn, index, "role", "content", {r: r for r in ROLES}) for index, turn in enumerate(turns))
    return Sample(where, messages=_check_conversation(messages, "messages"))


def _parse_sharegpt(record: dict, where: str) -> Sample:
    turns = _turn_list(record, "conversations")
    messages = tuple(_message(turn, index, "from", "value", SHAREGPT_ROLES) for index, turn in enumerate(turns))
    return Sample(where, messages=_check_conversation(messages, "conversations"))


def _turn_list(record: dict, name: str) -> list:
    if name not in record or record[name] is None:
        present = ", ".join(sorted(map(str, record))) or "none"
        raise BadRecordError(f"missing field {name!r} (fields present: {present})")
    turns = record[name]
    if not isinstance(turns, list):
        raise BadRecordError(f"field {name!r} must be a list of turns, got {type(turns).__name__} {_short(turns)}")
    return turns


def _message(turn: Any, index: int, role_key: str, content_key: str, roles: dict[str, str]) -> Message:
    if not isinstance(turn, dict):
        raise BadRecordError(f"turn {index} must be an object with {role_key!r} and {content_key!r}, got {type(turn).__name__}")
    try:
        role = _string(turn, role_key)
        content = _string(turn, content_key, required=False)
    except BadRecordError as err:
        raise BadRecordError(f"turn {index}: {err}") from None
    if role not in roles:
        raise BadRecordError(f"turn {index}: unknown {role_key} {role!r}; use one of {', '.join(roles)}")
    return Message(roles[role], content)


def _check_conversation(messages: tuple[Message, ...], name: str) -> tuple[Message, ...]:
    if not messages:
        raise BadRecordError(f"field {name!r} is empty")
    first = next((m for m in messages if m.role != "system"), None)
    if first is None or first.role != "user":
        raise BadRecordError(f"{name}: the first non-system turn must be from the user")
    if messages[-1].role != "assistant":
        raise BadRecordError(f"{name}: the last turn must be the assistant's (it is the {messages[-1].role}'s), or there is nothing to learn after it")
    empty = [i for i, m in enumerate(messages) if m.role == "assistant" and not m.content.strip()]
    if empty:
        raise BadRecordError(f"{name}: assistant turn {empty[0]} is empty")
    return messages


PARSERS: dict[str, Callable[[dict, str], Sample]] = {
    "alpaca": _parse_alpaca,
    "dolly": _parse_dolly,
    "chat": _parse_chat,
    "sharegpt": _parse_sharegpt,
    "text": _parse_text,
}
