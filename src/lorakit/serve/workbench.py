"""The workbench: a web page at `/` over the server's own endpoints (chat, side-by-side answers, adapter
load / unload), and the two routes it needs of its own, for training runs under --runs-root.

The page and its files are static (serve/static/, no build step, nothing fetched from the network) and
need no key, as /health does; everything they do goes through /v1, so the API key check covers it. The
runs routes read only metrics.jsonl files inside --runs-root, symlinks followed, and are off without it."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from lorakit.io import file_kind
from lorakit.serve.protocol import ApiError, bad
from lorakit.serve.state import State

router = APIRouter()

STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
"""The page's files (served by name: no path from a client ever reaches the file system)."""

METRICS_FILE = "metrics.jsonl"  # train/metrics.py's file (serve does not import the training stack)
MAX_METRICS_BYTES = 64 << 20
SCAN_DEPTH = 3  # run directories found at most this far below the runs root
SKIPPED = {"adapter", "checkpoints", "runs"}  # inside a run: its outputs, never runs of their own


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return static_file("index.html")


@router.get("/workbench/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in STATIC:
        raise ApiError(404, f"no workbench file {name!r}", "not_found_error")
    return static_file(name)


def static_file(name: str) -> Response:
    body = resources.files("lorakit.serve").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


@router.get("/v1/runs")
async def runs(state: State) -> dict[str, Any]:
    """The run directories (those holding a metrics.jsonl) under --runs-root, newest first."""
    root = require_runs_root(state.settings.runs_root)
    found = await asyncio.to_thread(find_runs, root)
    return {"root": str(root), "runs": found}


@router.get("/v1/runs/metrics")
async def run_metrics(state: State, path: str = "") -> dict[str, Any]:
    """A run's metrics.jsonl as a list of records (a line still being written is left for the next poll)."""
    root = require_runs_root(state.settings.runs_root)
    metrics = metrics_file(root, path)
    records, updated = await asyncio.to_thread(read_records, metrics)
    return {"path": path, "records": records, "updated": updated}


def require_runs_root(root: Path | None) -> Path:
    if root is None:
        raise ApiError(404, "the runs view is off; start lorakit serve with --runs-root DIR (training output directories "
                       "under it)", code="not_enabled")
    return root.resolve()


def inside_runs_root(root: Path, path: str) -> Path:
    """A client's run path resolved (symlinks followed) and required to stay inside the runs root (403)."""
    resolved = (root / path).resolve()  # an absolute `path` replaces root here, and is checked like any other
    if not resolved.is_relative_to(root):
        raise ApiError(403, f"'path' must be a run directory inside the runs root {root}", "permission_error", "path")
    return resolved


def metrics_file(root: Path, path: str) -> Path:
    """The run's metrics.jsonl: inside the root after its own symlinks too, and a regular file (a FIFO
    would hold the reading thread forever)."""
    directory = inside_runs_root(root, path)
    metrics = inside_runs_root(root, str(directory / METRICS_FILE))
    try:
        mode = metrics.stat().st_mode
    except FileNotFoundError:
        raise ApiError(404, f"no {METRICS_FILE} in {path or '.'!r} under the runs root; pick a training output_dir",
                       "not_found_error", "path") from None
    except OSError as error:
        raise bad("path", f"{METRICS_FILE} in {path!r} cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise bad("path", f"{METRICS_FILE} in {path!r} is not a regular file ({file_kind(mode)})")
    if os.stat(metrics).st_size > MAX_METRICS_BYTES:
        raise ApiError(413, f"{METRICS_FILE} in {path!r} is over {MAX_METRICS_BYTES >> 20} MiB", code="too_large", param="path")
    return metrics


def read_records(path: Path) -> tuple[list[dict[str, Any]], float]:
    """The file's complete JSON lines; a partial last line (training is appending it) is skipped."""
    # O_NONBLOCK: a FIFO swapped in after metrics_file's check opens at once instead of waiting for a writer
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise bad("path", f"{path.name} is not a regular file ({file_kind(info.st_mode)})")
        data, updated = handle.read(MAX_METRICS_BYTES), info.st_mtime
    records = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, updated


def find_runs(root: Path) -> list[dict[str, Any]]:
    """Directories under `root` (itself included, symlinks not followed) holding a metrics.jsonl file."""
    found = []
    for directory, subdirs, files in os.walk(root):
        depth = len(Path(directory).relative_to(root).parts)
        subdirs[:] = [] if depth >= SCAN_DEPTH else sorted(d for d in subdirs if not d.startswith(".") and d not in SKIPPED)
        if METRICS_FILE not in files:
            continue
        info = os.stat(Path(directory) / METRICS_FILE, follow_symlinks=False)
        if stat.S_ISREG(info.st_mode):  # a link (out of the root, maybe) or a FIFO is no run to offer
            relative = Path(directory).relative_to(root).as_posix()
            found.append({"path": "" if relative == "." else relative, "updated": info.st_mtime})
    return sorted(found, key=lambda run: -run["updated"])
