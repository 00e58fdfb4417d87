"""lorakit's C++ kernels (csrc/*.cpp), built together on first use for this machine.

torch.utils.cpp_extension compiles every source into one library (~10 s, once; cached under
~/.cache/torch_extensions and rebuilt when a source changes) whose operators register under
`torch.ops.lorakit_kernels`. Building needs a C++ compiler and ninja; where either is missing, `ops`
says why once and returns None, and each caller keeps its torch path. The library is compiled with
-march=native, so its name carries the CPU's model and flags: a cache shared between machines never
runs another machine's code. A portable build (no -march=native, so none of the AVX-512 paths; its
own namespace, so both load in one process) lets tests check the plain C++ loops other CPUs run."""

from __future__ import annotations

import hashlib
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
FLAGS = ["-O3", "-ffast-math", "-fopenmp"]
NATIVE = ["-march=native"]  # built where it runs: the machine's own vector units
NAMESPACE = "lorakit_kernels"

_built: dict[bool, bool] = {}  # portable -> built (absent: not tried yet)


def ops(portable: bool = False) -> Any | None:
    """`torch.ops.lorakit_kernels` (or the portable build's namespace), built and loaded once per
    process; None (after one warning) where building fails."""
    if portable not in _built:
        _built[portable] = _build(portable)
    return getattr(torch.ops, namespace(portable)) if _built[portable] else None


def namespace(portable: bool = False) -> str:
    return f"{NAMESPACE}_portable" if portable else NAMESPACE


def _build(portable: bool) -> bool:
    flags = FLAGS + ([f"-DLORAKIT_NAMESPACE={namespace(True)}"] if portable else NATIVE)
    try:
        from torch.utils.cpp_extension import load

        machine = "portable" if portable else hashlib.sha1(f"{platform.machine()} {_cpu_model()} {flags}".encode()).hexdigest()[:8]
        load(name=f"lorakit_kernels_{machine}", sources=[str(s) for s in SOURCES], extra_cflags=flags,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return True
    except Exception as error:  # no compiler, no ninja, an unusual platform
        failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"building lorakit's C++ kernels failed ({failure}); decoding uses torch's batched matmuls instead",
                      stacklevel=3)
        return False


def _cpu_model() -> str:
    """The CPU's model name and instruction-set flags (a VM can hide flags of the same model)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")]
    return " ".join(wanted) or platform.processor()
