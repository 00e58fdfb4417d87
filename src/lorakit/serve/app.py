"""The HTTP application of `lorakit serve`: the endpoints (routes.py) over one generation engine, behind
the API key check, with OpenAI-shaped errors and the engine closed when the server stops."""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lorakit.infer.engine import Engine
from lorakit.serve.protocol import ApiError
from lorakit.serve.relay import EventRelay
from lorakit.serve import workbench
from lorakit.serve.routes import router
from lorakit.serve.state import ServerState, ServeSettings

__all__ = ["EventRelay", "ServeSettings", "build_app"]


def build_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState.create(engine, settings)
    app.add_exception_handler(ApiError, api_error)
    app.middleware("http")(authenticate)
    app.include_router(router)
    app.include_router(workbench.router)  # the web page at / and its runs view
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # uvicorn has stopped accepting and waited for open requests; cancel what is left and stop the loop.
    await asyncio.to_thread(app.state.server.engine.close, True)


async def api_error(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """/v1 needs 'Authorization: Bearer <key>' when the server has a key; /health and /metrics never do."""
    key = request.app.state.server.settings.api_key
    if key is not None and request.url.path.startswith("/v1"):
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):  # constant time
            error = ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", "authentication_error",
                             code="invalid_api_key")
            return JSONResponse(error.body(), status_code=401)
    return await call_next(request)
