// The Llama layer's fused CPU ops (float32), shared by both extension modules: cpu_ops.cpp binds them and chains them
// with its panel matmul, gguf_ops.cpp chains them with its quantized matmul. Each op is checked against its
// plain-PyTorch reference in loom.ops.layers / loom.ops.attention:
// - paged_decode: paged-attention decode, one query token per sequence, keys and values read straight from the
//   block-paged cache, no gather copy, each cache row read once for all heads (GQA: query head h reads KV head
//   h / G); sliding windows (Mistral, Phi-3, Gemma) and score soft-capping (Gemma 2).
// - rms_norm, add_rms_norm_: RMSNorm, and the residual add fused with it (vLLM's fused_add_rms_norm).
// - rotary_cache_: rotary embedding of q and k in place inside the fused qkv rows, and the k/v cache write.
// - silu_and_mul, gelu_and_mul: SwiGLU's silu(gate) * up and GeGLU's gelu_tanh(gate) * up from the fused gate/up
//   rows.
// - decode_layer_with: a whole dense decoder layer over a decode-only step, with the module's own matmul.
// A decode step of a 135M model at batch 32 has ~600 KB of activations per layer: these ops are bound by
// dispatch and memory passes, not arithmetic, so one pass each instead of 4-12 PyTorch ops is the gain.
// Everything here has internal linkage (one copy per module).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <tuple>
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

// exp(x) for -87.3 <= x <= 88 (clamped below): Cephes' range reduction and degree-5 polynomial,
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

// tanh(x) = 1 - 2 / (exp(2x) + 1), exp's argument capped at 88 (exp256 floors it at -87.3): exactly +-1 in the
// tails, absolute error ~1e-7 elsewhere.
inline __m256 tanh256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp256(_mm256_min_ps(_mm256_add_ps(x, x), _mm256_set1_ps(88.f)));
  return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, one)));
}

// sc[t] = cap * tanh(sc[t] / cap) for t < n (Gemma 2's attention soft-capping).
inline void softcap_scores(float* sc, int64_t n, float cap) {
  const __m256 c = _mm256_set1_ps(cap), inv = _mm256_set1_ps(1.f / cap);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    _mm256_storeu_ps(sc + t, _mm256_mul_ps(c, tanh256(_mm256_mul_ps(_mm256_loadu_ps(sc + t), inv))));
  for (; t < n; ++t) sc[t] = cap * std::tanh(sc[t] / cap);
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

// out[0:64] = corr * out[0:64] + sum_t p[t] * v_t over the rows of one head, accumulated in registers (D == 64).
inline void weighted_sum64(float* out, float corr, const float* p, int64_t n, const float* v, int64_t stride) {
  const __m256 c = _mm256_set1_ps(corr);
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_mul_ps(c, _mm256_loadu_ps(out + 8 * j));
  for (int64_t t = 0; t < n; ++t, v += stride) {
    const __m256 w = _mm256_set1_ps(p[t]);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * j), a[j]);
  }
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + 8 * j, a[j]);
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

inline void softcap_scores(float* sc, int64_t n, float cap) {
  for (int64_t t = 0; t < n; ++t) sc[t] = cap * std::tanh(sc[t] / cap);
}

inline float exp_sub_sum(float* sc, int64_t n, float mx) {
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += (sc[t] = std::exp(sc[t] - mx));
  return sum;
}

inline void weighted_sum64(float* out, float corr, const float* p, int64_t n, const float* v, int64_t stride) {
  for (int d = 0; d < 64; ++d) out[d] *= corr;
  for (int64_t t = 0; t < n; ++t, v += stride)
    for (int d = 0; d < 64; ++d) out[d] += p[t] * v[d];
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

torch::Tensor paged_decode(
    torch::Tensor q,             // [B, H, D]
    torch::Tensor k_cache,       // [num_blocks, block_size, Hkv, D]
    torch::Tensor v_cache,       // [num_blocks, block_size, Hkv, D]
    torch::Tensor block_tables,  // [B, max_blocks] int32
    torch::Tensor seq_lens,      // [B] int32
    double scale,
    int64_t window = 0,          // > 0: a query sees only the last `window` keys (itself included)
    double softcap = 0.0,        // > 0: scores capped as softcap * tanh(score / softcap) (Gemma 2)
    c10::optional<torch::Tensor> sinks = c10::nullopt) {  // [H]: a sink logit per head in each softmax (gpt-oss)
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32, "float32 only");
  q = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  torch::Tensor sink_values;
  if (sinks.has_value()) {
    sink_values = sinks->contiguous();
    TORCH_CHECK(sink_values.scalar_type() == torch::kFloat32 && sink_values.numel() == H,
                "paged_decode: sinks must be float32 [H]");
  }
  const float* sp = sinks.has_value() ? sink_values.data_ptr<float>() : nullptr;
  const int64_t BS = k_cache.size(1), HKV = k_cache.size(2), G = H / HKV;
  const int64_t MB = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const int64_t row = HKV * D;  // stride between consecutive token slots
  const bool fast = kHaveDot8 && D % 8 == 0;

  // One work item per sequence: its K and V blocks are streamed once, block by block, every head of a block
  // handled while the block is in L1 (a block's rows are contiguous: the hardware prefetchers follow them), with
  // an online softmax per query head (running max m and sum l; the output accumulates in place and is rescaled
  // when the max grows), so no score array spans the whole context. Query heads h*G .. h*G+G-1 share KV head h.
  // With a window the walk starts at the block of the oldest key the query sees: the blocks before it may have been
  // given back (their table entries are -1) and are never read.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(BS), m(H), l(H);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = sl[b], first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const float* qb = qp + b * H * D;  // [H, D]
      float* ob = op + b * H * D;        // [H, D]
      std::fill(ob, ob + H * D, 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t t0 = first / BS * BS; t0 < len; t0 += BS) {
        const int64_t block = bt[b * MB + t0 / BS], skip = std::max<int64_t>(0, first - t0);
        const int64_t n = std::min(BS, len - t0) - skip;  // keys skip .. skip + n - 1 of the block
        // The next block starts at an unrelated address, a stream the hardware prefetcher can't guess: prefetch it
        // here, a slice per head so the requests spread over this block's work instead of stalling at once.
        const float* kn = nullptr;
        const float* vn = nullptr;
        int64_t next_floats = 0, slice = 0;
        if (t0 + BS < len) {
          const int64_t next = bt[b * MB + t0 / BS + 1];
          kn = kp + next * BS * row;
          vn = vp + next * BS * row;
          next_floats = std::min(BS, len - t0 - BS) * row;
          slice = ((next_floats + H - 1) / H + 15) / 16 * 16;
        }
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t off = h * slice; off < std::min((h + 1) * slice, next_floats); off += 16) {
            __builtin_prefetch(kn + off, 0, 2);
            __builtin_prefetch(vn + off, 0, 2);
          }
          const float* kb = kp + (block * BS + skip) * row + (h / G) * D;  // key i at kb + i * row
          const float* vb = vp + (block * BS + skip) * row + (h / G) * D;
          float* sh = sc.data();
          int64_t i = 0;
          if (fast)
            for (; i + 8 <= n; i += 8) dot8(qb + h * D, kb + i * row, row, D, s, sh + i);
          for (; i < n; ++i) sh[i] = dot(qb + h * D, kb + i * row, D) * s;
          if (cap > 0.f) softcap_scores(sh, n, cap);
          const float m_new = std::max(m[h], *std::max_element(sh, sh + n));
          const float corr = std::exp(m[h] - m_new);  // 0 on the first block (m = -inf)
          l[h] = l[h] * corr + exp_sub_sum(sh, n, m_new);
          m[h] = m_new;
          float* oh = ob + h * D;
          if (D == 64) {
            weighted_sum64(oh, corr, sh, n, vb, row);
          } else {
            for (int64_t d = 0; d < D; ++d) oh[d] *= corr;
            for (int64_t t = 0; t < n; ++t) axpy(oh, sh[t], vb + t * row, D);
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float corr = 1.f;
        if (sp != nullptr) {  // the sink counts in the sum, with no value: the weights of the keys sum below 1
          const float m_new = std::max(m[h], sp[h]);
          corr = std::exp(m[h] - m_new);
          l[h] = l[h] * corr + std::exp(sp[h] - m_new);
        }
        const float inv = corr / l[h];
        for (int64_t d = 0; d < D; ++d) ob[h * D + d] *= inv;
      }
    }
  });
  return out;
}


// ---- elementwise layer ops -------------------------------------------------------------------------------------

// Rows per parallel chunk: small batches (decode) run on the calling thread, an OpenMP region costs more than
// the work; prefill chunks of thousands of rows split across threads.
constexpr int64_t kRowGrain = 64;

inline float sum_squares(const float* x, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
  }
  float s = hsum(_mm256_add_ps(a0, a1));
#else
  float s = 0.f;
  int64_t i = 0;
#endif
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// out = weight * (x * rsqrt(mean(x^2) + eps)), the order HF's LlamaRMSNorm computes it in.
inline void rms_norm_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  const float r = 1.f / std::sqrt(sum_squares(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

inline void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, name, ": float32 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, ": expects [rows, features] with contiguous rows");
}


// x: [T, N] -> [T, N] (new tensor).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "rms_norm");
  weight = weight.contiguous();
  const int64_t T = x.size(0), N = x.size(1), ld = x.stride(0);
  auto out = torch::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) rms_norm_row(xp + t * ld, wp, op + t * N, N, static_cast<float>(eps));
  });
  return out;
}

// residual += x; x = rms_norm(residual) * weight. Both [T, N], contiguous, updated in place.
void add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check_rows(x, "add_rms_norm_");
  check_rows(residual, "add_rms_norm_");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes(), "add_rms_norm_: shapes");
  weight = weight.contiguous();
  const int64_t T = x.size(0), N = x.size(1);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  at::parallel_for(0, T, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* xr = xp + t * N;
      float* rr = rp + t * N;
      for (int64_t i = 0; i < N; ++i) rr[i] += xr[i];
      rms_norm_row(rr, wp, xr, N, static_cast<float>(eps));
    }
  });
}

// qkv: [T, (H + 2 Hkv) D] rows from the fused projection. Rotates the q and k heads in place ("rotate half"
// layout: out[:h] = x1 cos - x2 sin, out[h:] = x2 cos + x1 sin, with cos/sin tables [P, D]) and writes each token's
// k and v rows into the cache slot slots[t] of k_cache / v_cache [num_blocks, block_size, Hkv, D].
void rotary_cache_(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, int64_t H, int64_t HKV) {
  check_rows(qkv, "rotary_cache_");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat32, "rotary tables");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "rotary_cache_: caches must be contiguous");
  TORCH_CHECK(positions.scalar_type() == torch::kLong && slots.scalar_type() == torch::kLong, "int64 indices");
  const int64_t T = qkv.size(0), D = cos.size(1), half = D / 2, ld = qkv.stride(0);
  TORCH_CHECK(qkv.size(1) == (H + 2 * HKV) * D, "rotary_cache_: qkv width != (H + 2 Hkv) * D");
  float* base = qkv.data_ptr<float>();
  const int64_t* pos = positions.contiguous().data_ptr<int64_t>();
  const int64_t* slot = slots.contiguous().data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t row = HKV * D;
  at::parallel_for(0, T, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* r = base + t * ld;
      const float* c = cp + pos[t] * D;
      const float* s = sp + pos[t] * D;
      for (int64_t h = 0; h < H + HKV; ++h) {  // q heads, then k heads: contiguous in the row
        float* x = r + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] + (-x2) * s[i];
          x[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
      }
      std::copy(r + H * D, r + H * D + row, kc + slot[t] * row);
      std::copy(r + (H + HKV) * D, r + (H + 2 * HKV) * D, vc + slot[t] * row);
    }
  });
}

// gate_up: [T, 2I] (gate then up) -> act(gate) * up: [T, I]. act8: the activation on 8 floats (AVX2 builds; nullptr
// elsewhere), act: on one (the tail, and the whole row without AVX2).
template <class Act8, class Act>
torch::Tensor gated_mul(const torch::Tensor& gate_up, const char* name, Act8 act8, Act act) {
  check_rows(gate_up, name);
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, ld = gate_up.stride(0);
  auto out = torch::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* g = gp + t * ld;
      const float* u = g + I;
      float* o = op + t * I;
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      for (; i + 8 <= I; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(act8(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
#endif
      for (; i < I; ++i) o[i] = act(g[i]) * u[i];
    }
  });
  return out;
}

// SwiGLU: silu(gate) * up.
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
#if defined(__AVX2__) && defined(__FMA__)
  const auto silu8 = [](__m256 x) {
    // exp(-x), the argument capped at 88 where float32 exp is still finite (exp256 floors it at -87.3).
    const __m256 ex = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), _mm256_set1_ps(88.f)));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), ex));
  };
#else
  const std::nullptr_t silu8 = nullptr;
#endif
  return gated_mul(gate_up, "silu_and_mul", silu8, [](float x) { return x / (1.f + std::exp(-x)); });
}

// Gemma's GeGLU: gelu_tanh(gate) * up, torch's gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715
// x^3))).
constexpr float kGeluBeta = 0.7978845608028654f, kGeluKappa = 0.044715f;
torch::Tensor gelu_and_mul(torch::Tensor gate_up) {
#if defined(__AVX2__) && defined(__FMA__)
  const auto gelu8 = [](__m256 x) {
    const __m256 cubic = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kGeluKappa), x), _mm256_mul_ps(x, x), x);
    const __m256 t = tanh256(_mm256_mul_ps(_mm256_set1_ps(kGeluBeta), cubic));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.f), t));
  };
#else
  const std::nullptr_t gelu8 = nullptr;
#endif
  return gated_mul(gate_up, "gelu_and_mul", gelu8, [](float x) {
    return 0.5f * x * (1.f + std::tanh(kGeluBeta * (x + kGeluKappa * x * x * x)));
  });
}

// Qwen3's q/k norms: RMSNorm over each q head (weight q_norm [D]) and each k head (k_norm) of the fused qkv rows
// [T, (H + 2 Hkv) D], in place, v untouched; the arithmetic of rms_norm on the heads as rows.
void qk_norm_(torch::Tensor qkv, const torch::Tensor& q_norm, const torch::Tensor& k_norm, int64_t H, int64_t HKV,
              double eps) {
  check_rows(qkv, "qk_norm_");
  TORCH_CHECK(q_norm.is_contiguous() && k_norm.is_contiguous() && q_norm.numel() == k_norm.numel(), "qk_norm_: weights");
  const int64_t T = qkv.size(0), D = q_norm.numel(), ld = qkv.stride(0);
  TORCH_CHECK(qkv.size(1) == (H + 2 * HKV) * D, "qk_norm_: qkv width != (H + 2 Hkv) * D");
  float* base = qkv.data_ptr<float>();
  const float* qw = q_norm.data_ptr<float>();
  const float* kw = k_norm.data_ptr<float>();
  at::parallel_for(0, T, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t h = 0; h < H + HKV; ++h) {
        float* x = base + t * ld + h * D;
        rms_norm_row(x, h < H ? qw : kw, x, D, static_cast<float>(eps));
      }
  });
}

// ---- a whole decoder layer -----------------------------------------------------------------------------------------
// One dense pre-norm decoder layer of the Llama family (RMSNorm, fused qkv with rotary and the cache write, paged
// decode attention, o_proj, RMSNorm, fused gate/up with SwiGLU, down) over a decode-only step: the ops above chained in
// one call, the same arithmetic as DecoderLayer.forward through CpuOps but without a trip through Python between ops
// (at batch 1 that trip cost ~1/10 of SmolLM2-135M's float32 step and ~1/3 of its 4-bit one). linear(i, x) multiplies
// by projection i: 0 qkv, 1 o, 2 gate_up, 3 down. x: the layer's input [B, hidden], updated in place; residual: the
// stream before it, updated in place (none for the first layer: x becomes it). norms: {input_norm,
// post_attention_norm}, then {pre_feedforward_norm, post_feedforward_norm} with Gemma's sandwich norms, then {q_norm,
// k_norm} where the model has them (Qwen3, Gemma 3). The variants: window / softcap as paged_decode takes them (0:
// none), gelu: GeGLU instead of SwiGLU, sandwich: Gemma's norms of the attention's and the MLP's outputs. Returns (the
// layer's output, the residual stream), as DecoderLayer.forward.
template <class Linear>
std::tuple<torch::Tensor, torch::Tensor> decode_layer_with(
    const Linear& linear, torch::Tensor x, c10::optional<torch::Tensor> residual,
    const std::vector<torch::Tensor>& norms, double eps, torch::Tensor positions, torch::Tensor cos,
    torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor block_tables,
    torch::Tensor seq_lens, int64_t H, int64_t HKV, double scale, int64_t window, double softcap, bool gelu,
    bool sandwich) {
  const size_t base = sandwich ? 4 : 2;
  TORCH_CHECK(norms.size() == base || norms.size() == base + 2,
              "decode layer: 2 norms (4 with sandwich norms), and 2 more with q/k norms");
  const torch::Tensor &input_norm = norms[0], &post_attention_norm = norms[1];
  torch::Tensor res;
  if (residual.has_value()) {
    res = *residual;
    add_rms_norm_(x, res, input_norm, eps);
  } else {
    res = x;
    x = rms_norm(x, input_norm, eps);
  }
  const int64_t B = x.size(0), D = cos.size(1);
  auto qkv = linear(0, x);
  if (norms.size() == base + 2) qk_norm_(qkv, norms[base], norms[base + 1], H, HKV, eps);
  rotary_cache_(qkv, positions, cos, sin, k_cache, v_cache, slots, H, HKV);
  auto q = qkv.narrow(1, 0, H * D).reshape({B, H, D});
  auto attn = paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, window, softcap);
  auto h = linear(1, attn.view({B, H * D}));
  if (sandwich) {
    h = rms_norm(h, post_attention_norm, eps);
    add_rms_norm_(h, res, norms[2], eps);
  } else {
    add_rms_norm_(h, res, post_attention_norm, eps);
  }
  auto gate_up = linear(2, h);
  auto out = linear(3, gelu ? gelu_and_mul(gate_up) : silu_and_mul(gate_up));
  if (sandwich) out = rms_norm(out, norms[3], eps);
  return {out, res};
}

}  // namespace
