// AVX2 kernels for GGUF's block-quantized weights, run at the file's own precision (no second
// rounding). qwenrun/quant/gguf_linear.py repacks each GGUF tensor, losslessly, into one layout:
//
//   w[o, k] = (d[o, s] * sc[o, g]) * q[o, k] - dm[o, s] * mn[o, g]
//
//   s = k / S (super-block: S = 32 for Q8_0/Q5_0/Q4_0/..., 256 for the K-quants),
//   g = k / G (group: 32, or 16 for Q6_K); sc (int8) absent = 1; dm/mn absent = no offset.
//   q: int8 [O, K] ("q8" storage: Q8_0, Q5_0, Q5_1, Q5_K, Q6_K), or nibbles uint8 [O, K/2]
//   ("q4" storage: Q4_0, Q4_1, Q4_K) laid out as GGUF's Q4_K: per 64 weights 32 bytes, the low
//   nibble of byte i is weight i, the high nibble weight 32 + i.
//   d, dm fp16 (GGUF's own values, converted to fp32 exactly with F16C when used); sc, mn int8
//   (GGUF's 6-bit / int8 scales).
//
// The products in fp32 are those gguf's reference dequantization computes, in the same order, so
// bq_dequant returns its values exactly. The GEMV quantizes activations to int8 per 32 (one fp32
// scale each, the same quantize_row as the int8/int4 kernels), multiplies with
// _mm256_maddubs_epi16 / _mm256_madd_epi16 and applies the weight's scales per 32 (or 16) in fp32.
// The offset term sum_k x_k * dm * mn uses the quantized activations' block sums.
// One caveat, as in ggml: the sign trick (|x| * sign(w, x)) cannot represent w = -128, which
// llama.cpp's Q8_0 quantizer never writes; the Python side routes a tensor holding it to the
// (exact, slower) dequantize-and-multiply path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

#include "quant_common.h"

namespace {

using qwenrun::bf16_to_f32;
using qwenrun::f32_to_bf16;
using qwenrun::for_rows_streamed;
using qwenrun::grain_for;
using qwenrun::hsum;
using qwenrun::kPrefetch;
using qwenrun::quantize_row;
using qwenrun::x_row;
using qwenrun::YWriter;

constexpr int64_t kChunk = 32;  // activation block = the smallest GGUF block

struct Weight {  // one packed weight, raw pointers + geometry
  const uint8_t* q;
  const uint16_t* d;  // fp16
  const int8_t* sc;
  const uint16_t* dm;  // fp16
  const int8_t* mn;
  int64_t K, nb, ldq, ldd, ldg;  // nb = K / 32 chunks; row strides of q (bytes), d/dm, sc/mn
  int sshift;                    // chunk index >> sshift = super-block index
};

struct Act {  // one quantized activation row
  const int8_t* xq;
  const uint8_t* xa;
  const float* xs;
  const float* xsum;
};

// dot product of one weight row with one activation row (before the bias)
template <bool Nib, int G, bool Min, bool Sc>
inline float bq_row(const Weight& W, int64_t o, const Act& A) {
  const uint8_t* w = W.q + o * W.ldq;
  const uint16_t* d = W.d + o * W.ldd;
  const int8_t* sc = Sc ? W.sc + o * W.ldg : nullptr;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  auto scale = [&](int64_t b) -> __m256 {
    const float dx = _cvtsh_ss(d[b >> W.sshift]) * A.xs[b];
    if constexpr (G == 16) return _mm256_setr_m128(_mm_set1_ps(dx * sc[2 * b]), _mm_set1_ps(dx * sc[2 * b + 1]));
    else return _mm256_set1_ps(Sc ? dx * sc[b] : dx);
  };
  if constexpr (Nib) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t p = 0; p < W.nb / 2; ++p) {  // 64 weights = one 32-byte load = chunks 2p, 2p + 1
      const uint8_t* pw = w + p * 32;
      _mm_prefetch(reinterpret_cast<const char*>(pw + kPrefetch), _MM_HINT_T0);
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw));
      const __m256i lo = _mm256_and_si256(qv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4);
      // nibble (0..15, unsigned operand) x activation (int8): pair sums <= 2 * 15 * 127
      const __m256i d0 = _mm256_madd_epi16(
          _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.xq + p * 64))), ones);
      const __m256i d1 = _mm256_madd_epi16(
          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.xq + p * 64 + 32))), ones);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), scale(2 * p), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), scale(2 * p + 1), acc1);
    }
  } else {
    auto dot = [&](int64_t b) -> __m256 {
      const int8_t* pw = reinterpret_cast<const int8_t*>(w) + b * kChunk;
      _mm_prefetch(reinterpret_cast<const char*>(pw + kPrefetch), _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw));
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.xq + b * kChunk));
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.xa + b * kChunk));
      // |x| * (w * sign(x)) = x * w; pairs within int16 (2 * 127 * 127); int32 lane l = weights 4l..4l+3
      return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(wv, x)), ones));
    };
    int64_t b = 0;
    for (; b + 2 <= W.nb; b += 2) {
      acc0 = _mm256_fmadd_ps(dot(b), scale(b), acc0);
      acc1 = _mm256_fmadd_ps(dot(b + 1), scale(b + 1), acc1);
    }
    if (b < W.nb) acc0 = _mm256_fmadd_ps(dot(b), scale(b), acc0);
  }
  float y = hsum(_mm256_add_ps(acc0, acc1));
  if constexpr (Min) {  // - sum_g dm * mn_g * sum_{k in g} x_k   (G == 32 when there is an offset)
    const uint16_t* dm = W.dm + o * W.ldd;
    const int8_t* mn = W.mn + o * W.ldg;
    float m = 0.f;
    for (int64_t b = 0; b < W.nb; ++b) m += _cvtsh_ss(dm[b >> W.sshift]) * static_cast<float>(mn[b]) * A.xsum[b];
    y -= m;
  }
  return y;
}

using RowFn = float (*)(const Weight&, int64_t, const Act&);

RowFn pick(bool nib, int64_t G, bool min, bool sc) {
  if (G == 16) {
    TORCH_CHECK(!nib && !min && sc, "groups of 16 need int8 storage, sub-scales and no offset (Q6_K)");
    return &bq_row<false, 16, false, true>;
  }
  TORCH_CHECK(G == 32, "group size must be 16 or 32");
  if (nib) {
    if (min) return sc ? &bq_row<true, 32, true, true> : &bq_row<true, 32, true, false>;
    return sc ? &bq_row<true, 32, false, true> : &bq_row<true, 32, false, false>;
  }
  if (min) return sc ? &bq_row<false, 32, true, true> : &bq_row<false, 32, true, false>;
  return sc ? &bq_row<false, 32, false, true> : &bq_row<false, 32, false, false>;
}

Weight make_weight(const torch::Tensor& q, const torch::Tensor& d, const c10::optional<torch::Tensor>& sc,
                   const c10::optional<torch::Tensor>& dm, const c10::optional<torch::Tensor>& mn, int64_t G,
                   int64_t S, bool nib) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.element_size() == 1, "q must be a contiguous 2-D byte tensor");
  const int64_t O = q.size(0), K = nib ? q.size(1) * 2 : q.size(1);
  TORCH_CHECK(K % kChunk == 0 && (!nib || K % 64 == 0), "K must be a multiple of 32 (64 for nibbles)");
  TORCH_CHECK(S == 32 || S == 256, "super-block must be 32 or 256");
  TORCH_CHECK(K % S == 0 && S % G == 0, "K must be a multiple of the super-block");
  TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.size(0) == O && d.size(1) == K / S, "bad d");
  if (sc) TORCH_CHECK(sc->scalar_type() == torch::kInt8 && sc->is_contiguous() && sc->size(0) == O && sc->size(1) == K / G, "bad sc");
  TORCH_CHECK(dm.has_value() == mn.has_value(), "dm and mn come together");
  if (dm) {
    TORCH_CHECK(G == 32, "offsets need groups of 32");
    TORCH_CHECK(dm->scalar_type() == torch::kHalf && dm->is_contiguous() && dm->sizes() == d.sizes(), "bad dm");
    TORCH_CHECK(mn->scalar_type() == torch::kInt8 && mn->is_contiguous() && mn->size(0) == O && mn->size(1) == K / G, "bad mn");
  }
  Weight W{};
  W.q = reinterpret_cast<const uint8_t*>(q.data_ptr());
  W.d = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  W.sc = sc ? sc->data_ptr<int8_t>() : nullptr;
  W.dm = dm ? reinterpret_cast<const uint16_t*>(dm->data_ptr<at::Half>()) : nullptr;
  W.mn = mn ? mn->data_ptr<int8_t>() : nullptr;
  W.K = K;
  W.nb = K / kChunk;
  W.ldq = q.size(1);
  W.ldd = K / S;
  W.ldg = K / G;
  W.sshift = S == 256 ? 3 : 0;
  return W;
}

struct Scratch {
  std::vector<int8_t> q;
  std::vector<uint8_t> a;
  std::vector<float> s, sum, xf;
};
thread_local Scratch scratch;

}  // namespace

// y[N, O] = x[N, K] @ W.T + bias, W in the block format above; x and y fp32 or bf16 (y in x's dtype)
torch::Tensor bq_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d,
                        const c10::optional<torch::Tensor>& sc, const c10::optional<torch::Tensor>& dm,
                        const c10::optional<torch::Tensor>& mn, int64_t G, int64_t S, bool nib,
                        const c10::optional<torch::Tensor>& bias) {
  const Weight W = make_weight(q, d, sc, dm, mn, G, S, nib);
  const int64_t N = x.size(0), K = W.K, O = q.size(0), nb = W.nb;
  qwenrun::check_common(x, q, bias, O);
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weight ", K);
  const RowFn row = pick(nib, G, dm.has_value(), sc.has_value());
  Scratch& scr = scratch;
  if (static_cast<int64_t>(scr.q.size()) < N * K) scr.q.resize(N * K), scr.a.resize(N * K);
  if (static_cast<int64_t>(scr.s.size()) < N * nb) scr.s.resize(N * nb), scr.sum.resize(N * nb);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t n = 0; n < N; ++n) {
    int8_t* xq = scr.q.data() + n * K;
    float* xs = scr.s.data() + n * nb;
    quantize_row(x_row(x, n, scr.xf), K, K, kChunk, xq, xs);
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kChunk));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(scr.a.data() + n * K + b * kChunk), _mm256_abs_epi8(v));
      // block sum of the quantized activations (exact in int32), in the block's scale
      const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16);
      alignas(32) int32_t t[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), s32);
      scr.sum[n * nb + b] = xs[b] * static_cast<float>(t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7]);
    }
  }
  auto y = torch::empty({N, O}, x.options());
  const YWriter out(y);
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t row_bytes = W.ldq + W.ldd * 2 * (W.dm ? 2 : 1) + (W.sc ? W.ldg : 0) + (W.mn ? W.ldg : 0);
  at::parallel_for(0, O, grain_for(row_bytes * N), [&](int64_t o0, int64_t o1) {
    for_rows_streamed(o0, o1, [&](int64_t o) {
      for (int64_t n = 0; n < N; ++n) {  // the weight row stays in L1 for the other n
        const Act A{scr.q.data() + n * K, scr.a.data() + n * K, scr.s.data() + n * nb, scr.sum.data() + n * nb};
        out(n, o, row(W, o, A) + (bp ? bp[o] : 0.f));
      }
    });
  });
  return y;
}

// Rows r0..r1 of W, exactly as gguf's dequantization computes them, into out [r1 - r0, K]
// (fp32, or bf16 rounded to nearest even).
torch::Tensor bq_dequant(const torch::Tensor& q, const torch::Tensor& d, const c10::optional<torch::Tensor>& sc,
                         const c10::optional<torch::Tensor>& dm, const c10::optional<torch::Tensor>& mn, int64_t G,
                         int64_t S, bool nib, int64_t r0, int64_t r1, torch::Tensor out) {
  const Weight W = make_weight(q, d, sc, dm, mn, G, S, nib);
  const int64_t K = W.K;
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= q.size(0), "bad row range");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == r1 - r0 && out.size(1) == K &&
              (out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16), "bad out tile");
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* oh = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(r0, r1, std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, K)), [&](int64_t a, int64_t e) {
    alignas(32) float buf[kChunk];
    alignas(32) int8_t qb[kChunk];
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t o = a; o < e; ++o) {
      const uint8_t* w = W.q + o * W.ldq;
      for (int64_t b = 0; b < W.nb; ++b) {
        const int64_t s = b >> W.sshift;
        const float dv = _cvtsh_ss(W.d[o * W.ldd + s]);
        // the chunk's 32 values as int8: bytes, or one nibble half of a 64-weight group
        __m256i qv;
        if (nib) {
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (b >> 1) * 32));
          qv = _mm256_and_si256((b & 1) ? _mm256_srli_epi16(bytes, 4) : bytes, m4);
        } else {
          qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kChunk));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(qb), qv);
        // scale of weights 0-15 and 16-31 (two groups of 16 for Q6_K): d * sc, as gguf computes it
        float s0 = dv, s1 = dv;
        if (W.sc) {
          s0 = dv * static_cast<float>(W.sc[o * W.ldg + (b * kChunk) / G]);
          s1 = dv * static_cast<float>(W.sc[o * W.ldg + (b * kChunk + 16) / G]);
        }
        const __m256 off = _mm256_set1_ps(W.dm ? _cvtsh_ss(W.dm[o * W.ldd + s]) * static_cast<float>(W.mn[o * W.ldg + b])
                                               : 0.f);  // offsets come with G == 32
        for (int j = 0; j < 4; ++j) {  // v = (d * sc) * q, then - dm * mn: two roundings, as the reference
          const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + 8 * j))));
          __m256 v = _mm256_mul_ps(qf, _mm256_set1_ps(j < 2 ? s0 : s1));
          if (W.dm) v = _mm256_sub_ps(v, off);
          _mm256_store_ps(buf + 8 * j, v);
        }
        const int64_t base = (o - r0) * K + b * kChunk;
        if (bf16) for (int64_t i = 0; i < kChunk; ++i) oh[base + i] = f32_to_bf16(buf[i]);
        else std::memcpy(of + base, buf, sizeof(buf));
      }
    }
  });
  return out;
}
