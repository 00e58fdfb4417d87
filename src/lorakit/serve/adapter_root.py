"""--adapter-root: the one directory clients may load adapters from. Every path a client names is
resolved (symlinks followed) and must stay inside it."""

from __future__ import annotations

from pathlib import Path

from lorakit.serve.protocol import ApiError


def require_root(root: Path | None) -> Path:
    """Where clients may load adapters from; without --adapter-root the load / unload endpoints are off (404)."""
    if root is None:
        raise ApiError(404, "adapter loading is off; start lorakit serve with --adapter-root DIR", code="not_enabled")
    return root


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
