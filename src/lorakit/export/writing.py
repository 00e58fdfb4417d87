"""Writing a GGUF file atomically, and tensors in the GGML types the exports offer.

GGUFWriter writes wherever it is pointed; here it is pointed at a file beside the target, which is
fsynced and renamed over the target only once complete, so a crash never leaves half a GGUF."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from lorakit.errors import LorakitError

# the names users type -> GGML tensor types
TENSOR_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


def tensor_type(name: str, allowed: tuple[str, ...]) -> gguf.GGMLQuantizationType:
    if name not in allowed:
        raise LorakitError(f"GGUF tensor type {name!r} is not offered here; use one of {', '.join(allowed)}")
    return TENSOR_TYPES[name]


def add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, kind: gguf.GGMLQuantizationType) -> None:
    """Store `tensor` (any float dtype, torch layout) as `kind`; rows that Q8_0's 32-wide blocks cannot
    split are stored as F16 instead, as llama.cpp's converter does."""
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] != 0:
        kind = gguf.GGMLQuantizationType.F16
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)


@contextmanager
def atomic_gguf(target: str | os.PathLike, arch: str) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter for `arch`; fill it inside the block, and on leaving it the file is written to a
    temporary name beside `target`, fsynced and renamed into place (nothing is left on an error)."""
    target = Path(target)
    if target.is_dir():
        raise LorakitError(f"{target} is a directory; give the path of the .gguf file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep the file from an Ollama server's user
        os.replace(tmp, target)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
