// Decode attention on the CPU: one new query per row against that row's cached keys and values.
//
// torch's batched matmuls spend most of a 16-row decode step's attention on per-matrix overhead (each
// key/value head of each row is a 3 x 64 by 64 x span product), and SDPA's flash kernel is slower
// still at one query. Here each (row, key/value head) is one task that streams its keys once for the
// G query heads sharing them, takes the softmax and streams its values once, reading only the row's
// own positions (no mask, nothing past its length). fp32 arithmetic throughout; bf16 in and out.
// Every task's arithmetic is the same whatever the batch around it.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxHeadSize = 256;

inline float bf16_to_float(uint16_t bits16) {
  const uint32_t bits = static_cast<uint32_t>(bits16) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// q (B, KVH, G, D); keys, values (S >= B, KVH, C, D), D contiguous; lengths (B): positions per row.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4, "decode_attention: q, keys and values must be 4-d");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
                  values.scalar_type() == at::kBFloat16, "decode_attention: bf16 tensors only");
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.strides() == values.strides() && keys.stride(3) == 1,
              "decode_attention: keys and values must share one layout with the head size contiguous");
  const at::Tensor qc = q.contiguous();
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const int64_t rows = qc.size(0), kv_heads = qc.size(1), groups = qc.size(2), dim = qc.size(3);
  const int64_t capacity = keys.size(2);
  TORCH_CHECK(keys.size(0) >= rows && keys.size(1) == kv_heads && keys.size(3) == dim && len.numel() == rows,
              "decode_attention: the shapes of q, keys and lengths disagree");
  TORCH_CHECK(dim <= kMaxHeadSize, "decode_attention: head size above ", kMaxHeadSize);
  at::Tensor out = at::empty({rows, kv_heads, groups, dim}, q.options());
  const auto* q_ptr = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  const auto* k_ptr = reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>());
  const auto* v_ptr = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
  auto* out_ptr = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t* len_ptr = len.data_ptr<int64_t>();
  const int64_t row_stride = keys.stride(0), head_stride = keys.stride(1), position_stride = keys.stride(2);
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(groups * dim), acc(groups * dim), scores;
    float row[kMaxHeadSize];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const int64_t n = std::min(std::max<int64_t>(len_ptr[b], 1), capacity);
      scores.resize(groups * n);
      for (int64_t i = 0; i < groups * dim; ++i) query[i] = bf16_to_float(q_ptr[task * groups * dim + i]) * fscale;
      const uint16_t* k_row = k_ptr + b * row_stride + h * head_stride;
      const uint16_t* v_row = v_ptr + b * row_stride + h * head_stride;

      for (int64_t c = 0; c < n; ++c, k_row += position_stride) {  // scores = q K^T * scale
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) row[d] = bf16_to_float(k_row[d]);
        for (int64_t g = 0; g < groups; ++g) {
          const float* qg = query.data() + g * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qg[d] * row[d];
          scores[g * n + c] = dot;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {  // softmax over the row's positions
        float* sg = scores.data() + g * n;
        const float top = *std::max_element(sg, sg + n);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t c = 0; c < n; ++c) {
          sg[c] = std::exp(sg[c] - top);
          total += sg[c];
        }
        const float inverse = 1.f / total;
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) sg[c] *= inverse;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = 0; c < n; ++c, v_row += position_stride) {  // out = probabilities V
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) row[d] = bf16_to_float(v_row[d]);
        for (int64_t g = 0; g < groups; ++g) {
          const float p = scores[g * n + c];
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += p * row[d];
        }
      }
      uint16_t* out_row = out_ptr + task * groups * dim;
      for (int64_t i = 0; i < groups * dim; ++i) out_row[i] = c10::BFloat16(acc[i]).x;  // round to nearest even
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lorakit_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorakit_kernels, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
