// AVX2 weight-only int8 / int4 linear kernels for CPU (built by qwenrun/quant/kernels.py with
// quant_pack.cpp, which packs and unpacks the formats below).
//
// Formats (the Python side packs them; see qwenrun/quant/linear.py):
//   int8: qw int8 [O, Kp] (Kp = K rounded up to 64, zero padded), scale fp32 [O]; w = qw * scale.
//   int4: super-blocks of 128 along K, each = 4 groups of 32. Per super-block and row: 64 bytes of
//         nibbles, a bf16 scale d, and 4 int8 sub-scales sc_g; w = d * sc_g * (nibble - 8).
//         Nibble order inside a super-block is permuted so one 256-bit load feeds four groups:
//         element (g, r) (group g, offset r) sits in vector i = r / 8, byte j = g * 8 + r % 8;
//         vectors 0/1 are the low/high nibbles of bytes 0..31, vectors 2/3 of bytes 32..63.
// Activations are quantized per call to int8 with one fp32 scale per block (64 for int8
// weights, 128 for int4): block scales keep outlier channels from crushing the other ones
// (per-row scales cost 2-5x more error on Qwen's down_proj inputs).
// Products use _mm256_maddubs_epi16 (u8 x s8 -> s16 pairs) and _mm256_madd_epi16 (-> s32).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "quant_common.h"

namespace {

using qwenrun::absmax;
using qwenrun::bf16_to_f32;
using qwenrun::check_common;
using qwenrun::for_rows_streamed;
using qwenrun::grain_for;
using qwenrun::hsum;
using qwenrun::kBlk4;
using qwenrun::kBlk8;
using qwenrun::kPrefetch;
using qwenrun::quantize_row;
using qwenrun::x_row;
using qwenrun::YWriter;

// w[0:Kp] . quantized activation row (xq, |xq| in xa, block scales xs) -> fp32 (before the
// per-row weight scale).
inline float int8_row(const int8_t* w, const int8_t* xq, const uint8_t* xa, const float* xs, int64_t nb) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  auto block = [&](int64_t b) {
    const int8_t* p = w + b * kBlk8;
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlk8));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlk8 + 32));
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + b * kBlk8));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + b * kBlk8 + 32));
    // |x| * (w * sign(x)) = x * w; pairs stay within int16 (2 * 127 * 127 < 32767).
    const __m256i s0 = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), x0);
    const __m256i s1 = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)), x1);
    if constexpr (qwenrun::kVnni)  // the same integers in one vpdpbusd each
      return _mm256_cvtepi32_ps(qwenrun::dot4_acc(qwenrun::dot4_acc(_mm256_setzero_si256(), a0, s0), a1, s1));
    const __m256i p0 = _mm256_maddubs_epi16(a0, s0), p1 = _mm256_maddubs_epi16(a1, s1);
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones)));
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {  // two accumulators: the fma latency chain is not the limit
    acc0 = _mm256_fmadd_ps(block(b), _mm256_broadcast_ss(xs + b), acc0);
    acc1 = _mm256_fmadd_ps(block(b + 1), _mm256_broadcast_ss(xs + b + 1), acc1);
  }
  if (b < nb) acc0 = _mm256_fmadd_ps(block(b), _mm256_broadcast_ss(xs + b), acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
}

// One int4 row . one permuted quantized activation row (xq), its per-super-block correction
// vectors xc (8 * pair sums, undoing the +8 nibble offset) and scales xs.
inline float int4_row(const uint8_t* w, const int8_t* sc, const uint16_t* d, const int8_t* xq, const int16_t* xc,
                      const float* xs, int64_t nsb) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m128i expand = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  auto block = [&](int64_t b) {
    const int8_t* xb = xq + b * kBlk4;
    const uint8_t* p = w + b * 64;
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    // nibbles 0..15 as the unsigned operand; |pair sum| <= 2*15*127, four of them fit int16
    __m256i t = _mm256_maddubs_epi16(_mm256_and_si256(q0, m4), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)));
    t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q0, 4), m4),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32))));
    t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_and_si256(q1, m4), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64))));
    t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q1, 4), m4),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 96))));
    t = _mm256_sub_epi16(t, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + b * 16)));  // now sum((nib-8) * x)
    int32_t s4;
    std::memcpy(&s4, sc + b * 4, 4);
    // int16 lane l covers bytes 2l, 2l+1 -> group l / 4: sub-scale vector [s0 x4, s1 x4, s2 x4, s3 x4]
    const __m256i S = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_cvtsi32_si128(s4), expand));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(t, S)), _mm256_set1_ps(bf16_to_f32(d[b]) * xs[b]));
  };
  int64_t b = 0;
  for (; b + 2 <= nsb; b += 2) {
    acc0 = _mm256_add_ps(acc0, block(b));
    acc1 = _mm256_add_ps(acc1, block(b + 1));
  }
  if (b < nsb) acc0 = _mm256_add_ps(acc0, block(b));
  return hsum(_mm256_add_ps(acc0, acc1));
}

struct Scratch {  // per-thread activation buffers, grown once and reused across calls
  std::vector<int8_t> q, tmp;
  std::vector<uint8_t> a;
  std::vector<float> s, xf;
  std::vector<int16_t> c;
};
thread_local Scratch scratch;

template <typename V>
inline void grow(V& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

}  // namespace

namespace {
// int8 GEMV on raw rows: x [N, K] (fp32 or bf16), qw [O, Kp], y through out.
void int8_gemv(const int8_t* wp, const float* sp, const float* bp, int64_t O, int64_t Kp, const void* x, bool xbf16,
               int64_t N, int64_t K, const YWriter& out) {
  const int64_t nb = Kp / kBlk8;
  Scratch& sc = scratch;
  // each buffer checked on its own: the int4 GEMV grows q without a (it crashed here when an int4
  // call had grown q past a and an int8 call then wrote a to q's size)
  grow(sc.q, N * Kp), grow(sc.a, N * Kp), grow(sc.s, N * nb);
  int8_t* xq = sc.q.data();
  uint8_t* xa = sc.a.data();
  float* xs = sc.s.data();
  for (int64_t n = 0; n < N; ++n) {
    quantize_row(x_row(x, xbf16, n, K, sc.xf), K, Kp, kBlk8, xq + n * Kp, xs + n * nb);
    for (int64_t k = 0; k < Kp; k += 32)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xa + n * Kp + k),
                          _mm256_abs_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + n * Kp + k))));
  }
  at::parallel_for(0, O, grain_for(Kp * N), [&](int64_t o0, int64_t o1) {
    for_rows_streamed(o0, o1, [&](int64_t o) {
      for (int64_t n = 0; n < N; ++n)  // the row stays in L1 for the other n
        out(n, o, int8_row(wp + o * Kp, xq + n * Kp, xa + n * Kp, xs + n * nb, nb) * sp[o] + (bp ? bp[o] : 0.f));
    });
  });
}

// int4 GEMV on raw rows (the format above), y through out.
void int4_gemv(const uint8_t* wp, const int8_t* sp, const uint16_t* dp, const float* bp, int64_t O, int64_t Kp,
               const void* x, bool xbf16, int64_t N, int64_t K, const YWriter& out) {
  const int64_t nsb = Kp / kBlk4;
  Scratch& scr = scratch;
  grow(scr.q, N * Kp), grow(scr.tmp, Kp), grow(scr.s, N * nsb), grow(scr.c, N * nsb * 16);
  int8_t* xq = scr.q.data();
  float* xs = scr.s.data();
  int16_t* xc = scr.c.data();
  const __m256i eight = _mm256_set1_epi8(8);
  for (int64_t n = 0; n < N; ++n) {
    int8_t* t = scr.tmp.data();
    quantize_row(x_row(x, xbf16, n, K, scr.xf), K, Kp, kBlk4, t, xs + n * nsb);
    int8_t* dst = xq + n * Kp;
    for (int64_t b = 0; b < nsb; ++b) {  // permute into the nibble order, then the offset correction
      for (int g = 0; g < 4; ++g)
        for (int i = 0; i < 4; ++i) std::memcpy(dst + b * kBlk4 + i * 32 + g * 8, t + b * kBlk4 + g * 32 + i * 8, 8);
      __m256i c = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i)
        c = _mm256_add_epi16(c, _mm256_maddubs_epi16(eight, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + b * kBlk4 + i * 32))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xc + (n * nsb + b) * 16), c);
    }
  }
  const int64_t ldw = Kp / 2, ldsc = nsb * 4;
  at::parallel_for(0, O, grain_for(ldw * N), [&](int64_t o0, int64_t o1) {
    for_rows_streamed(o0, o1, [&](int64_t o) {
      for (int64_t n = 0; n < N; ++n)
        out(n, o, int4_row(wp + o * ldw, sp + o * ldsc, dp + o * nsb, xq + n * Kp, xc + n * nsb * 16,
                           xs + n * nsb, nsb) + (bp ? bp[o] : 0.f));
    });
  });
}

void check_int8(const torch::Tensor& qw, const torch::Tensor& scale, int64_t K) {
  const int64_t O = qw.size(0), Kp = qw.size(1);
  TORCH_CHECK(qw.scalar_type() == torch::kInt8 && Kp % kBlk8 == 0 && Kp >= K && Kp - K < kBlk8, "bad int8 weight");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == O, "bad int8 scale");
}

void check_int4(const torch::Tensor& qw, const torch::Tensor& sub, const torch::Tensor& d, int64_t K) {
  const int64_t O = qw.size(0), Kp = qw.size(1) * 2, nsb = Kp / kBlk4;
  TORCH_CHECK(qw.scalar_type() == torch::kUInt8 && Kp % kBlk4 == 0 && Kp >= K && Kp - K < kBlk4, "bad int4 weight");
  TORCH_CHECK(sub.scalar_type() == torch::kInt8 && sub.is_contiguous() && sub.size(0) == O && sub.size(1) == nsb * 4, "bad int4 sub-scales");
  TORCH_CHECK(d.scalar_type() == torch::kBFloat16 && d.is_contiguous() && d.size(0) == O && d.size(1) == nsb, "bad int4 scales");
}
}  // namespace

// y[N, O] = x[N, K] @ (qw * scale[:, None])[:, :K].T + bias; x and y fp32 or bf16 (y in x's dtype)
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& bias) {
  const int64_t N = x.size(0), K = x.size(1), O = qw.size(0);
  check_common(x, qw, bias, O);
  check_int8(qw, scale, K);
  auto y = torch::empty({N, O}, x.options());
  int8_gemv(qw.data_ptr<int8_t>(), scale.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, O, qw.size(1),
            x.data_ptr(), x.scalar_type() == torch::kBFloat16, N, K, YWriter(y));
  return y;
}

// y[N, O] = x @ W.T + bias for the int4 format above.
torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& sub,
                          const torch::Tensor& d, const c10::optional<torch::Tensor>& bias) {
  const int64_t N = x.size(0), K = x.size(1), O = qw.size(0);
  check_common(x, qw, bias, O);
  check_int4(qw, sub, d, K);
  auto y = torch::empty({N, O}, x.options());
  int4_gemv(qw.data_ptr<uint8_t>(), sub.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::BFloat16>()),
            bias ? bias->data_ptr<float>() : nullptr, O, qw.size(1) * 2, x.data_ptr(),
            x.scalar_type() == torch::kBFloat16, N, K, YWriter(y));
  return y;
}

// The int8 / int4 linears for the decode plan (PreparedLinear in quant_common.h).
namespace qwenrun {
namespace {
void check_bias(const c10::optional<torch::Tensor>& bias, int64_t O) {
  if (bias) TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->numel() == O && bias->is_contiguous(), "bad bias");
}

struct Int8Prepared final : PreparedLinear {
  const int8_t* w;
  const float *s, *b;
  int64_t Kp;
  void apply(const void* x, bool xbf16, int64_t N, void* y, int64_t ldy) const override {
    int8_gemv(w, s, b, O, Kp, x, xbf16, N, K, YWriter(y, xbf16, ldy));
  }
};

struct Int4Prepared final : PreparedLinear {
  const uint8_t* w;
  const int8_t* sub;
  const uint16_t* d;
  const float* b;
  int64_t Kp;
  void apply(const void* x, bool xbf16, int64_t N, void* y, int64_t ldy) const override {
    int4_gemv(w, sub, d, b, O, Kp, x, xbf16, N, K, YWriter(y, xbf16, ldy));
  }
};
}  // namespace

std::shared_ptr<PreparedLinear> int8_prepare(const torch::Tensor& qw, const torch::Tensor& scale,
                                             const c10::optional<torch::Tensor>& bias, int64_t K) {
  TORCH_CHECK(qw.dim() == 2 && qw.is_contiguous() && scale.is_contiguous(), "int8 weight: contiguous 2-D");
  check_int8(qw, scale, K);
  check_bias(bias, qw.size(0));
  auto p = std::make_shared<Int8Prepared>();
  p->O = qw.size(0), p->K = K, p->Kp = qw.size(1);
  p->w = qw.data_ptr<int8_t>(), p->s = scale.data_ptr<float>(), p->b = bias ? bias->data_ptr<float>() : nullptr;
  p->keep = {qw, scale};
  if (bias) p->keep.push_back(*bias);
  return p;
}

std::shared_ptr<PreparedLinear> int4_prepare(const torch::Tensor& qw, const torch::Tensor& sub, const torch::Tensor& d,
                                             const c10::optional<torch::Tensor>& bias, int64_t K) {
  TORCH_CHECK(qw.dim() == 2 && qw.is_contiguous(), "int4 weight: contiguous 2-D");
  check_int4(qw, sub, d, K);
  check_bias(bias, qw.size(0));
  auto p = std::make_shared<Int4Prepared>();
  p->O = qw.size(0), p->K = K, p->Kp = qw.size(1) * 2;
  p->w = qw.data_ptr<uint8_t>(), p->sub = sub.data_ptr<int8_t>();
  p->d = reinterpret_cast<const uint16_t*>(d.data_ptr<at::BFloat16>()), p->b = bias ? bias->data_ptr<float>() : nullptr;
  p->keep = {qw, sub, d};
  if (bias) p->keep.push_back(*bias);
  return p;
}
}  // namespace qwenrun

// quant_pack.cpp: load-time packing and the many-row path's dequantization.
std::vector<torch::Tensor> quantize_int8(const torch::Tensor& w);
std::vector<torch::Tensor> quantize_int4(const torch::Tensor& w);
torch::Tensor int8_dequant(const torch::Tensor& qw, const torch::Tensor& scale, int64_t r0, int64_t r1, int64_t K,
                           torch::Tensor out);
torch::Tensor int4_dequant(const torch::Tensor& qw, const torch::Tensor& sub, const torch::Tensor& d, int64_t r0,
                           int64_t r1, int64_t K, torch::Tensor out);

// gguf_kernels.cpp: GGUF block formats at their own precision.
torch::Tensor bq_linear(const torch::Tensor& x, const torch::Tensor& q, const c10::optional<torch::Tensor>& qh,
                        const torch::Tensor& d, const c10::optional<torch::Tensor>& sc,
                        const c10::optional<torch::Tensor>& dm, const c10::optional<torch::Tensor>& mn, int64_t G,
                        int64_t S, int64_t bits, int64_t zp, const c10::optional<torch::Tensor>& bias);
std::string bq_tiles(int64_t set_min_rows);
int64_t bq_tiles_min_rows();
torch::Tensor bq_dequant(const torch::Tensor& q, const c10::optional<torch::Tensor>& qh, const torch::Tensor& d,
                         const c10::optional<torch::Tensor>& sc, const c10::optional<torch::Tensor>& dm,
                         const c10::optional<torch::Tensor>& mn, int64_t G, int64_t S, int64_t bits, int64_t zp,
                         int64_t r0, int64_t r1, torch::Tensor out);
torch::Tensor bq_dequant_ids(const torch::Tensor& q, const c10::optional<torch::Tensor>& qh, const torch::Tensor& d,
                             const c10::optional<torch::Tensor>& sc, const c10::optional<torch::Tensor>& dm,
                             const c10::optional<torch::Tensor>& mn, int64_t G, int64_t S, int64_t bits, int64_t zp,
                             const torch::Tensor& ids, torch::Tensor out);
std::vector<torch::Tensor> bq_permute_words(const torch::Tensor& src, const torch::Tensor& table, int64_t gb,
                                            const c10::optional<torch::Tensor>& table_half, int64_t head,
                                            bool find_m128);
std::vector<torch::Tensor> bq_pack_q6k(const torch::Tensor& src);
std::vector<torch::Tensor> bq_pack_q5(const torch::Tensor& src, int64_t head);

// kv_attention.cpp
torch::Tensor int8kv_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor ks,
                                      torch::Tensor vs, torch::Tensor slots, torch::Tensor lens,
                                      int64_t window, double scale);

namespace qwenrun {
void def_fused_ops(pybind11::module_& m);  // fused_ops.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  qwenrun::def_fused_ops(m);
  m.def("isa", []() { return std::string(qwenrun::isa_name()); }, "the integer dot product's code path this build took");
  m.def("int8kv_decode_attention", &int8kv_decode_attention, "decode attention over an int8 KV cache (AVX2)");
  m.def("int8_linear", &int8_linear, "int8 weight-only linear (AVX2)");
  m.def("int4_linear", &int4_linear, "int4 weight-only linear (AVX2)");
  m.def("int8_dequant", &int8_dequant, "int8 rows -> fp32");
  m.def("int4_dequant", &int4_dequant, "int4 rows -> fp32");
  m.def("bq_linear", &bq_linear, "GGUF block-quantized weight linear (AVX2)");
  m.def("bq_tiles", &bq_tiles, "the many-row tile path this build has ('amx', 'amx (emulated)', ''); set_min_rows >= 0 sets the row count from which bq_linear takes it", pybind11::arg("set_min_rows") = -1);
  m.def("bq_tiles_min_rows", &bq_tiles_min_rows, "the row count from which bq_linear takes the tile path (-1: no tile path)");
  m.def("bq_dequant", &bq_dequant, "GGUF block-quantized rows -> fp32/bf16, exactly gguf's values");
  m.def("bq_dequant_ids", &bq_dequant_ids, "GGUF block-quantized rows ids[i] -> fp32/bf16 (an embedding lookup), exactly gguf's values");
  m.def("bq_permute_words", &bq_permute_words, "GGUF blocks -> the kernels' interleaved word order (load time)");
  m.def("bq_pack_q6k", &bq_pack_q6k, "Q6_K blocks -> the kernels' 6-bit storage (load time)");
  m.def("bq_pack_q5", &bq_pack_q5, "Q5_0 / Q5_1 blocks -> the kernels' 5-bit storage (load time)");
  m.def("quantize_int8", &quantize_int8, "fp32 [O, K] -> int8 format");
  m.def("quantize_int4", &quantize_int4, "fp32 [O, K] -> int4 format");
}
