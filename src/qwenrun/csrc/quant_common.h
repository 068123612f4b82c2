// Helpers shared by the kernel sources (one definition, one behaviour).
#pragma once
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace qwenrun {

constexpr int64_t kBlk8 = 64;    // int8 weights: K padding = the activation block
constexpr int64_t kBlk4 = 128;   // int4 super-block (= activation block)

// max |x[i]| over n floats (AVX2, exact: max does not round)
inline float absmax(const float* x, int64_t n) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  float amax = _mm_cvtss_f32(m);
  for (; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax;
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// ---- shared by the linear kernels (quant_kernels.cpp, gguf_kernels.cpp) ----

// The integer dot product's code path, fixed at build time by qwenrun/quant/kernels.py from the
// CPU's flags (QWENRUN_VNNI): 0 = AVX2 (maddubs -> int16 pairs, madd -> int32), 1 = AVX-512
// VNNI on 256-bit vectors (AVX512VL vpdpbusd), 2 = AVX-VNNI (VEX vpdpbusd), 3 = the VNNI code
// structure with vpdpbusd emulated exactly in AVX2 (tests only: it lets a CPU without VNNI run
// the kernels' VNNI branches). Every path computes the same integers, so their outputs are
// bit-identical (tests/test_kernel_isa.py).
#ifndef QWENRUN_VNNI
#define QWENRUN_VNNI 0
#endif
constexpr bool kVnni = QWENRUN_VNNI != 0;

// acc (int32 lanes) += the sum of the 4 products u8(a) * s8(b) of each 4-byte lane (no
// saturation: vpdpbusd's semantics).
inline __m256i dot4_acc(__m256i acc, __m256i a, __m256i b) {
#if QWENRUN_VNNI == 1
  return _mm256_dpbusd_epi32(acc, a, b);
#elif QWENRUN_VNNI == 2
  return _mm256_dpbusd_avx_epi32(acc, a, b);
#else  // exact in AVX2: even and odd bytes widened to int16, each pair summed by madd
  const __m256i lo8 = _mm256_set1_epi16(0x00FF);
  const __m256i ae = _mm256_and_si256(a, lo8), ao = _mm256_srli_epi16(a, 8);
  const __m256i be = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8), bo = _mm256_srai_epi16(b, 8);
  return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ae, be), _mm256_madd_epi16(ao, bo)));
#endif
}

inline const char* isa_name() {
#if defined(QWENRUN_AMX) && QWENRUN_AMX == 1
  return "amx";  // avx512-vnni dot products + AMX-INT8 tiles for many rows (gguf_kernels.cpp)
#endif
  switch (QWENRUN_VNNI) {
    case 1: return "avx512-vnni";
    case 2: return "avx-vnni";
    case 3: return "avx2 (vnni emulated)";
    default: return "avx2";
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Quantize one row x[0:K] to int8 in blocks of `blk` (K padded with zeros to Kp). scale[b] =
// amax/127; q = round-half-even(x * (127/amax)), the same arithmetic as the Python reference.
inline void quantize_row(const float* x, int64_t K, int64_t Kp, int64_t blk, int8_t* q, float* scale) {
  for (int64_t b0 = 0, bi = 0; b0 < Kp; b0 += blk, ++bi) {
    const int64_t n = std::max<int64_t>(0, std::min(blk, K - b0));
    const float amax = absmax(x + b0, n);
    int64_t i = 0;
    scale[bi] = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + b0 + i), vinv));  // nearest-even
      alignas(32) int32_t t[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
      for (int k = 0; k < 8; ++k) q[b0 + i + k] = static_cast<int8_t>(t[k]);
    }
    for (; i < n; ++i) q[b0 + i] = static_cast<int8_t>(std::nearbyint(x[b0 + i] * inv));
    for (; i < blk; ++i) q[b0 + i] = 0;
  }
}

// Memory-level parallelism decides decode speed: each thread splits its rows into kStreams
// contiguous runs and walks them round-robin, one row at a time (kStreams sequential streams for
// the hardware prefetchers), plus a software prefetch kPrefetch bytes ahead in each stream.
// Measured with 2 threads (int8, N = 1): 1 stream, no prefetch 18-20 GB/s; + prefetch 21-23;
// 2-3 streams + prefetch 24-30, on par with MKL's fp32 sgemv.
constexpr int64_t kPrefetch = 2048;
constexpr int64_t kStreams = 3;

// Calls row_fn(o) for o in [o0, o1) in the stream order above.
template <typename F>
inline void for_rows_streamed(int64_t o0, int64_t o1, const F& row_fn) {
  const int64_t h = (o1 - o0) / kStreams;
  for (int64_t i = 0; i < h; ++i)
    for (int64_t j = 0; j < kStreams; ++j) row_fn(o0 + j * h + i);
  for (int64_t o = o0 + kStreams * h; o < o1; ++o) row_fn(o);
}

// Work split over output rows; at least ~64 KiB of weights per task so tiny linears don't pay
// a thread wake-up.
inline int64_t grain_for(int64_t row_bytes) { return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, row_bytes)); }

// Row n of x as fp32: the tensor's own memory, or (bf16 x) converted into a scratch row (exact).
inline const float* x_row(const torch::Tensor& x, int64_t n, std::vector<float>& buf) {
  const int64_t K = x.size(1);
  if (x.scalar_type() == torch::kFloat32) return x.data_ptr<float>() + n * K;
  if (static_cast<int64_t>(buf.size()) < K) buf.resize(K);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + n * K;
  for (int64_t k = 0; k < K; ++k) buf[k] = bf16_to_f32(src[k]);
  return buf.data();
}

// Row n of x [N, K] (fp32, or bf16 converted into buf) given as a pointer.
inline const float* x_row(const void* x, bool bf16, int64_t n, int64_t K, std::vector<float>& buf) {
  if (!bf16) return static_cast<const float*>(x) + n * K;
  if (static_cast<int64_t>(buf.size()) < K) buf.resize(K);
  const uint16_t* src = static_cast<const uint16_t*>(x) + n * K;
  for (int64_t k = 0; k < K; ++k) buf[k] = bf16_to_f32(src[k]);
  return buf.data();
}

// y[n, o] = v in y's dtype: fp32, or bf16 rounded to nearest even (= PyTorch's .to(bfloat16)),
// so bf16 in / bf16 out is bit-identical to converting around an fp32 call.
struct YWriter {
  float* f = nullptr;
  uint16_t* h = nullptr;
  int64_t O;
  explicit YWriter(torch::Tensor& y) : O(y.size(1)) {
    if (y.scalar_type() == torch::kFloat32) f = y.data_ptr<float>();
    else h = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  }
  YWriter(void* y, bool bf16, int64_t ld) : O(ld) {  // rows ld elements apart (a slice of a wider row)
    if (bf16) h = static_cast<uint16_t*>(y);
    else f = static_cast<float*>(y);
  }
  void operator()(int64_t n, int64_t o, float v) const {
    if (f) f[n * O + o] = v;
    else h[n * O + o] = f32_to_bf16(v);
  }
};

// A quantized linear validated once, for callers in C++ (fused_ops.cpp's decode plan): y[n, :]
// = W x[n, :] + b for N rows of x (fp32, or bf16 with y bf16), y rows ldy elements apart (a slice
// of a wider buffer). The same arithmetic as the format's torch-facing entry point.
struct PreparedLinear {
  int64_t O = 0, K = 0;
  std::vector<torch::Tensor> keep;  // the buffers the kernel reads
  virtual ~PreparedLinear() = default;
  virtual void apply(const void* x, bool xbf16, int64_t N, void* y, int64_t ldy) const = 0;
};

inline void check_common(const torch::Tensor& x, const torch::Tensor& qw, const c10::optional<torch::Tensor>& bias, int64_t O) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) &&
              x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D float32 or bfloat16 CPU tensor");
  TORCH_CHECK(qw.is_contiguous() && qw.dim() == 2, "packed weight must be contiguous 2-D");
  if (bias) TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->numel() == O && bias->is_contiguous(), "bad bias");
}

}  // namespace qwenrun
