"""The generation engine: continuous batching at the token level over one base and many adapters.

Between two decode steps the engine admits waiting requests (one prefill for all of them,
right-padded) into free cache slots and drops the finished or cancelled ones, so a short request
never waits for a long one. Every row carries its own adapter (or mix, or none) and its own sampling
settings; tokens are streamed to the request's handle as they are made.

Who runs the steps: the thread that waits for a result (`handle.result()`, iterating a handle,
`engine.generate()`), or one thread running `run_forever()` (a server's main thread). Never a thread of
the engine's own: on a CPU, a second thread issuing torch ops starts a second OpenMP team, and two
teams on the same cores measured 1.5-2x slower per step than one (`bench/generate_throughput.py`).

Memory is bounded: the KV cache holds `max_batch` slots of at most `max_len` positions (its capacity
follows the longest running request, infer/cache.py); a request that finds no free slot waits, and
one that can never fit is refused when submitted.

In the default mode a request's bf16 tokens can depend on what else runs and ran: the batch's shape
changes kernels' rounding, a prompt whose beginning is in the prefix cache (infer/prefix.py) skips its
prefill, and a long run of rows on one adapter switches to merged weights (infer/packed.py).

Batch-invariant mode (`deterministic=True`): a request's tokens do not depend on what else runs.
Prompts are prefilled one at a time at a length that depends on theirs alone (prefill_length), every decode step runs all `max_batch`
rows (idle ones padded) so matrix shapes never change, and attention runs row by row over exactly
the row's own cached tokens."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lorakit.data.chat import render
from lorakit.data.formats import Message
from lorakit.data.templates import has_chat_template
from lorakit.errors import LorakitError
from lorakit.infer.cache import SlotCache
from lorakit.infer.decoder import SlotDecoder
from lorakit.infer.prefix import PrefixCache, block_keys
from lorakit.infer.registry import AdapterRegistry
from lorakit.infer.sampling import SamplingParams, new_generator, next_tokens
from lorakit.infer.text import TextStream
from lorakit.lora.routing import Routing, RowSpec, SlotTable

PREFILL_TOKENS = 4096  # prompt tokens (rows x padded length) admitted in one prefill at most


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens) or "cancelled"
    prompt_tokens: int
    submitted: float
    first_token: float | None
    finished: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """What `Engine.submit` returns: iterate it for text pieces as they come, or call `result()`."""

    def __init__(self, request_id: int, prompt_tokens: int, engine: Engine) -> None:
        self.id = request_id
        self._engine = engine
        self.prompt_tokens = prompt_tokens
        self._events: queue.Queue[str | Completion | Exception] = queue.Queue()
        self._done = threading.Event()
        self._completion: Completion | None = None
        self._error: Exception | None = None
        self.cancelled = False
        self.listener = None  # optional callable(event), called from the stepping thread (servers wake their loop)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating (a client went away); the slot is freed at the next step."""
        self.cancelled = True

    def __iter__(self) -> Iterator[str]:
        while True:
            self._engine.run_until(lambda: not self._events.empty(), None)
            event = self._events.get()
            if isinstance(event, Exception):
                raise event
            if isinstance(event, Completion):
                return
            yield event

    def result(self, timeout: float | None = None) -> Completion:
        if not self._engine.run_until(self._done.is_set, timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion

    def _emit(self, event: str | Completion | Exception) -> None:
        if isinstance(event, Completion):
            self._completion = event
        elif isinstance(event, Exception):
            self._error = event
        self._events.put(event)
        if isinstance(event, (Completion, Exception)):
            self._done.set()
        if self.listener is not None:
            self.listener(event)


@dataclass
class _Row:
    handle: RequestHandle
    prompt: list[int]
    mix: dict[str, float]
    params: SamplingParams
    generator: torch.Generator | None
    stream: TextStream
    submitted: float
    length: int = 0  # tokens in the cache
    pending: int = -1  # the last sampled token, not yet in the cache
    first_token: float | None = None
    generated: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # its prompt's prefix-cache keys (infer/prefix.py)


class Engine:
    """One base model (with a registry of adapters) serving many generation requests at once."""

    def __init__(self, registry: AdapterRegistry, tokenizer: Any, *, max_batch: int = 32, max_len: int = 2048,
                 deterministic: bool = False, prefix_cache_mb: float = 128, compile: bool = False,
                 quantization: str | None = None) -> None:
        """`registry`: the base and its adapters (Engine.from_model builds one). `prefix_cache_mb`: memory
        for the keys and values of prompt blocks shared between requests (infer/prefix.py; 0 turns it off;
        always off in the batch-invariant mode). `compile`: compile the decode step (infer/compiled.py;
        the batch-invariant mode's steps are never compiled). `quantization` ("int8" | "q4_0"): the base's
        projection weights quantized for lorakit's CPU matmuls (infer/packed.py), adapters on top."""
        if not isinstance(registry, AdapterRegistry):
            raise TypeError(f"Engine takes an AdapterRegistry, not {type(registry).__name__}; use Engine.from_model(model, tokenizer)")
        self.registry = registry
        self.tokenizer = tokenizer
        model = registry.causal_lm
        self.decoder = SlotDecoder(model, compile=compile and not deterministic, quantization=quantization)
        context = getattr(model.config, "max_position_embeddings", max_len)
        self.max_len = min(max_len, context)
        self.max_batch = max_batch
        self.deterministic = deterministic
        self.prefixes = PrefixCache(0 if deterministic else int(prefix_cache_mb * 2**20))
        self.cache: SlotCache = self.decoder.allocate(max_batch, self.max_len)
        self.decoder.warm_up(self.cache)  # packs the base weights; compiling: 30-60 s more on the default model, less once cached
        self.eos_ids = _eos_ids(model, tokenizer)
        self.device = self.decoder.inner.embed_tokens.weight.device
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []  # row i lives in cache slot i
        self._admitting: list[_Row] = []  # taken from the queue by the step in flight
        self._wake = threading.Condition()
        self._next_id = 0
        self._drive_lock = threading.Lock()  # one thread steps at a time
        self._owner: threading.Thread | None = None  # the thread in run_forever(), if any
        self.steps = 0
        self._last_routing: tuple[tuple, Routing | None] | None = None

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, *, max_loras: int | None = None, **options: Any) -> Engine:
        """An engine over a transformers model or a LoraModel (its adapters registered), with a registry of
        its own holding at most `max_loras` adapters (None: no cap); `options` as for Engine()."""
        return cls(AdapterRegistry(model, max_loras), tokenizer, **options)

    # --- public API -------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], adapter: RowSpec = None, params: SamplingParams | None = None,
               listener: Callable[[str | Completion | Exception], None] | None = None) -> RequestHandle:
        """Queue one request; returns at once. `adapter`: a name, None / "__base__", or {name: scale}.
        `listener` is called from the engine thread with every event (a server uses it to wake its loop).

        Raises:
            LorakitError: bad sampling settings, an unknown adapter, or a prompt that cannot fit.
        """
        params = (params or SamplingParams()).validate()
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False)) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise LorakitError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_len:
            raise LorakitError(f"the prompt has {len(ids)} tokens but the context holds {self.max_len}; shorten it")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.max_len - len(ids))
        if len(ids) + params.max_tokens > self.max_len:
            raise LorakitError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {self.max_len}; "
                f"lower max_tokens to at most {self.max_len - len(ids)}"
            )
        mix = self.registry.acquire(adapter)
        with self._wake:
            handle = RequestHandle(self._next_id, len(ids), self)
            handle.listener = listener
            self._next_id += 1
            self._waiting.append(_Row(handle, ids, mix, params, new_generator(params), TextStream(self.tokenizer, params.stop), time.perf_counter()))
            self._wake.notify()
        return handle

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, rendered with the tokenizer's chat template, ready for the reply."""
        if not has_chat_template(self.tokenizer):
            raise LorakitError("this tokenizer has no chat template; send a plain prompt instead")
        text = render(self.tokenizer, [Message(m["role"], m["content"]) for m in messages], add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def generate(self, prompts: Sequence[str | Sequence[int]], adapters: Sequence[RowSpec] | None = None,
                 params: SamplingParams | None = None) -> list[Completion]:
        """Run many requests through the engine together and wait for all of them."""
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        handles = [self.submit(p, a, params) for p, a in zip(prompts, adapters)]
        return [h.result() for h in handles]

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self._running), len(self._waiting)

    def close(self, cancel: bool = False) -> None:
        """Finish (or, with `cancel`, cancel) every running and waiting request."""
        with self._wake:
            if cancel:
                for row in [*self._running, *self._waiting]:
                    row.handle.cancel()
            self._wake.notify()
        self.run_until(lambda: not self._running and not self._waiting)

    # --- who runs the steps -------------------------------------------------------------------------
    def run_forever(self, stop: Callable[[], bool]) -> None:
        """Make steps in this thread whenever there is work, until `stop()` is true and no work is left.
        While it runs, waiting on a handle in other threads never steps (they just wait)."""
        self._owner = threading.current_thread()
        try:
            while True:
                with self._wake:
                    if not self._waiting and not self._running:
                        if stop():
                            return
                        self._wake.wait(timeout=0.05)
                        continue
                with self._drive_lock:
                    self._step_safely()
        finally:
            self._owner = None

    def run_until(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Until `ready()`: step from this thread, or wait while another thread steps. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if deadline is not None and time.monotonic() > deadline:
                return False
            if self._owner is not None or not self._drive_lock.acquire(timeout=0.01):
                time.sleep(0.002)
                continue
            try:
                idle = not (self._waiting or self._running)
                if not idle and not ready():
                    self._step_safely()
            finally:
                self._drive_lock.release()
            if idle:
                time.sleep(0.002)  # the result is being delivered by whoever made the last step
        return True

    def _step_safely(self) -> None:
        try:
            with self.registry.lock:
                self.step()
        except Exception as error:  # one bad step must not stop the engine: fail the rows it touched
            touched = self._running + [row for row in self._admitting if row not in self._running]
            for row in touched:  # rows being admitted too: out of the queue, not yet running, never to finish
                self._finish(row, error=error)
            self._running.clear()
            self._admitting = []

    def step(self) -> None:
        """Admit waiting requests, then make one token for every running one."""
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode()
            self.steps += 1

    def _drop_cancelled(self) -> None:
        with self._wake:
            for row in [r for r in self._waiting if r.handle.cancelled]:
                self._waiting.remove(row)
                self._finish(row, "cancelled")
        for row in [r for r in self._running if r.handle.cancelled]:
            self._retire(row, "cancelled")

    def _admit(self) -> None:
        """Prefill the waiting requests that fit; a step that fails on the way fails them too."""
        self._admitting = self._take_waiting()
        if self._admitting:
            self._prefill_new(self._admitting)
        self._admitting = []

    def _take_waiting(self) -> list[_Row]:
        new: list[_Row] = []
        longest = 0
        with self._wake:
            while self._waiting and len(self._running) + len(new) < self.max_batch:
                longest = max(longest, len(self._waiting[0].prompt))
                if new and (longest * (len(new) + 1) > PREFILL_TOKENS or self.deterministic):  # rows x padded length
                    break
                new.append(self._waiting.popleft())
        return new

    def _prefill_new(self, new: list[_Row]) -> None:
        if self.deterministic:
            for row in new:
                self._prefill([row])
            return
        table = self.registry.slot_table()  # read once: it sums every adapter tensor's version counter
        by_start: dict[int, list[_Row]] = {}  # rows whose cached prefixes are equally long prefill together
        for row in new:
            row.block_keys = block_keys(row.prompt, prefix_key(row.mix, table))
            by_start.setdefault(self.prefixes.cached_length(row.prompt, row.block_keys), []).append(row)
        for start, rows in by_start.items():
            self._prefill(rows, start)

    def _prefill(self, rows: list[_Row], start: int = 0) -> None:
        """Prefill `rows` into the next free slots; their first `start` prompt tokens come from the prefix cache."""
        first_slot = len(self._running)
        if start:
            for slot, row in enumerate(rows, first_slot):
                self.prefixes.restore(self.cache, slot, row.block_keys, start)
        longest = min(prefill_length(max(len(r.prompt) for r in rows) - start), self.max_len - start)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row.prompt) - start] = torch.tensor(row.prompt[start:])
        lengths = torch.tensor([len(r.prompt) - start for r in rows])
        logits = self.decoder.prefill(self.cache, first_slot, ids.to(self.device), lengths.to(self.device), self._routing(rows), start)
        if self.prefixes.max_bytes:
            for slot, row in enumerate(rows, first_slot):
                self.prefixes.store(self.cache, slot, row.block_keys, start)
        self._running.extend(rows)
        now = time.perf_counter()
        for row in rows:  # every length first: accepting a token may retire a row and move another
            row.length, row.first_token = len(row.prompt), now
        for row, token in zip(rows, next_tokens(logits, [r.params for r in rows], [r.generator for r in rows])):
            self._accept(row, token)

    def _decode(self) -> None:
        rows = list(self._running)
        pad = self.max_batch - len(rows) if self.deterministic else 0
        tokens = torch.tensor([r.pending for r in rows] + [0] * pad, device=self.device)
        positions = torch.tensor([r.length for r in rows] + [0] * pad, device=self.device)
        logits = self.decoder.decode(self.cache, tokens, positions, self._routing(rows, pad), rowwise=self.deterministic)
        chosen = next_tokens(logits[: len(rows)], [r.params for r in rows], [r.generator for r in rows])
        for row in rows:  # every length first: accepting a token may retire a row and move another
            row.length += 1
        for row, token in zip(rows, chosen):
            self._accept(row, token)

    def _routing(self, rows: list[_Row], pad: int = 0) -> Routing | None:
        """The routing of these rows (the step's metadata, handed to the decoder), reused while the same
        rows run: building it reads every adapter tensor's version counter (~1 ms on 8 adapters of the
        default model), too much for every token. A step that admits or retires rows builds a new one,
        so adapter changes are seen there."""
        key = (tuple(r.handle.id for r in rows), pad, self.registry.version)  # ids never reused
        if self._last_routing is not None and self._last_routing[0] == key:
            return self._last_routing[1]
        specs: list[RowSpec] = [r.mix for r in rows] + [None] * pad
        routing = self.registry.routing(specs, self.device, batch_invariant=self.deterministic)
        self._last_routing = (key, routing)
        return routing

    def _accept(self, row: _Row, token: int) -> None:
        """Record a sampled token: stream its text, or finish the row on EOS / stop / length."""
        if token in self.eos_ids and not row.params.ignore_eos:
            self._retire(row, "stop")
            return
        row.generated.append(token)
        piece = row.stream.add(token)
        if piece:
            row.handle._emit(piece)
        if row.stream.stopped:
            self._retire(row, "stop")
        elif len(row.generated) >= row.params.max_tokens or row.length + 1 >= self.max_len:
            self._retire(row, "length")
        else:
            row.pending = token

    def _retire(self, row: _Row, reason: str) -> None:
        """Take a running row out and keep the running rows in the lowest slots: the last row moves
        into the freed slot (its cache copied), so decode reads slots 0..B-1 as one view."""
        slot = self._running.index(row)
        last = len(self._running) - 1
        if slot != last:
            moved = self._running[last]
            self.cache.move(last, slot, moved.length)
            self._running[slot] = moved
        self._running.pop()
        self._finish(row, reason)

    def _finish(self, row: _Row, reason: str | None = None, error: Exception | None = None) -> None:
        self.registry.release(row.mix)
        if error is not None:
            row.handle._emit(error)
            return
        tail = row.stream.flush()
        if tail:
            row.handle._emit(tail)
        row.handle._emit(Completion(row.stream.text, list(row.generated), reason or "stop", len(row.prompt),
                                    row.submitted, row.first_token, time.perf_counter()))


def prefix_key(mix: dict[str, float], table: SlotTable) -> tuple:
    """What a prompt's keys and values depend on besides its tokens: the adapter mix and the adapters' weights."""
    return tuple(sorted(mix.items())), table.version, table.weights_version


def prefill_length(tokens: int) -> int:
    """The padded length a prefill runs at: a power of two up to 16, then a multiple of 16. oneDNN
    compiles and keeps kernels for every matrix shape it meets: prompts prefilled at their exact
    lengths grew a server's memory by ~13% over 500 varied requests (no tensor was left behind);
    a few lengths keep its kernel cache small, for at most 15 padding tokens (or 2x a tiny prompt)."""
    return 1 << (tokens - 1).bit_length() if tokens <= 16 else -(-tokens // 16) * 16


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple, set)) else [value])
    return ids
