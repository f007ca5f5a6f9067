// GGUF block-quantized weights multiplied without expanding them (float32 activations, float32 accumulation):
// - gguf_linear: y[M, N] = x[M, K] W^T for W stored as llama.cpp's Q8_0, Q4_0 or Q4_1 blocks, one row of blocks per
//   output feature. Each 32-weight block is dequantized once into registers / L1 and used by up to 8 rows of x.
// - gguf_dequantize: the whole W as float32 (the reference, and the path for large M where a float32 GEMM wins).
// Block layouts (ggml-common.h): Q8_0 = fp16 d, int8 q[32] (w = d q); Q4_0 = fp16 d, 16 bytes of nibbles
// (w = d (q - 8)); Q4_1 = fp16 d, fp16 m, 16 bytes of nibbles (w = d q + m). Byte j of the nibbles holds weight j
// in its low half and weight j + 16 in its high half.
// With AVX-512 the blocks are widened and scaled in registers (dequantize_block_512, rows_512); elsewhere the loops
// are plain C++ over fixed 32-wide blocks that the compiler vectorizes for what the CPU has (AVX2).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <utility>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;
enum QType : int64_t { Q8_0 = 8, Q4_0 = 2, Q4_1 = 3 };

inline int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case Q8_0: return 34;
    case Q4_0: return 18;
    case Q4_1: return 20;
  }
  TORCH_CHECK(false, "unsupported GGUF quantization type ", qtype, " (Loom runs Q8_0, Q4_0 and Q4_1)");
}

inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// One block's 32 weights as floats.
inline void dequantize_block(const uint8_t* b, int64_t qtype, float* __restrict w) {
  const float d = half(b);
  if (qtype == Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < QK; ++i) w[i] = d * static_cast<float>(q[i]);
    return;
  }
  const bool has_min = qtype == Q4_1;
  const uint8_t* q = b + (has_min ? 4 : 2);
  const float m = has_min ? half(b + 2) : -8.f * d;
  for (int i = 0; i < QK / 2; ++i) {
    w[i] = d * static_cast<float>(q[i] & 0x0F) + m;
    w[i + QK / 2] = d * static_cast<float>(q[i] >> 4) + m;
  }
}

#if defined(__AVX512F__)
// One block as two vectors of 16 floats (weights 0-15, 16-31): bytes widened, converted, scaled in registers.
inline float half_f16c(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

inline void dequantize_block_512(const uint8_t* b, int64_t qtype, __m512& w0, __m512& w1) {
  const float d = half_f16c(b);
  const __m512 dv = _mm512_set1_ps(d);
  if (qtype == Q8_0) {
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 2)))), dv);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 18)))), dv);
    return;
  }
  const bool has_min = qtype == Q4_1;
  const __m512 mv = _mm512_set1_ps(has_min ? half_f16c(b + 2) : -8.f * d);
  const __m128i raw = _mm_loadu_si128((const __m128i*)(b + (has_min ? 4 : 2)));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), dv, mv);
  w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), dv, mv);
}

// Rows [m0, m0 + T) of y for output feature n: each block dequantized once into two registers, then applied to every
// row of x; the accumulators stay in registers across the whole row of blocks. Up to 4 rows keep two accumulators
// each (two independent FMA chains per row); larger tiles, one (16 rows fit the register file with the block).
template <int T>
inline void rows_512(const float* xp, int64_t K, const uint8_t* row, int64_t nb, int64_t bb, int64_t qtype,
                     float* yp, int64_t N, int64_t n, int64_t m0, const float* bp) {
  constexpr bool kTwo = T <= 4;
  __m512 acc0[T], acc1[kTwo ? T : 1];
  for (int r = 0; r < T; ++r) acc0[r] = _mm512_setzero_ps();
  if constexpr (kTwo)
    for (int r = 0; r < T; ++r) acc1[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 w0, w1;
    dequantize_block_512(row + b * bb, qtype, w0, w1);
    for (int r = 0; r < T; ++r) {
      const float* xr = xp + (m0 + r) * K + b * QK;
      acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc0[r]);
      if constexpr (kTwo)
        acc1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc1[r]);
      else
        acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc0[r]);
    }
  }
  for (int r = 0; r < T; ++r) {
    const __m512 sum = kTwo ? _mm512_add_ps(acc0[r], acc1[r]) : acc0[r];
    yp[(m0 + r) * N + n] = _mm512_reduce_add_ps(sum) + (bp ? bp[n] : 0.f);
  }
}

template <int... Ts>
inline void row_tile_dispatch(int64_t tm, std::integer_sequence<int, Ts...>, const float* xp, int64_t K,
                              const uint8_t* row, int64_t nb, int64_t bb, int64_t qtype, float* yp, int64_t N,
                              int64_t n, int64_t m0, const float* bp) {
  ((tm == Ts + 1 ? (rows_512<Ts + 1>(xp, K, row, nb, bb, qtype, yp, N, n, m0, bp), 0) : 0), ...);
}

constexpr int64_t kTile512 = 16;  // rows of x sharing one dequantized block

inline void row_tile_512(int64_t tm, const float* xp, int64_t K, const uint8_t* row, int64_t nb, int64_t bb,
                         int64_t qtype, float* yp, int64_t N, int64_t n, int64_t m0, const float* bp) {
  row_tile_dispatch(tm, std::make_integer_sequence<int, kTile512>{}, xp, K, row, nb, bb, qtype, yp, N, n, m0, bp);
}
#endif

}  // namespace

torch::Tensor gguf_dequantize(torch::Tensor qweight, int64_t qtype, int64_t in_features) {
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.dim() == 2, "qweight: [N, row_bytes] uint8");
  TORCH_CHECK(in_features % QK == 0, "in_features must be a multiple of 32");
  qweight = qweight.contiguous();
  const int64_t N = qweight.size(0), nb = in_features / QK, bb = block_bytes(qtype);
  TORCH_CHECK(qweight.size(1) == nb * bb, "qweight rows hold ", qweight.size(1), " bytes, expected ", nb * bb);
  auto out = torch::empty({N, in_features}, torch::kFloat32);
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t b = 0; b < nb; ++b) dequantize_block(qp + (n * nb + b) * bb, qtype, op + n * in_features + b * QK);
  });
  return out;
}

torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor qweight, int64_t qtype, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x: [M, K] float32");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.dim() == 2, "qweight: [N, row_bytes] uint8");
  x = x.contiguous();
  qweight = qweight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), bb = block_bytes(qtype);
  TORCH_CHECK(K % QK == 0, "in_features must be a multiple of 32");
  const int64_t nb = K / QK;
  TORCH_CHECK(qweight.size(1) == nb * bb, "qweight rows hold ", qweight.size(1), " bytes, expected ", nb * bb);
  auto y = torch::empty({M, N}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  constexpr int64_t TM = 8;  // rows of x sharing one dequantized block

#if defined(__AVX512F__)
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += kTile512)
        row_tile_512(std::min(kTile512, M - m0), xp, K, qp + n * nb * bb, nb, bb, qtype, yp, N, n, m0, bp);
  });
  return y;
#endif
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    alignas(64) float w[QK];
    alignas(64) float acc[TM][QK];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = qp + n * nb * bb;
      for (int64_t m0 = 0; m0 < M; m0 += TM) {
        const int64_t tm = std::min(TM, M - m0);
        for (int64_t r = 0; r < tm; ++r) std::fill(acc[r], acc[r] + QK, 0.f);
        for (int64_t b = 0; b < nb; ++b) {
          dequantize_block(row + b * bb, qtype, w);
          for (int64_t r = 0; r < tm; ++r) {
            const float* xr = xp + (m0 + r) * K + b * QK;
            float* a = acc[r];
#pragma omp simd
            for (int i = 0; i < QK; ++i) a[i] += xr[i] * w[i];
          }
        }
        for (int64_t r = 0; r < tm; ++r) {
          float s = 0.f;
          for (int i = 0; i < QK; ++i) s += acc[r][i];
          yp[(m0 + r) * N + n] = s + (bp ? bp[n] : 0.f);
        }
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_linear", &gguf_linear, "x W^T with W in GGUF blocks (Q8_0, Q4_0, Q4_1)");
  m.def("gguf_dequantize", &gguf_dequantize, "GGUF blocks (Q8_0, Q4_0, Q4_1) to float32");
}
