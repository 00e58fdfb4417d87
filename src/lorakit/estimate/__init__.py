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
The head loss is lorakit's chunked one (LOSS_CHUNK positions at a time, the full logits never exist).
Training peak = framework + weights + optimizer state + max(activations at the end of the forward,
gradients at the end of the backward). Loading peak = framework + the checkpoint's pages (read through
a memory map) + what is built from them; quantizing on load touches the whole file, so for QLoRA on a
bf16 checkpoint the loading peak can be the process's peak. Measured on the CPU
(bench/qlora_memory.py) the estimates land within ~5% of the four runs its two constants were fitted
to; glibc's heap retention is the main thing modelled only roughly.

  formulas.py   bytes of each storage format, of the checkpoint and of the chunked head loss
  profile.py    the model on the meta device and the saved-tensor bytes of one forward
  constants.py  what is fitted to measurements (framework, recompute factor, heap retention)
  report.py     the columns and the table
  compare.py    estimate(): the three columns from the pieces above
"""

from lorakit.estimate.compare import estimate
from lorakit.estimate.formulas import int8_bytes, nf4_bytes, weights_by_format
from lorakit.estimate.profile import measure_decoder, meta_model
from lorakit.estimate.report import Column, Estimate, human

__all__ = ["Column", "Estimate", "estimate", "human", "int8_bytes", "measure_decoder", "meta_model", "nf4_bytes",
           "weights_by_format"]
