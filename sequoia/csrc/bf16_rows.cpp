// y = x W^T + b for a few rows of bfloat16 activations and a bfloat16 weight, on AVX2 + FMA.
//
// Decoding multiplies 1-16 rows by every weight, so the product is bound by reading the
// weight, not by arithmetic. Each block of NB weight rows is read from memory once for all
// rows of x: it is widened to float32 eight values at a time (exact: a 16-bit shift) and
// multiplied into up to four rows of x at once, with R * NB float32 accumulators in
// registers; further rows of x reread the block from L1. The next block is prefetched while
// this one is summed, which keeps two cores streaming near memory bandwidth. Sums are
// float32 and the result is rounded to bfloat16 once, as oneDNN's bfloat16 product does; the
// order of the sums differs, so results can differ from it in the last bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

struct Args {
  const float* x;          // [rows, K], float32
  const at::BFloat16* w;   // [N, K]
  const float* bias;       // [N] or nullptr
  at::BFloat16* y;         // [rows, N]
  int64_t rows, N, K;
};

inline __m256 widen(const at::BFloat16* p) {  // 8 bfloat16 -> 8 float32
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[r0 .. r0+R, n0 .. n0+NB)
template <int R, int NB>
inline void block(const Args& a, int64_t r0, int64_t n0) {
  const int64_t K = a.K, K8 = K - K % 8;
  const float* x = a.x + r0 * K;
  const at::BFloat16* w = a.w + n0 * K;
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w + NB * K + k * NB), _MM_HINT_T0);
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * K + k);
    for (int j = 0; j < NB; ++j) {
      const __m256 wv = widen(w + j * K + k);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(xv[r], wv, acc[r][j]);
    }
  }
  float sums[R][NB];  // reduced in a loop of its own, so that acc stays in registers
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) sums[r][j] = hsum(acc[r][j]);
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NB; ++j) {
      float sum = sums[r][j];
      for (int64_t k = K8; k < K; ++k) sum += x[r * K + k] * static_cast<float>(w[j * K + k]);
      a.y[(r0 + r) * a.N + n0 + j] = at::BFloat16(sum + (a.bias ? a.bias[n0 + j] : 0.0f));
    }
  }
}

// Every row of x times weight rows [n0, n0 + NB): four rows at a time (with half as many
// weight rows, to stay within AVX2's 16 registers), then the rest.
template <int NB>
inline void panel(const Args& a, int64_t n0) {
  constexpr int HALF = NB > 1 ? NB / 2 : 1;
  int64_t r = 0;
  for (; r + 4 <= a.rows; r += 4)
    for (int j = 0; j < NB; j += HALF) block<4, HALF>(a, r, n0 + j);
  switch (a.rows - r) {
    case 3: for (int j = 0; j < NB; j += HALF) block<3, HALF>(a, r, n0 + j); break;
    case 2: block<2, NB>(a, r, n0); break;
    case 1: block<1, NB>(a, r, n0); break;
    default: break;
  }
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "x's last dimension must be the weight's in_features");
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const auto xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  torch::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have out_features values");
    bf = bias->to(at::kFloat).contiguous();
  }
  auto y = torch::empty({xf.size(0), N}, x.options());
  const Args a{xf.data_ptr<float>(), w.data_ptr<at::BFloat16>(), bf.defined() ? bf.data_ptr<float>() : nullptr,
               y.data_ptr<at::BFloat16>(), xf.size(0), N, K};
  constexpr int64_t NB = 4;
  at::parallel_for(0, N / NB, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) panel<NB>(a, i * NB);
  });
  for (int64_t n = N - N % NB; n < N; ++n) panel<1>(a, n);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.reshape(shape);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x W^T + b for few rows of bfloat16 (AVX2 + FMA)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none());
}
