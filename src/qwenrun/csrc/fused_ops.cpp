// Fused decode-step ops for CPU (AVX2): everything a Qwen2 layer does between its linears, in a
// handful of calls instead of ~25 PyTorch dispatches per layer. Used by qwenrun/layers/fused.py;
// each op has a plain PyTorch equivalent there (the fallback and the tests' reference).
//
//   rms_norm(x, w, eps)                  RMSNorm (transformers' rounding points for bf16)
//   add_rms_norm_(h, r, w, eps)          h += r in place, then RMSNorm(h): residual + next norm
//   silu_mul(gu) / silu_mul2(g, u)       silu(gate) * up (gate|up stacked in one tensor, or two)
//   rope_store_(qkv, rope, pos, kv, ...) RoPE on q and k in place inside the qkv projection's
//                                        output, then k and v written to their KV-cache slots
//                                        (converted to the cache's dtype, round to nearest even)
//   decode_attention_(qkv, kv, ...)      one query token per sequence over its cached context
//                                        (fp32, bf16 or fp16 cache read in place under fp32 or
//                                        bf16 activations, no gather, GQA)
//   argmax_rows(logits, n)               greedy sampling: torch.argmax over the first n columns
//   DecodePlan(layers, ...).run(h, ...)  a whole all-decode step of a model whose linears all
//                                        have kernels (GGUF blocks, int8, int4): the layer loop
//                                        above in one call, the GEMVs called directly
//                                        (PreparedLinear, quant_common.h)
//
// Bound as the extension's `fused` submodule (def_fused_ops at the end of this file).
//
// Rounding: elementwise ops round where PyTorch's separate ops round (fp-contract off: no FMA
// fusing a multiply into the following add), so residual adds and RoPE are bit-identical to the
// plain path; reductions (norm statistics, attention dot products, softmax sums) and exp() differ
// from ATen's by reassociation / a few ulp only.
#pragma GCC optimize("fp-contract=off")

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "quant_common.h"

namespace {

using bf16 = c10::BFloat16;
using fp16 = c10::Half;

inline float to_f(float x) { return x; }
inline float to_f(bf16 x) { return static_cast<float>(x); }
inline float to_f(fp16 x) { return static_cast<float>(x); }
template <typename T> inline T from_f(float x) { return static_cast<T>(x); }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// v rounded to T: for bf16 the nearest-even bf16 value (as fp32; NaN -> 0x7FC0 as c10::BFloat16
// gives), for fp32 v itself. Bit-identical to to_f(from_f<T>(x)) lane by lane.
template <typename T>
inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    static_assert(std::is_same_v<T, bf16>, "round8: fp32 or bf16");
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
}

// p[0:8] = v, v already representable in T (round8 first)
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}

// exp(x) for x in fp32, AVX2 (Cephes-style: x = n ln2 + r, degree-6 polynomial, 2^n by exponent
// bits); relative error ~2 ulp, exp(-inf) = 0, large x saturates to +inf.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-103.972084045410f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f);
  __m256 xc = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(n, c1)), _mm256_mul_ps(n, c2));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n in two halves so that n down to -150 (denormal results) stays exact
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays NaN
}

inline float exp1(float x) {
  alignas(32) float b[8];
  _mm256_store_ps(b, exp8(_mm256_set1_ps(x)));
  return b[0];
}

void check_cpu(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": CPU tensors only (the caller falls back elsewhere)");
}

// ---------------------------------------------------------------------------------------------
// RMSNorm. fp32: y = (x * rsqrt(mean(x^2) + eps)) * w. bf16 (transformers' Qwen2RMSNorm):
// statistics in fp32, normalised value cast to bf16, then the bf16 weight multiply (rounds again).
template <typename T>
void rms_row(const T* x, const T* w, T* y, int64_t D, float eps) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    __m256 v0 = load8(x + i), v1 = load8(x + i + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  float ss = hsum8(_mm256_add_ps(a0, a1));
  for (; i < D; ++i) ss += to_f(x[i]) * to_f(x[i]);
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  // y = (x * r) * w; bf16 rounds x * r to bf16 first (transformers' Qwen2RMSNorm: normalize in
  // fp32, .to(bf16), then * weight)
  const __m256 rv = _mm256_set1_ps(r);
  int64_t j = 0;
  for (; j + 8 <= D; j += 8)
    store8(y + j, round8<T>(_mm256_mul_ps(load8(w + j), round8<T>(_mm256_mul_ps(load8(x + j), rv)))));
  for (; j < D; ++j) {
    const float n = to_f(from_f<T>(to_f(x[j]) * r));
    y[j] = from_f<T>(to_f(w[j]) * n);
  }
}

template <typename T>
void rms_rows(const T* x, const T* w, T* y, int64_t N, int64_t D, float eps) {
  at::parallel_for(0, N, N * D < (1 << 16) ? N : 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_row(x + r * D, w, y + r * D, D, eps);
  });
}

void check_norm_args(const torch::Tensor& x, const torch::Tensor& w) {
  check_cpu(x, "rms_norm");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && w.numel() == x.size(1),
              "rms_norm: x [N, D] contiguous, w [D]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and w must share a dtype");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "rms_norm: fp32 or bf16");
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_norm_args(x, w);
  auto y = torch::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  if (x.scalar_type() == torch::kFloat32)
    rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), N, D, static_cast<float>(eps));
  else
    rms_rows(x.data_ptr<bf16>(), w.data_ptr<bf16>(), y.data_ptr<bf16>(), N, D, static_cast<float>(eps));
  return y;
}

// h += r (rounded in h's dtype, as `h + r`), then y = RMSNorm(h) * w.
template <typename T>
void add_rms_rows(T* h, const T* r, const T* w, T* y, int64_t N, int64_t D, float eps) {
  at::parallel_for(0, N, N * D < (1 << 16) ? N : 1, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      T* hr = h + row * D;
      const T* rr = r + row * D;
      int64_t j = 0;
      for (; j + 8 <= D; j += 8) store8(hr + j, round8<T>(_mm256_add_ps(load8(hr + j), load8(rr + j))));
      for (; j < D; ++j) hr[j] = from_f<T>(to_f(hr[j]) + to_f(rr[j]));
      rms_row(hr, w, y + row * D, D, eps);
    }
  });
}

torch::Tensor add_rms_norm_(torch::Tensor h, torch::Tensor r, torch::Tensor w, double eps) {
  check_norm_args(h, w);
  TORCH_CHECK(r.sizes() == h.sizes() && r.is_contiguous() && r.scalar_type() == h.scalar_type(),
              "add_rms_norm_: r like h");
  auto y = torch::empty_like(h);
  const int64_t N = h.size(0), D = h.size(1);
  if (h.scalar_type() == torch::kFloat32)
    add_rms_rows(h.data_ptr<float>(), r.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), N, D,
                 static_cast<float>(eps));
  else
    add_rms_rows(h.data_ptr<bf16>(), r.data_ptr<bf16>(), w.data_ptr<bf16>(), y.data_ptr<bf16>(), N, D,
                 static_cast<float>(eps));
  return y;
}

// ---------------------------------------------------------------------------------------------
// silu(g) * u, g/u rows of F elements at row strides sg / su. silu(x) = x / (1 + exp(-x)); bf16
// rounds silu's result to bf16 before the multiply (F.silu, then `*`).
template <typename T>
void silu_mul_rows(const T* g, int64_t sg, const T* u, int64_t su, T* y, int64_t N, int64_t F) {
  at::parallel_for(0, N, N * F < (1 << 15) ? N : 1, [&](int64_t r0, int64_t r1) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t row = r0; row < r1; ++row) {
      const T* gr = g + row * sg;
      const T* ur = u + row * su;
      T* yr = y + row * F;
      int64_t j = 0;
      for (; j + 8 <= F; j += 8) {
        __m256 x = load8(gr + j);
        __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_xor_ps(x, sign))));
        store8(yr + j, round8<T>(_mm256_mul_ps(round8<T>(s), load8(ur + j))));
      }
      for (; j < F; ++j) {
        const float x = to_f(gr[j]);
        const float s = x / (1.0f + exp1(-x));
        yr[j] = from_f<T>(to_f(from_f<T>(s)) * to_f(ur[j]));
      }
    }
  });
}

torch::Tensor silu_mul_impl(const torch::Tensor& g, int64_t sg, const torch::Tensor& u, int64_t su,
                            int64_t N, int64_t F, int64_t u_off) {
  auto y = torch::empty({N, F}, g.options());
  if (g.scalar_type() == torch::kFloat32)
    silu_mul_rows(g.data_ptr<float>(), sg, u.data_ptr<float>() + u_off, su, y.data_ptr<float>(), N, F);
  else
    silu_mul_rows(g.data_ptr<bf16>(), sg, u.data_ptr<bf16>() + u_off, su, y.data_ptr<bf16>(), N, F);
  return y;
}

// gu [N, 2F]: gate = gu[:, :F], up = gu[:, F:] (gate_proj and up_proj fused in one linear).
torch::Tensor silu_mul(torch::Tensor gu) {
  check_cpu(gu, "silu_mul");
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 2 == 0, "silu_mul: gu [N, 2F] contiguous");
  TORCH_CHECK(gu.scalar_type() == torch::kFloat32 || gu.scalar_type() == torch::kBFloat16, "silu_mul: fp32 or bf16");
  const int64_t N = gu.size(0), F = gu.size(1) / 2;
  return silu_mul_impl(gu, 2 * F, gu, 2 * F, N, F, F);
}

torch::Tensor silu_mul2(torch::Tensor g, torch::Tensor u) {
  check_cpu(g, "silu_mul2");
  TORCH_CHECK(g.dim() == 2 && g.is_contiguous() && u.is_contiguous() && u.sizes() == g.sizes() &&
                  u.scalar_type() == g.scalar_type(), "silu_mul2: g, u [N, F] contiguous, one dtype");
  TORCH_CHECK(g.scalar_type() == torch::kFloat32 || g.scalar_type() == torch::kBFloat16, "silu_mul2: fp32 or bf16");
  return silu_mul_impl(g, g.size(1), u, u.size(1), g.size(0), g.size(1), 0);
}

// ---------------------------------------------------------------------------------------------
// RoPE ("rotate half", GPT-NeoX layout) on the q and k heads of qkv [N, (H + 2 Hkv) d], in place:
// x' = x * cos + rotate_half(x) * sin, cos/sin = rope[pos] ([P, 2, d] fp32, cast to the activation
// dtype first as the plain path does); then k and v rows copied to kv[layer, 0/1, slot].
template <typename T>
void rope_rows(T* qkv, const float* rope, const int64_t* pos, int64_t N, int64_t nheads, int64_t row_stride,
               int64_t d, int64_t P) {
  const int64_t half = d / 2;
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(pos[n] >= 0 && pos[n] < P, "rope: position ", pos[n], " outside the table");
    const float* cs = rope + pos[n] * 2 * d;
    const float* sn = cs + d;
    std::vector<float> c(d), s(d), x(d);
    for (int64_t i = 0; i < d; ++i) {
      c[i] = to_f(from_f<T>(cs[i]));
      s[i] = to_f(from_f<T>(sn[i]));
    }
    if (half % 8 == 0) {  // 8 lanes of each half at a time, the same roundings as below
      const __m256 sign = _mm256_set1_ps(-0.0f);
      for (int64_t h = 0; h < nheads; ++h) {
        T* xr = qkv + n * row_stride + h * d;
        for (int64_t i = 0; i < half; i += 8) {
          const __m256 lo = load8(xr + i), hi = load8(xr + i + half);
          const __m256 cl = _mm256_loadu_ps(c.data() + i), ch = _mm256_loadu_ps(c.data() + i + half);
          const __m256 sl = _mm256_loadu_ps(s.data() + i), sh = _mm256_loadu_ps(s.data() + i + half);
          const __m256 a0 = round8<T>(_mm256_mul_ps(lo, cl)), b0 = round8<T>(_mm256_mul_ps(_mm256_xor_ps(hi, sign), sl));
          const __m256 a1 = round8<T>(_mm256_mul_ps(hi, ch)), b1 = round8<T>(_mm256_mul_ps(lo, sh));
          store8(xr + i, round8<T>(_mm256_add_ps(a0, b0)));
          store8(xr + i + half, round8<T>(_mm256_add_ps(a1, b1)));
        }
      }
      continue;
    }
    for (int64_t h = 0; h < nheads; ++h) {
      T* xr = qkv + n * row_stride + h * d;
      for (int64_t i = 0; i < d; ++i) x[i] = to_f(xr[i]);
      for (int64_t i = 0; i < half; ++i) {
        const float a = to_f(from_f<T>(x[i] * c[i])), b = to_f(from_f<T>(-x[i + half] * s[i]));
        xr[i] = from_f<T>(a + b);
      }
      for (int64_t i = half; i < d; ++i) {
        const float a = to_f(from_f<T>(x[i] * c[i])), b = to_f(from_f<T>(x[i - half] * s[i]));
        xr[i] = from_f<T>(a + b);
      }
    }
  }
}

// dst[0:n] = src[0:n] in the cache's dtype, rounded to nearest even as torch's copy_ does
template <typename T, typename C>
inline void convert_row(const T* src, C* dst, int64_t n) {
  if constexpr (std::is_same_v<T, C>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else if constexpr (std::is_same_v<T, float> && std::is_same_v<C, fp16>) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = static_cast<C>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = from_f<C>(to_f(src[i]));
  }
}

template <typename T, typename C>
void store_rows(const T* qkv, C* kv, int64_t layer, const int64_t* slots, int64_t N, int64_t H, int64_t Hkv,
                int64_t d, int64_t S) {
  const int64_t row = (H + 2 * Hkv) * d, hd = Hkv * d;
  C* kb = kv + (layer * 2 + 0) * S * hd;
  C* vb = kv + (layer * 2 + 1) * S * hd;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t s = slots[n];
    TORCH_CHECK(s >= 0 && s < S, "store: slot ", s, " out of range");
    convert_row(qkv + n * row + H * d, kb + s * hd, hd);
    convert_row(qkv + n * row + (H + Hkv) * d, vb + s * hd, hd);
  }
}

// fn(T*, C*): the activation type T (fp32 / bf16) and the cache type C (fp32 / bf16 / fp16)
template <typename F>
void with_types(const torch::Tensor& qkv, const torch::Tensor& kv, const F& fn) {
  auto cache = [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    switch (kv.scalar_type()) {
      case torch::kFloat32: return fn(t, kv.data_ptr<float>());
      case torch::kBFloat16: return fn(t, kv.data_ptr<bf16>());
      default: return fn(t, kv.data_ptr<fp16>());
    }
  };
  if (qkv.scalar_type() == torch::kFloat32) cache(qkv.data_ptr<float>());
  else cache(qkv.data_ptr<bf16>());
}

void check_qkv(const torch::Tensor& qkv, int64_t H, int64_t Hkv, int64_t d) {
  check_cpu(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (H + 2 * Hkv) * d,
              "qkv: [N, (H + 2 Hkv) d] contiguous");
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 || qkv.scalar_type() == torch::kBFloat16, "qkv: fp32 or bf16");
}

void check_kv(const torch::Tensor& kv, const torch::Tensor& qkv, int64_t layer, int64_t Hkv, int64_t d) {
  check_cpu(kv, "kv cache");
  TORCH_CHECK(kv.dim() == 5 && kv.is_contiguous() && kv.size(1) == 2 && kv.size(3) == Hkv && kv.size(4) == d,
              "kv cache: [layers, 2, slots, Hkv, d] contiguous");
  TORCH_CHECK(kv.scalar_type() == torch::kFloat32 || kv.scalar_type() == torch::kBFloat16 ||
                  kv.scalar_type() == torch::kHalf, "kv cache: fp32, bf16 or fp16");
  TORCH_CHECK(layer >= 0 && layer < kv.size(0), "layer out of range");
}

void rope_store_(torch::Tensor qkv, torch::Tensor rope, torch::Tensor positions, int64_t H, int64_t Hkv,
                 c10::optional<torch::Tensor> kv, int64_t layer, c10::optional<torch::Tensor> slot_mapping) {
  TORCH_CHECK(rope.dim() == 3 && rope.size(1) == 2 && rope.is_contiguous() && rope.scalar_type() == torch::kFloat32,
              "rope: [P, 2, d] fp32 contiguous");
  const int64_t d = rope.size(2), N = qkv.size(0);
  check_qkv(qkv, H, Hkv, d);
  TORCH_CHECK(d % 2 == 0, "rope: even head_dim");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous() && positions.numel() == N,
              "positions: int64 [N]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  if (qkv.scalar_type() == torch::kFloat32)
    rope_rows(qkv.data_ptr<float>(), rope.data_ptr<float>(), pos, N, H + Hkv, qkv.size(1), d, rope.size(0));
  else
    rope_rows(qkv.data_ptr<bf16>(), rope.data_ptr<float>(), pos, N, H + Hkv, qkv.size(1), d, rope.size(0));
  if (!kv.has_value()) return;
  TORCH_CHECK(slot_mapping.has_value(), "rope_store_: kv needs slot_mapping");
  const auto& c = *kv;
  const auto& sm = *slot_mapping;
  check_kv(c, qkv, layer, Hkv, d);
  TORCH_CHECK(sm.scalar_type() == torch::kInt64 && sm.is_contiguous() && sm.numel() == N, "slot_mapping: int64 [N]");
  with_types(qkv, c, [&](auto* a, auto* kvp) {
    store_rows(a, kvp, layer, sm.data_ptr<int64_t>(), N, H, Hkv, d, c.size(2));
  });
}

// ---------------------------------------------------------------------------------------------
// Decode attention: query rows row0 .. row0 + B of qkv (one token per sequence) attend their
// context, read in place from the fp32/bf16 cache: slots [B, L] (int64) or, with slots empty, the
// consecutive slots slot_start .. slot_start + L (B == 1). Keys visible to row b: the first
// min(lens[b], L) context positions, the last `window` of them when window > 0. Exact softmax
// (max-subtracted, fp32). out [*, H * d] rows row0 .. row0 + B are written (activation dtype).
template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), a1);
  }
  for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
  float s = hsum8(_mm256_add_ps(a0, a1));
  for (; i < d; ++i) s += q[i] * to_f(k[i]);
  return s;
}

template <typename T>
inline void axpy(float p, const T* v, float* y, int64_t d) {
  const __m256 a = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, load8(v + i), _mm256_loadu_ps(y + i)));
  for (; i < d; ++i) y[i] += p * to_f(v[i]);
}

// Scores of 8 keys at once (8 consecutive positions, one query head; d % 8 == 0): 8 independent
// FMA chains over d, each q vector loaded once for the 8 keys, then one transposing reduction
// (hadd tree) to a vector of the 8 dot products, times scale. Key row jj at kr[jj] + off.
template <typename C>
inline void qk8(const float* q, const C* const* kr, int64_t off, int64_t d, float scale, float* out) {
  __m256 a[8];
  for (int jj = 0; jj < 8; ++jj) a[jj] = _mm256_setzero_ps();
  for (int64_t e = 0; e < d; e += 8) {
    const __m256 qv = _mm256_loadu_ps(q + e);
    for (int jj = 0; jj < 8; ++jj) a[jj] = _mm256_fmadd_ps(qv, load8(kr[jj] + off + e), a[jj]);
  }
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
}

// acc[0:d] += p[0] v[0][0:d] + ... + p[P-1] v[P-1][0:d], the keys in order (the roundings of an
// axpy per key), d % 8 == 0
template <int P, typename C>
inline void pv_keys(const float* p, const C* const* v, int64_t d, float* acc) {
  __m256 pj[P];
  for (int j = 0; j < P; ++j) pj[j] = _mm256_broadcast_ss(p + j);
  for (int64_t e = 0; e < d; e += 8) {
    __m256 r = _mm256_loadu_ps(acc + e);
    for (int j = 0; j < P; ++j) r = _mm256_fmadd_ps(pj[j], load8(v[j] + e), r);
    _mm256_storeu_ps(acc + e, r);
  }
}

template <typename T, typename C>
void decode_attn(const T* qkv, const C* kv, int64_t layer, int64_t S, const int64_t* slots, int64_t slot_start,
                 int64_t L, const int64_t* lens, int64_t B, int64_t row0, int64_t H, int64_t Hkv, int64_t d,
                 int64_t window, float scale, T* out) {
  const int64_t g = H / Hkv, row = (H + 2 * Hkv) * d, hd = Hkv * d;
  const C* kb = kv + (layer * 2 + 0) * S * hd;
  const C* vb = kv + (layer * 2 + 1) * S * hd;
  std::vector<int64_t> first(B), count(B);
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = std::min<int64_t>(lens[b], L);
    first[b] = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    count[b] = std::max<int64_t>(0, len - first[b]);
    for (int64_t j = first[b]; j < first[b] + count[b]; ++j) {
      const int64_t s = slots ? slots[b * L + j] : slot_start + j;
      TORCH_CHECK(s >= 0 && s < S, "decode_attention: slot ", s, " out of range");
    }
    work += count[b];
  }
  // Work items: (sequence, a run of its positions), all heads each (flash-decoding's split of the
  // context). A slot's K (or V) rows of all heads are adjacent in the cache, and consecutive
  // slots mostly are too (blocks of the pool), so an item reads long sequential runs that the
  // prefetchers follow. (One task per kv head read 512 bytes per slot, 10 KiB apart at 4B
  // shapes: ~8 GB/s per thread, latency-bound.) Each item keeps its own softmax maximum, sum and
  // unnormalized weighted V sum; they are merged per sequence at the end (exact: rescaled by
  // exp(max_i - max)). A context within one item gives the single-pass result.
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(16, ((work + 2 * threads - 1) / (2 * threads) + 7) / 8 * 8);
  std::vector<int64_t> koff(H);  // query head h's K/V row within a slot
  for (int64_t h = 0; h < H; ++h) koff[h] = (h / g) * d;
  std::vector<int64_t> item_b, item_j0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < count[b]; j += chunk) item_b.push_back(b), item_j0.push_back(j);
  const int64_t items = static_cast<int64_t>(item_b.size()), per = H * d + 2 * H;
  std::vector<float> part(items * per);  // per item: weighted V sums [H, d], maxima [H], sums [H]
  const bool vec = d % 8 == 0;  // head dims of 64 / 128: the blocked loops; others the plain ones
  const int64_t grain = work * H * d < (1 << 17) ? std::max<int64_t>(1, items) : 1;  // short: inline
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(H * d), sc;
    std::vector<const C*> krow, vrow;
    int64_t qb = -1;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = item_b[it], j0 = item_j0[it], m = std::min(count[b], j0 + chunk) - j0;
      if (b != qb) {
        const T* qr = qkv + (row0 + b) * row;
        for (int64_t e = 0; e < H * d; ++e) q[e] = to_f(qr[e]);
        qb = b;
      }
      krow.resize(m), vrow.resize(m);
      for (int64_t j = 0; j < m; ++j) {  // each slot's head 0 (kv head hk: + hk d)
        const int64_t pos = first[b] + j0 + j;
        const int64_t s = slots ? slots[b * L + pos] : slot_start + pos;
        krow[j] = kb + s * hd, vrow[j] = vb + s * hd;
      }
      sc.resize(H * m);  // [H, m], every score written below
      int64_t j = 0;
      if (vec)  // 8 positions, all heads: the 8 slots' rows are each read front to back
        for (; j + 8 <= m; j += 8)
          for (int64_t h = 0; h < H; ++h) qk8(q.data() + h * d, krow.data() + j, koff[h], d, scale, sc.data() + h * m + j);
      for (; j < m; ++j)
        for (int64_t h = 0; h < H; ++h) sc[h * m + j] = dot(q.data() + h * d, krow[j] + koff[h], d) * scale;
      float* acc = part.data() + it * per;
      float* mx = acc + H * d;
      float* sm = mx + H;
      for (int64_t h = 0; h < H; ++h) {
        float* x = sc.data() + h * m;
        const float mm = *std::max_element(x, x + m);
        int64_t j = 0;
        const __m256 mv = _mm256_set1_ps(mm);
        __m256 sv = _mm256_setzero_ps();
        for (; j + 8 <= m; j += 8) {
          __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
          _mm256_storeu_ps(x + j, e);
          sv = _mm256_add_ps(sv, e);
        }
        float sum = hsum8(sv);
        for (; j < m; ++j) sum += (x[j] = exp1(x[j] - mm));
        mx[h] = mm, sm[h] = sum;
      }
      std::fill(acc, acc + H * d, 0.f);
      j = 0;
      if (vec) {
        for (; j + 8 <= m; j += 8)  // 8 keys per pass over a head's sums: fewer loads and stores of acc
          for (int64_t h = 0; h < H; ++h) {
            const C* v[8];
            for (int k = 0; k < 8; ++k) v[k] = vrow[j + k] + koff[h];
            pv_keys<8>(sc.data() + h * m + j, v, d, acc + h * d);
          }
        for (; j < m; ++j)
          for (int64_t h = 0; h < H; ++h) {
            const C* v[1] = {vrow[j] + koff[h]};
            pv_keys<1>(sc.data() + h * m + j, v, d, acc + h * d);
          }
      } else {
        for (; j < m; ++j)
          for (int64_t h = 0; h < H; ++h) axpy(sc[h * m + j], vrow[j] + koff[h], acc + h * d, d);
      }
    }
  });
  // merge the items of each sequence (in order), normalize, write
  std::vector<float> o(d);
  for (int64_t b = 0, it0 = 0; b < B; ++b) {
    int64_t it1 = it0;
    while (it1 < items && item_b[it1] == b) ++it1;
    T* orow = out + (row0 + b) * H * d;
    for (int64_t h = 0; h < H; ++h) {
      if (it1 == it0) {  // nothing visible (not produced by the engine): zeros, as a fully masked row
        for (int64_t e = 0; e < d; ++e) orow[h * d + e] = from_f<T>(0.f);
        continue;
      }
      float M = -INFINITY;
      for (int64_t it = it0; it < it1; ++it) M = std::max(M, part[it * per + H * d + h]);
      float sum = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t it = it0; it < it1; ++it) {
        const float* a = part.data() + it * per;
        const float w = it1 - it0 == 1 ? 1.f : std::exp(a[H * d + h] - M);
        sum += w * a[H * d + H + h];
        for (int64_t e = 0; e < d; ++e) o[e] += w * a[h * d + e];
      }
      const float inv = 1.f / sum;
      for (int64_t e = 0; e < d; ++e) orow[h * d + e] = from_f<T>(o[e] * inv);
    }
    it0 = it1;
  }
}

// A decode group's slot table: (L, slots [B, L] int64), or for empty slots (one sequence over the
// consecutive slots from slot_start) (lens[0], nullptr).
std::pair<int64_t, const int64_t*> slot_table(const torch::Tensor& slots, const torch::Tensor& lens) {
  const int64_t B = lens.numel();
  if (slots.numel() == 0) {
    TORCH_CHECK(B == 1, "contiguous slots: one sequence");
    return {lens.data_ptr<int64_t>()[0], nullptr};
  }
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.dim() == 2 && slots.size(0) == B,
              "slots: int64 [B, L] contiguous");
  return {slots.size(1), slots.data_ptr<int64_t>()};
}

void decode_attention_(torch::Tensor qkv, torch::Tensor kv, int64_t layer, torch::Tensor slots, int64_t slot_start,
                       torch::Tensor lens, int64_t row0, int64_t H, int64_t Hkv, int64_t window, double scale,
                       torch::Tensor out) {
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0, "heads must be a multiple of kv heads");
  const int64_t d = kv.size(4);
  check_qkv(qkv, H, Hkv, d);
  check_kv(kv, qkv, layer, Hkv, d);
  TORCH_CHECK(lens.scalar_type() == torch::kInt64 && lens.is_contiguous() && lens.dim() == 1, "lens: int64 [B]");
  const int64_t B = lens.numel();
  const auto table = slot_table(slots, lens);  // (not a structured binding: lambdas below capture these)
  const int64_t L = table.first;
  const int64_t* sp = table.second;
  TORCH_CHECK(row0 >= 0 && row0 + B <= qkv.size(0), "rows out of range");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == qkv.scalar_type() && out.numel() == qkv.size(0) * H * d,
              "out: [N, H d] contiguous, activation dtype");
  with_types(qkv, kv, [&](auto* a, auto* kvp) {
    using T = std::remove_pointer_t<decltype(a)>;
    decode_attn(a, kvp, layer, kv.size(2), sp, slot_start, L, lens.data_ptr<int64_t>(), B, row0, H, Hkv, d,
                window, static_cast<float>(scale), out.data_ptr<T>());
  });
}

// The whole attention of an all-decode step in one call: RoPE, cache write, attention.
torch::Tensor decode_step_attention(torch::Tensor qkv, torch::Tensor rope, torch::Tensor positions, torch::Tensor kv,
                                    int64_t layer, torch::Tensor slot_mapping, torch::Tensor slots, int64_t slot_start,
                                    torch::Tensor lens, int64_t H, int64_t Hkv, int64_t window, double scale) {
  rope_store_(qkv, rope, positions, H, Hkv, kv, layer, slot_mapping);
  TORCH_CHECK(lens.numel() == qkv.size(0), "decode_step_attention: one row per sequence");
  auto out = torch::empty({qkv.size(0), H * kv.size(4)}, qkv.options());
  decode_attention_(qkv, kv, layer, slots, slot_start, lens, 0, H, Hkv, window, scale, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Greedy sampling: per row of logits [B, V] (fp32), the index of the maximum of the first n
// columns, as torch.argmax: the first index holding it, a NaN counting as the maximum (the first
// NaN). Two passes over the row (max, then the first index equal to it); PyTorch's argmax takes
// ~300 us over Qwen's 151,936 logits on one core, this ~30.
int64_t argmax_row(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float mx = -INFINITY;
  {
    alignas(32) float b[8];
    _mm256_store_ps(b, m);
    for (int k = 0; k < 8; ++k) mx = std::max(mx, b[k]);
  }
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < n; ++i) has_nan |= std::isnan(x[i]), mx = std::max(mx, x[i]);
  if (has_nan) {
    for (int64_t k = 0; k < n; ++k)
      if (std::isnan(x[k])) return k;
  }
  const __m256 mv = _mm256_set1_ps(mx);
  for (i = 0; i + 8 <= n; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
    if (mask) return i + __builtin_ctz(mask);
  }
  for (; i < n; ++i)
    if (x[i] == mx) return i;
  return 0;  // n == 0 is refused by the caller
}

std::vector<int64_t> argmax_rows(torch::Tensor logits, int64_t n) {
  check_cpu(logits, "argmax_rows");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat32 && logits.dim() == 2 && logits.stride(1) == 1,
              "argmax_rows: fp32 [B, V] with unit column stride");
  TORCH_CHECK(n > 0 && n <= logits.size(1), "argmax_rows: n must be in 1..V");
  const int64_t B = logits.size(0), ld = logits.stride(0);
  const float* p = logits.data_ptr<float>();
  std::vector<int64_t> out(B);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) out[b] = argmax_row(p + b * ld, n);
  });
  return out;
}


// ---------------------------------------------------------------------------------------------
// The whole decode step of a Qwen2 model whose linears all have kernels (GGUF block weights,
// int8, int4), in one call:
// the layer loop of qwen2._forward_fused in C++, the same kernels in the same order on the same
// buffers, so the result is bit-identical to it. What it saves is not arithmetic: between two
// linears the weight stream has evicted the caches, and each PyTorch call (Python frame, pybind
// conversion, dispatcher, allocator) then pays tens of cache misses, ~8 us an op measured cold
// against ~1 us warm. Here a layer touches only its own data: no tensor is made per op, the
// activations live in a few scratch rows reused by every layer.
}  // namespace

namespace qwenrun {
// gguf_kernels.cpp / quant_kernels.cpp: the linears' kernels on raw rows (PreparedLinear)
std::shared_ptr<PreparedLinear> bq_prepare(const torch::Tensor& q, const c10::optional<torch::Tensor>& qh,
                                           const torch::Tensor& d, const c10::optional<torch::Tensor>& sc,
                                           const c10::optional<torch::Tensor>& dm,
                                           const c10::optional<torch::Tensor>& mn, int64_t G, int64_t S, int64_t bits,
                                           int64_t zp, const c10::optional<torch::Tensor>& bias);
std::shared_ptr<PreparedLinear> int8_prepare(const torch::Tensor& qw, const torch::Tensor& scale,
                                             const c10::optional<torch::Tensor>& bias, int64_t K);
std::shared_ptr<PreparedLinear> int4_prepare(const torch::Tensor& qw, const torch::Tensor& sub, const torch::Tensor& d,
                                             const c10::optional<torch::Tensor>& bias, int64_t K);
}  // namespace qwenrun

namespace {
namespace py = pybind11;

using PlanLinear = std::shared_ptr<qwenrun::PreparedLinear>;

// (format, in_features, the module's kernel arguments), None for absent parts:
//   "gguf": (q, qh, d, sc, dm, mn, G, S, bits, zp, bias); "int8": (qweight, scale, bias);
//   "int4": (qweight, sub, d, bias)
PlanLinear plan_linear(const py::handle& spec) {
  auto s = py::reinterpret_borrow<py::tuple>(spec);
  TORCH_CHECK(s.size() == 3, "decode plan: a linear is (format, in_features, kernel arguments)");
  const auto fmt = s[0].cast<std::string>();
  const auto K = s[1].cast<int64_t>();
  auto t = py::reinterpret_borrow<py::tuple>(s[2]);
  auto opt = [&](size_t i) {
    return t[i].is_none() ? c10::optional<torch::Tensor>() : c10::optional<torch::Tensor>(t[i].cast<torch::Tensor>());
  };
  auto ten = [&](size_t i) { return t[i].cast<torch::Tensor>(); };
  PlanLinear l;
  if (fmt == "gguf") {
    TORCH_CHECK(t.size() == 11, "decode plan: a GGUF linear has 11 kernel arguments");
    l = qwenrun::bq_prepare(ten(0), opt(1), ten(2), opt(3), opt(4), opt(5), t[6].cast<int64_t>(), t[7].cast<int64_t>(),
                            t[8].cast<int64_t>(), t[9].cast<int64_t>(), opt(10));
  } else if (fmt == "int8") {
    TORCH_CHECK(t.size() == 3, "decode plan: an int8 linear has 3 kernel arguments");
    l = qwenrun::int8_prepare(ten(0), ten(1), opt(2), K);
  } else if (fmt == "int4") {
    TORCH_CHECK(t.size() == 4, "decode plan: an int4 linear has 4 kernel arguments");
    l = qwenrun::int4_prepare(ten(0), ten(1), ten(2), opt(3), K);
  } else {
    TORCH_CHECK(false, "decode plan: no kernel for linear format '", fmt, "'");
  }
  TORCH_CHECK(l->K == K, "decode plan: the ", fmt, " weight has ", l->K, " inputs, the module ", K);
  return l;
}

struct PlanLayer {
  std::vector<PlanLinear> qkv, gu;  // q|k|v (one stacked linear or three), gate|up (one or two)
  PlanLinear o, down;
  torch::Tensor ln1, ln2;  // input and post-attention RMSNorm weights
  int64_t layer = 0, window = 0;
  float scale = 1.f;
};

class DecodePlan {
 public:
  // layers: per layer (qkv linears, o, gate/up linears, down, input norm w, post-attention norm w,
  // cache layer index, sliding window or 0, softmax scale); final_norm: the model's last norm.
  DecodePlan(py::list layers, torch::Tensor final_norm, double eps, int64_t H, int64_t Hkv, int64_t d)
      : final_(final_norm.contiguous()), eps_(static_cast<float>(eps)), H_(H), Hkv_(Hkv), d_(d) {
    TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && d > 0 && d % 2 == 0, "decode plan: bad head geometry");
    TORCH_CHECK(layers.size() > 0, "decode plan: no layers");
    D_ = final_.numel();
    dtype_ = final_.scalar_type();
    TORCH_CHECK(dtype_ == torch::kFloat32 || dtype_ == torch::kBFloat16, "decode plan: fp32 or bf16 activations");
    const int64_t Q = (H + 2 * Hkv) * d;
    for (const auto& item : layers) {
      auto t = py::reinterpret_borrow<py::tuple>(item);
      TORCH_CHECK(t.size() == 9, "decode plan: a layer is 9 fields");
      PlanLayer L;
      for (const auto& a : t[0].cast<py::list>()) L.qkv.push_back(plan_linear(a));
      L.o = plan_linear(t[1]);
      for (const auto& a : t[2].cast<py::list>()) L.gu.push_back(plan_linear(a));
      L.down = plan_linear(t[3]);
      L.ln1 = t[4].cast<torch::Tensor>().contiguous(), L.ln2 = t[5].cast<torch::Tensor>().contiguous();
      L.layer = t[6].cast<int64_t>(), L.window = t[7].cast<int64_t>(), L.scale = t[8].cast<float>();
      int64_t q = 0, g = 0;
      for (const auto& l : L.qkv) {
        TORCH_CHECK(l->K == D_, "decode plan: q/k/v take the hidden size");
        q += l->O;
      }
      TORCH_CHECK(q == Q, "decode plan: q/k/v give ", q, " features, the heads need ", Q);
      TORCH_CHECK(L.o->K == H * d && L.o->O == D_, "decode plan: o_proj shape");
      TORCH_CHECK(L.gu.size() == 1 || (L.gu.size() == 2 && L.gu[0]->O == L.gu[1]->O), "decode plan: gate/up");
      for (const auto& l : L.gu) {
        TORCH_CHECK(l->K == D_, "decode plan: gate/up take the hidden size");
        g += l->O;
      }
      TORCH_CHECK(g % 2 == 0 && L.down->K == g / 2 && L.down->O == D_, "decode plan: MLP shapes");
      for (const auto* w : {&L.ln1, &L.ln2})
        TORCH_CHECK(w->numel() == D_ && w->scalar_type() == dtype_, "decode plan: norm weights [D], activation dtype");
      F_ = g / 2;
      layers_.push_back(std::move(L));
    }
  }

  // h [B, D] (the embeddings; the residual stream, updated in place) -> the final normed hidden
  // states [B, D]. The other arguments are decode_step_attention's, for every layer.
  torch::Tensor run(torch::Tensor h, torch::Tensor rope, torch::Tensor positions, torch::Tensor kv,
                    torch::Tensor slot_mapping, torch::Tensor slots, int64_t slot_start, torch::Tensor lens) {
    check_cpu(h, "decode plan");
    TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.size(1) == D_ && h.scalar_type() == dtype_,
                "decode plan: h [B, D] contiguous, the plan's dtype");
    const int64_t B = h.size(0), d = d_, H = H_, Hkv = Hkv_, Q = (H + 2 * Hkv) * d;
    TORCH_CHECK(rope.dim() == 3 && rope.size(1) == 2 && rope.size(2) == d && rope.is_contiguous() &&
                    rope.scalar_type() == torch::kFloat32, "rope: [P, 2, d] fp32 contiguous");
    TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous() && positions.numel() == B,
                "positions: int64 [B]");
    TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() &&
                    slot_mapping.numel() == B, "slot_mapping: int64 [B]");
    for (const auto& L : layers_) check_kv(kv, h, L.layer, Hkv, d);
    TORCH_CHECK(lens.scalar_type() == torch::kInt64 && lens.is_contiguous() && lens.dim() == 1 && lens.numel() == B,
                "lens: int64 [B]");
    const auto table = slot_table(slots, lens);
    const int64_t Lmax = table.first;
    const int64_t* sp = table.second;
    const int64_t P = rope.size(0), S = kv.size(2);
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* sm = slot_mapping.data_ptr<int64_t>();
    for (int64_t n = 0; n < B; ++n) {
      TORCH_CHECK(pos[n] >= 0 && pos[n] < P, "rope: position ", pos[n], " outside the table");
      TORCH_CHECK(sm[n] >= 0 && sm[n] < S, "store: slot ", sm[n], " out of range");
    }
    auto x = torch::empty({B, D_}, h.options());
    const int64_t F = F_;
    auto body = [&](auto* hp, auto* kvp) {
      using T = std::remove_pointer_t<decltype(hp)>;
      const bool bf = std::is_same_v<T, bf16>;
      const int64_t elems = B * (Q + H * d + D_ + 3 * F);
      if (static_cast<int64_t>(scratch_.size()) < elems * 4) scratch_.resize(elems * 4);
      T* qkv = reinterpret_cast<T*>(scratch_.data());
      T* att = qkv + B * Q;
      T* t = att + B * H * d;  // a linear's output before the residual add
      T* gu = t + B * D_;
      T* act = gu + B * 2 * F;
      T* xp = x.data_ptr<T>();
      const float* rp = rope.data_ptr<float>();
      const int64_t* lp = lens.data_ptr<int64_t>();
      auto lin = [&](const PlanLinear& l, const T* in, int64_t n, T* out, int64_t ld) {
        const auto t0 = std::chrono::steady_clock::now();
        l->apply(in, bf, n, out, ld);
        linear_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
      };
      rms_rows(hp, layers_[0].ln1.template data_ptr<T>(), xp, B, D_, eps_);
      for (size_t i = 0; i < layers_.size(); ++i) {
        const PlanLayer& L = layers_[i];
        int64_t off = 0;
        for (const auto& l : L.qkv) lin(l, xp, B, qkv + off, Q), off += l->O;
        const auto t0 = std::chrono::steady_clock::now();
        rope_rows(qkv, rp, pos, B, H + Hkv, Q, d, P);
        store_rows(qkv, kvp, L.layer, sm, B, H, Hkv, d, S);
        decode_attn(qkv, kvp, L.layer, S, sp, slot_start, Lmax, lp, B, 0, H, Hkv, d, L.window, L.scale, att);
        attention_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
        lin(L.o, att, B, t, D_);
        add_rms_rows(hp, t, L.ln2.template data_ptr<T>(), xp, B, D_, eps_);
        if (L.gu.size() == 1) {
          lin(L.gu[0], xp, B, gu, 2 * F);
        } else {  // gate and up written side by side: the stacked layout silu_mul reads
          lin(L.gu[0], xp, B, gu, 2 * F);
          lin(L.gu[1], xp, B, gu + F, 2 * F);
        }
        silu_mul_rows(gu, 2 * F, gu + F, 2 * F, act, B, F);
        lin(L.down, act, B, t, D_);
        const T* next = i + 1 < layers_.size() ? layers_[i + 1].ln1.template data_ptr<T>() : final_.template data_ptr<T>();
        add_rms_rows(hp, t, next, xp, B, D_, eps_);
      }
    };
    with_types(h, kv, body);
    return x;
  }

  // time spent in the linears and in RoPE + cache write + attention, summed over runs (profiling)
  py::dict seconds() const {
    py::dict d;
    d["linears"] = static_cast<double>(linear_ns_) * 1e-9;
    d["attention"] = static_cast<double>(attention_ns_) * 1e-9;
    return d;
  }
  void reset_seconds() { linear_ns_ = attention_ns_ = 0; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  std::vector<PlanLayer> layers_;
  torch::Tensor final_;
  float eps_;
  int64_t H_, Hkv_, d_, D_ = 0, F_ = 0;
  c10::ScalarType dtype_;
  std::vector<char> scratch_;
  int64_t linear_ns_ = 0, attention_ns_ = 0;
};
}  // namespace

// Bound with pybind11 as the submodule `fused` of the extension (quant_kernels.cpp's module calls
// def_fused_ops). They were TORCH_LIBRARY ops before: the boxed dispatcher's call from Python
// (schema parsing of the arguments, an IValue stack) cost ~10 us more per call than a pybind
// call, ~1 ms a token over the demo's 96 fused calls.
namespace qwenrun {
void def_fused_ops(pybind11::module_& ext) {
  namespace py = pybind11;
  auto m = ext.def_submodule("fused", "fused decode-step ops (csrc/fused_ops.cpp)");
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("w"), py::arg("eps"));
  m.def("add_rms_norm_", &add_rms_norm_, py::arg("h"), py::arg("r"), py::arg("w"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, py::arg("gu"));
  m.def("argmax_rows", &argmax_rows, py::arg("logits"), py::arg("n"));
  m.def("silu_mul2", &silu_mul2, py::arg("g"), py::arg("u"));
  m.def("rope_store_", &rope_store_, py::arg("qkv"), py::arg("rope"), py::arg("positions"), py::arg("heads"),
        py::arg("kv_heads"), py::arg("kv"), py::arg("layer"), py::arg("slot_mapping"));
  m.def("decode_attention_", &decode_attention_, py::arg("qkv"), py::arg("kv"), py::arg("layer"), py::arg("slots"),
        py::arg("slot_start"), py::arg("lens"), py::arg("row0"), py::arg("heads"), py::arg("kv_heads"),
        py::arg("window"), py::arg("scale"), py::arg("out"));
  m.def("decode_step_attention", &decode_step_attention, py::arg("qkv"), py::arg("rope"), py::arg("positions"),
        py::arg("kv"), py::arg("layer"), py::arg("slot_mapping"), py::arg("slots"), py::arg("slot_start"),
        py::arg("lens"), py::arg("heads"), py::arg("kv_heads"), py::arg("window"), py::arg("scale"));
  py::class_<DecodePlan>(m, "DecodePlan", "the decode step of a GGUF Qwen2 model in one call (see fused_ops.cpp)")
      .def(py::init<py::list, torch::Tensor, double, int64_t, int64_t, int64_t>(), py::arg("layers"),
           py::arg("final_norm"), py::arg("eps"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"))
      .def("run", &DecodePlan::run, py::arg("h"), py::arg("rope"), py::arg("positions"), py::arg("kv"),
           py::arg("slot_mapping"), py::arg("slots"), py::arg("slot_start"), py::arg("lens"))
      .def("seconds", &DecodePlan::seconds, "time in the linears and in the attention since reset_seconds()")
      .def("reset_seconds", &DecodePlan::reset_seconds)
      .def_property_readonly("num_layers", &DecodePlan::num_layers);
}
}  // namespace qwenrun
