// GGUF block-quantized weights multiplied without expanding them (float32 activations, float32 accumulation):
// - gguf_linear: y[M, N] = x[M, K] W^T for W stored as llama.cpp's Q8_0, Q4_0, Q4_1, Q4_K or Q6_K blocks, one row of
//   blocks per output feature. Each 32-weight (sub-)block is dequantized once into registers / L1 and used by a tile
//   of rows of x.
// - gguf_dequantize: the whole W as float32 (the reference, and the path for large M where a float32 GEMM wins).
// Block layouts (ggml-common.h; the gguf package's quants.py is the reference the tests hold them to):
// - 32 weights: Q8_0 = fp16 d, int8 q[32] (w = d q); Q4_0 = fp16 d, 16 bytes of nibbles (w = d (q - 8)); Q4_1 = fp16
//   d, fp16 m, 16 bytes of nibbles (w = d q + m). Byte j of the nibbles holds weight j in its low half, j + 16 in its
//   high half.
// - 256 weights (K-quants), read as 8 sub-blocks of 32: Q4_K (144 bytes) = fp16 d, fp16 dmin, 12 bytes of 6-bit
//   (scale, min) pairs, 128 bytes of nibbles; sub-block s: w = d sc[s] q - dmin m[s], its nibbles the low (s even) or
//   high (s odd) halves of bytes 32 (s / 2) .. + 31. Q6_K (210 bytes) = 128 bytes ql (low 4 bits), 64 bytes qh (high
//   2 bits), int8 scales[16] (one per 16 weights), fp16 d; w = d scales[i / 16] (q - 32).
// Every product in these formulas is exact in float32 (fp16 d has 11 significant bits; scales, mins and quants at most
// 8, 6 and 6), so a fused multiply-add rounds as numpy's separate multiply and add do: both kernel paths dequantize
// to exactly the reference's floats.
// With AVX-512 the sub-blocks are widened and scaled in registers (Block::sub512, rows_512); elsewhere, or with
// portable=true (tests run both), plain C++ loops over 32-weight sub-blocks that the compiler vectorizes (AVX2).
#include "layer_ops.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <cstring>
#include <utility>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;  // weights per sub-block: what a kernel dequantizes at once
// I8_ROWS is not a GGUF type: int8 weights with a float32 scale per output feature (--quantization int8 on an HF
// folder), packed in Python (loom.ops.quantized.Int8Linear) straight into the int8 kernels' tiles.
enum QType : int64_t {
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
  IQ4_NL = 20, IQ4_XS = 23, I8_ROWS = 1000
};

// IQ4_NL's and IQ4_XS's 16 levels plus 128 (unsigned, zero point 128): a 4-bit quant q is the weight
// kIq4Levels[q] - 128 times its group's scale. The kernels map nibbles to levels with one byte shuffle.
alignas(16) constexpr uint8_t kIq4Levels[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};

inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

#if defined(__AVX512F__)
inline __m512 widen_u8(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
#endif

// Each block type: kBytes, kSubs (32-weight sub-blocks per block); the constructor reads the block's scales once,
// sub(s, w) writes sub-block s's 32 weights, sub512(s, w0, w1) makes them two vectors (weights 0-15, 16-31).
struct BlockQ8_0 {
  static constexpr int64_t kBytes = 34, kSubs = 1;
  const int8_t* q;
  float d;
  explicit BlockQ8_0(const uint8_t* b) : q(reinterpret_cast<const int8_t*>(b + 2)), d(half(b)) {}
  void sub(int, float* __restrict w) const {
    for (int i = 0; i < QK; ++i) w[i] = d * static_cast<float>(q[i]);
  }
#if defined(__AVX512F__)
  void sub512(int, __m512& w0, __m512& w1) const {
    const __m512 dv = _mm512_set1_ps(d);
    const auto* p = reinterpret_cast<const uint8_t*>(q);
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(p))), dv);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(p + 16))), dv);
  }
#endif
};

// Q4_0 (kMin = false: m = -8 d) and Q4_1 (an fp16 m after d).
template <bool kMin>
struct BlockQ4 {
  static constexpr int64_t kBytes = kMin ? 20 : 18, kSubs = 1;
  const uint8_t* q;
  float d, m;
  explicit BlockQ4(const uint8_t* b) : q(b + (kMin ? 4 : 2)), d(half(b)), m(kMin ? half(b + 2) : -8.f * d) {}
  void sub(int, float* __restrict w) const {
    for (int i = 0; i < QK / 2; ++i) {
      w[i] = d * static_cast<float>(q[i] & 0x0F) + m;
      w[i + QK / 2] = d * static_cast<float>(q[i] >> 4) + m;
    }
  }
#if defined(__AVX512F__)
  void sub512(int, __m512& w0, __m512& w1) const {
    const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
    const __m128i raw = load16(q), mask = _mm_set1_epi8(0x0F);
    w0 = _mm512_fmadd_ps(widen_u8(_mm_and_si128(raw, mask)), dv, mv);
    w1 = _mm512_fmadd_ps(widen_u8(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)), dv, mv);
  }
#endif
};

struct BlockQ4_K {
  static constexpr int64_t kBytes = 144, kSubs = 8;
  const uint8_t* q;
  float dl[8], ml[8];  // d sc[s] and dmin m[s] of each sub-block
  explicit BlockQ4_K(const uint8_t* b) : q(b + 16) {
    const float d = half(b), dmin = half(b + 2);
    // 12 bytes of 6-bit (scale, min): for s < 4 the low 6 bits of bytes s and s + 4; for s >= 4 the low and high
    // nibbles of byte s + 4, topped with the 2 high bits of bytes s - 4 and s.
    const uint8_t* sc = b + 4;
    for (int s = 0; s < 4; ++s) {
      dl[s] = d * static_cast<float>(sc[s] & 63);
      ml[s] = dmin * static_cast<float>(sc[s + 4] & 63);
    }
    for (int s = 4; s < 8; ++s) {
      dl[s] = d * static_cast<float>((sc[s + 4] & 0x0F) | ((sc[s - 4] >> 6) << 4));
      ml[s] = dmin * static_cast<float>((sc[s + 4] >> 4) | ((sc[s] >> 6) << 4));
    }
  }
  void sub(int s, float* __restrict w) const {
    const uint8_t* p = q + (s / 2) * QK;
    const int shift = (s & 1) * 4;
    for (int i = 0; i < QK; ++i) w[i] = dl[s] * static_cast<float>((p[i] >> shift) & 0x0F) - ml[s];
  }
#if defined(__AVX512F__)
  void sub512(int s, __m512& w0, __m512& w1) const {
    const uint8_t* p = q + (s / 2) * QK;
    const __m128i shift = _mm_cvtsi32_si128((s & 1) * 4), mask = _mm_set1_epi8(0x0F);
    const __m512 dv = _mm512_set1_ps(dl[s]), mv = _mm512_set1_ps(ml[s]);
    w0 = _mm512_fmsub_ps(widen_u8(_mm_and_si128(_mm_srl_epi16(load16(p), shift), mask)), dv, mv);
    w1 = _mm512_fmsub_ps(widen_u8(_mm_and_si128(_mm_srl_epi16(load16(p + 16), shift), mask)), dv, mv);
  }
#endif
};

// Sub-block s = 4 h + c (half h of 128 weights, chunk c): low bits from ql[64 h + 32 (c & 1) + i] (low nibble for
// c < 2, high for c >= 2), high bits from bits 2c, 2c + 1 of qh[32 h + i]; scales 8 h + 2 c (i < 16) and + 1.
struct BlockQ6_K {
  static constexpr int64_t kBytes = 210, kSubs = 8;
  const uint8_t *ql, *qh;
  const int8_t* scales;
  float d;
  explicit BlockQ6_K(const uint8_t* b)
      : ql(b), qh(b + 128), scales(reinterpret_cast<const int8_t*>(b + 192)), d(half(b + 208)) {}
  void sub(int s, float* __restrict w) const {
    const int h = s / 4, c = s % 4, lshift = (c / 2) * 4, hshift = 2 * c;
    const uint8_t *lo = ql + 64 * h + 32 * (c & 1), *hi = qh + 32 * h;
    for (int j = 0; j < 2; ++j) {  // 16 weights a scale
      const float dl = d * static_cast<float>(scales[8 * h + 2 * c + j]);
      for (int i = 16 * j; i < 16 * j + 16; ++i)
        w[i] = dl * static_cast<float>((((lo[i] >> lshift) & 0x0F) | (((hi[i] >> hshift) & 3) << 4)) - 32);
    }
  }
#if defined(__AVX512F__)
  __m512 half512(const uint8_t* lo, const uint8_t* hi, __m128i lshift, __m128i hshift, int scale) const {
    const __m128i low = _mm_and_si128(_mm_srl_epi16(load16(lo), lshift), _mm_set1_epi8(0x0F));
    const __m128i high = _mm_slli_epi16(_mm_and_si128(_mm_srl_epi16(load16(hi), hshift), _mm_set1_epi8(3)), 4);
    const __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_or_si128(low, high)), _mm512_set1_epi32(32));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(d * static_cast<float>(scales[scale])));
  }
  void sub512(int s, __m512& w0, __m512& w1) const {
    const int h = s / 4, c = s % 4;
    const __m128i lshift = _mm_cvtsi32_si128((c / 2) * 4), hshift = _mm_cvtsi32_si128(2 * c);
    const uint8_t *lo = ql + 64 * h + 32 * (c & 1), *hi = qh + 32 * h;
    w0 = half512(lo, hi, lshift, hshift, 8 * h + 2 * c);
    w1 = half512(lo + 16, hi + 16, lshift, hshift, 8 * h + 2 * c + 1);
  }
#endif
};

template <class B>
struct Tag {
  using Block = B;
};

// f(Tag<Block>{}) for qtype's block type.
template <class F>
void with_block(int64_t qtype, F&& f) {
  switch (qtype) {
    case Q8_0: return f(Tag<BlockQ8_0>{});
    case Q4_0: return f(Tag<BlockQ4<false>>{});
    case Q4_1: return f(Tag<BlockQ4<true>>{});
    case Q4_K: return f(Tag<BlockQ4_K>{});
    case Q6_K: return f(Tag<BlockQ6_K>{});
  }
  TORCH_CHECK(false, "unsupported GGUF quantization type ", qtype, " (Loom runs Q8_0, Q4_0, Q4_1, Q4_K and Q6_K)");
}

// K and W's row bytes agree with the block type; returns the blocks per row.
template <class Block>
int64_t blocks_per_row(const torch::Tensor& qweight, int64_t K) {
  constexpr int64_t weights = Block::kSubs * QK;
  TORCH_CHECK(K % weights == 0, "in_features must be a multiple of ", weights, " for this block type, got ", K);
  const int64_t nb = K / weights;
  TORCH_CHECK(qweight.size(1) == nb * Block::kBytes, "qweight rows hold ", qweight.size(1), " bytes, expected ",
              nb * Block::kBytes);
  return nb;
}

template <class Block>
void dequantize_rows(const uint8_t* qp, int64_t N, int64_t nb, float* op, bool portable) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const Block block(qp + (n * nb + b) * Block::kBytes);
        float* out = op + (n * nb + b) * Block::kSubs * QK;
        for (int s = 0; s < Block::kSubs; ++s) {
#if defined(__AVX512F__)
          if (!portable) {
            __m512 w0, w1;
            block.sub512(s, w0, w1);
            _mm512_storeu_ps(out + s * QK, w0);
            _mm512_storeu_ps(out + s * QK + 16, w1);
            continue;
          }
#endif
          block.sub(s, out + s * QK);
        }
      }
  });
}

#if defined(__AVX512F__)
// Rows [m0, m0 + T) of y for output feature n: each sub-block dequantized once into two registers, then applied to
// every row of x; the accumulators stay in registers across the whole row of blocks. Up to 4 rows keep two
// accumulators each (two independent FMA chains per row); larger tiles, one (16 rows fit the register file with the
// sub-block).
template <int T, class Block>
inline void rows_512(const float* xp, int64_t K, const uint8_t* row, int64_t nb, float* yp, int64_t N, int64_t n,
                     int64_t m0, const float* bp) {
  constexpr bool kTwo = T <= 4;
  __m512 acc0[T], acc1[kTwo ? T : 1];
  for (int r = 0; r < T; ++r) acc0[r] = _mm512_setzero_ps();
  if constexpr (kTwo)
    for (int r = 0; r < T; ++r) acc1[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const Block block(row + b * Block::kBytes);
#pragma GCC unroll 8
    for (int s = 0; s < Block::kSubs; ++s) {
      __m512 w0, w1;
      block.sub512(s, w0, w1);
      const int64_t k0 = (b * Block::kSubs + s) * QK;
      for (int r = 0; r < T; ++r) {
        const float* xr = xp + (m0 + r) * K + k0;
        acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc0[r]);
        if constexpr (kTwo)
          acc1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc1[r]);
        else
          acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc0[r]);
      }
    }
  }
  for (int r = 0; r < T; ++r) {
    const __m512 sum = kTwo ? _mm512_add_ps(acc0[r], acc1[r]) : acc0[r];
    yp[(m0 + r) * N + n] = _mm512_reduce_add_ps(sum) + (bp ? bp[n] : 0.f);
  }
}

template <class Block, int... Ts>
inline void row_tile_dispatch(int64_t tm, std::integer_sequence<int, Ts...>, const float* xp, int64_t K,
                              const uint8_t* row, int64_t nb, float* yp, int64_t N, int64_t n, int64_t m0,
                              const float* bp) {
  ((tm == Ts + 1 ? (rows_512<Ts + 1, Block>(xp, K, row, nb, yp, N, n, m0, bp), 0) : 0), ...);
}

constexpr int64_t kTile512 = 16;  // rows of x sharing one dequantized sub-block

template <class Block>
void linear_512(const float* xp, int64_t M, int64_t K, const uint8_t* qp, int64_t N, int64_t nb, float* yp,
                const float* bp) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += kTile512)
        row_tile_dispatch<Block>(std::min(kTile512, M - m0), std::make_integer_sequence<int, kTile512>{}, xp, K,
                                 qp + n * nb * Block::kBytes, nb, yp, N, n, m0, bp);
  });
}
#endif

template <class Block>
void linear_portable(const float* xp, int64_t M, int64_t K, const uint8_t* qp, int64_t N, int64_t nb, float* yp,
                     const float* bp) {
  constexpr int64_t TM = 8;  // rows of x sharing one dequantized sub-block
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    alignas(64) float w[QK];
    alignas(64) float acc[TM][QK];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = qp + n * nb * Block::kBytes;
      for (int64_t m0 = 0; m0 < M; m0 += TM) {
        const int64_t tm = std::min(TM, M - m0);
        for (int64_t r = 0; r < tm; ++r) std::fill(acc[r], acc[r] + QK, 0.f);
        for (int64_t b = 0; b < nb; ++b) {
          const Block block(row + b * Block::kBytes);
          for (int s = 0; s < Block::kSubs; ++s) {
            block.sub(s, w);
            for (int64_t r = 0; r < tm; ++r) {
              const float* xr = xp + (m0 + r) * K + (b * Block::kSubs + s) * QK;
              float* a = acc[r];
#pragma omp simd
              for (int i = 0; i < QK; ++i) a[i] += xr[i] * w[i];
            }
          }
        }
        for (int64_t r = 0; r < tm; ++r) {
          float sum = 0.f;
          for (int i = 0; i < QK; ++i) sum += acc[r][i];
          yp[(m0 + r) * N + n] = sum + (bp ? bp[n] : 0.f);
        }
      }
    }
  });
}


// ---- int8 dot products (llama.cpp's arithmetic): activations quantized per 32 to int8, integer block dots ----
// At load the blocks are repacked (gguf_int8_pack) into tiles of 16 output features: within a tile, each group of G
// weights (32; Q6_K's scale groups: 16) is G / 4 "quads" of 64 bytes, byte 4 n + l of quad j holding feature n's
// quant for input 4 j + l (4-bit formats: two quads a 64-byte line, quad 2i in the low nibbles, 2i + 1 in the high),
// beside the group's 16 scales d and (Q4_1, Q4_K) mins m: w = d (q - zero) + m with q unsigned. The quads are
// exactly vpdpbusd's operand: one instruction multiplies 4 inputs of a row (one int32 broadcast) by 16 features'
// 4 weights and adds each feature's 4 products into its lane. Per group and row: sum_k q x_q in int32, minus
// zero * sum_k x_q (exact), times d d_x, plus m * d_x sum_k x_q (the min's share). Activations: per 32 inputs
// d_x = amax / 127, x_q = round-to-nearest-even(x / d_x) as llama.cpp's quantize_row_q8_0 (float d_x, not fp16).

struct Int8Format {
  int bits, group, zero;
  bool has_min, half_scales;
  bool levels = false;  // the 4-bit quants index kIq4Levels (IQ4_NL, IQ4_XS)
};

Int8Format int8_format(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return {4, 32, 8, false, true};
    case Q4_1: return {4, 32, 0, true, true};
    case Q8_0: return {8, 32, 128, false, true};
    case Q4_K: return {4, 32, 0, true, false};
    case Q6_K: return {8, 16, 32, false, false};
    case I8_ROWS: return {8, 32, 128, false, false};
    // packed from spelled-out quants (gguf_int8_pack_quants; loom.ops.quantized.block_quants unpacks the blocks)
    case Q5_0: return {8, 32, 16, false, true};
    case Q5_1: return {8, 32, 0, true, true};
    case Q5_K: return {8, 32, 0, true, false};
    case Q3_K: return {4, 16, 4, false, false};
    case Q2_K: return {4, 16, 0, true, false};
    case IQ4_NL: return {4, 32, 128, false, true, true};
    case IQ4_XS: return {4, 32, 128, false, false, true};
  }
  TORCH_CHECK(false, "unsupported GGUF quantization type ", qtype, " (Loom runs Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, ",
              "Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS)");
}

int64_t block_weights(int64_t qtype) { return qtype == Q4_K || qtype == Q6_K ? 256 : 32; }
int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    case Q4_K: return 144;
    default: return 210;
  }
}

// One GGUF block's unsigned quants q[block_weights] and its groups' d and m (the min; 0 where the format has none).
void unpack_block(int64_t qtype, const uint8_t* b, uint8_t* q, float* d, float* m) {
  switch (qtype) {
    case Q8_0:
      d[0] = half(b), m[0] = 0.f;
      for (int i = 0; i < 32; ++i) q[i] = static_cast<uint8_t>(static_cast<int8_t>(b[2 + i]) + 128);
      return;
    case Q4_0:
    case Q4_1: {
      const int off = qtype == Q4_1 ? 4 : 2;
      d[0] = half(b), m[0] = qtype == Q4_1 ? half(b + 2) : 0.f;
      for (int i = 0; i < 16; ++i) q[i] = b[off + i] & 0x0F, q[i + 16] = b[off + i] >> 4;
      return;
    }
    case Q4_K: {
      const BlockQ4_K block(b);
      for (int s = 0; s < 8; ++s) {
        d[s] = block.dl[s], m[s] = -block.ml[s];
        const uint8_t* p = block.q + (s / 2) * 32;
        for (int i = 0; i < 32; ++i) q[32 * s + i] = (p[i] >> ((s & 1) * 4)) & 0x0F;
      }
      return;
    }
    case Q6_K: {
      const BlockQ6_K block(b);
      for (int s = 0; s < 8; ++s) {
        const int h = s / 4, c = s % 4;
        const uint8_t *lo = block.ql + 64 * h + 32 * (c & 1), *hi = block.qh + 32 * h;
        for (int i = 0; i < 32; ++i)
          q[32 * s + i] = ((lo[i] >> ((c / 2) * 4)) & 0x0F) | (((hi[i] >> (2 * c)) & 3) << 4);
        for (int j = 0; j < 2; ++j) d[2 * s + j] = block.d * static_cast<float>(block.scales[8 * h + 2 * c + j]), m[2 * s + j] = 0.f;
      }
      return;
    }
  }
  TORCH_CHECK(false, "unsupported GGUF quantization type ", qtype);
}

inline float scale_at(const uint16_t* p) { return c10::detail::fp16_ieee_to_fp32_value(*p); }
inline float scale_at(const float* p) { return *p; }

// Activations of one call: x_q int8 [M, K], d_x [M, K / 32], per weight group sum_k x_q (int32) and d_x sum_k x_q.
// They live in a per-thread scratch buffer reused call after call (a decode step makes ~120 calls; four tensor
// allocations each were a measurable share of a small projection's time).
struct QuantizedRows {
  int8_t* q;
  float *d, *fsum;
  int32_t* qsum;
  int64_t M, K;
};

QuantizedRows quantize_rows(const torch::Tensor& x, int64_t group, bool portable) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / group;
  thread_local std::vector<float> scratch;  // floats, so every part stays 4-byte aligned
  const int64_t q_floats = (M * K + 3) / 4, need = q_floats + M * (K / 32) + 2 * M * groups;
  if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
  float* base = scratch.data();
  QuantizedRows out{reinterpret_cast<int8_t*>(base), base + q_floats, base + q_floats + M * (K / 32),
                    reinterpret_cast<int32_t*>(base + q_floats + M * (K / 32) + M * groups), M, K};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = out.q;
  float *dp = out.d, *fp = out.fsum;
  int32_t* sp = out.qsum;
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t b = 0; b < K / 32; ++b) {
        const float* xb = xp + r * K + b * 32;
        int8_t* qb = qp + r * K + b * 32;
        int32_t sums[2] = {0, 0};  // of each 16
        float d;
#if defined(__AVX512F__)
        if (!portable) {
          const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
          const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
          d = amax / 127.f;
          const __m512 id = _mm512_set1_ps(d != 0.f ? 1.f / d : 0.f);
          const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(q0));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(q1));
          sums[0] = _mm512_reduce_add_epi32(q0), sums[1] = _mm512_reduce_add_epi32(q1);
        } else
#endif
        {
          float amax = 0.f;
          for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
          d = amax / 127.f;
          const float id = d != 0.f ? 1.f / d : 0.f;
          for (int i = 0; i < 32; ++i) {
            const int v = static_cast<int>(std::nearbyint(xb[i] * id));
            qb[i] = static_cast<int8_t>(v);
            sums[i / 16] += v;
          }
        }
        dp[r * (K / 32) + b] = d;
        if (group == 32) {
          sp[r * groups + b] = sums[0] + sums[1];
          fp[r * groups + b] = d * static_cast<float>(sums[0] + sums[1]);
        } else {
          for (int j = 0; j < 2; ++j) {
            sp[r * groups + 2 * b + j] = sums[j];
            fp[r * groups + 2 * b + j] = d * static_cast<float>(sums[j]);
          }
        }
      }
  });
  return out;
}

// The arguments every tile kernel takes.
struct Int8Call {
  const int8_t* xq;
  const float *dx, *fsum, *bias;
  const int32_t* qsum;
  const uint8_t* qs;  // this tile's quads, group after group
  const void *d, *m;  // this tile's scales (16 a group)
  int64_t K, N, n0, groups, line;  // line: bytes of quads a group
  float* y;
};

// The formats as types: quant bits, weights a group (one d, one m), zero point, whether m exists, scale storage,
// whether the quants index kIq4Levels.
template <int kBits, int kGroup, int kZero, bool kMin, class Scale, bool kLevels = false>
struct Fmt {
  static constexpr int bits = kBits, group = kGroup, zero = kZero, quads = kGroup / 4;
  static constexpr bool has_min = kMin, levels = kLevels;
  using S = Scale;
};
using FQ4_0 = Fmt<4, 32, 8, false, uint16_t>;
using FQ4_1 = Fmt<4, 32, 0, true, uint16_t>;
using FQ8_0 = Fmt<8, 32, 128, false, uint16_t>;
using FQ4_K = Fmt<4, 32, 0, true, float>;
using FQ6_K = Fmt<8, 16, 32, false, float>;
using FI8 = Fmt<8, 32, 128, false, float>;
using FQ5_0 = Fmt<8, 32, 16, false, uint16_t>;
using FQ5_1 = Fmt<8, 32, 0, true, uint16_t>;
using FQ5_K = Fmt<8, 32, 0, true, float>;
using FQ3_K = Fmt<4, 16, 4, false, float>;
using FQ2_K = Fmt<4, 16, 0, true, float>;
using FIQ4_NL = Fmt<4, 32, 128, false, uint16_t, true>;
using FIQ4_XS = Fmt<4, 32, 128, false, float, true>;

template <class F>
void with_int8_format(int64_t qtype, F&& f) {
  switch (qtype) {
    case Q4_0: return f(FQ4_0{});
    case Q4_1: return f(FQ4_1{});
    case Q8_0: return f(FQ8_0{});
    case Q4_K: return f(FQ4_K{});
    case Q6_K: return f(FQ6_K{});
    case I8_ROWS: return f(FI8{});
    case Q5_0: return f(FQ5_0{});
    case Q5_1: return f(FQ5_1{});
    case Q5_K: return f(FQ5_K{});
    case Q3_K: return f(FQ3_K{});
    case Q2_K: return f(FQ2_K{});
    case IQ4_NL: return f(FIQ4_NL{});
    case IQ4_XS: return f(FIQ4_XS{});
  }
  TORCH_CHECK(false, "unsupported GGUF quantization type ", qtype);
}

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
inline __m512 scales16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 scales16(const float* p) { return _mm512_loadu_ps(p); }

// Rows [m0, m0 + T) of the tile's 16 features: one vpdpbusd per quad and row.
template <int T, class F>
inline void int8_rows_512(const Int8Call& c, int64_t m0) {
  const auto* d = static_cast<const typename F::S*>(c.d);
  const auto* mn = static_cast<const typename F::S*>(c.m);
  __m512 acc[T];
  for (int r = 0; r < T; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i levels = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4Levels)));
  for (int64_t g = 0; g < c.groups; ++g) {
    const uint8_t* line = c.qs + g * c.line;
    __m512i w[F::quads];
    if constexpr (F::bits == 8) {
      for (int j = 0; j < F::quads; ++j) w[j] = _mm512_loadu_si512(line + 64 * j);
    } else {
      for (int j = 0; j < F::quads / 2; ++j) {
        const __m512i v = _mm512_loadu_si512(line + 64 * j);
        w[2 * j] = _mm512_and_si512(v, low);
        w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      if constexpr (F::levels)
        for (int j = 0; j < F::quads; ++j) w[j] = _mm512_shuffle_epi8(levels, w[j]);
    }
    const __m512 dw = scales16(d + 16 * g);
    __m512 mw;
    if constexpr (F::has_min) mw = scales16(mn + 16 * g);
    for (int r = 0; r < T; ++r) {
      const int64_t row = m0 + r;
      const int8_t* a = c.xq + row * c.K + g * F::group;
      __m512i s = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();  // two chains: dpbusd's latency
      for (int j = 0; j < F::quads; j += 2) {
        s = _mm512_dpbusd_epi32(s, w[j], _mm512_set1_epi32(four_bytes(a + 4 * j)));
        s1 = _mm512_dpbusd_epi32(s1, w[j + 1], _mm512_set1_epi32(four_bytes(a + 4 * j + 4)));
      }
      s = _mm512_add_epi32(s, s1);
      if constexpr (F::zero != 0) s = _mm512_sub_epi32(s, _mm512_set1_epi32(F::zero * c.qsum[row * c.groups + g]));
      const float dx = c.dx[row * (c.K / 32) + g * F::group / 32];
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[r]);
      if constexpr (F::has_min) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(c.fsum[row * c.groups + g]), acc[r]);
    }
  }
  const int64_t width = std::min<int64_t>(16, c.N - c.n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
  const __m512 bias = c.bias ? _mm512_maskz_loadu_ps(mask, c.bias + c.n0) : _mm512_setzero_ps();
  for (int r = 0; r < T; ++r) _mm512_mask_storeu_ps(c.y + (m0 + r) * c.N + c.n0, mask, _mm512_add_ps(acc[r], bias));
}
#endif

#if defined(__AVX2__)
inline __m256 scales8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 scales8(const float* p) { return _mm256_loadu_ps(p); }

// The same with AVX2 (no VNNI): each half of the tile (8 features, 32 bytes of a quad) at a time; vpmaddubsw
// multiplies unsigned by signed bytes into pairs of int16 (saturating: safe for quants below 64), vpmaddwd adds
// the pairs into each feature's int32. Q8_0's and IQ4's quants (0..255 with zero 128) would saturate, so they are
// turned back to signed and llama.cpp's sign trick used: |w| times x with w's sign.
template <int T, class F>
inline void int8_rows_256(const Int8Call& c, int64_t m0) {
  constexpr bool kSigned = F::zero == 128;
  const auto* d = static_cast<const typename F::S*>(c.d);
  const auto* mn = static_cast<const typename F::S*>(c.m);
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(-128);
  const __m256i levels = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4Levels)));
  for (int h = 0; h < 2; ++h) {
    const int64_t width = std::min<int64_t>(8, c.N - c.n0 - 8 * h);
    if (width <= 0) break;
    __m256 acc[T];
    for (int r = 0; r < T; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < c.groups; ++g) {
      const uint8_t* line = c.qs + g * c.line + 32 * h;
      __m256i w[F::quads];
      if constexpr (F::bits == 8) {
        for (int j = 0; j < F::quads; ++j) {
          w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 64 * j));
          if constexpr (kSigned) w[j] = _mm256_xor_si256(w[j], flip);
        }
      } else {
        for (int j = 0; j < F::quads / 2; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 64 * j));
          w[2 * j] = _mm256_and_si256(v, low);
          w[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
        if constexpr (F::levels)
          for (int j = 0; j < F::quads; ++j) w[j] = _mm256_xor_si256(_mm256_shuffle_epi8(levels, w[j]), flip);
      }
      const __m256 dw = scales8(d + 16 * g + 8 * h);
      __m256 mw;
      if constexpr (F::has_min) mw = scales8(mn + 16 * g + 8 * h);
      for (int r = 0; r < T; ++r) {
        const int64_t row = m0 + r;
        const int8_t* a = c.xq + row * c.K + g * F::group;
        __m256i s = _mm256_setzero_si256();
        for (int j = 0; j < F::quads; ++j) {
          const __m256i x = _mm256_set1_epi32(four_bytes(a + 4 * j));
          const __m256i pairs = kSigned ? _mm256_maddubs_epi16(_mm256_abs_epi8(w[j]), _mm256_sign_epi8(x, w[j]))
                                        : _mm256_maddubs_epi16(w[j], x);
          s = _mm256_add_epi32(s, _mm256_madd_epi16(pairs, ones));
        }
        if constexpr (F::zero != 0 && !kSigned)
          s = _mm256_sub_epi32(s, _mm256_set1_epi32(F::zero * c.qsum[row * c.groups + g]));
        const float dx = c.dx[row * (c.K / 32) + g * F::group / 32];
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc[r]);
        if constexpr (F::has_min) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(c.fsum[row * c.groups + g]), acc[r]);
      }
    }
    const int64_t n = c.n0 + 8 * h;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(width)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 bias = c.bias ? _mm256_maskload_ps(c.bias + n, mask) : _mm256_setzero_ps();
    for (int r = 0; r < T; ++r) _mm256_maskstore_ps(c.y + (m0 + r) * c.N + n, mask, _mm256_add_ps(acc[r], bias));
  }
}
#endif

// The same arithmetic in plain loops (any CPU): a group's weights unpacked to int16 per feature, one dot per row.
template <class F>
void int8_rows_portable(const Int8Call& c, int64_t m0, int64_t tm) {
  const auto* d = static_cast<const typename F::S*>(c.d);
  const auto* mn = static_cast<const typename F::S*>(c.m);
  float acc[8][16] = {};
  int16_t w[16][F::group];
  for (int64_t g = 0; g < c.groups; ++g) {
    const uint8_t* line = c.qs + g * c.line;
    for (int j = 0; j < F::quads; ++j)
      for (int n = 0; n < 16; ++n)
        for (int l = 0; l < 4; ++l) {
          const uint8_t q = F::bits == 8 ? line[64 * j + 4 * n + l]
                                         : (line[64 * (j / 2) + 4 * n + l] >> (4 * (j % 2))) & 0x0F;
          w[n][4 * j + l] = F::levels ? kIq4Levels[q] : q;
        }
    for (int64_t r = 0; r < tm; ++r) {
      const int64_t row = m0 + r;
      const int8_t* a = c.xq + row * c.K + g * F::group;
      const float dx = c.dx[row * (c.K / 32) + g * F::group / 32];
      for (int n = 0; n < 16; ++n) {
        int32_t s = 0;
        for (int k = 0; k < F::group; ++k) s += w[n][k] * a[k];
        s -= F::zero * c.qsum[row * c.groups + g];
        acc[r][n] = std::fma(static_cast<float>(s), scale_at(d + 16 * g + n) * dx, acc[r][n]);
        if constexpr (F::has_min) acc[r][n] = std::fma(scale_at(mn + 16 * g + n), c.fsum[row * c.groups + g], acc[r][n]);
      }
    }
  }
  for (int64_t r = 0; r < tm; ++r)
    for (int n = 0; n < 16 && c.n0 + n < c.N; ++n)
      c.y[(m0 + r) * c.N + c.n0 + n] = acc[r][n] + (c.bias ? c.bias[c.n0 + n] : 0.f);
}

enum Int8Path : int { kAuto = 0, kAvx2 = 1, kPortable = 2 };

template <class F, int... Ts>
inline void int8_tile(int64_t tm, std::integer_sequence<int, Ts...>, const Int8Call& c, int64_t m0, Int8Path path) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  if (path == kAuto) return (void)((tm == Ts + 1 ? (int8_rows_512<Ts + 1, F>(c, m0), 0) : 0), ...);
#endif
#if defined(__AVX2__)
  if (path != kPortable) return (void)((tm == Ts + 1 ? (int8_rows_256<Ts + 1, F>(c, m0), 0) : 0), ...);
#endif
  int8_rows_portable<F>(c, m0, tm);
}

constexpr int64_t kInt8Rows = 8;    // rows of x a tile's weight group serves while in registers
constexpr int64_t kInt8Chunk = 64;  // rows of x kept hot in cache while a thread walks its tiles

template <class F>
void int8_linear_impl(const QuantizedRows& xq, const torch::Tensor& qs, const torch::Tensor& d,
                      const torch::Tensor& m, int64_t N, const float* bias, float* y, Int8Path path) {
  const int64_t M = xq.M, K = xq.K, tiles = qs.size(0), groups = K / F::group;
  const int64_t line = F::group * 16 * F::bits / 8;
  const uint8_t* qsp = qs.data_ptr<uint8_t>();
  const auto* dp = static_cast<const typename F::S*>(d.data_ptr());
  const auto* mp = F::has_min ? static_cast<const typename F::S*>(m.data_ptr()) : nullptr;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = 0; c0 < M; c0 += kInt8Chunk)
      for (int64_t t = begin; t < end; ++t) {
        const Int8Call c{xq.q, xq.d, xq.fsum, bias, xq.qsum, qsp + t * groups * line, dp + t * groups * 16,
                         mp ? mp + t * groups * 16 : nullptr, K, N, t * 16, groups, line, y};
        const int64_t c1 = std::min(M, c0 + kInt8Chunk);
        for (int64_t m0 = c0; m0 < c1; m0 += kInt8Rows)
          int8_tile<F>(std::min(kInt8Rows, c1 - m0), std::make_integer_sequence<int, kInt8Rows>{}, c, m0, path);
      }
  });
}

}  // namespace

torch::Tensor gguf_dequantize(torch::Tensor qweight, int64_t qtype, int64_t in_features, bool portable) {
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.dim() == 2, "qweight: [N, row_bytes] uint8");
  qweight = qweight.contiguous();
  auto out = torch::empty({qweight.size(0), in_features}, torch::kFloat32);
  with_block(qtype, [&](auto tag) {
    using Block = typename decltype(tag)::Block;
    const int64_t nb = blocks_per_row<Block>(qweight, in_features);
    dequantize_rows<Block>(qweight.data_ptr<uint8_t>(), qweight.size(0), nb, out.data_ptr<float>(), portable);
  });
  return out;
}

torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor qweight, int64_t qtype, c10::optional<torch::Tensor> bias,
                          bool portable) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x: [M, K] float32");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.dim() == 2, "qweight: [N, row_bytes] uint8");
  x = x.contiguous();
  qweight = qweight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  auto y = torch::empty({M, N}, torch::kFloat32);
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  with_block(qtype, [&](auto tag) {
    using Block = typename decltype(tag)::Block;
    const int64_t nb = blocks_per_row<Block>(qweight, K);
    const float* xp = x.data_ptr<float>();
    const uint8_t* qp = qweight.data_ptr<uint8_t>();
#if defined(__AVX512F__)
    if (!portable) return linear_512<Block>(xp, M, K, qp, N, nb, y.data_ptr<float>(), bp);
#endif
    linear_portable<Block>(xp, M, K, qp, N, nb, y.data_ptr<float>(), bp);
  });
  return y;
}

// The tiles, row by row: ``row(n, q, d, m)`` writes feature n's K unsigned quants and its K / group scales d and
// mins m (float32; m unused when the format has none) into per-thread buffers, w = d (q - zero) + m.
template <class Row>
std::vector<torch::Tensor> pack_tiles(int64_t N, int64_t K, const Int8Format& f, Row&& row) {
  const int64_t tiles = (N + 15) / 16, groups = K / f.group, line = f.group * 16 * f.bits / 8;
  auto qs = torch::zeros({tiles, groups, line}, torch::kUInt8);
  const auto scale_type = f.half_scales ? torch::kFloat16 : torch::kFloat32;
  auto d = torch::zeros({tiles, groups, 16}, scale_type);
  auto m = f.has_min ? torch::zeros({tiles, groups, 16}, scale_type) : torch::empty({0}, scale_type);
  uint8_t* qsp = qs.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> q(K);
    std::vector<float> dr(groups), mr(groups);
    for (int64_t n = begin; n < end; ++n) {
      row(n, q.data(), dr.data(), mr.data());
      const int64_t t = n / 16, lane = n % 16;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t idx = (t * groups + g) * 16 + lane;
        if (f.half_scales) {
          d.data_ptr<at::Half>()[idx] = at::Half(dr[g]);
          if (f.has_min) m.data_ptr<at::Half>()[idx] = at::Half(mr[g]);
        } else {
          d.data_ptr<float>()[idx] = dr[g];
          if (f.has_min) m.data_ptr<float>()[idx] = mr[g];
        }
        uint8_t* out = qsp + (t * groups + g) * line;
        for (int64_t k = 0; k < f.group; ++k) {
          const uint8_t v = q[g * f.group + k];
          const int64_t j = k / 4, l = k % 4;
          if (f.bits == 8)
            out[64 * j + 4 * lane + l] = v;
          else
            out[64 * (j / 2) + 4 * lane + l] |= v << (4 * (j % 2));
        }
      }
    }
  });
  // Padding features (N not a multiple of 16) keep scale 0 and min 0: their weights are 0 whatever the quants.
  return {qs, d, m};
}

std::vector<torch::Tensor> gguf_int8_pack(torch::Tensor qweight, int64_t qtype, int64_t in_features) {
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.dim() == 2, "qweight: [N, row_bytes] uint8");
  TORCH_CHECK(qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0 || qtype == Q4_K || qtype == Q6_K,
              "gguf_int8_pack reads Q4_0, Q4_1, Q8_0, Q4_K and Q6_K blocks; other types: gguf_int8_pack_quants");
  qweight = qweight.contiguous();
  const Int8Format f = int8_format(qtype);
  const int64_t N = qweight.size(0), K = in_features, bw = block_weights(qtype), nb = K / bw;
  TORCH_CHECK(K % bw == 0 && qweight.size(1) == nb * block_bytes(qtype), "qweight rows hold ", qweight.size(1),
              " bytes, expected ", nb * block_bytes(qtype), " for ", K, " inputs");
  const int64_t gpb = bw / f.group;  // groups a block
  const uint8_t* src = qweight.data_ptr<uint8_t>();
  return pack_tiles(N, K, f, [&](int64_t n, uint8_t* q, float* dr, float* mr) {
    for (int64_t b = 0; b < nb; ++b)
      unpack_block(qtype, src + (n * nb + b) * block_bytes(qtype), q + b * bw, dr + b * gpb, mr + b * gpb);
  });
}

std::vector<torch::Tensor> gguf_int8_pack_quants(torch::Tensor q, torch::Tensor d, torch::Tensor m, int64_t qtype) {
  const Int8Format f = int8_format(qtype);
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.size(1) % f.group == 0,
              "q: [N, K] uint8 with K a multiple of ", f.group);
  const int64_t N = q.size(0), K = q.size(1), groups = K / f.group;
  q = q.contiguous();
  d = d.to(torch::kFloat32).contiguous();
  TORCH_CHECK(d.numel() == N * groups, "d: one scale per ", f.group, " weights");
  m = f.has_min ? m.to(torch::kFloat32).contiguous() : d;
  TORCH_CHECK(m.numel() == d.numel(), "m: one min per ", f.group, " weights");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *dp = d.data_ptr<float>(), *mp = m.data_ptr<float>();
  return pack_tiles(N, K, f, [&](int64_t n, uint8_t* qr, float* dr, float* mr) {
    std::copy_n(qp + n * K, K, qr);
    std::copy_n(dp + n * groups, groups, dr);
    std::copy_n(mp + n * groups, groups, mr);
  });
}

torch::Tensor gguf_int8_unpack(torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t qtype, int64_t N) {
  const Int8Format f = int8_format(qtype);
  const int64_t groups = qs.size(1), K = groups * f.group;
  auto out = torch::empty({N, K}, torch::kFloat32);
  const auto df = d.to(torch::kFloat32).contiguous();
  const auto mf = f.has_min ? m.to(torch::kFloat32).contiguous() : df;
  const uint8_t* qsp = qs.data_ptr<uint8_t>();
  const int64_t line = qs.size(2);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* in = qsp + ((n / 16) * groups + g) * line;
      const int64_t idx = ((n / 16) * groups + g) * 16 + n % 16;
      const float dv = df.data_ptr<float>()[idx], mv = f.has_min ? mf.data_ptr<float>()[idx] : 0.f;
      for (int64_t k = 0; k < f.group; ++k) {
        const int64_t j = k / 4, l = k % 4;
        int q = f.bits == 8 ? in[64 * j + 4 * (n % 16) + l] : (in[64 * (j / 2) + 4 * (n % 16) + l] >> (4 * (j % 2))) & 0x0F;
        if (f.levels) q = kIq4Levels[q];
        out.data_ptr<float>()[n * K + g * f.group + k] = dv * static_cast<float>(q - f.zero) + mv;
      }
    }
  return out;
}

torch::Tensor gguf_int8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t qtype,
                               int64_t N, c10::optional<torch::Tensor> bias, const std::string& path) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x: [M, K] float32");
  TORCH_CHECK(path == "auto" || path == "avx2" || path == "portable", "path: auto, avx2 or portable, got ", path);
  const Int8Path kernel = path == "auto" ? kAuto : path == "avx2" ? kAvx2 : kPortable;
  const Int8Format f = int8_format(qtype);
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(qs.dim() == 3 && qs.size(0) == (N + 15) / 16 && qs.size(1) * f.group == K, "packed weight of shape ",
              qs.sizes(), " does not fit x [", M, ", ", K, "] and ", N, " outputs");
  auto y = torch::empty({M, N}, torch::kFloat32);
  if (M == 0) return y;
  const QuantizedRows xq = quantize_rows(x, f.group, kernel != kAuto);
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  with_int8_format(qtype, [&](auto fmt) {
    int8_linear_impl<decltype(fmt)>(xq, qs, d, m, N, bp, y.data_ptr<float>(), kernel);
  });
  return y;
}

// decode_layer_with (layer_ops.h) on weights repacked for int8 dot products (gguf_int8_pack; norms: as it takes
// them). w: {qs, d, m, bias} for each of qkv, o, gate_up, down (bias optional), or {qs, d, m, bias, order} where a
// projection reads its input's columns in an order of its own (GPTQ's act-order; order optional); formats: {qtype,
// out_features} for each.
std::tuple<torch::Tensor, torch::Tensor> gguf_decode_layer(
    torch::Tensor x, c10::optional<torch::Tensor> residual, const std::vector<torch::Tensor>& norms,
    const std::vector<c10::optional<torch::Tensor>>& w, const std::vector<int64_t>& formats, double eps,
    torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
    torch::Tensor slots, torch::Tensor block_tables, torch::Tensor seq_lens, int64_t H, int64_t HKV, double scale,
    int64_t window, double softcap, bool gelu, bool sandwich) {
  TORCH_CHECK((w.size() == 16 || w.size() == 20) && formats.size() == 8,
              "gguf_decode_layer: 16 or 20 weights, 8 formats");
  const int per = static_cast<int>(w.size()) / 4;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j)
      TORCH_CHECK(w[per * i + j].has_value(), "gguf_decode_layer: weight ", per * i + j, " is missing");
  const auto linear = [&](int i, const torch::Tensor& in) {
    const c10::optional<torch::Tensor> order = per == 5 ? w[per * i + 4] : c10::optional<torch::Tensor>();
    return gguf_int8_linear(order.has_value() ? in.index_select(1, *order) : in, *w[per * i], *w[per * i + 1],
                            *w[per * i + 2], formats[2 * i], formats[2 * i + 1], w[per * i + 3], "auto");
  };
  return decode_layer_with(linear, x, residual, norms, eps, positions, cos, sin, k_cache, v_cache, slots, block_tables,
                           seq_lens, H, HKV, scale, window, softcap, gelu, sandwich);
}

std::vector<torch::Tensor> gguf_quantize_activations(torch::Tensor x, int64_t group, bool portable) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) % 32 == 0, "x: [M, K] float32, K % 32 == 0");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), groups = K / group;
  const QuantizedRows q = quantize_rows(x, group, portable);
  return {torch::from_blob(q.q, {M, K}, torch::kInt8).clone(), torch::from_blob(q.d, {M, K / 32}).clone(),
          torch::from_blob(q.qsum, {M, groups}, torch::kInt32).clone(), torch::from_blob(q.fsum, {M, groups}).clone()};
}

bool has_avx2() {
#if defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

bool has_vnni() {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using NoGil = py::call_guard<py::gil_scoped_release>;  // every op computes without the GIL, as torch's do
  // portable: the plain C++ loops even where the AVX-512 path is compiled in (a no-op elsewhere); for tests.
  m.def("gguf_linear", &gguf_linear, "x W^T with W in GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)", py::arg("x"),
        py::arg("qweight"), py::arg("qtype"), py::arg("bias") = py::none(), py::arg("portable") = false, NoGil());
  m.def("gguf_dequantize", &gguf_dequantize, "GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) to float32",
        py::arg("qweight"), py::arg("qtype"), py::arg("in_features"), py::arg("portable") = false, NoGil());
  m.def("gguf_int8_pack_quants", &gguf_int8_pack_quants, "spelled-out quants, scales and mins -> int8 tiles", NoGil());
  m.def("gguf_int8_pack", &gguf_int8_pack, "GGUF blocks repacked for int8 dot products: [quads, d, m]",
        py::arg("qweight"), py::arg("qtype"), py::arg("in_features"), NoGil());
  m.def("gguf_int8_unpack", &gguf_int8_unpack, "repacked weights back to float32 [N, K]", py::arg("qs"), py::arg("d"),
        py::arg("m"), py::arg("qtype"), py::arg("out_features"), NoGil());
  m.def("gguf_int8_linear", &gguf_int8_linear, "x W^T (+ b) by int8 dot products on x quantized per 32",
        py::arg("x"), py::arg("qs"), py::arg("d"), py::arg("m"), py::arg("qtype"), py::arg("out_features"),
        py::arg("bias") = py::none(), py::arg("path") = "auto", NoGil());
  m.def("gguf_quantize_activations", &gguf_quantize_activations, "x quantized per 32: [x_q, d_x, group sums, d_x sums]",
        py::arg("x"), py::arg("group"), py::arg("portable") = false, NoGil());
  m.def("gguf_decode_layer", &gguf_decode_layer, "a dense decoder layer over a decode-only step",
        NoGil());
  m.def("has_vnni", &has_vnni, "whether the int8 kernels were compiled for AVX-512 VNNI");
  m.def("has_avx2", &has_avx2, "whether the int8 kernels were compiled with the AVX2 path");
}
