"""Merging an adapter into its base: `merge_to_dense` folds a LoraModel (on a quantized or plain base)
into a dense transformers model; `merge_to_directory` is the whole `lorakit merge` pipeline (load the
base as the adapter was trained on it, merge, optionally re-quantize, write, measure)."""

from lorakit.merge.dense import merge_to_dense
from lorakit.merge.directory import MergeReport, merge_to_directory

__all__ = ["MergeReport", "merge_to_dense", "merge_to_directory"]
