"""How a submitted request's answer goes back to its client: whole once it completes, or streamed as
server-sent events. A client that goes away cancels its request, so its slot is freed at the next step."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lorakit.infer.engine import Completion, RequestHandle
from lorakit.serve.metrics import ServerMetrics
from lorakit.serve.protocol import ApiError, GenerationRequest, chat_body, chunk_body, completion_body, text_chunk_sse, usage_chunk


@dataclass(frozen=True)
class Submitted:
    """A request the engine has accepted, with what its reply needs."""

    handle: RequestHandle
    events: asyncio.Queue  # filled by the EventRelay: text pieces, then a Completion or an Exception
    parsed: GenerationRequest
    rid: str
    chat: bool

    @property
    def endpoint(self) -> str:  # the metrics' label
        return "chat" if self.chat else "completions"


async def whole_answer(request: Request, submitted: Submitted, metrics: ServerMetrics) -> Response:
    """The completion body once generation ends; 499 (and the request cancelled) if the client left."""
    completion = await wait_for(request, submitted.handle, submitted.events)
    if completion is None:
        metrics.request_done(submitted.endpoint, 499)
        return Response(status_code=499)
    metrics.completed(submitted.endpoint, completion)
    make = chat_body if submitted.chat else completion_body
    return JSONResponse(make(submitted.rid, submitted.parsed.model, completion.text, finish(completion),
                             completion.prompt_tokens, completion.completion_tokens))


async def stream_events(submitted: Submitted, metrics: ServerMetrics) -> AsyncIterator[str]:
    """The answer as server-sent events: OpenAI's chunks, the usage chunk if asked, then [DONE]."""
    rid, model, chat = submitted.rid, submitted.parsed.model, submitted.chat
    text_sse = text_chunk_sse(rid, model, chat)
    try:
        if chat:
            yield sse(chunk_body(rid, model, chat, None, None, first=True))
        while True:
            event, text = await next_events(submitted.events)
            if text:
                yield text_sse(text)
            if event is None:
                continue
            if isinstance(event, Exception):
                yield sse(ApiError(500, f"generation failed: {event}", "server_error").body())
                metrics.request_done(submitted.endpoint, 500)
                break
            if isinstance(event, Completion):
                yield sse(chunk_body(rid, model, chat, None, finish(event)))
                if submitted.parsed.include_usage:
                    yield sse(usage_chunk(rid, model, chat, event.prompt_tokens, event.completion_tokens))
                metrics.completed(submitted.endpoint, event)
                break
        yield "data: [DONE]\n\n"
    finally:
        submitted.handle.cancel()  # a client that disconnects frees its slot at the next step (no-op once finished)


async def wait_for(request: Request, handle: RequestHandle, events: asyncio.Queue) -> Completion | None:
    """The request's completion, or None if the client disconnects first (its slot is then freed)."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                handle.cancel()
                return None
            continue
        if isinstance(event, Exception):
            raise ApiError(500, f"generation failed: {event}", "server_error")
        if isinstance(event, Completion):
            return event


async def next_events(events: asyncio.Queue) -> tuple[Completion | Exception | None, str]:
    """Wait for the request's next event; text pieces already queued behind it (the client or the loop
    fell behind the engine) are joined into one chunk, so a busy server sends fewer, larger chunks.
    Returns (the first event that is not text, or None; the joined text)."""
    event = await events.get()
    pieces = []
    while isinstance(event, str):
        pieces.append(event)
        if events.empty():
            return None, "".join(pieces)
        event = events.get_nowait()
    return event, "".join(pieces)


def finish(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
