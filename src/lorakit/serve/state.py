"""What every endpoint of `lorakit serve` shares: the operator's settings, the engine, the metrics and
the event relay, held once on the app (app.state.server) and handed to endpoints as a dependency."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from lorakit.infer.engine import Engine
from lorakit.serve.metrics import ServerMetrics
from lorakit.serve.relay import EventRelay


@dataclass(frozen=True)
class ServeSettings:
    model_name: str  # the base model's id in /v1/models and in requests
    model_dir: str
    api_key: str | None = None
    adapter_root: Path | None = None  # where /v1/load_lora_adapter may read from; None: the endpoint is off
    max_body_bytes: int = 1 << 20
    max_waiting: int = 256  # requests queued beyond the running batch before new ones get 503
    stream_interval: float = 0.0  # seconds a started stream's text may wait to go out with the next steps' (EventRelay)
    runs_root: Path | None = None  # where the workbench may read training runs' metrics.jsonl from; None: off


@dataclass(frozen=True)
class ServerState:
    engine: Engine
    settings: ServeSettings
    metrics: ServerMetrics
    relay: EventRelay

    @classmethod
    def create(cls, engine: Engine, settings: ServeSettings) -> ServerState:
        return cls(engine, settings, ServerMetrics(engine), EventRelay(settings.stream_interval))


async def server_state(request: Request) -> ServerState:
    # async, so FastAPI calls it on the event loop rather than hopping to its thread pool per request
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]
