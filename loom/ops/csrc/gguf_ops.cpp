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
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <utility>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;  // weights per sub-block: what a kernel dequantizes at once
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // portable: the plain C++ loops even where the AVX-512 path is compiled in (a no-op elsewhere); for tests.
  m.def("gguf_linear", &gguf_linear, "x W^T with W in GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)", py::arg("x"),
        py::arg("qweight"), py::arg("qtype"), py::arg("bias") = py::none(), py::arg("portable") = false);
  m.def("gguf_dequantize", &gguf_dequantize, "GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) to float32",
        py::arg("qweight"), py::arg("qtype"), py::arg("in_features"), py::arg("portable") = false);
}
