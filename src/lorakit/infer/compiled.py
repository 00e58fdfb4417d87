"""The decode step compiled by torch.compile (inductor), around lorakit's own projections.

A decode step of a small model is ~30 layers of small tensor ops around its matmuls, and each op costs
microseconds of dispatch whatever its size. Inductor fuses each layer's norms, rotary embedding, cache
writes, softmax and residual adds into a few C++ loops. The matmuls stay lorakit's (infer/packed.py:
prepacked, fused, with each row's adapters): the compiled graph reaches them through one custom op,
`lorakit::project`, which calls the running step's resolved projections by group number. So no graph
holds a weight, and loading an adapter, retraining one or merging weights needs no recompilation; only
new shape classes do (one row over few or many cached positions, several rows).

Measured on the default model, 2-core Zen 4, bf16, with the graphs varying only in rows and cache
span and attention in lorakit's C++ kernel (kernels/decode_attention.py): the 64-request, 16-stream
load through `lorakit serve` 613 tokens/s against 477 eager, in-process 743 against 558. Compiling all
30 layers as one graph ran no faster than chunks of five and took ~4x as long to compile (~130 s
cold), so the decoder compiles a chunk of layers and calls it once per chunk (decoder.COMPILED_LAYERS).
Compiling costs 10-60 s and needs a C++ compiler: `lorakit serve` compiles unless told `--no-compile`;
the library's Engine only with `compile=True` (tests, scripts and one-off generation start at once).
Where compiling fails, decoding stays eager (a warning says so)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from lorakit.infer.packed import StepProjections

_library = torch.library.Library("lorakit", "DEF")
_library.define("project(Tensor x, int group, int width) -> Tensor")


class _Running(threading.local):
    """What `project` reads, as a graph cannot carry it: the step running in this thread (its resolved
    projections and routing) and the first group of the chunk of layers being run, which the graph's
    group numbers count from (so one graph serves every chunk)."""

    step: StepProjections | None = None
    first: int = 0


_running = _Running()


def _project(x: torch.Tensor, group: int, width: int) -> torch.Tensor:
    out = _running.step(_running.first + group, x)
    return out if out.is_contiguous() else out.contiguous()  # graphs are traced with a contiguous output


def _project_shape(x: torch.Tensor, group: int, width: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], width)


_library.impl("project", _project, "CompositeExplicitAutograd")
torch.library.register_fake("lorakit::project", _project_shape, lib=_library)

project = torch.ops.lorakit.project.default


class GraphProjections:
    """The projections as a compiled chunk calls them: group g (from the chunk's first) through
    `lorakit::project`. `routing` is None: compiled chunks hold only gated MLPs, so no layer runs a
    module that would read it."""

    routing = None

    def __init__(self, widths: Sequence[int]) -> None:
        self.widths = list(widths)

    def __call__(self, group: int, x: torch.Tensor) -> torch.Tensor:
        return project(x, group, self.widths[group])


@contextmanager
def running(step: StepProjections) -> Iterator[None]:
    """Make `project` run this step's projections while its compiled chunks run in this thread."""
    saved = (_running.step, _running.first)
    _running.step, _running.first = step, 0
    try:
        yield
    finally:
        _running.step, _running.first = saved


def at_chunk(first_group: int) -> None:
    """Make `project`'s group numbers count from this group (the first of the chunk about to run)."""
    _running.first = first_group
