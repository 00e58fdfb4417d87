"""The HTTP application of `lorakit serve`: OpenAI's endpoints (vLLM's names for adapter loading) over
one generation engine. Every request is answered on its own: a bad one gets its error and the engine
keeps serving the others in the same batches."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from lorakit.errors import LorakitError
from lorakit.infer.engine import Completion, Engine, RequestHandle
from lorakit.infer.registry import valid_adapter_name
from lorakit.lora.routing import BASE
from lorakit.serve.metrics import ServerMetrics
from lorakit.serve.protocol import (ApiError, GenerationRequest, bad, chat_body, chunk_body, completion_body, new_id,
                                    parse_request, text_chunk_sse, usage_chunk)


@dataclass(frozen=True)
class ServeSettings:
    model_name: str  # the base model's id in /v1/models and in requests
    model_dir: str
    api_key: str | None = None
    adapter_root: Path | None = None  # where /v1/load_lora_adapter may read from; None: the endpoint is off
    max_body_bytes: int = 1 << 20
    max_waiting: int = 256  # requests queued beyond the running batch before new ones get 503
    stream_interval: float = 0.0  # seconds a started stream's text may wait to go out with the next steps' (EventRelay)


class EventRelay:
    """Hands engine events (made in the stepping thread) to the requests' asyncio queues with one event
    loop wake-up per burst instead of one per event: a 16-row decode step makes 16 events at once, and
    each wake-up is a system call plus a loop iteration competing with the engine for the same cores.

    Text for a stream that has had its first piece waits up to `interval` seconds for the next steps'
    pieces, so a busy server sends (and its clients parse) fewer, larger chunks: on 2 cores every
    millisecond of HTTP work steals one from the engine's threads. A request's first piece and its final
    event go at once. Nothing waits long: rows that still run post at every step, and rows that stop
    post their final event."""

    def __init__(self, interval: float = 0.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._scheduled = False
        self._last = 0.0  # when the last delivery was scheduled (time.monotonic)
        self._started: set[int] = set()  # ids of the queues that have had their first piece
        self.loop: asyncio.AbstractEventLoop | None = None

    def listener(self, queue: asyncio.Queue):
        self.loop = self.loop or asyncio.get_running_loop()
        return lambda event: self._post(queue, event)

    def _post(self, queue: asyncio.Queue, event: object) -> None:
        now = time.monotonic()
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            urgent = not isinstance(event, str) or id(queue) not in self._started
            if not urgent and now - self._last < self.interval:
                return  # the next step's events bring it
            self._scheduled, self._last = True, now
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
            for queue, event in pending:
                if isinstance(event, str):
                    self._started.add(id(queue))
                else:
                    self._started.discard(id(queue))  # its last event: the id may be reused
        for queue, event in pending:
            queue.put_nowait(event)


def build_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    metrics = ServerMetrics(engine)
    relay = EventRelay(settings.stream_interval)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has stopped accepting and waited for open requests; cancel what is left and stop the loop.
        await asyncio.to_thread(engine.close, True)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if settings.api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):  # constant time
                error = ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", "authentication_error",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entries = [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "lorakit",
                    "root": settings.model_dir, "parent": None}]
        for name in engine.registry.names():
            info = engine.registry.info(name)
            entries.append({"id": name, "object": "model", "created": 0, "owned_by": "lorakit", "root": info.path,
                            "parent": settings.model_name})
        return {"object": "list", "data": entries}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def generate(request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            parsed = parse_request(await read_json(request, settings.max_body_bytes), chat)
            spec = resolve_model(parsed, engine, settings)
            if engine.load[1] >= settings.max_waiting:
                raise ApiError(503, "the server is at capacity; retry shortly", "server_error", code="overloaded")
            prompt = engine.chat_prompt(parsed.messages) if chat else parsed.prompt
            if isinstance(prompt, str):
                prompt = engine.tokenizer.encode(prompt, add_special_tokens=True)
            events: asyncio.Queue = asyncio.Queue()
            handle = engine.submit(prompt, spec, parsed.params, relay.listener(events))
        except LorakitError as error:
            metrics.request_done(endpoint, 400)
            raise ApiError(400, str(error)) from None
        except ApiError as error:
            metrics.request_done(endpoint, error.status)
            raise
        rid = new_id("chatcmpl" if chat else "cmpl")
        if parsed.stream:
            return StreamingResponse(stream_events(request, handle, events, parsed, rid, chat, endpoint),
                                     media_type="text/event-stream")
        completion = await wait_for(request, handle, events)
        if completion is None:  # the client went away
            metrics.request_done(endpoint, 499)
            return Response(status_code=499)
        metrics.completed(endpoint, completion)
        make = chat_body if chat else completion_body
        return JSONResponse(make(rid, parsed.model, completion.text, finish(completion), completion.prompt_tokens,
                                 completion.completion_tokens))

    async def stream_events(request: Request, handle: RequestHandle, events: asyncio.Queue, parsed: GenerationRequest,
                            rid: str, chat: bool, endpoint: str) -> AsyncIterator[str]:
        text_sse = text_chunk_sse(rid, parsed.model, chat)
        try:
            if chat:
                yield sse(chunk_body(rid, parsed.model, chat, None, None, first=True))
            while True:
                event, text = await next_events(events)
                if text:
                    yield text_sse(text)
                if event is None:
                    continue
                if isinstance(event, Exception):
                    yield sse(ApiError(500, f"generation failed: {event}", "server_error").body())
                    metrics.request_done(endpoint, 500)
                    break
                if isinstance(event, Completion):
                    yield sse(chunk_body(rid, parsed.model, chat, None, finish(event)))
                    if parsed.include_usage:
                        yield sse(usage_chunk(rid, parsed.model, chat, event.prompt_tokens, event.completion_tokens))
                    metrics.completed(endpoint, event)
                    break
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # a client that disconnects frees its slot at the next step (no-op once finished)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> Response:
        body = await read_json(request, settings.max_body_bytes)
        name, path = adapter_fields(body, need_path=True)
        directory = inside_root(adapter_root(settings), path)
        try:
            await asyncio.to_thread(engine.registry.load, name, directory)
        except LorakitError as error:
            raise ApiError(400, str(error)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request) -> Response:
        adapter_root(settings)
        body = await read_json(request, settings.max_body_bytes)
        name, _ = adapter_fields(body, need_path=False)
        if name not in engine.registry.names():
            raise ApiError(404, f"no adapter named {name!r} is loaded", "not_found_error", "lora_name", "model_not_found")
        try:
            await asyncio.to_thread(engine.registry.unload, name)
        except LorakitError as error:
            raise ApiError(400, str(error)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


# --- helpers ---------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refused beyond `limit` bytes (413) before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad("body", f"the request body is not valid JSON ({error.msg if hasattr(error, 'msg') else error})") from None


def resolve_model(parsed: GenerationRequest, engine: Engine, settings: ServeSettings):
    """The engine's row spec for a request's `model` (and `adapters` mix); unknown names are 404."""
    loaded = engine.registry.names()
    if parsed.adapters is not None:
        unknown = [n for n in parsed.adapters if n not in loaded]
        if unknown:
            raise ApiError(404, f"adapter {unknown[0]!r} does not exist; loaded: {', '.join(loaded) or 'none'}",
                           "not_found_error", "adapters", "model_not_found")
        if parsed.model not in (settings.model_name, *loaded):
            raise ApiError(404, f"the model {parsed.model!r} does not exist", "not_found_error", "model", "model_not_found")
        return parsed.adapters
    if parsed.model == settings.model_name:
        return BASE
    if parsed.model in loaded:
        return parsed.model
    raise ApiError(404, f"the model {parsed.model!r} does not exist; available: {', '.join([settings.model_name, *loaded])}",
                   "not_found_error", "model", "model_not_found")


def adapter_fields(body: Any, need_path: bool) -> tuple[str, str]:
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    name, path = body.get("lora_name"), body.get("lora_path")
    if not valid_adapter_name(name):
        raise bad("lora_name", "'lora_name' must use letters, digits, '.', '_' and '-' only")
    if need_path and (not isinstance(path, str) or not path):
        raise bad("lora_path", "'lora_path' is required: a directory inside the server's --adapter-root")
    return name, path or ""


def adapter_root(settings: ServeSettings) -> Path:
    """Where clients may load adapters from; without --adapter-root the load / unload endpoints are off (404)."""
    if settings.adapter_root is None:
        raise ApiError(404, "adapter loading is off; start lorakit serve with --adapter-root DIR", code="not_enabled")
    return settings.adapter_root


def inside_root(root: Path, path: str) -> Path:
    """`path` resolved (symlinks followed) and required to stay inside the operator's adapter root."""
    root = root.resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root) or resolved == root:
        raise ApiError(403, f"'lora_path' must be a directory inside the adapter root {root}", "permission_error", "lora_path")
    if not resolved.is_dir():
        raise ApiError(404, f"no adapter directory at {path!r} inside the adapter root", "not_found_error", "lora_path")
    return resolved


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
