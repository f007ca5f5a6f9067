// Token sampling on CPU without sorting the vocabulary: the reference in loom/ops/sampler.py (random_probs, then
// inverse_cdf; argmax for greedy rows) in a few passes over each row. Included by cpu_ops.cpp after layer_ops.h.
//
// Per row: e[i] = exp((logit[i] - max) / T), so the top token's e is exactly 1 and the row's distribution is e / sum.
// The filters keep the tokens whose e reaches a threshold, never a sorted prefix:
// - top-k: the k-th largest e (a min-heap of k values that most tokens only compare with);
// - top-p: the smallest e among the kept ones whose strictly larger kept values hold at most top_p of the kept mass
//   (the sorted walk's rule: a token stays while the mass ranked above it is <= top_p), found by a radix select on
//   the float bits weighted by mass: four passes of 256 buckets, each over the candidates the last one left;
// - min-p: e >= min_p (a probability relative to the top token's, whose e is 1).
// Then the inverse CDF of the row's uniform (loom.ops.sampler.uniforms, computed here) over the kept e in token-id
// order, as the reference draws.
// Tokens that tie with the threshold are all kept (the reference's sort keeps an arbitrary part of a tie); sums are
// in double, so a draw may differ from the reference's only when the uniform falls within float rounding of a CDF
// step.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>

namespace {

// e[i] = exp((l[i] - mx) * inv_t), 0 where l[i] is -inf (a masked token); returns the sum.
inline double scaled_exp(const float* l, float* e, int64_t V, float mx, float inv_t) {
  int64_t i = 0;
  double total = 0.0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vm = _mm256_set1_ps(mx), vt = _mm256_set1_ps(inv_t), ninf = _mm256_set1_ps(-INFINITY);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= V; i += 8) {
    const __m256 x = _mm256_loadu_ps(l + i);
    __m256 y = exp256(_mm256_mul_ps(_mm256_sub_ps(x, vm), vt));
    y = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), y);
    _mm256_storeu_ps(e + i, y);
    acc = _mm256_add_ps(acc, y);
    if ((i & 1023) == 1016) {  // float lanes summed into double every 1024 tokens: no drift over a 150k vocabulary
      total += hsum(acc);
      acc = _mm256_setzero_ps();
    }
  }
  total += hsum(acc);
#endif
  for (; i < V; ++i) total += (e[i] = l[i] == -INFINITY ? 0.f : std::exp((l[i] - mx) * inv_t));
  return total;
}

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// One radix pass of the top-p search: the byte at ``shift`` of every candidate's bits (``each`` calls its argument
// with each), weighted by mass; walks the byte values from the top while the mass above them stays within the budget
// and returns the last one reached, adding the mass of the byte values above it to ``above``.
template <class Each>
inline int heaviest_byte(Each each, int shift, double& above, double budget) {
  double mass[256] = {0.0};
  int64_t count[256] = {0};
  each([&](uint32_t b) {
    const uint32_t d = (b >> shift) & 255u;
    mass[d] += bits_float(b);
    ++count[d];
  });
  int chosen = -1;
  double cum = above;
  for (int d = 255; d >= 0; --d) {
    if (!count[d]) continue;
    if (cum > budget) break;
    chosen = d;
    above = cum;
    cum += mass[d];
  }
  return chosen;
}

// The top-p threshold over the values e[i] >= floor (all >= 0, so their bits order as the values do): the smallest
// such value v with sum(e[i] > v, e[i] >= floor) <= budget. Radix select from the high byte down, each pass over the
// candidates the last one kept (the first over e itself).
inline float mass_threshold(const float* e, int64_t V, float floor, double budget, std::vector<uint32_t>& cand) {
  double above = 0.0;  // mass of the values above every candidate left
  const int top = heaviest_byte([&](auto&& f) {
    for (int64_t i = 0; i < V; ++i)
      if (e[i] >= floor) f(float_bits(e[i]));
  }, 24, above, budget);
  cand.clear();
  for (int64_t i = 0; i < V; ++i)
    if (e[i] >= floor && static_cast<int>(float_bits(e[i]) >> 24) == top) cand.push_back(float_bits(e[i]));
  for (int shift = 16; shift >= 0; shift -= 8) {
    const int chosen = heaviest_byte([&](auto&& f) {
      for (const uint32_t b : cand) f(b);
    }, shift, above, budget);
    size_t kept = 0;
    for (const uint32_t b : cand)
      if (static_cast<int>((b >> shift) & 255u) == chosen) cand[kept++] = b;
    cand.resize(kept);
  }
  return bits_float(cand[0]);
}

// The k-th largest of e[0:V] (0 < k < V): a min-heap of the k largest so far, which most values only compare with;
// nth_element for a large k.
inline float kth_largest(const float* e, int64_t V, int64_t k, std::vector<float>& scratch) {
  if (k > 256) {
    scratch.assign(e, e + V);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    return scratch[k - 1];
  }
  scratch.assign(e, e + k);
  std::make_heap(scratch.begin(), scratch.end(), std::greater<float>());
  for (int64_t i = k; i < V; ++i) {
    if (e[i] <= scratch.front()) continue;
    std::pop_heap(scratch.begin(), scratch.end(), std::greater<float>());
    scratch.back() = e[i];
    std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
  }
  return scratch.front();
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// loom.ops.sampler.uniforms for one (seed, counter): 24 random bits in [0, 1).
inline float uniform(int64_t seed, int64_t counter) {
  const uint64_t bits = splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(counter));
  return static_cast<float>(bits >> 40) * (1.f / (1 << 24));
}

// The first token whose running sum of kept e (e >= thr) passes target; the last kept token if rounding never gets
// there.
inline int64_t inverse_cdf_kept(const float* e, int64_t V, float thr, double target) {
  constexpr int64_t kChunk = 256;
  double acc = 0.0;
  int64_t last = 0;
  for (int64_t c = 0; c < V; c += kChunk) {
    const int64_t end = std::min(V, c + kChunk);
    float chunk = 0.f;
    for (int64_t i = c; i < end; ++i) chunk += e[i] >= thr ? e[i] : 0.f;
    if (chunk == 0.f) continue;
    if (acc + chunk > target) {
      for (int64_t i = c; i < end; ++i) {
        if (e[i] < thr) continue;
        acc += e[i];
        last = i;
        if (acc > target) return i;
      }
      continue;  // rounding: the chunk's float sum passed the target, the exact walk did not
    }
    acc += chunk;
    for (int64_t i = end - 1; i >= c; --i)
      if (e[i] >= thr) {
        last = i;
        break;
      }
  }
  return last;
}

// The first index of the row's largest value (torch.argmax's choice); NaNs are not looked for.
inline int64_t argmax_row(const float* l, int64_t V) {
  float mx = -INFINITY;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 vmx = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= V; i += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(l + i));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  mx = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
#endif
  for (; i < V; ++i) mx = std::max(mx, l[i]);
  for (i = 0; i < V; ++i)
    if (l[i] == mx) return i;
  return 0;
}

}  // namespace

// A row's filters: e (exp((l - max) / T), written by filter_row) is kept where e >= thr; ``norm`` is the mass of the
// top-k / top-p survivors (the reference's softmax denominator, taken before min-p), ``kept`` the mass kept after
// min-p (what the inverse CDF scales its uniform by).
struct RowFilter {
  float thr;
  double norm, kept;
};

inline RowFilter filter_row(const float* l, float* e, int64_t V, float mx, float temperature, int64_t k, float top_p,
                            float min_p, std::vector<float>& scratch, std::vector<uint32_t>& cand) {
  double total = scaled_exp(l, e, V, mx, 1.f / temperature);
  const auto kept_mass = [&](float thr) {
    double sum = 0.0;
    for (int64_t i = 0; i < V; ++i) sum += e[i] >= thr ? e[i] : 0.f;
    return sum;
  };
  float thr = std::numeric_limits<float>::denorm_min();  // e == 0 (a masked token) is never kept
  if (k > 0 && k < V) {
    thr = std::max(thr, kth_largest(e, V, k, scratch));
    total = kept_mass(thr);
  }
  if (top_p < 1.f) {
    const float p_thr = mass_threshold(e, V, thr, double(top_p) * total, cand);
    if (p_thr > thr) {
      thr = p_thr;
      total = kept_mass(thr);
    }
  }
  if (min_p > thr) return {min_p, total, kept_mass(min_p)};
  return {thr, total, total};
}

inline void check_settings(const torch::Tensor& logits, const std::vector<const torch::Tensor*>& floats,
                           const std::vector<const torch::Tensor*>& ints, const char* name) {
  check_rows(logits, name);
  for (const auto* t : floats)
    TORCH_CHECK(t->dim() == 1 && t->size(0) == logits.size(0) && t->scalar_type() == torch::kFloat32 &&
                t->is_contiguous(), name, ": one contiguous float32 value per row");
  for (const auto* t : ints)
    TORCH_CHECK(t->dim() == 1 && t->size(0) == logits.size(0) && t->scalar_type() == torch::kInt64 &&
                t->is_contiguous(), name, ": one contiguous int64 value per row");
}

// logits [S, V] float32 (rows contiguous), per row: temperature (0: greedy), top_p, min_p (float32), top_k (0 or
// >= V: off) and the uniform's seed and counter (int64; see loom.ops.sampler.uniforms) -> token ids [S] int64.
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor temperature, torch::Tensor top_p, torch::Tensor min_p,
                          torch::Tensor top_k, torch::Tensor seeds, torch::Tensor counters) {
  check_settings(logits, {&temperature, &top_p, &min_p}, {&top_k, &seeds, &counters}, "sample_rows");
  const int64_t S = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  auto out = torch::empty({S}, logits.options().dtype(torch::kInt64));
  const float* lp = logits.data_ptr<float>();
  const float *tp = temperature.data_ptr<float>(), *pp = top_p.data_ptr<float>(), *mp = min_p.data_ptr<float>();
  const int64_t *kp = top_k.data_ptr<int64_t>(), *sp = seeds.data_ptr<int64_t>(), *cp = counters.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> e(V), scratch;
    std::vector<uint32_t> cand;
    for (int64_t r = begin; r < end; ++r) {
      const float* l = lp + r * ld;
      const int64_t top = argmax_row(l, V);
      const float mx = l[top];  // e of the top token: exp(0) == 1
      if (tp[r] == 0.f || mx == -INFINITY) {  // greedy, or nothing allowed at all
        op[r] = top;
        continue;
      }
      const RowFilter f = filter_row(l, e.data(), V, mx, tp[r], kp[r], pp[r], mp[r], scratch, cand);
      op[r] = inverse_cdf_kept(e.data(), V, f.thr, double(uniform(sp[r], cp[r])) * f.kept);
    }
  });
  return out;
}

// loom.ops.sampler.random_probs: the distributions the rows sample from, [S, V] float32: softmax(logits / T) over the
// top-k / top-p survivors, min-p's drops zeroed without renormalising. A greedy row (T == 0) is taken at T = 1.
torch::Tensor filtered_probs(torch::Tensor logits, torch::Tensor temperature, torch::Tensor top_p,
                             torch::Tensor min_p, torch::Tensor top_k) {
  check_settings(logits, {&temperature, &top_p, &min_p}, {&top_k}, "filtered_probs");
  const int64_t S = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  auto out = torch::zeros({S, V}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const float *tp = temperature.data_ptr<float>(), *pp = top_p.data_ptr<float>(), *mp = min_p.data_ptr<float>();
  const int64_t* kp = top_k.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    std::vector<uint32_t> cand;
    for (int64_t r = begin; r < end; ++r) {
      const float* l = lp + r * ld;
      float* e = op + r * V;
      const float mx = l[argmax_row(l, V)];
      if (mx == -INFINITY) continue;  // nothing allowed: zeros
      const RowFilter f = filter_row(l, e, V, mx, tp[r] == 0.f ? 1.f : tp[r], kp[r], pp[r], mp[r], scratch, cand);
      const float inv = static_cast<float>(1.0 / f.norm);
      for (int64_t i = 0; i < V; ++i) e[i] = e[i] >= f.thr ? e[i] * inv : 0.f;
    }
  });
  return out;
}

// loom.ops.sampler.apply_penalties' token penalties, in place on logits [S, V] float32, for the rows ``rows`` [N]:
// row n's prompt tokens are prompt_ids[prompt_offsets[n]:prompt_offsets[n + 1]], its generated ones likewise in
// output_ids. A token seen in either has its logit divided by the repetition penalty (multiplied when <= 0); a
// generated one then loses frequency * count and presence. O(tokens) a row: counts live in per-thread arrays of V
// entries, cleared through the same token lists.
void apply_penalties_(torch::Tensor logits, torch::Tensor rows, torch::Tensor prompt_ids, torch::Tensor prompt_offsets,
                      torch::Tensor output_ids, torch::Tensor output_offsets, torch::Tensor repetition,
                      torch::Tensor frequency, torch::Tensor presence) {
  check_rows(logits, "apply_penalties_");
  const int64_t N = rows.size(0), V = logits.size(1), ld = logits.stride(0);
  for (const auto* t : {&rows, &prompt_ids, &prompt_offsets, &output_ids, &output_offsets})
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "apply_penalties_: contiguous int64 rows, ids and offsets");
  TORCH_CHECK(prompt_offsets.size(0) == N + 1 && output_offsets.size(0) == N + 1, "apply_penalties_: N + 1 offsets");
  for (const auto* t : {&repetition, &frequency, &presence})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "apply_penalties_: one float32 penalty per row");
  float* lp = logits.data_ptr<float>();
  const int64_t *rp = rows.data_ptr<int64_t>(), *pi = prompt_ids.data_ptr<int64_t>();
  const int64_t *po = prompt_offsets.data_ptr<int64_t>(), *oi = output_ids.data_ptr<int64_t>();
  const int64_t* oo = output_offsets.data_ptr<int64_t>();
  const float *rep = repetition.data_ptr<float>(), *freq = frequency.data_ptr<float>();
  const float* pres = presence.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> count(V, 0);
    std::vector<uint8_t> done(V, 0);
    for (int64_t n = begin; n < end; ++n) {
      float* l = lp + rp[n] * ld;
      const auto each = [&](auto&& f) {
        for (int64_t j = oo[n]; j < oo[n + 1]; ++j)
          if (oi[j] >= 0 && oi[j] < V) f(oi[j]);
        for (int64_t j = po[n]; j < po[n + 1]; ++j)
          if (pi[j] >= 0 && pi[j] < V) f(pi[j]);
      };
      for (int64_t j = oo[n]; j < oo[n + 1]; ++j)
        if (oi[j] >= 0 && oi[j] < V) ++count[oi[j]];
      each([&](int64_t t) {
        if (done[t]) return;
        done[t] = 1;
        float x = l[t];
        if (rep[n] != 1.f) x = x > 0.f ? x / rep[n] : x * rep[n];
        if (count[t] > 0) {
          x = x - freq[n] * static_cast<float>(count[t]);
          x = x - pres[n];
        }
        l[t] = x;
      });
      each([&](int64_t t) {
        count[t] = 0;
        done[t] = 0;
      });
    }
  });
}
