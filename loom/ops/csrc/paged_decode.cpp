// Fused paged-attention decode for CPU (float32): one query token per sequence, keys and values read straight
// from the block-paged cache, no gather copy, each cache row read once for all heads (GQA: query head h reads
// KV head h / G). Checked against loom.ops.attention.decode_attention_reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <vector>

namespace {

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// Sum each of 8 vectors into one lane of the result: r[j] = sum(v[j]).
inline __m256 hsum8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6, __m256 v7) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));  // lanes: 0123|0123
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));  // lanes: 4567|4567
  const __m256 lo = _mm256_permute2f128_ps(a, b, 0x20), hi = _mm256_permute2f128_ps(a, b, 0x31);
  return _mm256_add_ps(lo, hi);
}

// scores[j] = scale * dot(q, k + j * stride) for 8 rows, D a multiple of 8 (q stays in registers across rows).
inline void dot8(const float* q, const float* k, int64_t stride, int64_t D, float scale, float* scores) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * stride + d), acc[j]);
  }
  const __m256 r = hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
  _mm256_storeu_ps(scores, _mm256_mul_ps(r, _mm256_set1_ps(scale)));
}
constexpr bool kHaveDot8 = true;

// exp(x) for x <= 0 (softmax after subtracting the max): Cephes' range reduction and degree-5 polynomial,
// relative error ~1e-7, far inside the tests' tolerances.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

// sc[t] = exp(sc[t] - mx) for t < n; returns the sum.
inline float exp_sub_sum(float* sc, int64_t n, float mx) {
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + t), vm));
    _mm256_storeu_ps(sc + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; t < n; ++t) sum += (sc[t] = std::exp(sc[t] - mx));
  return sum;
}

// out[0:64] = sum_t p[t] * v_t for the rows of one head, accumulated in registers (D == 64).
template <typename RowAt>
inline void weighted_sum64(float* out, const float* p, int64_t n, RowAt row_at) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t t = 0; t < n; ++t) {
    const float* v = row_at(t);
    const __m256 w = _mm256_set1_ps(p[t]);
    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
    a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
    a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
    a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
    a4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 32), a4);
    a5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 40), a5);
    a6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 48), a6);
    a7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 56), a7);
  }
  _mm256_storeu_ps(out, a0);
  _mm256_storeu_ps(out + 8, a1);
  _mm256_storeu_ps(out + 16, a2);
  _mm256_storeu_ps(out + 24, a3);
  _mm256_storeu_ps(out + 32, a4);
  _mm256_storeu_ps(out + 40, a5);
  _mm256_storeu_ps(out + 48, a6);
  _mm256_storeu_ps(out + 56, a7);
}

inline void axpy(float* y, float alpha, const float* x, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
  for (; d < n; ++d) y[d] += alpha * x[d];
}
#else
inline void dot8(const float*, const float*, int64_t, int64_t, float, float*) {}
constexpr bool kHaveDot8 = false;

inline float exp_sub_sum(float* sc, int64_t n, float mx) {
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += (sc[t] = std::exp(sc[t] - mx));
  return sum;
}

template <typename RowAt>
inline void weighted_sum64(float* out, const float* p, int64_t n, RowAt row_at) {
  std::fill(out, out + 64, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const float* v = row_at(t);
    for (int d = 0; d < 64; ++d) out[d] += p[t] * v[d];
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

inline void axpy(float* y, float alpha, const float* x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}
#endif

}  // namespace

torch::Tensor paged_decode(
    torch::Tensor q,             // [B, H, D]
    torch::Tensor k_cache,       // [num_blocks, block_size, Hkv, D]
    torch::Tensor v_cache,       // [num_blocks, block_size, Hkv, D]
    torch::Tensor block_tables,  // [B, max_blocks] int32
    torch::Tensor seq_lens,      // [B] int32
    double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32, "float32 only");
  q = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), HKV = k_cache.size(2), G = H / HKV;
  const int64_t MB = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t row = HKV * D;  // stride between consecutive token slots

  // One work item per sequence: its K/V blocks are read front to back once, all heads of a token together.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(H * std::max<int64_t>(MB * BS, 1));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = sl[b];
      const float* qb = qp + b * H * D;  // [H, D]
      float* ob = op + b * H * D;
      // Pass 1: scaled scores [H, len]; each K block is read once, 8 rows at a time for every head.
      const bool fast = kHaveDot8 && D % 8 == 0 && BS % 8 == 0;
      for (int64_t t0 = 0; t0 < len; t0 += BS) {
        const float* blk = kp + static_cast<int64_t>(bt[b * MB + t0 / BS]) * BS * row;
        const int64_t n = std::min(BS, len - t0);
        int64_t i = 0;
        if (fast)
          for (; i + 8 <= n; i += 8)
            for (int64_t hq = 0; hq < H; ++hq)
              dot8(qb + hq * D, blk + i * row + (hq / G) * D, row, D, s, scores.data() + hq * len + t0 + i);
        for (; i < n; ++i)
          for (int64_t hq = 0; hq < H; ++hq)
            scores[hq * len + t0 + i] = dot(qb + hq * D, blk + i * row + (hq / G) * D, D) * s;
      }
      // Softmax per head.
      for (int64_t hq = 0; hq < H; ++hq) {
        float* sc = scores.data() + hq * len;
        float mx = -INFINITY;
        for (int64_t t = 0; t < len; ++t) mx = std::max(mx, sc[t]);
        const float inv = 1.f / exp_sub_sum(sc, len, mx);
        for (int64_t t = 0; t < len; ++t) sc[t] *= inv;
      }
      // Pass 2: out[h] = sum_t p[h, t] * v[t, h / G].
      if (D == 64) {
        for (int64_t hq = 0; hq < H; ++hq) {
          const float* vh = vp + (hq / G) * D;
          weighted_sum64(ob + hq * D, scores.data() + hq * len, len, [&](int64_t t) {
            return vh + (static_cast<int64_t>(bt[b * MB + t / BS]) * BS + t % BS) * row;
          });
        }
      } else {
        std::fill(ob, ob + H * D, 0.f);
        for (int64_t t0 = 0; t0 < len; t0 += BS) {
          const float* blk = vp + static_cast<int64_t>(bt[b * MB + t0 / BS]) * BS * row;
          const int64_t n = std::min(BS, len - t0);
          for (int64_t i = 0; i < n; ++i) {
            const float* v = blk + i * row;
            for (int64_t hq = 0; hq < H; ++hq) axpy(ob + hq * D, scores[hq * len + t0 + i], v + (hq / G) * D, D);
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode, "paged attention decode (CPU)"); }
