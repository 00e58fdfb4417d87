"""The estimate's result: one Column per way of training, and the markdown table they make."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.estimate.constants import FRAMEWORK_BYTES


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
        lines = [
            f"{self.model}: {self.architecture}, {self.total_params:,d} parameters "
            f"({self.quantizable_params:,d} in quantizable linear layers)",
            f"LoRA r={self.r} on {self.target_modules}: {self.lora_params:,d} adapter parameters; batch of {self.tokens:,d} tokens",
            "",
            "weights by storage format: " + ", ".join(f"{k} {human(v)}" for k, v in self.weights_by_format.items()),
            "",
            f"| | {' | '.join(c.name for c in cols)} |",
            "|" + "---|" * (len(cols) + 1),
        ]
        lines += [f"| {label} | {' | '.join(values)} |" for label, values in _rows(cols)]
        return "\n".join(lines + [""] + self.notes)


def _rows(cols: list[Column]) -> list[tuple[str, list[str]]]:
    return [
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


def human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
