// Decode attention on the CPU: one new query per row against that row's cached keys and values.
//
// torch's batched matmuls spend most of a 16-row decode step's attention on per-matrix overhead (each
// key/value head of each row is a 3 x 64 by 64 x span product), and SDPA's flash kernel is slower
// still at one query. Here each (row, key/value head) is one task that streams its keys once for the
// G query heads sharing them, takes the softmax and streams its values once, reading only the row's
// own positions (no mask, nothing past its length). fp32 arithmetic throughout; bf16 in and out.
// Every task's arithmetic is the same whatever the batch around it.
#include "library.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using lorakit::bf16_to_float;

constexpr int64_t kMaxHeadSize = 256;

#if defined(__AVX512BF16__)
// Lane i of the result: the sum of the 16 lanes of v[i] (a transposing tree of 46 instructions, against
// 16 separate horizontal sums).
inline __m512 sum_each(const __m512 v[16]) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)  // 128-bit lanes: v_i (0+2, 1+3), v_{i+8} (0+2, 1+3)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // lanes: v_i, v_{i+8}, v_{i+4}, v_{i+12}, four partial sums each
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 c0 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
  const __m512 c1 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c0, c1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(c0, c1, _MM_SHUFFLE(3, 2, 3, 2)));  // sums 0-3, 8-11, 4-7, 12-15
  return _mm512_shuffle_f32x4(d, d, _MM_SHUFFLE(3, 1, 2, 0));
}

// exp(x) for x <= 0 (scores minus their maximum), 16 lanes: 2^(x log2 e) as 2^integer (scalef) times a
// degree-6 polynomial for 2^fraction; relative error below 6e-6 (bf16 probabilities keep 2^-8), and 0 for x below -126 / log2 e.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _mm512_set1_ps(-126.f));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, whole);  // [0, 1)
  __m512 p = _mm512_set1_ps(1.535336188e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, whole);
}

// One (row, key/value head) task with AVX-512 BF16 (head size a multiple of 32, at most kMaxHeadSize):
// scores for 16 positions at a time as bf16 dot products (exact products, fp32 sums) reduced together;
// probabilities rounded to bf16 (as the batched-matmul path does) and multiplied into V two positions
// a step, V's rows interleaved in pairs. Nothing past the row's length is read.
void attend_bf16(const uint16_t* q, const uint16_t* k_row, const uint16_t* v_row, int64_t stride, int64_t n,
                 int64_t groups, int64_t dim, float scale, std::vector<float>& scores, uint16_t* out) {
  const int64_t chunks = dim / 32;  // 32 bf16 values per 512-bit register
  scores.resize(groups * n);
  for (int64_t c0 = 0; c0 < n; c0 += 16) {  // scores = q K^T * scale
    const int64_t m = std::min<int64_t>(16, n - c0);
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc[16];
      for (int64_t i = 0; i < 16; ++i) {
        acc[i] = _mm512_setzero_ps();
        if (i >= m) continue;
        const uint16_t* key = k_row + (c0 + i) * stride;
        for (int64_t j = 0; j < chunks; ++j)
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(key + 32 * j),
                                    (__m512bh)_mm512_loadu_si512(q + g * dim + 32 * j));
      }
      const __m512 sums = _mm512_mul_ps(sum_each(acc), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores.data() + g * n + c0, (__mmask16)((1u << m) - 1), sums);
    }
  }
  const int64_t pairs = (n + 1) / 2;
  std::vector<int32_t> probability_pairs(groups * pairs);  // bf16 probabilities of positions 2c, 2c+1 (0 past n)
  for (int64_t g = 0; g < groups; ++g) {  // softmax over the row's positions
    float* sg = scores.data() + g * n;
    const float top = *std::max_element(sg, sg + n);
    __m512 total = _mm512_setzero_ps();
    for (int64_t c = 0; c < n; c += 16) {
      const __mmask16 valid = (__mmask16)((1u << std::min<int64_t>(16, n - c)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, sg + c), _mm512_set1_ps(top)));
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(valid, e));
      _mm512_mask_storeu_ps(sg + c, valid, e);
    }
    const float inverse = 1.f / _mm512_reduce_add_ps(total);
    for (int64_t c = 0; c < pairs; ++c) {
      const uint32_t p0 = c10::BFloat16(sg[2 * c] * inverse).x;
      const uint32_t p1 = 2 * c + 1 < n ? c10::BFloat16(sg[2 * c + 1] * inverse).x : 0u;
      probability_pairs[g * pairs + c] = static_cast<int32_t>(p0 | (p1 << 16));
    }
  }
  // out = probabilities V: acc[g][j][0] holds dims 32j + {0-3, 8-11, 16-19, 24-27}, [1] the rest
  // (unpacklo / unpackhi interleave within 128-bit lanes); put back in order at the end.
  std::vector<__m512> acc(groups * chunks * 2, _mm512_setzero_ps());
  for (int64_t c = 0; c < n; c += 2) {
    const bool pair = c + 1 < n;
    const uint16_t* v0 = v_row + c * stride;
    for (int64_t j = 0; j < chunks; ++j) {
      const __m512i first = _mm512_loadu_si512(v0 + 32 * j);
      const __m512i second = pair ? _mm512_loadu_si512(v0 + stride + 32 * j) : _mm512_setzero_si512();
      const __m512bh low = (__m512bh)_mm512_unpacklo_epi16(first, second);
      const __m512bh high = (__m512bh)_mm512_unpackhi_epi16(first, second);
      for (int64_t g = 0; g < groups; ++g) {
        const __m512bh both = (__m512bh)_mm512_set1_epi32(probability_pairs[g * pairs + c / 2]);
        __m512* a = acc.data() + (g * chunks + j) * 2;
        a[0] = _mm512_dpbf16_ps(a[0], low, both);
        a[1] = _mm512_dpbf16_ps(a[1], high, both);
      }
    }
  }
  float lanes[2][16];
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < chunks; ++j) {
      _mm512_storeu_ps(lanes[0], acc[(g * chunks + j) * 2]);
      _mm512_storeu_ps(lanes[1], acc[(g * chunks + j) * 2 + 1]);
      uint16_t* o = out + g * dim + 32 * j;
      for (int half = 0; half < 2; ++half)
        for (int lane = 0; lane < 4; ++lane)
          for (int k = 0; k < 4; ++k) o[8 * lane + 4 * half + k] = c10::BFloat16(lanes[half][4 * lane + k]).x;
    }
}
#endif

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
#if defined(__AVX512BF16__)
      if (dim % 32 == 0) {
        attend_bf16(q_ptr + task * groups * dim, k_ptr + b * row_stride + h * head_stride,
                    v_ptr + b * row_stride + h * head_stride, position_stride, n, groups, dim, fscale, scores,
                    out_ptr + task * groups * dim);
        continue;
      }
#endif
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

LORAKIT_FRAGMENT(LORAKIT_NAMESPACE, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor lengths, float scale) -> Tensor");
}

LORAKIT_CPU_IMPL(LORAKIT_NAMESPACE, m) {
  m.impl("decode_attention", &decode_attention);
}
