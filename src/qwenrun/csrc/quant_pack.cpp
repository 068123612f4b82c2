// Packing (load time) and unpacking (many-row path) of qwenrun's int8 / int4 weight formats;
// the formats and the GEMV kernels are described in quant_kernels.cpp. Packing uses the same
// arithmetic as quantize_int8/int4 in qwenrun/quant/linear.py, bit for bit (tested).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "quant_common.h"

namespace {

using qwenrun::absmax;
using qwenrun::bf16_to_f32;
using qwenrun::f32_to_bf16;
using qwenrun::kBlk4;
using qwenrun::kBlk8;

void check_out(const torch::Tensor& qw, const torch::Tensor& out, int64_t r0, int64_t r1, int64_t K, int64_t Kp) {
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= qw.size(0) && K <= Kp, "bad dequant row range or K");
  TORCH_CHECK((out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16) && out.is_contiguous() &&
              out.dim() == 2 && out.size(0) == r1 - r0 && out.size(1) == K, "bad dequant output buffer");
}

// Eight fp32 values stored as fp32 or as bf16 (round to nearest even, as PyTorch's .to(bfloat16)
// rounds finite values), so a bf16 tile is bit-identical to the fp32 tile converted afterwards.
inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }
inline void store8(uint16_t* dst, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // u16 0..3 | 4..7
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(p));
}
inline void store1(float* dst, float v) { *dst = v; }
inline void store1(uint16_t* dst, float v) { *dst = f32_to_bf16(v); }

template <typename T>
T* out_ptr(torch::Tensor& out) {
  if constexpr (std::is_same_v<T, float>) return out.data_ptr<float>();
  else return reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
}

}  // namespace

// Rows r0..r1 of the weight as fp32 or bf16 (out's dtype) into out [r1 - r0, K] (the many-row
// path: tile + sgemm / bf16 GEMM; the caller reuses `out`: a fresh multi-MB tensor per tile costs
// more in page faults than the dequantization itself). Bit-identical to dequantize_int8/int4 in
// linear.py (bf16: that result rounded to nearest even).
template <typename T>
void int8_dequant_impl(const torch::Tensor& qw, const torch::Tensor& scale, int64_t r0, int64_t r1, int64_t K,
                       torch::Tensor& out) {
  const int64_t Kp = qw.size(1);
  const int8_t* wp = qw.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  T* op = out_ptr<T>(out);
  at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const int8_t* src = wp + r * Kp;
      T* dst = op + (r - r0) * K;
      const __m256 s = _mm256_set1_ps(sp[r]);
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k));
        store8(dst + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s));
      }
      for (; k < K; ++k) store1(dst + k, src[k] * sp[r]);
    }
  });
}

torch::Tensor int8_dequant(const torch::Tensor& qw, const torch::Tensor& scale, int64_t r0, int64_t r1, int64_t K,
                           torch::Tensor out) {
  check_out(qw, out, r0, r1, K, qw.size(1));
  if (out.scalar_type() == torch::kFloat32) int8_dequant_impl<float>(qw, scale, r0, r1, K, out);
  else int8_dequant_impl<uint16_t>(qw, scale, r0, r1, K, out);
  return out;
}

template <typename T>
void int4_dequant_impl(const torch::Tensor& qw, const torch::Tensor& sub, const torch::Tensor& d, int64_t r0,
                       int64_t r1, int64_t K, torch::Tensor& out) {
  const int64_t Kp = qw.size(1) * 2, nsb = Kp / kBlk4, ldw = Kp / 2;
  const uint8_t* wp = qw.data_ptr<uint8_t>();
  const int8_t* sp = sub.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::BFloat16>());
  T* op = out_ptr<T>(out);
  at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
    alignas(32) T buf[kBlk4];
    alignas(32) uint8_t nib[4][32];
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t r = a; r < b; ++r) {
      T* dst = op + (r - r0) * K;
      for (int64_t sb = 0; sb < nsb; ++sb) {
        const uint8_t* p = wp + r * ldw + sb * 64;
        const float dd = bf16_to_f32(dp[r * nsb + sb]);
        const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
        _mm256_store_si256(reinterpret_cast<__m256i*>(nib[0]), _mm256_and_si256(q0, m4));
        _mm256_store_si256(reinterpret_cast<__m256i*>(nib[1]), _mm256_and_si256(_mm256_srli_epi16(q0, 4), m4));
        _mm256_store_si256(reinterpret_cast<__m256i*>(nib[2]), _mm256_and_si256(q1, m4));
        _mm256_store_si256(reinterpret_cast<__m256i*>(nib[3]), _mm256_and_si256(_mm256_srli_epi16(q1, 4), m4));
        const int64_t n = std::min<int64_t>(kBlk4, K - sb * kBlk4);
        T* o = n == kBlk4 ? dst + sb * kBlk4 : buf;  // the last, partial super-block via buf
        for (int g = 0; g < 4; ++g) {
          const float s = dd * sp[r * nsb * 4 + sb * 4 + g];
          const __m256 vs = _mm256_set1_ps(s), voff = _mm256_set1_ps(-8.f * s);
          for (int i = 0; i < 4; ++i) {  // elements g*32 + i*8 .. +8 are bytes g*8 .. +8 of vector i
            const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(nib[i] + g * 8))));
            store8(o + g * 32 + i * 8, _mm256_fmadd_ps(v, vs, voff));  // (nib - 8) * s
          }
        }
        if (o == buf && n > 0) std::memcpy(dst + sb * kBlk4, buf, n * sizeof(T));
      }
    }
  });
}

torch::Tensor int4_dequant(const torch::Tensor& qw, const torch::Tensor& sub, const torch::Tensor& d, int64_t r0,
                           int64_t r1, int64_t K, torch::Tensor out) {
  check_out(qw, out, r0, r1, K, qw.size(1) * 2);
  if (out.scalar_type() == torch::kFloat32) int4_dequant_impl<float>(qw, sub, d, r0, r1, K, out);
  else int4_dequant_impl<uint16_t>(qw, sub, d, r0, r1, K, out);
  return out;
}

std::vector<torch::Tensor> quantize_int8(const torch::Tensor& w_) {
  auto w = w_.to(torch::kFloat32).contiguous();
  const int64_t O = w.size(0), K = w.size(1), Kp = (K + kBlk8 - 1) / kBlk8 * kBlk8;
  auto q = torch::zeros({O, Kp}, torch::kInt8);
  auto scale = torch::empty({O}, torch::kFloat32);
  const float* wp = w.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, O, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const float* x = wp + r * K;
      const float s = absmax(x, K) / 127.f;
      sp[r] = s;
      if (!(s > 0.f)) continue;
      const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {  // x / s (a true division, as in PyTorch), round half-even
        __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        alignas(32) int32_t t[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi)));
        for (int j = 0; j < 8; ++j) qp[r * Kp + k + j] = static_cast<int8_t>(t[j]);
      }
      for (; k < K; ++k) qp[r * Kp + k] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(x[k] / s))));
    }
  });
  return {q, scale};
}

std::vector<torch::Tensor> quantize_int4(const torch::Tensor& w_) {
  auto w = w_.to(torch::kFloat32).contiguous();
  const int64_t O = w.size(0), K = w.size(1), Kp = (K + kBlk4 - 1) / kBlk4 * kBlk4, nsb = Kp / kBlk4;
  auto q = torch::empty({O, Kp / 2}, torch::kUInt8);
  auto sub = torch::empty({O, nsb * 4}, torch::kInt8);
  auto d = torch::empty({O, nsb}, torch::kBFloat16);
  const float* wp = w.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  int8_t* subp = sub.data_ptr<int8_t>();
  uint16_t* dp = reinterpret_cast<uint16_t*>(d.data_ptr<at::BFloat16>());
  at::parallel_for(0, O, 16, [&](int64_t a, int64_t b) {
    float buf[kBlk4], s[4];
    uint8_t nib[kBlk4];
    for (int64_t r = a; r < b; ++r) {
      for (int64_t sb = 0; sb < nsb; ++sb) {
        const int64_t k0 = sb * kBlk4, n = std::max<int64_t>(0, std::min(kBlk4, K - k0));
        for (int64_t k = 0; k < kBlk4; ++k) buf[k] = k < n ? wp[r * K + k0 + k] : 0.f;
        float smax = 0.f;
        for (int g = 0; g < 4; ++g) {  // the largest-magnitude weight (first on ties) maps to -8
          int best = 0;
          for (int k = 1; k < 32; ++k)
            if (std::fabs(buf[g * 32 + k]) > std::fabs(buf[g * 32 + best])) best = k;
          s[g] = buf[g * 32 + best] / -8.f;
          smax = std::max(smax, std::fabs(s[g]));
        }
        const uint16_t dh = f32_to_bf16(smax / 127.f);
        const float dd = bf16_to_f32(dh);
        dp[r * nsb + sb] = dh;
        for (int g = 0; g < 4; ++g) {
          const float sc = dd > 0.f ? std::max(-127.f, std::min(127.f, std::nearbyint(s[g] / dd))) : 0.f;
          subp[r * nsb * 4 + sb * 4 + g] = static_cast<int8_t>(sc);
          const float eff = sc * dd;
          if (eff == 0.f) {
            std::memset(nib + g * 32, 8, 32);
            continue;
          }
          const __m256 ve = _mm256_set1_ps(eff), lo = _mm256_set1_ps(-8.f), hi = _mm256_set1_ps(7.f);
          for (int k = 0; k < 32; k += 8) {  // w / eff, round half-even, clamp, + 8
            __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(buf + g * 32 + k), ve), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            alignas(32) int32_t t[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi)));
            for (int j = 0; j < 8; ++j) nib[g * 32 + k + j] = static_cast<uint8_t>(t[j] + 8);
          }
        }
        uint8_t* dst = qp + r * (Kp / 2) + sb * 64;  // element (g, i*8 + r8) -> vector i, byte g*8 + r8
        for (int g = 0; g < 4; ++g)
          for (int i = 0; i < 4; i += 2)
            for (int k = 0; k < 8; ++k)
              dst[(i / 2) * 32 + g * 8 + k] = nib[g * 32 + i * 8 + k] | (nib[g * 32 + (i + 1) * 8 + k] << 4);
      }
    }
  });
  return {q, sub, d};
}

