"""The ground floor under lora/ and quant/: what kind of weight a layer holds and its dense values.

  kinds.py    WeightKind (dense, bitsandbytes 4-bit, 8-bit), is_quantized, is_4bit
  dequant.py  dense_weight and the exact dequantization of bitsandbytes' packed weights

Both lora/ (merging, refusing in-place merges into packed weights) and quant/ (detecting, re-quantizing)
need these, so they live here and import neither: that keeps lora and quant free of an import circle."""
