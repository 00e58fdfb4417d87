// Quantized base-weight matmuls for decode on the CPU: y (B, N) = x (B, K) @ W^T with W stored as
// int8 per output channel or 4 bits per block of K (kernels/quant_matmul.py holds the formats).
//
// A decode step reads every weight once per token, so at a few rows it is bound by memory, not
// arithmetic: int8 halves what bf16 reads, 4 bits (plus a bf16 scale per block) cut it to ~0.28.
// Each row of x is quantized to int8 on the fly (a scale per block of K, as llama.cpp's Q8_0
// activations), and the integer dot products run on AVX-512 VNNI (vpdpbusd: 64 multiply-adds of
// unsigned by signed bytes into 16 int32 sums) where the CPU has it, from 16 rows on AMX tiles
// (16 rows x 16 columns a block deep per instruction) where it has those; plain loops doing the same
// integer arithmetic elsewhere, so every path gives the same sums. The weights are the unsigned operand (int8 stored +128; 4-bit codes
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
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define LORAKIT_QUANT_VNNI 1
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define LORAKIT_QUANT_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace {

using lorakit::bf16_to_float;
constexpr int64_t kCols = 16;  // output columns per packed block
constexpr int64_t kAmxRows = 16;  // from this many rows of x on, AMX tiles (where the CPU has them)

// x's rows quantized to int8, a scale per block of K: x[r, k] ~ q[r, k] * scale[r, k / block].
struct QuantizedRows {
  std::vector<int8_t> q;       // (rows, kp), zero past K
  std::vector<float> scale;    // (rows, blocks)
  std::vector<int32_t> sum;    // (rows, blocks): the sum of each block's q (the offset correction)
};

// One block of a row: absmax / 127 as its scale, each value rounded to the nearest (even) integer.
inline void quantize_block(const uint16_t* x, int64_t count, int64_t block, int8_t* q, float& scale, int32_t& sum) {
  float amax = 0.f;
  int64_t i = 0;
#if defined(LORAKIT_QUANT_VNNI)
  __m512 vmax = _mm512_setzero_ps();
  for (; i + 16 <= count; i += 16)
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16))));
  amax = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < count; ++i) amax = std::max(amax, std::fabs(bf16_to_float(x[i])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t total = 0;
  i = 0;
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

// Rows past `rows` (up to a multiple of 16: what an AMX tile reads) are zeros.
QuantizedRows quantize_rows(const uint16_t* x, int64_t rows, int64_t k, int64_t kp, int64_t block) {
  const int64_t blocks = kp / block, padded = (rows + 15) / 16 * 16;
  QuantizedRows out{std::vector<int8_t>(padded * kp), std::vector<float>(padded * blocks), std::vector<int32_t>(padded * blocks)};
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


#if defined(LORAKIT_QUANT_AMX)
// AMX: a 16 x 16 tile of int32 sums per instruction (16 rows of x by one column block, a block of
// K deep). The packed layout is already what a B tile wants (K / 4 rows of 16 columns x 4 bytes).
// Linux hands out the tile registers only on request, once per process.
bool amx_ready() {
  static const bool ready = [] {
    constexpr long kReqPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
  }();
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Two sets of tiles, so one block's products run while the block before is scaled and summed:
// tmm0 / tmm1 sums (16 rows x 16 int32), tmm2 / tmm3 16 rows of x's block codes, tmm4 / tmm5 the
// weights' block (K / 4 rows of 16 columns x 4 bytes).
void configure_tiles(int64_t block) {
  TileConfig config;
  for (int set = 0; set < 2; ++set) {
    config.rows[set] = 16; config.colsb[set] = 64;
    config.rows[2 + set] = 16; config.colsb[2 + set] = static_cast<uint16_t>(block);
    config.rows[4 + set] = static_cast<uint8_t>(block / 4); config.colsb[4 + set] = 64;
  }
  asm volatile("" : : "r"(&config) : "memory");  // gcc may drop the stores above: ldtilecfg's read is hidden from it
  _tile_loadconfig(&config);
}

// The weights of block b as bytes the tile loads: in place for int8, the 4-bit codes unpacked.
template <bool Q4>
inline const uint8_t* block_weights(const Tile& t, int64_t b, uint8_t* unpacked) {
  if (!Q4) return t.w + b * t.block * kCols;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < t.block / 8; ++g) {
    const __m512i v = _mm512_loadu_si512(t.w + (b * t.block + g * 8) * kCols / 2);
    _mm512_store_si512(unpacked + g * 128, _mm512_and_si512(v, low));
    _mm512_store_si512(unpacked + g * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
  return unpacked;
}

// facc[r] += block b's sums (16 rows x 16 columns, from a tile) times its scales.
template <bool Q4>
inline void add_block(const Tile& t, int64_t b, const int32_t* sums, __m512* facc) {
  const int64_t blocks = t.kp / t.block;
  __m512 s = _mm512_set1_ps(1.f);
  if (Q4)
    s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(t.scales + b * kCols))), 16));
  for (int r = 0; r < 16; ++r) {
    __m512i acc = _mm512_load_si512(sums + r * 16);
    const __m512 d = _mm512_set1_ps(t.dx[r * blocks + b]);
    if (Q4) {
      acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(8 * t.xsum[r * blocks + b]));  // codes are q + 8
      facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(s, d), facc[r]);
    } else {
      facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), d, facc[r]);
    }
  }
}

// Block b's products into tile set (sums C, x X, weights W: literals, as the tile instructions
// take them); x signed, weights unsigned.
#define LORAKIT_AMX_BLOCK(C, X, W, b)                                            \
  do {                                                                           \
    const uint8_t* weights_ = block_weights<Q4>(t, b, unpacked + (C) * 2048);    \
    _tile_zero(C);                                                               \
    _tile_loadd(X, t.q + (b) * t.block, t.kp);                                   \
    _tile_loadd(W, weights_, 64);                                                \
    _tile_dpbsud(C, X, W);                                                       \
  } while (0)

// result[r * 16 + j] for 16 rows of x (q: kp codes a row) by one column block.
template <bool Q4>
void amx_tile(const Tile& t, float* result, uint8_t* unpacked) {
  const int64_t blocks = t.kp / t.block;
  alignas(64) int32_t sums[16 * 16];
  __m512 facc[16];
  for (int r = 0; r < 16; ++r) facc[r] = _mm512_setzero_ps();
  LORAKIT_AMX_BLOCK(0, 2, 4, 0);
  for (int64_t b = 0; b < blocks; b += 2) {
    if (b + 1 < blocks) LORAKIT_AMX_BLOCK(1, 3, 5, b + 1);
    _tile_stored(0, sums, 64);
    add_block<Q4>(t, b, sums, facc);
    if (b + 2 < blocks) LORAKIT_AMX_BLOCK(0, 2, 4, b + 2);
    if (b + 1 < blocks) {
      _tile_stored(1, sums, 64);
      add_block<Q4>(t, b + 1, sums, facc);
    }
  }
  for (int r = 0; r < 16; ++r) _mm512_storeu_ps(result + r * kCols, facc[r]);
}
#undef LORAKIT_AMX_BLOCK
#endif

// The same arithmetic in plain loops (the portable build, and CPUs without AVX-512 VNNI): a group's
// 4 bytes (or 8 nibbles) of each of the 16 columns against x's 4 (or 8) codes, 16 int32 sums a block.
template <bool Q4>
void plain_tile(const Tile& t, int rows, int cols, float* result) {
  const int64_t blocks = t.kp / t.block;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const uint8_t* w = t.w + c * t.col_stride;
      const int8_t* xq = t.q + r * t.kp;
      float total[kCols] = {};
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot[kCols] = {};
        if (Q4) {
          for (int64_t g = b * t.block / 8; g < (b + 1) * t.block / 8; ++g) {
            const uint8_t* wg = w + g * 64;
            const int8_t* xg = xq + g * 8;
            for (int64_t j = 0; j < kCols; ++j)
              for (int i = 0; i < 4; ++i) dot[j] += (wg[j * 4 + i] & 0x0F) * xg[i] + (wg[j * 4 + i] >> 4) * xg[4 + i];
          }
          const float d = t.dx[r * blocks + b];
          const int32_t offset = 8 * t.xsum[r * blocks + b];  // codes are q + 8
          for (int64_t j = 0; j < kCols; ++j)
            total[j] += static_cast<float>(dot[j] - offset) * (bf16_to_float(t.scales[c * t.scale_stride + b * kCols + j]) * d);
        } else {
          for (int64_t g = b * t.block / 4; g < (b + 1) * t.block / 4; ++g) {
            const uint8_t* wg = w + g * 64;
            const int8_t* xg = xq + g * 4;
            for (int64_t j = 0; j < kCols; ++j)
              dot[j] += wg[j * 4] * xg[0] + wg[j * 4 + 1] * xg[1] + wg[j * 4 + 2] * xg[2] + wg[j * 4 + 3] * xg[3];
          }
          for (int64_t j = 0; j < kCols; ++j) total[j] += static_cast<float>(dot[j]) * t.dx[r * blocks + b];
        }
      }
      for (int64_t j = 0; j < kCols; ++j) result[(r * cols + c) * kCols + j] = total[j];
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

// A finite fp32 value rounded to the nearest bf16 (ties to even), as torch's .bfloat16() rounds it.
inline uint16_t round_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// One column block's 16 sums to bf16 outputs: out[first + j] = round(scale * (sum - correction) + bias)
// (int8: the per-channel scale and the +128 offset's correction; 4-bit: `scale` null), columns past n dropped.
inline void write_columns(uint16_t* out, const float* sums, int64_t first, int64_t n, const float* scale,
                          float correction, const float* bias) {
  const int64_t count = std::min<int64_t>(kCols, n - first);
#if defined(LORAKIT_QUANT_VNNI) && defined(__AVX512BF16__)
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  __m512 v = _mm512_loadu_ps(sums);
  if (scale) v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scale + first), _mm512_sub_ps(v, _mm512_set1_ps(correction)));
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + first));
  _mm256_mask_storeu_epi16(out + first, mask, (__m256i)_mm512_cvtneps_pbh(v));
#else
  for (int64_t j = 0; j < count; ++j) {
    float v = sums[j];
    if (scale) v = scale[first + j] * (v - correction);
    if (bias) v += bias[first + j];
    out[first + j] = round_bf16(v);
  }
#endif
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
#if defined(LORAKIT_QUANT_AMX)
  const bool amx = rows >= kAmxRows && amx_ready();
#else
  const bool amx = false;
#endif
  // Tiles: AMX's 16 rows x 1 column block; else one row x 4 column blocks (four sums in flight), or 4 x 2.
  const int cmax = amx ? 1 : rows == 1 ? 4 : 2, rmax = amx ? 16 : 4;
  const int64_t groups = (col_blocks + cmax - 1) / cmax;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> result(rmax * cmax * kCols);
#if defined(LORAKIT_QUANT_AMX)
    alignas(64) uint8_t unpacked[2 * 2048];  // two 4-bit blocks' codes as bytes (up to 64 x 16 columns each)
    if (amx) configure_tiles(block);
#endif
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * cmax;
      const int cols = static_cast<int>(std::min<int64_t>(cmax, col_blocks - first));
      for (int64_t r0 = 0; r0 < rows; r0 += rmax) {
        const int tile_rows = static_cast<int>(std::min<int64_t>(rmax, rows - r0));
        const Tile t{w + first * kp * kCols / (Q4 ? 2 : 1), kp * kCols / (Q4 ? 2 : 1),
                     Q4 ? block_scale + first * blocks * kCols : nullptr, blocks * kCols,
                     qx.q.data() + r0 * kp, qx.scale.data() + r0 * blocks, qx.sum.data() + r0 * blocks, kp, block};
        // Column blocks one at a time when they do not fill a tile (only the last group's).
        for (int c0 = 0; c0 < cols; c0 += (cols == cmax ? cmax : 1)) {
          const int tile_cols = cols == cmax ? cmax : 1;
          Tile part = t;
          part.w += c0 * t.col_stride;
          if (Q4) part.scales += c0 * t.scale_stride;
#if defined(LORAKIT_QUANT_AMX)
          if (amx) amx_tile<Q4>(part, result.data(), unpacked); else
#endif
          run_tile<Q4>(part, tile_rows, tile_cols, result.data());
          for (int r = 0; r < tile_rows; ++r)
            for (int c = 0; c < tile_cols; ++c)
              write_columns(out_ptr + (r0 + r) * n, result.data() + (r * tile_cols + c) * kCols, (first + c0 + c) * kCols, n,
                            col_scale, correction[r0 + r], bias_ptr);
        }
      }
    }
#if defined(LORAKIT_QUANT_AMX)
    if (amx) _tile_release();
#endif
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
  const float* column_scale = Q4 ? nullptr : scales.data_ptr<float>();
  const uint16_t* block_scale = Q4 ? reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>()) : nullptr;
  // Row by row: its codes gathered from the packed groups (4 bytes, or 8 nibbles, per group) into a
  // buffer as signed values, then scaled and rounded in a loop the compiler vectorizes.
  at::parallel_for(0, col_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> codes(kp);
    for (int64_t cb = begin; cb < end; ++cb)
      for (int64_t j = 0; j < kCols && cb * kCols + j < n; ++j) {
        const int64_t col = cb * kCols + j;
        uint16_t* row = o + col * k;
        if (Q4) {
          const uint8_t* src = w + cb * kp * kCols / 2 + j * 4;
          for (int64_t g = 0; g < kp / 8; ++g)
            for (int i = 0; i < 4; ++i) {
              codes[g * 8 + i] = static_cast<int8_t>((src[g * 64 + i] & 0x0F) - 8);
              codes[g * 8 + 4 + i] = static_cast<int8_t>((src[g * 64 + i] >> 4) - 8);
            }
          const uint16_t* s = block_scale + cb * blocks * kCols + j;
          for (int64_t b = 0; b * block < k; ++b) {
            const float scale = bf16_to_float(s[b * kCols]);
            const int64_t last = std::min(k, (b + 1) * block);
#pragma omp simd
            for (int64_t kk = b * block; kk < last; ++kk) row[kk] = round_bf16(static_cast<float>(codes[kk]) * scale);
          }
        } else {
          const uint8_t* src = w + cb * kp * kCols + j * 4;
          for (int64_t g = 0; g < kp / 4; ++g)
            for (int i = 0; i < 4; ++i) codes[g * 4 + i] = static_cast<int8_t>(static_cast<int32_t>(src[g * 64 + i]) - 128);
          const float scale = column_scale[col];
#pragma omp simd
          for (int64_t kk = 0; kk < k; ++kk) row[kk] = round_bf16(static_cast<float>(codes[kk]) * scale);
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

// Which path the integer matmuls take on this CPU in this build: "amx" (VNNI below 16 rows),
// "avx512_vnni", or "plain" (loops the compiler vectorizes as it can: at 16 rows ~10x slower than
// bf16 through oneDNN in the portable build, about even at one row).
std::string quant_isa() {
#if defined(LORAKIT_QUANT_AMX)
  if (amx_ready()) return "amx";
#endif
#if defined(LORAKIT_QUANT_VNNI)
  return "avx512_vnni";
#else
  return "plain";
#endif
}

}  // namespace

LORAKIT_FRAGMENT(LORAKIT_NAMESPACE, m) {
  m.def("quant_linear_int8(Tensor x, Tensor data, Tensor scales, int n, int block, Tensor? bias=None) -> Tensor");
  m.def("quant_linear_q4(Tensor x, Tensor data, Tensor scales, int n, int block, Tensor? bias=None) -> Tensor");
  m.def("quant_dequantize_int8(Tensor data, Tensor scales, int n, int k, int block) -> Tensor");
  m.def("quant_dequantize_q4(Tensor data, Tensor scales, int n, int k, int block) -> Tensor");
  m.def("quant_isa() -> str", &quant_isa);  // no tensors, so no dispatch key: one kernel for all
}

LORAKIT_CPU_IMPL(LORAKIT_NAMESPACE, m) {
  m.impl("quant_linear_int8", &quant_linear_int8);
  m.impl("quant_linear_q4", &quant_linear_q4);
  m.impl("quant_dequantize_int8", &quant_dequantize_int8);
  m.impl("quant_dequantize_q4", &quant_dequantize_q4);
}
