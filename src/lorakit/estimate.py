"""`estimate`: memory and size of full fine-tuning, LoRA and QLoRA for a model, from its config.json.

No weight is read. The model is built on PyTorch's meta device (shapes, no storage), which gives the
exact parameter count and linear-layer shapes of any transformers architecture. Activation memory
is measured the same way: the decoder runs once on meta tensors under autograd's saved-tensor hooks,
so what backward keeps per layer is counted from the architecture's real code, not from a formula.

What the columns assume (lorakit's training step, on the CPU):
  full   every weight trainable: fp32 master weights, fp32 gradients, AdamW moments, bf16 autocast
         (whose bf16 copies of the weights live through the step); no checkpointing.
  lora   frozen base in bf16, adapters (and their gradients, moments) in fp32; no checkpointing.
  qlora  frozen base NF4 + double quantization (norms fp32, rest bf16), adapters as in lora;
         activation checkpointing per decoder layer (prepare_model_for_kbit_training's default).
The head loss is lorakit's chunked one (512 positions at a time, the full logits never exist).
Training peak = framework + weights + optimizer state + max(activations at the end of the forward,
gradients at the end of the backward). Loading peak = framework + the checkpoint's pages (read through
a memory map) + what is built from them; quantizing on load touches the whole file, so for QLoRA on a
bf16 checkpoint the loading peak can be the process's peak. Measured on the CPU
(bench/qlora_memory.py) the estimates land within ~5% of the four runs its two constants were fitted
to; glibc's heap retention is the main thing modelled only roughly.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from lorakit.errors import LorakitError

FRAMEWORK_BYTES = 450_000_000
"""Resident memory of a Python process with torch, transformers and bitsandbytes imported (CPU)."""
RECOMPUTE_FACTOR = 8
"""Under checkpointing, backward holds a recomputed layer's saved tensors, their gradients and the
recompute's own temporaries (dequantized weights, fp32 gradient buffers) at once: about 8x the
layer's saved tensors, fitted with HEAP_RETENTION to measured peaks (bench/qlora_memory.py: 135M and
1.1B Llamas, bf16 and nf4, 4 x 512; all four within 5%)."""
HEAP_RETENTION = {"glibc": 1.15, "mmap": 1.0}
"""Resident bytes per byte of live activations. glibc, left as it is (as `lorakit train` leaves it),
serves activations from its heap after the first large free and keeps some of what is freed (1.15x,
fitted as above; it was ~1.6x before the head loss reused its chunk buffers). With a fixed 1 MB mmap
threshold (lorakit.train.malloc) freed activations go back to the OS and RSS tracks what is live."""
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256


@dataclass
class Column:
    """One way of training: what it keeps in memory and what it writes."""

    name: str
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    checkpointing: bool
    saved_file: int
    loading: int
    """Resident memory while the base loads: the checkpoint file's pages, read through a memory map,
    plus whatever is built from them (a cast or quantized copy)."""
    framework: int = FRAMEWORK_BYTES

    @property
    def training_peak(self) -> int:
        return self.framework + self.weights + self.optimizer + max(self.activations, self.gradients)

    @property
    def loading_peak(self) -> int:
        return self.framework + self.loading

    @property
    def peak_bytes(self) -> int:
        """The process's peak resident memory: the larger of loading and training."""
        return max(self.training_peak, self.loading_peak)


@dataclass
class Estimate:
    model: str
    architecture: str
    total_params: int
    quantizable_params: int
    lora_params: int
    r: int
    target_modules: list[str] | str
    tokens: int
    weights_by_format: dict[str, int]
    columns: dict[str, Column]
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        cols = list(self.columns.values())
        head = f"| | {' | '.join(c.name for c in cols)} |"
        rows = [
            ("trainable parameters", [f"{c.trainable:,d}" for c in cols]),
            ("weights", [human(c.weights) for c in cols]),
            ("gradients", [human(c.gradients) for c in cols]),
            ("optimizer state (AdamW)", [human(c.optimizer) for c in cols]),
            ("activations (batch)", [human(c.activations) + (" (ckpt)" if c.checkpointing else "") for c in cols]),
            ("framework", [human(c.framework) for c in cols]),
            ("peak while training", [human(c.training_peak) for c in cols]),
            ("peak while loading", [human(c.loading_peak) for c in cols]),
            ("**peak memory**", [f"**{human(c.peak_bytes)}**" for c in cols]),
            ("saved on disk", [human(c.saved_file) for c in cols]),
        ]
        lines = [
            f"{self.model}: {self.architecture}, {self.total_params:,d} parameters "
            f"({self.quantizable_params:,d} in quantizable linear layers)",
            f"LoRA r={self.r} on {self.target_modules}: {self.lora_params:,d} adapter parameters; batch of {self.tokens:,d} tokens",
            "",
            "weights by storage format: " + ", ".join(f"{k} {human(v)}" for k, v in self.weights_by_format.items()),
            "",
            head,
            "|" + "---|" * (len(cols) + 1),
        ]
        lines += [f"| {label} | {' | '.join(values)} |" for label, values in rows]
        return "\n".join(lines + [""] + self.notes)


def human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# --- weights ---------------------------------------------------------------------------------------
def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Packed 4-bit codes plus block scales: one absmax per 64 weights, itself 8-bit with an fp32
    scale per 256 blocks under double quantization (bitsandbytes' layout), plus the code tables."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if double_quant:
        scales = blocks + 4 * math.ceil(blocks / NF4_SCALE_BLOCK) + 256 * 4 + 4
    else:
        scales = 4 * blocks
    return math.ceil(numel / 2) + scales + 16 * 4


def int8_bytes(weight_shape: torch.Size) -> int:
    return weight_shape.numel() + 4 * weight_shape[0]  # codes + one fp32 absmax per row


def weights_by_format(params: int, quantizable: list[nn.Linear]) -> dict[str, int]:
    """Model weights stored fp32 / bf16 / int8 / nf4+dq; quantized formats keep the rest in bf16."""
    q_numel = sum(m.weight.numel() for m in quantizable)
    rest = 2 * (params - q_numel)
    return {
        "fp32": 4 * params,
        "bf16": 2 * params,
        "int8": rest + sum(int8_bytes(m.weight.shape) for m in quantizable),
        "nf4+dq": rest + sum(nf4_bytes(m.weight.numel()) for m in quantizable),
    }


# --- the model on the meta device -----------------------------------------------------------------
def load_config(model: str | os.PathLike):
    from transformers import AutoConfig

    from lorakit.models.load import resolve_model_dir

    path = Path(model)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    directory = path if (path / "config.json").is_file() else resolve_model_dir(model)
    return AutoConfig.from_pretrained(str(directory), local_files_only=True)


def meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.requires_grad_(False)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise LorakitError(f"{type(model).__name__} has no list of decoder layers; lorakit estimate handles decoder-only LMs")
    return max(lists, key=len)


class SavedTensorMeter:
    """Bytes autograd keeps for backward, per decoder layer (None: outside the layers), each storage
    counted once; parameters are not activations and are left out."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.by_layer: dict[int | None, int] = {}
        self.seen: set[int] = set()
        self.alive: list[torch.Tensor] = []
        self.current: int | None = None
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=index: setattr(self, "current", i)))
            self.handles.append(layer.register_forward_hook(lambda m, a, o: setattr(self, "current", None)))

    def add(self, tensor: torch.Tensor, nbytes: int | None = None, key: int | None = None) -> None:
        base = tensor._base if tensor._base is not None else tensor
        if isinstance(base, nn.Parameter):
            return
        key = key if key is not None else id(base)
        if key in self.seen:
            return
        self.seen.add(key)
        self.alive.append(base)  # keeps ids unique: a freed tensor's id could be reused by a new one
        size = nbytes if nbytes is not None else base.numel() * base.element_size()
        self.by_layer[self.current] = self.by_layer.get(self.current, 0) + size

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure_decoder(model: nn.Module, batch: int, seq_len: int, lora_targets: Sequence[nn.Module], r: int,
                    device: str = "meta") -> tuple[list[int], int]:
    """(saved bytes per decoder layer, saved bytes outside them) for one forward of the decoder
    (on meta tensors; a real device gives the same numbers, slowly, which the tests check).

    LoRA layers are stood in for by hooks on the targeted linears: each keeps its input (for lora_A's
    gradient) and its rank-r intermediate (for lora_B's), which is what LoraLinear keeps in bf16 autocast."""
    layers = decoder_layers(model)
    meter = SavedTensorMeter(layers)

    def lora_saves(module: nn.Module, args: tuple) -> None:
        x = args[0]
        meter.add(x)
        meter.add(x, x[..., :1].numel() * r * 2, key=id(module))

    for module in lora_targets:
        meter.handles.append(module.register_forward_pre_hook(lora_saves))
    embeddings = model.get_input_embeddings()
    meter.handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    positions = torch.arange(seq_len, device=device).expand(batch, -1)
    decoder = getattr(model, model.base_model_prefix)
    kwargs, context = _packed_attention(model, batch, seq_len)
    try:
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t), context, _flash_attention_on_meta(device):
            decoder(input_ids=ids, position_ids=positions, use_cache=False, **kwargs)
    finally:
        meter.close()
    per_layer = [meter.by_layer.get(i, 0) for i in range(len(layers))]
    return per_layer, meter.by_layer.get(None, 0)


class _FlashOnMeta(torch.autograd.Function):
    """What the CPU flash kernel keeps for backward (q, k, v, output, fp32 logsumexp), on meta tensors;
    left alone, SDPA on meta takes its math path and keeps fp32 attention matrices instead."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: meta measurements stop at the forward
        raise NotImplementedError


@contextmanager
def _flash_attention_on_meta(device: str) -> Iterator[None]:
    if device != "meta":
        yield
        return
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FlashOnMeta.apply(q, k, v)
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _packed_attention(model: nn.Module, batch: int, seq_len: int):
    """lorakit's training paths (its causal attention kernel per packed example, lean norm / MLP
    kernels), as its training step runs them."""
    from lorakit.train.attention import SEQ_LENS_KWARG
    from lorakit.train.step import training_paths

    return {SEQ_LENS_KWARG: [[seq_len]] * batch}, training_paths(model)


def checkpoint_bytes_per_param(config) -> int:
    """Bytes per parameter of the checkpoint on disk, from config.json's dtype (fp32 when unstated)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    name = str(dtype).replace("torch.", "")
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(name, 4)


def head_loss_bytes(tokens: int, hidden: int, vocab: int) -> int:
    """lorakit's chunked head loss: the selected hidden states and their gradient (bf16), and its chunk
    buffers: logits and gradient in bf16 plus fp32 log-probabilities (8 bytes per chunk entry)."""
    from lorakit.train.loss import LOSS_CHUNK

    chunk = min(LOSS_CHUNK, tokens)
    return 2 * tokens * hidden * 2 + chunk * vocab * (4 + 4)


# --- the estimate ----------------------------------------------------------------------------------
def estimate(
    model: str | os.PathLike,
    r: int = 16,
    target_modules: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
    seq_len: int = 512,
    batch: int = 4,
    adapter_bytes: int = 4,
    lora_checkpointing: bool = False,
    qlora_checkpointing: bool = True,
    allocator: str = "glibc",
) -> Estimate:
    """Full fine-tuning vs LoRA vs QLoRA for `model` ("default", a model directory or a config.json).

    Raises:
        LorakitError: no config.json, or target_modules match nothing.
    """
    from lorakit.config import LoraConfig
    from lorakit.lora.targets import find_targets, output_head_names

    config = load_config(model)
    stored = checkpoint_bytes_per_param(config)  # before meta_model, which sets config.dtype to bf16
    net = meta_model(config)
    targets = list(target_modules) if not isinstance(target_modules, str) else target_modules
    lora_paths = find_targets(net, LoraConfig(r=r, target_modules=targets))
    lora_modules = [net.get_submodule(p) for p in lora_paths]
    lora_params = sum(r * (m.in_features + m.out_features) for m in lora_modules)
    heads = output_head_names(net)
    quantizable = [m for n, m in net.named_modules() if isinstance(m, nn.Linear) and n not in heads]
    total = sum(p.numel() for p in net.parameters())
    formats = weights_by_format(total, quantizable)
    tokens = batch * seq_len

    per_layer, outside = measure_decoder(net, batch, seq_len, lora_modules, r)
    head = head_loss_bytes(tokens, config.hidden_size, config.vocab_size)
    hidden_state = tokens * config.hidden_size * 2

    if allocator not in HEAP_RETENTION:
        raise LorakitError(f"allocator must be one of {', '.join(HEAP_RETENTION)} (got {allocator!r})")

    def activations(per_layer: list[int], outside: int, checkpointing: bool) -> int:
        if checkpointing:  # each layer keeps its input; one layer at a time is recomputed in backward
            live = len(per_layer) * hidden_state + RECOMPUTE_FACTOR * max(per_layer) + outside + head
        else:
            live = sum(per_layer) + outside + head
        return int(live * HEAP_RETENTION[allocator])

    lora_act = activations(per_layer, outside, lora_checkpointing)
    from lorakit.quant.prepare import upcast_norms

    upcast_norms(net)  # QLoRA runs its norms in fp32
    q_layer, q_outside = measure_decoder(net, batch, seq_len, lora_modules, r)
    qlora_act = activations(q_layer, q_outside, qlora_checkpointing)
    net.requires_grad_(True)
    full_layer, full_outside = measure_decoder(net, batch, seq_len, [], r)
    full_act = activations(full_layer, full_outside, False) + 2 * total  # + autocast's bf16 weight copies

    adapter_file = lora_params * adapter_bytes
    moments = 2 * adapter_file  # AdamW keeps two moments in the adapters' dtype
    def loading(bytes_per_param: int | None, built: int) -> int:
        # the same dtype is used in place from the memory map, paged in during training (and counted
        # there); anything else is built beside the file's pages, which are all read
        return 0 if bytes_per_param == stored else stored * total + built

    columns = {
        "full": Column("full fine-tuning", total, 4 * total, 4 * total, 8 * total, full_act, False, formats["bf16"],
                       loading(4, 4 * total)),
        "lora": Column("LoRA (bf16 base)", lora_params, formats["bf16"] + adapter_file, adapter_file, moments,
                       lora_act, lora_checkpointing, adapter_file, loading(2, formats["bf16"])),
        "qlora": Column("QLoRA (nf4 base)", lora_params, formats["nf4+dq"] + adapter_file, adapter_file, moments,
                        qlora_act, qlora_checkpointing, adapter_file, loading(None, formats["nf4+dq"])),
    }
    notes = [
        "full: fp32 weights + fp32 gradients + AdamW moments (16 bytes per parameter), bf16 autocast; saved file = the model in bf16",
        f"LoRA / QLoRA: adapters in {'fp32' if adapter_bytes == 4 else 'bf16'} with AdamW moments; saved file = adapter_model.safetensors",
        "activations: measured on the meta device from the model's own code (lorakit's packed attention, lean kernels, "
        f"chunked head loss), times {HEAP_RETENTION[allocator]} for what the {allocator} allocator keeps resident",
    ]
    return Estimate(str(model), type(net).__name__, total, sum(m.weight.numel() for m in quantizable), lora_params, r,
                    targets, tokens, formats, columns, notes)
