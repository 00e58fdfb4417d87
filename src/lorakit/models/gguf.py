"""GGUF files as models: converted once into a plain safetensors model directory under the cache.

transformers reads a GGUF file (dequantizing every tensor) but refuses to save such a model, and the
parse costs tens of seconds for a 135M-parameter file. So a GGUF is converted once, weights and
tokenizer, into `$LORAKIT_CACHE/gguf/<stem>-<key>/`, and every later load reads that directory. A
user's file is keyed by its resolved path, size and modification time (hashing gigabytes on every
load would cost more than it saves): an edited or replaced file converts again."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.io import atomic_directory, file_kind

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    """`$LORAKIT_CACHE`, else `~/.cache/lorakit`."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def is_gguf_name(name: str | os.PathLike) -> bool:
    """True for a model name that names a GGUF file (by its suffix), whether or not it exists."""
    return str(name).lower().endswith(GGUF_SUFFIX)


def gguf_model_dir(path: str | os.PathLike) -> Path:
    """The converted model directory of a user's GGUF file, converting it on first use.

    Raises:
        LorakitError: no such file, not a regular file, not a GGUF file, or a GGUF transformers cannot
            read as a causal LM (its architecture is named).
    """
    source = check_gguf_file(Path(path).expanduser())
    info = source.stat()
    key = hashlib.blake2b(f"{source.resolve()}\0{info.st_size}\0{info.st_mtime_ns}".encode(), digest_size=8).hexdigest()
    target = cache_root() / "gguf" / f"{source.stem}-{key}"
    if not (target / "config.json").is_file():
        with atomic_directory(target) as staging:
            convert_gguf(source, staging, source.stem)
    return target


def check_gguf_file(path: Path) -> Path:
    """`path` if it is a regular file that starts with GGUF's magic bytes."""
    if not path.exists():
        raise LorakitError(f"GGUF file {path} does not exist; check the path given as the model name")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise LorakitError(f"{path} is {file_kind(mode)}, not a GGUF file; name a .gguf model file")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise LorakitError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r}); name a .gguf model file")
    return path


def convert_gguf(source: Path, out_dir: Path, name: str) -> None:
    """Write the GGUF's model (fp32 weights, as safetensors) and tokenizer into `out_dir`.

    GGUF-loaded models refuse save_pretrained, so the dequantized weights are copied into a plain
    model built from the same config.

    Raises:
        LorakitError: transformers cannot read the file as a causal LM (an unsupported architecture).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # here: seconds of import, needed once per cache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32,
                                                          local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LorakitError(f"transformers cannot read {source} as a causal LM ({reason}); "
                           "use a GGUF of an architecture transformers supports, or a model directory") from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: the directory is a plain model
    config.name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
