// The namespace lorakit's kernels register their operators in: torch.ops.lorakit_kernels, or the one a
// second build names (kernels/native.py builds a portable copy for tests) so both can share a process.
#pragma once
#include <torch/library.h>

#ifndef LORAKIT_NAMESPACE
#define LORAKIT_NAMESPACE lorakit_kernels
#endif
// One level of indirection, so LORAKIT_NAMESPACE expands before torch's macros paste it into names.
#define LORAKIT_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LORAKIT_CPU_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
