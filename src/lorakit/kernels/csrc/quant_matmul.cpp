// Quantized base-weight matmuls for decode on the CPU: y (B, N) = x (B, K) @ W^T with W stored as
// int8 per output channel or 4 bits per block of K (kernels/quant_matmul.py holds the formats).
//
// A decode step reads every weight once per token, so at a few rows it is bound by memory, not
// arithmetic: int8 halves what bf16 reads, 4 bits (plus a bf16 scale per block) cut it to ~0.28.
// Each row of x is quantized to int8 on the fly (a scale per block of K, as llama.cpp's Q8_0
// activations), and the integer dot products run on AVX-512 VNNI (vpdpbusd: 64 multiply-adds of
// unsigned by signed bytes into 16 int32 sums) where the CPU has it; plain loops doing the same
// integer arithmetic elsewhere. The weights are the unsigned operand (int8 stored +128; 4-bit codes
// 0..15), so the correction for that offset depends only on x's sums (computed with its quantization).
//
// Packed layout: output columns in blocks of 16 (one zmm of int32 sums), and within a block K in
// groups of 4 (what one vpdpbusd lane sums): byte (col block, k / 4, column, k % 4). The 4-bit codes
// of two such groups share a byte (low nibble: k % 8 < 4), so one 64-byte load unpacks to two.
// x's 4 bytes per group are broadcast, so the sums land per output column with no horizontal adds.
#include "library.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define LORAKIT_QUANT_VNNI 1
#include <immintrin.h>
#endif

namespace {

using lorakit::bf16_to_float;
constexpr int64_t kCols = 16;  // output columns per packed block

// x's rows quantized to int8, a scale per block of K: x[r, k] ~ q[r, k] * scale[r, k / block].
struct QuantizedRows {
  std::vector<int8_t> q;       // (rows, kp), zero past K
  std::vector<float> scale;    // (rows, blocks)
  std::vector<int32_t> sum;    // (rows, blocks): the sum of each block's q (the offset correction)
};

// One block of a row: absmax / 127 as its scale, each value rounded to the nearest (even) integer.
inline void quantize_block(const uint16_t* x, int64_t count, int64_t block, int8_t* q, float& scale, int32_t& sum) {
  float amax = 0.f;
  for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(bf16_to_float(x[i])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t total = 0;
  int64_t i = 0;
#if defined(LORAKIT_QUANT_VNNI)
  const __m512 vinv = _mm512_set1_ps(inv);
  __m512i vsum = _mm512_setzero_si512();
  for (; i + 16 <= count; i += 16) {
    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16));
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));  // round to nearest even
    vsum = _mm512_add_epi32(vsum, r);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(r));
  }
  total = _mm512_reduce_add_epi32(vsum);
#endif
  for (; i < count; ++i) {
    const int32_t r = static_cast<int32_t>(std::nearbyint(bf16_to_float(x[i]) * inv));
    q[i] = static_cast<int8_t>(std::clamp(r, -127, 127));
    total += q[i];
  }
  std::fill(q + count, q + block, int8_t{0});
  scale = amax / 127.f;
  sum = total;
}

QuantizedRows quantize_rows(const uint16_t* x, int64_t rows, int64_t k, int64_t kp, int64_t block) {
  const int64_t blocks = kp / block;
  QuantizedRows out{std::vector<int8_t>(rows * kp), std::vector<float>(rows * blocks), std::vector<int32_t>(rows * blocks)};
  at::parallel_for(0, rows * blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / blocks, first = (i % blocks) * block;
      const int64_t count = std::max<int64_t>(0, std::min(block, k - first));
      quantize_block(x + r * k + first, count, block, out.q.data() + r * kp + first, out.scale[i], out.sum[i]);
    }
  });
  return out;
}

// What a tile writes: result[r * C * 16 + c * 16 + j], rows r of x against columns j of the C column
// blocks from `w`: sum over blocks of scale(r, block) * (integer dot of the block) [- the 4-bit offset].
struct Tile {
  const uint8_t* w;        // the first column block's packed weights
  int64_t col_stride;      // bytes from one column block to the next
  const uint16_t* scales;  // 4-bit only: the first column block's bf16 scales (blocks, 16)
  int64_t scale_stride;    // 4-bit only: scales from one column block to the next
  const int8_t* q;         // x's first row, quantized
  const float* dx;         // that row's block scales
  const int32_t* xsum;     // that row's block sums
  int64_t kp, block;
};

#if defined(LORAKIT_QUANT_VNNI)
template <int R, int C>
inline void int8_tile(const Tile& t, float* result) {
  const int64_t blocks = t.kp / t.block;
  __m512 facc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) facc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
    for (int64_t k = b * t.block; k < (b + 1) * t.block; k += 4) {
      __m512i wv[C];
      for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_si512(t.w + c * t.col_stride + k * kCols);
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(t.q + r * t.kp + k));
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wv[c], xv);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_set1_ps(t.dx[r * blocks + b]);
      for (int c = 0; c < C; ++c) facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][c]), d, facc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(result + (r * C + c) * kCols, facc[r][c]);
}

template <int R, int C>
inline void q4_tile(const Tile& t, float* result) {
  const int64_t blocks = t.kp / t.block;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 facc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) facc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
    for (int64_t k = b * t.block; k < (b + 1) * t.block; k += 8) {
      __m512i lo[C], hi[C];
      for (int c = 0; c < C; ++c) {
        const __m512i v = _mm512_loadu_si512(t.w + c * t.col_stride + k * kCols / 2);
        lo[c] = _mm512_and_si512(v, low);
        hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i x0 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(t.q + r * t.kp + k));
        const __m512i x1 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(t.q + r * t.kp + k + 4));
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][c], lo[c], x0), hi[c], x1);
      }
    }
    __m512 s[C];
    for (int c = 0; c < C; ++c)
      s[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(t.scales + c * t.scale_stride + b * kCols))), 16));
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_set1_ps(t.dx[r * blocks + b]);
      const __m512i offset = _mm512_set1_epi32(8 * t.xsum[r * blocks + b]);  // codes are q + 8
      for (int c = 0; c < C; ++c)
        facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], offset)), _mm512_mul_ps(s[c], d), facc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(result + (r * C + c) * kCols, facc[r][c]);
}
#endif

// The same arithmetic in plain loops (the portable build, and CPUs without AVX-512 VNNI).
template <bool Q4>
void plain_tile(const Tile& t, int rows, int cols, float* result) {
  const int64_t blocks = t.kp / t.block;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      for (int64_t j = 0; j < kCols; ++j) {
        const uint8_t* w = t.w + c * t.col_stride;
        float total = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          int32_t dot = 0;
          for (int64_t k = b * t.block; k < (b + 1) * t.block; ++k) {
            int32_t code;
            if (Q4) {
              const uint8_t byte = w[(k / 8) * 64 + j * 4 + k % 4];
              code = (k % 8 < 4) ? (byte & 0x0F) : (byte >> 4);
            } else {
              code = w[(k / 4) * 64 + j * 4 + k % 4];
            }
            dot += code * t.q[r * t.kp + k];
          }
          if (Q4) {
            const float s = bf16_to_float(t.scales[c * t.scale_stride + b * kCols + j]);
            total += static_cast<float>(dot - 8 * t.xsum[r * blocks + b]) * (s * t.dx[r * blocks + b]);
          } else {
            total += static_cast<float>(dot) * t.dx[r * blocks + b];
          }
        }
        result[(r * cols + c) * kCols + j] = total;
      }
}

// Rows of x by columns of W in tiles of R rows x C column blocks (sums for R x C zmm stay in registers).
template <bool Q4>
void run_tile(const Tile& t, int rows, int cols, float* result) {
#if defined(LORAKIT_QUANT_VNNI)
#define LORAKIT_TILE(R, C)                                       \
  if (rows == R && cols == C) {                                  \
    if (Q4) q4_tile<R, C>(t, result); else int8_tile<R, C>(t, result); \
    return;                                                      \
  }
  LORAKIT_TILE(1, 4) LORAKIT_TILE(1, 2) LORAKIT_TILE(1, 1) LORAKIT_TILE(2, 2) LORAKIT_TILE(2, 1)
  LORAKIT_TILE(3, 2) LORAKIT_TILE(3, 1) LORAKIT_TILE(4, 2) LORAKIT_TILE(4, 1)
#undef LORAKIT_TILE
#endif
  plain_tile<Q4>(t, rows, cols, result);
}

// y = x W^T (+ bias) for either format: `column_scale` (int8: the per-channel scale, applied at the
// end with the +128 offset's correction) or the 4-bit block scales inside the tiles.
template <bool Q4>
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scales, int64_t n,
                        int64_t block, const c10::optional<at::Tensor>& bias, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), name, ": x must be a contiguous 2-d bf16 tensor");
  TORCH_CHECK(data.scalar_type() == at::kByte && data.dim() == 4 && data.size(2) == kCols && data.size(3) == 4 && data.is_contiguous(),
              name, ": data must be a contiguous uint8 tensor (column blocks, K groups, 16, 4)");
  const int64_t col_blocks = data.size(0), kp = data.size(1) * (Q4 ? 8 : 4), rows = x.size(0), k = x.size(1);
  TORCH_CHECK(block > 0 && block % 8 == 0 && kp % block == 0 && k <= kp && kp - k < block, name,
              ": x's ", k, " columns and the weight's ", kp, " (padded) with blocks of ", block, " disagree");
  TORCH_CHECK(n > (col_blocks - 1) * kCols && n <= col_blocks * kCols, name, ": n=", n, " does not fit ", col_blocks, " column blocks");
  if (Q4) {
    TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.numel() == col_blocks * (kp / block) * kCols,
                name, ": scales must be contiguous bf16 (column blocks, K blocks, 16)");
  } else {
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == col_blocks * kCols,
                name, ": scales must be contiguous fp32 (column blocks * 16)");
  }
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, name, ": bias must have n=", n, " values");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bias_ptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const int64_t blocks = kp / block;
  const QuantizedRows qx = quantize_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), rows, k, kp, block);
  std::vector<float> correction(rows, 0.f);  // int8: 128 * sum_k x_k, the +128 offset's share of each row
  if (!Q4)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < blocks; ++b) correction[r] += 128.f * qx.scale[r * blocks + b] * qx.sum[r * blocks + b];
  at::Tensor out = at::empty({rows, n}, x.options());
  auto* out_ptr = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint8_t* w = data.data_ptr<uint8_t>();
  const float* col_scale = Q4 ? nullptr : scales.data_ptr<float>();
  const uint16_t* block_scale = Q4 ? reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>()) : nullptr;
  const int cmax = rows == 1 ? 4 : 2;  // one row: four column blocks' sums in flight; more: 4 rows x 2
  const int64_t groups = (col_blocks + cmax - 1) / cmax;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> result(4 * cmax * kCols);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * cmax;
      const int cols = static_cast<int>(std::min<int64_t>(cmax, col_blocks - first));
      for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        const int tile_rows = static_cast<int>(std::min<int64_t>(4, rows - r0));
        const Tile t{w + first * kp * kCols / (Q4 ? 2 : 1), kp * kCols / (Q4 ? 2 : 1),
                     Q4 ? block_scale + first * blocks * kCols : nullptr, blocks * kCols,
                     qx.q.data() + r0 * kp, qx.scale.data() + r0 * blocks, qx.sum.data() + r0 * blocks, kp, block};
        // Column blocks one at a time when they do not fill a tile (only the last group's).
        for (int c0 = 0; c0 < cols; c0 += (cols == cmax ? cmax : 1)) {
          const int tile_cols = cols == cmax ? cmax : 1;
          Tile part = t;
          part.w += c0 * t.col_stride;
          if (Q4) part.scales += c0 * t.scale_stride;
          run_tile<Q4>(part, tile_rows, tile_cols, result.data());
          for (int r = 0; r < tile_rows; ++r)
            for (int c = 0; c < tile_cols; ++c)
              for (int64_t j = 0; j < kCols; ++j) {
                const int64_t col = (first + c0 + c) * kCols + j;
                if (col >= n) continue;
                float v = result[(r * tile_cols + c) * kCols + j];
                if (!Q4) v = col_scale[col] * (v - correction[r0 + r]);
                if (bias_ptr) v += bias_ptr[col];
                out_ptr[(r0 + r) * n + col] = c10::BFloat16(v).x;
              }
        }
      }
    }
  });
  return out;
}

at::Tensor quant_linear_int8(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scales, int64_t n,
                             int64_t block, const c10::optional<at::Tensor>& bias) {
  return quant_linear<false>(x, data, scales, n, block, bias, "quant_linear_int8");
}

at::Tensor quant_linear_q4(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scales, int64_t n,
                           int64_t block, const c10::optional<at::Tensor>& bias) {
  return quant_linear<true>(x, data, scales, n, block, bias, "quant_linear_q4");
}

// The weight as bf16 (n, k), for prefill's matmuls (many rows: dequantized once, then oneDNN's).
template <bool Q4>
at::Tensor quant_dequantize(const at::Tensor& data, const at::Tensor& scales, int64_t n, int64_t k, int64_t block) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.dim() == 4 && data.size(2) == kCols && data.size(3) == 4 && data.is_contiguous(),
              "quant_dequantize: data must be a contiguous uint8 tensor (column blocks, K groups, 16, 4)");
  const int64_t col_blocks = data.size(0), kp = data.size(1) * (Q4 ? 8 : 4), blocks = kp / block;
  TORCH_CHECK(n > (col_blocks - 1) * kCols && n <= col_blocks * kCols && k <= kp && kp % block == 0,
              "quant_dequantize: n, k and block do not match the packed weight");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == (Q4 ? col_blocks * blocks * kCols : col_blocks * kCols) &&
                  scales.scalar_type() == (Q4 ? at::kBFloat16 : at::kFloat),
              "quant_dequantize: scales do not match the packed weight");
  at::Tensor out = at::empty({n, k}, data.options().dtype(at::kBFloat16));
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint8_t* w = data.data_ptr<uint8_t>();
  at::parallel_for(0, col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t cb = begin; cb < end; ++cb)
      for (int64_t j = 0; j < kCols && cb * kCols + j < n; ++j) {
        const int64_t col = cb * kCols + j;
        uint16_t* row = o + col * k;
        if (Q4) {
          const uint8_t* src = w + cb * kp * kCols / 2 + j * 4;
          const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>()) + cb * blocks * kCols + j;
          for (int64_t kk = 0; kk < k; ++kk) {
            const uint8_t byte = src[(kk / 8) * 64 + kk % 4];
            const int32_t code = (kk % 8 < 4) ? (byte & 0x0F) : (byte >> 4);
            row[kk] = c10::BFloat16(static_cast<float>(code - 8) * bf16_to_float(s[(kk / block) * kCols])).x;
          }
        } else {
          const uint8_t* src = w + cb * kp * kCols + j * 4;
          const float s = scales.data_ptr<float>()[col];
          for (int64_t kk = 0; kk < k; ++kk)
            row[kk] = c10::BFloat16(static_cast<float>(static_cast<int32_t>(src[(kk / 4) * 64 + kk % 4]) - 128) * s).x;
        }
      }
  });
  return out;
}

at::Tensor quant_dequantize_int8(const at::Tensor& data, const at::Tensor& scales, int64_t n, int64_t k, int64_t block) {
  return quant_dequantize<false>(data, scales, n, k, block);
}

at::Tensor quant_dequantize_q4(const at::Tensor& data, const at::Tensor& scales, int64_t n, int64_t k, int64_t block) {
  return quant_dequantize<true>(data, scales, n, k, block);
}

}  // namespace

LORAKIT_FRAGMENT(LORAKIT_NAMESPACE, m) {
  m.def("quant_linear_int8(Tensor x, Tensor data, Tensor scales, int n, int block, Tensor? bias=None) -> Tensor");
  m.def("quant_linear_q4(Tensor x, Tensor data, Tensor scales, int n, int block, Tensor? bias=None) -> Tensor");
  m.def("quant_dequantize_int8(Tensor data, Tensor scales, int n, int k, int block) -> Tensor");
  m.def("quant_dequantize_q4(Tensor data, Tensor scales, int n, int k, int block) -> Tensor");
}

LORAKIT_CPU_IMPL(LORAKIT_NAMESPACE, m) {
  m.impl("quant_linear_int8", &quant_linear_int8);
  m.impl("quant_linear_q4", &quant_linear_q4);
  m.impl("quant_dequantize_int8", &quant_dequantize_int8);
  m.impl("quant_dequantize_q4", &quant_dequantize_q4);
}
