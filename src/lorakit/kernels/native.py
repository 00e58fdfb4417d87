"""lorakit's C++ kernels (csrc/*.cpp), built together on first use for this machine.

torch.utils.cpp_extension compiles every source into one library (~10 s, once; cached under
~/.cache/torch_extensions and rebuilt when a source changes) that registers its operators with torch
(`torch.ops.lorakit_kernels`, `torch.ops.lorakit_lora`). Building needs a C++ compiler and ninja;
where either is missing, `build` says why once and returns False, and each caller keeps its torch
path. The library is compiled with -march=native, so its name carries the CPU's model and flags: a
cache shared between machines never runs another machine's code."""

from __future__ import annotations

import hashlib
import platform
import warnings
from pathlib import Path

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]  # built where it runs: the machine's own vector units

_built: bool | None = None  # None: not tried yet
_failure: str | None = None


def build() -> bool:
    """Build and load the kernels once per process; False (after one warning) where that fails."""
    global _built, _failure
    if _built is not None:
        return _built
    try:
        from torch.utils.cpp_extension import load

        machine = hashlib.sha1(f"{platform.machine()} {_cpu_model()} {FLAGS}".encode()).hexdigest()[:8]
        load(name=f"lorakit_kernels_{machine}", sources=[str(s) for s in SOURCES], extra_cflags=FLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        _built = True
    except Exception as error:  # no compiler, no ninja, an unusual platform
        _failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"building lorakit's C++ kernels failed ({_failure}); decoding uses torch's batched matmuls instead",
                      stacklevel=3)
        _built = False
    return _built


def _cpu_model() -> str:
    """The CPU's model name and instruction-set flags (a VM can hide flags of the same model)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")]
    return " ".join(wanted) or platform.processor()
