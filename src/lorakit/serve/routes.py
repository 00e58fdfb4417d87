"""The endpoints of `lorakit serve`: OpenAI's (vLLM's names for adapter loading), each a short function
over the ServerState it is handed. Every request is answered on its own: a bad one gets its error and
the engine keeps serving the others in the same batches."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from lorakit.errors import LorakitError
from lorakit.infer.registry import valid_adapter_name
from lorakit.lora.routing import BASE, RowSpec
from lorakit.serve.adapter_root import inside_root, require_regular_files, require_root
from lorakit.serve.protocol import ApiError, GenerationRequest, bad, new_id, parse_request
from lorakit.serve.replies import Submitted, stream_events, whole_answer
from lorakit.serve.state import ServerState, State

router = APIRouter()


@router.get("/health")
async def health() -> Response:
    return Response(status_code=200)


@router.get("/metrics")
async def prometheus(state: State) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    settings, registry = state.settings, state.engine.registry
    entries = [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "lorakit",
                "root": settings.model_dir, "parent": None}]
    for name in registry.names():
        entries.append({"id": name, "object": "model", "created": 0, "owned_by": "lorakit", "root": registry.info(name).path,
                        "parent": settings.model_name})
    return {"object": "list", "data": entries}


@router.post("/v1/completions")
async def completions(request: Request, state: State) -> Response:
    return await generate(request, state, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State) -> Response:
    return await generate(request, state, chat=True)


@router.post("/v1/load_lora_adapter")
async def load_adapter(request: Request, state: State) -> Response:
    name, path = adapter_fields(await read_json(request, state.settings.max_body_bytes), need_path=True)
    root = require_root(state.settings.adapter_root)
    directory = inside_root(root, path)
    require_regular_files(root, directory)  # a FIFO there would hold the load (and its thread) forever
    try:
        await asyncio.to_thread(state.engine.registry.load, name, directory)
    except LorakitError as error:
        raise ApiError(400, str(error)) from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_adapter(request: Request, state: State) -> Response:
    require_root(state.settings.adapter_root)
    name, _ = adapter_fields(await read_json(request, state.settings.max_body_bytes), need_path=False)
    if name not in state.engine.registry.names():
        raise ApiError(404, f"no adapter named {name!r} is loaded", "not_found_error", "lora_name", "model_not_found")
    try:
        await asyncio.to_thread(state.engine.registry.unload, name)
    except LorakitError as error:
        raise ApiError(400, str(error)) from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


# --- generation ------------------------------------------------------------------------------------
async def generate(request: Request, state: ServerState, chat: bool) -> Response:
    submitted = await submit(request, state, chat)
    if submitted.parsed.stream:
        return StreamingResponse(stream_events(submitted, state.metrics), media_type="text/event-stream")
    return await whole_answer(request, submitted, state.metrics)


async def submit(request: Request, state: ServerState, chat: bool) -> Submitted:
    """Parse the request and hand it to the engine; a refusal is counted in the metrics and raised."""
    endpoint = "chat" if chat else "completions"
    try:
        parsed = parse_request(await read_json(request, state.settings.max_body_bytes), chat)
        spec = resolve_model(parsed, state)
        if state.engine.load[1] >= state.settings.max_waiting:
            raise ApiError(503, "the server is at capacity; retry shortly", "server_error", code="overloaded")
        events: asyncio.Queue = asyncio.Queue()
        handle = state.engine.submit(prompt_ids(parsed, state, chat), spec, parsed.params, state.relay.listener(events))
    except LorakitError as error:
        state.metrics.request_done(endpoint, 400)
        raise ApiError(400, str(error)) from None
    except ApiError as error:
        state.metrics.request_done(endpoint, error.status)
        raise
    return Submitted(handle, events, parsed, new_id("chatcmpl" if chat else "cmpl"), chat)


def prompt_ids(parsed: GenerationRequest, state: ServerState, chat: bool) -> list[int]:
    prompt = state.engine.chat_prompt(parsed.messages) if chat else parsed.prompt
    return state.engine.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else prompt


def resolve_model(parsed: GenerationRequest, state: ServerState) -> RowSpec:
    """The engine's row spec for a request's `model` (and `adapters` mix); unknown names are 404."""
    base, loaded = state.settings.model_name, state.engine.registry.names()
    if parsed.adapters is not None:
        unknown = [n for n in parsed.adapters if n not in loaded]
        if unknown:
            raise ApiError(404, f"adapter {unknown[0]!r} does not exist; loaded: {', '.join(loaded) or 'none'}",
                           "not_found_error", "adapters", "model_not_found")
        if parsed.model not in (base, *loaded):
            raise ApiError(404, f"the model {parsed.model!r} does not exist", "not_found_error", "model", "model_not_found")
        return parsed.adapters
    if parsed.model == base:
        return BASE
    if parsed.model in loaded:
        return parsed.model
    raise ApiError(404, f"the model {parsed.model!r} does not exist; available: {', '.join([base, *loaded])}",
                   "not_found_error", "model", "model_not_found")


# --- request bodies --------------------------------------------------------------------------------
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
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's 4300 digits
        raise bad("body", f"the request body is not valid JSON ({error.msg if hasattr(error, 'msg') else error})") from None


def adapter_fields(body: Any, need_path: bool) -> tuple[str, str]:
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    name, path = body.get("lora_name"), body.get("lora_path")
    if not valid_adapter_name(name):
        raise bad("lora_name", "'lora_name' must use letters, digits, '.', '_' and '-' only")
    if need_path and (not isinstance(path, str) or not path):
        raise bad("lora_path", "'lora_path' is required: a directory inside the server's --adapter-root")
    return name, path or ""
