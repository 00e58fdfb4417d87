"""Many adapters on one base: the adapter registry, the continuous-batching generation engine, and
generation-based scoring."""

from lorakit.infer.engine import Completion, Engine, RequestHandle
from lorakit.infer.registry import AdapterInfo, AdapterRegistry
from lorakit.infer.sampling import SamplingParams

__all__ = ["AdapterInfo", "AdapterRegistry", "Completion", "Engine", "RequestHandle", "SamplingParams"]
