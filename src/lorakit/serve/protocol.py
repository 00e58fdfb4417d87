"""OpenAI's request and response bodies (vLLM's names where OpenAI has none): parsing with one clear
error per bad field, and the JSON the server sends back."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from lorakit.infer.sampling import SamplingParams
from lorakit.lora.routing import MAX_MIX_WEIGHT


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class GenerationRequest:
    """What both endpoints ask of the engine, once parsed."""

    model: str
    adapters: dict[str, float] | None  # lorakit's extension: a weighted mix of adapters
    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    params: SamplingParams
    stream: bool
    include_usage: bool


# Fields lorakit serve does not implement, and the values that ask for nothing.
UNSUPPORTED: dict[str, tuple] = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
                                 "best_of": (None, 1), "tools": (None, []), "logit_bias": (None, {}), "suffix": (None, "")}


def _number(body: dict, key: str, default: float | None, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(key, f"'{key}' must be a number, got {type(value).__name__}")
    if value != value:  # NaN (json.loads reads the token) passes every bound check below
        raise bad(key, f"'{key}' must be a number, got NaN")
    if low is not None and (value < low or (low_open and value == low)):
        raise bad(key, f"'{key}' must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise bad(key, f"'{key}' must be <= {high}, got {value}")
    return value


def _integer(body: dict, key: str, default: int | None, low: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(key, f"'{key}' must be an integer, got {type(value).__name__}")
    if value < low:
        raise bad(key, f"'{key}' must be >= {low}, got {value}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        return tuple(stop)
    raise bad("stop", "'stop' must be a string or a list of at most 16 strings")


def _adapters(body: dict) -> dict[str, float] | None:
    mix = body.get("adapters")
    if mix is None:
        return None
    if not isinstance(mix, dict) or not mix or not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for k, v in mix.items()):
        raise bad("adapters", "'adapters' must be an object of adapter name -> scale, e.g. {\"a\": 0.7, \"b\": 0.3}")
    # The bound is the library's (lora/routing.py says why 100: peft takes any finite weight, negatives
    # included, but past ~100 the answer is noise and 1e38 overflows to inf); checked here too, so the
    # client gets a 400 naming the field before the engine sees the request.
    for name, weight in mix.items():
        # one comparison refuses nan (never <=), +-inf (json.loads reads Infinity / NaN tokens) and
        # integers too large for a float, before float() could overflow
        if not abs(weight) <= MAX_MIX_WEIGHT:
            raise bad("adapters", f"'adapters' weight of {name!r} must be a finite number from -{MAX_MIX_WEIGHT:g} "
                      f"to {MAX_MIX_WEIGHT:g}, got {_shown(weight)}")
    return {k: float(v) for k, v in mix.items()}


def _shown(value: int | float) -> str:
    """A number for an error message: a huge integer as its magnitude, not its hundreds of digits."""
    return f"a {len(str(abs(value)))}-digit integer" if isinstance(value, int) and abs(value) > 10**15 else repr(value)


def parse_request(body: Any, chat: bool) -> GenerationRequest:
    """Check a /v1/completions (chat=False) or /v1/chat/completions body.

    Raises:
        ApiError: 400 naming the first bad field.
    """
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required: the base model's name or an adapter's (GET /v1/models lists them)")
    if _integer(body, "n", 1, 1) != 1:
        raise bad("n", "'n' must be 1; send several requests instead")
    for key, harmless in UNSUPPORTED.items():
        if key in body and body[key] not in harmless:
            raise bad(key, f"'{key}' is not supported by lorakit serve; leave it out")
    prompt, messages = (None, _messages(body)) if chat else (_prompt(body), None)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    max_tokens = _integer(body, "max_completion_tokens", None, 1) if chat else None
    max_tokens = _integer(body, "max_tokens", max_tokens if chat else 16, 1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", "'seed' must be an integer")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0, high=2),
        top_p=_number(body, "top_p", 1.0, low=0, high=1, low_open=True),
        top_k=_top_k(body),
        stop=_stop(body),
        seed=seed,
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    return GenerationRequest(model, _adapters(body), prompt, messages, params, stream, bool(options.get("include_usage")))


def _top_k(body: dict) -> int:
    value = body.get("top_k", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise bad("top_k", "'top_k' must be an integer >= 0 (0 or -1: no limit)")
    return max(value, 0)


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return prompt
    raise bad("prompt", "'prompt' must be a non-empty string or a list of token ids (one prompt per request)")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}]", f"messages[{i}] needs a 'role' of system, user or assistant")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
        out.append({"role": "system" if message["role"] == "developer" else message["role"], "content": content})
    return out


# --- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str | None, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(rid: str, model: str, text: str, finish: str | None, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(rid: str, model: str, chat: bool, piece: str | None, finish: str | None, first: bool = False) -> dict:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": [choice]}
    choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": [choice]}


def text_chunk_sse(rid: str, model: str, chat: bool):
    """A function piece -> the server-sent event of a text chunk, equal to sse(chunk_body(rid, model,
    chat, piece, None)) but with the request's fixed JSON written once: a streamed token costs one
    string escape instead of building and serialising the whole body (every chunk of a completion
    shares one `created`, as OpenAI's do)."""
    marker = "\u0000piece\u0000"
    template = json.dumps(chunk_body(rid, model, chat, marker, None))
    head, tail = template.split(json.dumps(marker))
    head, tail = "data: " + head, tail + "\n\n"
    return lambda piece: head + json.dumps(piece) + tail


def usage_chunk(rid: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
