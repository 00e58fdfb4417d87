// Each row's own adapters added onto a layer group's base output, on the CPU (Punica's gathered
// matrix-vector idea): row n gets sum_j w_j * B_{s_j} (A_{s_j} x_n) for the slots s_j it uses.
//
// A batch of rows over many adapters done as dense matmuls over every adapter's banks computes every
// adapter for every row and throws most of it away (on the default model at 16 rows over 8 adapters,
// a fifth of a decode step's arithmetic). Here a row reads only its own slots' A and B, from cache,
// in fp32, and rounds once when it adds onto the base output. Each row's arithmetic is the same
// whatever the batch around it.
#include "library.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using lorakit::bf16_to_float;

// out[k] = w * (row k of a) . v for k < count: the rows of a (count, n) against one vector, bf16 in,
// fp32 sums (bf16 products are exact in fp32). Four rows at a time, so four independent sums hide
// the latency of each multiply-add.
inline void rows_dot_bf16(float* out, const uint16_t* a, const uint16_t* v, int64_t count, int64_t n, float w) {
  int64_t k = 0;
#if defined(__AVX512BF16__)
  const int64_t body = n - n % 32;
  const __mmask32 tail = (__mmask32)((1ull << (n % 32)) - 1);
  for (; k + 4 <= count; k += 4) {
    const uint16_t* r = a + k * n;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    for (int64_t c = 0; c < body; c += 32) {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(v + c);
      s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(r + c), x);
      s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(r + n + c), x);
      s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_loadu_si512(r + 2 * n + c), x);
      s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_loadu_si512(r + 3 * n + c), x);
    }
    if (body < n) {
      const __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(tail, v + body);
      s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + body), x);
      s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + n + body), x);
      s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + 2 * n + body), x);
      s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + 3 * n + body), x);
    }
    out[k] = w * _mm512_reduce_add_ps(s0);
    out[k + 1] = w * _mm512_reduce_add_ps(s1);
    out[k + 2] = w * _mm512_reduce_add_ps(s2);
    out[k + 3] = w * _mm512_reduce_add_ps(s3);
  }
#endif
  for (; k < count; ++k) {
    const uint16_t* r = a + k * n;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < n; ++c) dot += bf16_to_float(r[c]) * bf16_to_float(v[c]);
    out[k] = w * dot;
  }
}

// acc[first..first+size) += sum_r xa[r] * B[r][o], B stored as rank pairs (pairs, W, 2) so AVX-512
// BF16 takes two ranks a step; xa is rounded to bf16 for that (as a bf16 matmul's output would be).
inline void add_b_times_xa(float* acc, const uint16_t* b, const float* xa, int64_t pairs, int64_t width,
                           int64_t first, int64_t size) {
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t x0 = c10::BFloat16(xa[2 * p]).x, x1 = c10::BFloat16(xa[2 * p + 1]).x;
    if ((x0 | x1) == 0) continue;  // ranks a smaller adapter pads with zeros
    const uint16_t* bp = b + (p * width + first) * 2;
    int64_t o = 0;
#if defined(__AVX512BF16__)
    const __m512bh both = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x0) | (static_cast<int32_t>(x1) << 16));
    for (; o + 16 <= size; o += 16)
      _mm512_storeu_ps(acc + first + o, _mm512_dpbf16_ps(_mm512_loadu_ps(acc + first + o),
                                                         (__m512bh)_mm512_loadu_si512(bp + 2 * o), both));
#endif
    const float f0 = bf16_to_float(x0), f1 = bf16_to_float(x1);
    for (; o < size; ++o) acc[first + o] += f0 * bf16_to_float(bp[2 * o]) + f1 * bf16_to_float(bp[2 * o + 1]);
  }
}

// out[first..first+size) = bf16(out + acc), rounded to nearest even once.
inline void add_rounded(uint16_t* out, const float* acc, int64_t first, int64_t size) {
  int64_t o = first;
#if defined(__AVX512BF16__)
  for (; o + 16 <= first + size; o += 16) {
    const __m512 base = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + o))), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + o),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(base, _mm512_loadu_ps(acc + o))));
  }
#endif
  for (; o < first + size; ++o) out[o] = c10::BFloat16(bf16_to_float(out[o]) + acc[o]).x;
}

// out (N, W) bf16, updated in place; x (N, C) bf16; a (S, T*R, C) bf16: slot s+1's A rows for the T
// adapted layers of the group, R each; b (S, R/2, W, 2) bf16: slot s+1's scaled B, layer t's in its
// own output columns, ranks in pairs; segments (T, 2) long: layer t's first output column and width; slots, weights
// (J, B): row b's adapters (bank slot, 0 = none) and scales; N = B * tokens per row.
void routed_lora_(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& segments, const at::Tensor& slots, const at::Tensor& weights) {
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
                  a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
              "routed_lora_: bf16 tensors only");
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && a.dim() == 3 && b.dim() == 4 && segments.dim() == 2 &&
                  slots.dim() == 2, "routed_lora_: out, x must be 2-d, a 3-d, b 4-d, segments, slots 2-d");
  TORCH_CHECK(out.is_contiguous() && x.is_contiguous() && a.is_contiguous() && b.is_contiguous(),
              "routed_lora_: out, x, a and b must be contiguous");
  const int64_t n_rows = x.size(0), in = x.size(1), width = out.size(1);
  const int64_t bank_slots = a.size(0), columns = a.size(1), pairs = b.size(1), layers = segments.size(0);
  const int64_t depth = slots.size(0), batch = slots.size(1);
  TORCH_CHECK(out.size(0) == n_rows && a.size(2) == in && b.size(0) == bank_slots && b.size(2) == width && b.size(3) == 2 &&
                  columns == layers * pairs * 2 && segments.size(1) == 2 && weights.sizes() == slots.sizes() &&
                  batch > 0 && n_rows % batch == 0,
              "routed_lora_: the shapes of out, x, a, b, segments and the routing disagree");
  const at::Tensor seg = segments.to(at::kLong).contiguous();
  const at::Tensor slot = slots.to(at::kLong).contiguous();
  const at::Tensor weight = weights.to(at::kFloat).contiguous();
  const int64_t* seg_ptr = seg.data_ptr<int64_t>();
  for (int64_t t = 0; t < layers; ++t)
    TORCH_CHECK(seg_ptr[2 * t] >= 0 && seg_ptr[2 * t + 1] >= 0 && seg_ptr[2 * t] + seg_ptr[2 * t + 1] <= width,
                "routed_lora_: a segment lies outside the output");
  const int64_t* slot_ptr = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < slot.numel(); ++i)
    TORCH_CHECK(slot_ptr[i] >= 0 && slot_ptr[i] <= bank_slots, "routed_lora_: a row's slot is outside the bank");
  const float* weight_ptr = weight.data_ptr<float>();
  const auto* x_ptr = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* a_ptr = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>());
  const auto* b_ptr = reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>());
  auto* out_ptr = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t tokens = n_rows / batch;
  // Rows in order of their first slot, so each thread's share covers few slots and a slot's banks are
  // read from memory by one thread, then from its cache (16 rows over 8 adapters split as they come
  // would have both threads read all eight).
  std::vector<int64_t> order(n_rows);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t p, int64_t q) { return slot_ptr[p / tokens] < slot_ptr[q / tokens]; });

  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xa(columns), acc(width);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = order[i], row = n / tokens;
      bool used = false;
      const uint16_t* xn = x_ptr + n * in;
      for (int64_t j = 0; j < depth; ++j) {
        const int64_t s = slot_ptr[j * batch + row];
        const float w = weight_ptr[j * batch + row];
        if (s == 0 || w == 0.f) continue;
        if (!used) std::fill(acc.begin(), acc.end(), 0.f);
        used = true;
        const uint16_t* as = a_ptr + (s - 1) * columns * in;
        rows_dot_bf16(xa.data(), as, xn, columns, in, w);  // xa = w * A_s x
        const uint16_t* bs = b_ptr + (s - 1) * pairs * width * 2;
        for (int64_t t = 0; t < layers; ++t)  // acc[layer t's columns] += B_s xa[layer t's ranks]
          add_b_times_xa(acc.data(), bs, xa.data() + t * pairs * 2, pairs, width, seg_ptr[2 * t], seg_ptr[2 * t + 1]);
      }
      if (!used) continue;
      uint16_t* on = out_ptr + n * width;
      for (int64_t t = 0; t < layers; ++t) add_rounded(on, acc.data(), seg_ptr[2 * t], seg_ptr[2 * t + 1]);
    }
  });
}

}  // namespace

LORAKIT_FRAGMENT(LORAKIT_NAMESPACE, m) {
  m.def("routed_lora_(Tensor(a!) out, Tensor x, Tensor a, Tensor b, Tensor segments, Tensor slots, Tensor weights) -> ()");
}

LORAKIT_CPU_IMPL(LORAKIT_NAMESPACE, m) {
  m.impl("routed_lora_", &routed_lora_);
}
