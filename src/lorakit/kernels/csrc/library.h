// What lorakit's kernels share: the namespace they register their operators in (torch.ops.lorakit_kernels,
// or the one a second build names: kernels/native.py builds a portable copy for tests, so both can share
// a process), and bf16 bits to fp32.
#pragma once
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#ifndef LORAKIT_NAMESPACE
#define LORAKIT_NAMESPACE lorakit_kernels
#endif
// One level of indirection, so LORAKIT_NAMESPACE expands before torch's macros paste it into names.
#define LORAKIT_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LORAKIT_CPU_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

namespace lorakit {

// A bf16 value (its 16 bits) as the fp32 value it stands for: exact, the bits shifted into place.
inline float bf16_to_float(uint16_t bits16) {
  const uint32_t bits = static_cast<uint32_t>(bits16) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

}  // namespace lorakit
