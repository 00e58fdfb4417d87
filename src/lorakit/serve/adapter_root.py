"""--adapter-root: the one directory clients may load adapters from. Every path a client names is
resolved (symlinks followed) and must stay inside it, and the adapter's files must be regular files."""

from __future__ import annotations

import stat
from pathlib import Path

from lorakit.io import file_kind
from lorakit.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME
from lorakit.serve.protocol import ApiError, bad

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


def require_regular_files(root: Path, directory: Path) -> None:
    """The adapter's files in `directory` (inside_root's answer) must be regular files inside the root.

    Reading a FIFO blocks until something writes to it, and a load waits for its files: refused here
    with a 400 naming the file before the registry sees the directory (the reader refuses one swapped
    in after this check too). A missing file is left to the registry, whose message says what to do."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        require_regular(root.resolve(), directory / name)


def require_regular(root: Path, path: Path) -> None:
    shown = path.relative_to(root)
    resolved = resolved_inside(root, path, shown)
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise bad("lora_path", f"{shown} in the adapter root cannot be read ({error.strerror}); make it readable by the server") from None
    if not stat.S_ISREG(mode):
        raise bad("lora_path", f"{shown} in the adapter root is not a regular file ({file_kind(mode)}); replace it with the file "
                  "save_pretrained wrote")


def resolved_inside(root: Path, path: Path, shown: Path) -> Path:
    """`path` with its symlinks followed, which must stay inside the root (403 otherwise, as for lora_path)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise bad("lora_path", f"{shown} in the adapter root is a symlink loop; replace it with the file save_pretrained wrote") from None
    if not resolved.is_relative_to(root):
        raise ApiError(403, f"{shown} links outside the adapter root {root}; copy the file into the adapter's directory",
                       "permission_error", "lora_path")
    return resolved
