// Loom's float32 CPU kernels: the Llama layer's fused ops (layer_ops.h) and the panel matmul, which packs a float32
// weight once and streams it at memory bandwidth in decode steps; decode_layer chains the two over a whole layer; and
// the sampler (sample_ops.h).
#include "layer_ops.h"
#include "sample_ops.h"

// ---- panel matmul --------------------------------------------------------------------------------------------------
// y[M, N] = x[M, K] W^T + b. W is packed once into panels of kPanel output columns, K-major ([N/kPanel][K][kPanel]):
// a panel streams from memory once per call and is reused from L2 by every tile of rows; each k step loads the panel's
// weight vectors and broadcasts one input per row of the tile into one accumulator per row and vector (the register
// tile of a BLIS micro-kernel). With AVX-512 (32 registers, 8 x 32 tiles) it ran 15-55% faster than oneDNN's packed
// matmuls on these cores for 8-128 rows and on par for 256-2048 (oneDNN stays on AVX2 here). The AVX2 build has 16
// registers: tiles of up to 3 x 32 (12 accumulators, 3 broadcasts, 1 weight vector); against oneDNN held to AVX2 it
// took 2.3x less time at 1 row, 1.2x at 64 and the same at 1024 (loom/ops/packed_linear.py). has_avx512() tells
// which build this is.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define LOOM_HAS_PANEL 1
namespace {
constexpr int64_t kPanel = 32;
#if defined(__AVX512F__)
// 32 output columns = 2 zmm per row; tiles of up to 8 rows: 16 accumulators, 2 weight loads and 8 broadcasts per k.
constexpr int kMaxRows = 8;
template <int MR>
inline void panel_tile(const float* x, int64_t ldx, const float* panel, int64_t K, float* out) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel), w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i * ldx + k]);
      acc[i][0] = _mm512_fmadd_ps(xb, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xb, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(out + i * kPanel, acc[i][0]);
    _mm512_storeu_ps(out + i * kPanel + 16, acc[i][1]);
  }
}
#else
// 32 output columns = 4 ymm per row; tiles of up to 3 rows: 12 accumulators, 3 broadcasts and 1 weight vector live.
constexpr int kMaxRows = 3;
template <int MR>
inline void panel_tile(const float* x, int64_t ldx, const float* panel, int64_t K, float* out) {
  __m256 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 xb[MR];
    for (int i = 0; i < MR; ++i) xb[i] = _mm256_broadcast_ss(x + i * ldx + k);
    for (int j = 0; j < 4; ++j) {
      const __m256 w = _mm256_loadu_ps(panel + k * kPanel + 8 * j);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xb[i], w, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + i * kPanel + 8 * j, acc[i][j]);
}
#endif

// rows (1..MR) -> the tile of that height, chosen at run time among the compiled ones.
template <int MR = kMaxRows>
inline void panel_rows(int rows, const float* x, int64_t ldx, const float* panel, int64_t K, float* out) {
  if constexpr (MR > 1) {
    if (rows < MR) return panel_rows<MR - 1>(rows, x, ldx, panel, K, out);
  }
  panel_tile<MR>(x, ldx, panel, K, out);
}
}  // namespace

// weight [N, K] -> panels [ceil(N / kPanel), K, kPanel], zero-padded past N.
torch::Tensor pack_panels(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32, "pack_panels: [N, K] float32");
  const int64_t N = weight.size(0), K = weight.size(1), P = (N + kPanel - 1) / kPanel;
  auto padded = torch::zeros({P * kPanel, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({P, kPanel, K}).transpose(1, 2).contiguous();  // [P, K, kPanel]
}

// x [M, K] (rows contiguous), panels from pack_panels, N the real output width -> y [M, N].
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N, c10::optional<torch::Tensor> bias) {
  check_rows(x, "panel_linear");
  TORCH_CHECK(panels.is_contiguous() && panels.size(1) == x.size(1) && panels.size(2) == kPanel, "panel_linear: shapes");
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0), P = panels.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  const float* bp = bias && bias->defined() ? bias->contiguous().data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, P, 4, [&](int64_t begin, int64_t end) {
    float tile[kMaxRows * kPanel];
    for (int64_t p = begin; p < end; ++p) {
      const float* panel = wp + p * K * kPanel;
      const int64_t n0 = p * kPanel, width = std::min(kPanel, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        panel_rows(rows, xp + m0 * ldx, ldx, panel, K, tile);
        for (int i = 0; i < rows; ++i) {
          float* yr = yp + (m0 + i) * N + n0;
          for (int64_t j = 0; j < width; ++j) yr[j] = tile[i * kPanel + j] + (bp ? bp[n0 + j] : 0.f);
        }
      }
    }
  });
  return y;
}

// ---- a whole decoder layer -----------------------------------------------------------------------------------------
// decode_layer_with (layer_ops.h) on panel-packed weights (norms: as it takes them); w: {panels, bias}
// for each of qkv, o, gate_up, down (panels from pack_panels, bias optional); widths: their output widths.
std::tuple<torch::Tensor, torch::Tensor> decode_layer(
    torch::Tensor x, c10::optional<torch::Tensor> residual, const std::vector<torch::Tensor>& norms,
    const std::vector<c10::optional<torch::Tensor>>& w, const std::vector<int64_t>& widths, double eps,
    torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
    torch::Tensor slots, torch::Tensor block_tables, torch::Tensor seq_lens, int64_t H, int64_t HKV, double scale,
    int64_t window, double softcap, bool gelu, bool sandwich) {
  TORCH_CHECK(w.size() == 8 && widths.size() == 4, "decode_layer: 8 weights, 4 widths");
  for (int i = 0; i < 4; ++i) TORCH_CHECK(w[2 * i].has_value(), "decode_layer: weight ", 2 * i, " is missing");
  const auto linear = [&](int i, const torch::Tensor& in) {
    return panel_linear(in, *w[2 * i], widths[i], w[2 * i + 1]);
  };
  return decode_layer_with(linear, x, residual, norms, eps, positions, cos, sin, k_cache, v_cache, slots, block_tables,
                           seq_lens, H, HKV, scale, window, softcap, gelu, sandwich);
}
#endif  // LOOM_HAS_PANEL

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using NoGil = py::call_guard<py::gil_scoped_release>;  // every op computes without the GIL, as torch's do
  m.def("paged_decode", &paged_decode, "paged attention decode (CPU)", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"), py::arg("window") = 0,
        py::arg("softcap") = 0.0, py::arg("sinks") = py::none(), NoGil());
  m.def("rms_norm", &rms_norm, "RMSNorm over rows", NoGil());
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x; x = RMSNorm(residual), in place", NoGil());
  m.def("rotary_cache_", &rotary_cache_, "rotary q/k in place + k/v cache write", NoGil());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up", NoGil());
  m.def("gelu_and_mul", &gelu_and_mul, "gelu_tanh(gate) * up", NoGil());
  m.def("sample_rows", &sample_rows, "one token per row: greedy, or temperature / top-k / top-p / min-p by inverse CDF",
        py::arg("logits"), py::arg("temperature"), py::arg("top_p"), py::arg("min_p"), py::arg("top_k"),
        py::arg("seeds"), py::arg("counters"), NoGil());
  m.def("apply_penalties_", &apply_penalties_, "repetition / frequency / presence penalties in place",
        py::arg("logits"), py::arg("rows"), py::arg("prompt_ids"), py::arg("prompt_offsets"), py::arg("output_ids"),
        py::arg("output_offsets"), py::arg("repetition"), py::arg("frequency"), py::arg("presence"), NoGil());
  m.def("filtered_probs", &filtered_probs, "softmax(logits / T) over the top-k / top-p survivors, min-p zeroed",
        py::arg("logits"), py::arg("temperature"), py::arg("top_p"), py::arg("min_p"), py::arg("top_k"), NoGil());
#if defined(LOOM_HAS_PANEL)
  m.def("pack_panels", &pack_panels, "pack a [N, K] weight into kPanel-column panels", NoGil());
  m.def("panel_linear", &panel_linear, "x W^T + b, W from pack_panels", NoGil());
  m.def("decode_layer", &decode_layer, "a dense decoder layer over a decode-only step", NoGil());
#endif
#if defined(__AVX512F__)
  m.def("has_avx512", [] { return true; }, "whether the kernels were built with AVX-512 (8 x 32 panel tiles)");
#else
  m.def("has_avx512", [] { return false; }, "whether the kernels were built with AVX-512 (8 x 32 panel tiles)");
#endif
}
