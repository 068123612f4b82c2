// AVX2 kernels for GGUF's block-quantized weights, run at the file's own precision (no second
// rounding). qwenrun/quant/gguf_linear.py repacks each GGUF tensor, losslessly, into one layout:
//
//   w[o, k] = (d[o, s] * sc[o, g]) * (u[o, k] - zp) - dm[o, s] * mn[o, g]
//
//   s = k / S (super-block: S = 32 for Q8_0/Q5_0/Q4_0/..., 256 for the K-quants),
//   g = k / G (group: 32, or 16 for Q6_K); sc (int8) absent = 1; dm/mn absent = no offset.
//   u, the stored integer, in one of four storages (`bits`):
//     8  int8 bytes [O, K] (Q8_0; 4/5-bit formats whose rows are not a multiple of 64)
//     4  nibbles [O, K/2]: per 64 weights 32 bytes, the low nibble of byte i is weight i, the
//        high nibble weight 32 + i (GGUF's Q4_K order)
//     5  the nibbles as for 4, plus qh [O, K/8]: per 32 weights a little-endian 32-bit word whose
//        bit i is bit 4 of weight i (GGUF's Q5_0 order)
//     6  the nibbles as for 4, plus qh [O, K/4]: per 128 weights 32 bytes, bits 2c..2c+1 of byte
//        i are bits 4-5 of weight 32c + i (GGUF's Q6_K order)
//   zp: a zero point subtracted from u (32 for Q6_K, else 0).
//   d, dm fp16 (GGUF's own values, converted to fp32 exactly with F16C when used); sc, mn int8
//   (GGUF's 6-bit / int8 scales).
//
// The products in fp32 are those gguf's reference dequantization computes, in the same order, so
// bq_dequant returns its values exactly. The GEMV quantizes activations to int8 per 32 (one fp32
// scale each, the same quantize_row as the int8/int4 kernels), multiplies with
// _mm256_maddubs_epi16 / _mm256_madd_epi16 (or one vpdpbusd where the CPU has VNNI, see
// quant_common.h) and applies the weight's scales per 32 (or 16) in fp32.
// The per-32 float scales (d * sc * activation scale) and the offset term
// sum_k x_k * dm * mn (from the quantized activations' block sums) are computed 8 chunks at a
// time in vector registers, so the inner loop per 32 weights is unpack, one integer dot product,
// one convert and one FMA. Up to 4 activation rows share each unpacked weight chunk.
// Many activation rows (prefill, big batches) on a CPU with AMX-INT8 go through tiles instead
// (bq_linear_tiles below): the same integers and scales, 16 x 16 x 32 products per instruction.
// One caveat, as in ggml: the sign trick (|x| * sign(w, x)) cannot represent w = -128, which
// llama.cpp's Q8_0 quantizer never writes; the Python side routes a tensor holding it to the
// (exact, slower) dequantize-and-multiply path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

#include "quant_common.h"

#if defined(QWENRUN_AMX) && QWENRUN_AMX == 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
constexpr int kGroup = 8;       // chunks whose scales are computed together (one K-quant super-block)
constexpr int kMaxNR = 4;       // activation rows sharing one unpacked weight chunk

struct Weight {  // one packed weight, raw pointers + geometry
  const uint8_t* q;
  const uint8_t* qh;  // high-bit plane (bits 5, 6)
  const uint16_t* d;  // fp16
  const int8_t* sc;
  const uint16_t* dm;  // fp16
  const int8_t* mn;
  int64_t K, nb, ldq, ldh, ldd, ldg;  // nb = K / 32 chunks; row strides of q, qh (bytes), d/dm, sc/mn
  int sshift;                         // chunk index >> sshift = super-block index
  int bits, zp;
};

struct Act {  // one quantized activation row (scales and sums padded to a multiple of kGroup)
  const int8_t* xq;
  const uint8_t* xa;
  const float* xs;
  const float* xsum;  // activation block sums (real scale): per 32, or per 16 for G = 16
};

// Byte j of the result is 0x10 where bit j of `word` is set, else 0.
inline __m256i bit4_from_word(uint32_t word) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x(0x8040201008040201LL);  // byte j tests bit j % 8
  const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(word)), spread);
  const __m256i hit = _mm256_cmpeq_epi8(_mm256_and_si256(b, sel), sel);
  return _mm256_and_si256(hit, _mm256_set1_epi8(0x10));
}

// The stored integers (u - zp) of chunks c and c + 1 (c even) of one row, as int8 lanes.
template <int Bits, int Zp>
inline void load_pair(const uint8_t* w, const uint8_t* h, int64_t c, __m256i& v0, __m256i& v1) {
  if constexpr (Bits == 8) {
    v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * kChunk));
    v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (c + 1) * kChunk));
  } else {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (c >> 1) * 32));
    v0 = _mm256_and_si256(bytes, m4);
    v1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
    if constexpr (Bits == 6) {  // bits 2j..2j+1 of each plane byte, j = c % 4, are bits 4-5 of chunk c
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + (c >> 2) * 32));
      const __m256i m3 = _mm256_set1_epi8(0x30);
      const __m256i t = (c & 2) ? hb : _mm256_slli_epi16(hb, 4);  // chunk c's two bits at 4-5
      v0 = _mm256_or_si256(v0, _mm256_and_si256(t, m3));
      v1 = _mm256_or_si256(v1, _mm256_and_si256(_mm256_srli_epi16(t, 2), m3));
    } else if constexpr (Bits == 5) {
      uint32_t w0, w1;
      std::memcpy(&w0, h + c * 4, 4);
      std::memcpy(&w1, h + c * 4 + 4, 4);
      v0 = _mm256_or_si256(v0, bit4_from_word(w0));
      v1 = _mm256_or_si256(v1, bit4_from_word(w1));
    }
    if constexpr (Zp != 0) {
      v0 = _mm256_sub_epi8(v0, _mm256_set1_epi8(Zp));
      v1 = _mm256_sub_epi8(v1, _mm256_set1_epi8(Zp));
    }
  }
}

// One chunk's integers (c any), for the dequantizer and an odd last chunk.
template <int Bits, int Zp>
inline __m256i load_chunk(const uint8_t* w, const uint8_t* h, int64_t c) {
  __m256i v0, v1;
  if constexpr (Bits == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * kChunk));
  } else {
    load_pair<Bits, Zp>(w, h, c & ~int64_t(1), v0, v1);
    return (c & 1) ? v1 : v0;
  }
}

// 8 fp16 values -> fp32 (F16C), or fewer with zeros after them
inline __m256 load_f16x8(const uint16_t* p, int n) {
  if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; ++i) t[i] = p[i];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// 8 int8 values -> fp32, or fewer with zeros after them
inline __m256 load_i8x8(const int8_t* p, int n) {
  int64_t bits = 0;
  std::memcpy(&bits, p, n);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bits)));
}

// Interleaved groups. A row's weights come in groups of 8 units (a unit = one scale group: G = 32
// weights, or 16 for Q6_K), R = 8 G weights, stored (and consumed) as R / 32 vectors of 32
// values in pairs (L_k, H_k), k < G / 8. Lane j (4 bytes) of L_k holds word 2k + j / 4 of unit
// 2 (j % 4), lane j of H_k the same word of unit 2 (j % 4) + 1. So _mm256_madd_epi16's int32 lane
// j collects one unit across the whole group: the group's integer dot products accumulate in two
// registers (int16 while they cannot overflow), and each group needs two converts and two FMAs
// against its units' scales (d * sc * activation scale), not one per 32 weights. For Q4_K this
// order is a 4-byte-word permutation of the file's own bytes (the nibble pair of a byte is units
// 2t, 2t + 1). The activations are reordered the same way per call. After the full groups, S = 32
// formats may end with a half group of 4 units (K = 896 = 3 * 256 + 128: Qwen2.5-0.5B): lane j
// of L_k then holds word 4k + j / 2 of unit 2 (j % 2). What is left after that (K % 128) stays in
// plain order and goes chunk by chunk.
inline int64_t sigma_word(int64_t m, int64_t G, int64_t U) {  // stored word m of a group of U units <- weight word
  const int64_t v = m / 8, j = m % 8, k = v / 2, half = v % 2, P = U / 2;
  return (2 * (j % P) + half) * (G / 4) + (8 / P) * k + j / P;
}

// x (weight order) -> dst (stored order), or back with inverse; K bytes.
inline void permute_words(const int8_t* src, int8_t* dst, int64_t K, int64_t G, bool inverse) {
  int64_t tab8[64], tab4[32];
  for (int64_t m = 0; m < 2 * G; ++m) tab8[m] = sigma_word(m, G, 8);
  for (int64_t m = 0; m < G; ++m) tab4[m] = sigma_word(m, G, 4);
  auto apply = [&](int64_t at, const int64_t* tab, int64_t nw) {
    for (int64_t m = 0; m < nw; ++m) {
      if (inverse) std::memcpy(dst + at + 4 * tab[m], src + at + 4 * m, 4);
      else std::memcpy(dst + at + 4 * m, src + at + 4 * tab[m], 4);
    }
  };
  const int64_t R = 8 * G, ng = K / R;
  int64_t at = 0;
  for (int64_t g = 0; g < ng; ++g, at += R) apply(at, tab8, 2 * G);
  if (G == 32 && K - at >= 4 * G) apply(at, tab4, G), at += 4 * G;
  std::memcpy(dst + at, src + at, K - at);
}

template <int Bits, int Zp>
inline void slot_pair(const uint8_t* wg, const uint8_t* hg, int s, __m256i& v0, __m256i& v1) {
  // slots s, s + 1 (s even) of one group: wg / hg = the group's values / high-bit plane
  if constexpr (Bits == 8) {
    v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * s));
    v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * s + 32));
  } else {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 16 * s));
    v0 = _mm256_and_si256(bytes, m4);
    v1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
    if constexpr (Bits == 6) {  // one 32-byte plane per group of 128: bits 2s..2s+1 = slot s
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hg));
      const __m256i m3 = _mm256_set1_epi8(0x30);
      const __m256i t = (s & 2) ? hb : _mm256_slli_epi16(hb, 4);
      v0 = _mm256_or_si256(v0, _mm256_and_si256(t, m3));
      v1 = _mm256_or_si256(v1, _mm256_and_si256(_mm256_srli_epi16(t, 2), m3));
    } else if constexpr (Bits == 5) {  // one 32-byte plane per group: bit s of byte p = slot s
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hg));
      const __m256i m1 = _mm256_set1_epi8(0x10);
      auto bit4 = [&](int b) {  // bit b of each byte -> bit 4 (the shifts stay inside a byte after the mask)
        return _mm256_and_si256(b <= 4 ? _mm256_sll_epi16(hb, _mm_cvtsi32_si128(4 - b))
                                       : _mm256_srl_epi16(hb, _mm_cvtsi32_si128(b - 4)), m1);
      };
      v0 = _mm256_or_si256(v0, bit4(s));
      v1 = _mm256_or_si256(v1, bit4(s + 1));
    }
    if constexpr (Zp != 0) {
      v0 = _mm256_sub_epi8(v0, _mm256_set1_epi8(Zp));
      v1 = _mm256_sub_epi8(v1, _mm256_set1_epi8(Zp));
    }
  }
}

template <bool Unsigned>
inline __m256i mul_pairs(__m256i v, const Act& A, int64_t off) {  // int16 lanes: pairs of products
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.xq + off));
  if constexpr (Unsigned) return _mm256_maddubs_epi16(v, x);
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.xa + off));
  return _mm256_maddubs_epi16(a, _mm256_sign_epi8(v, x));
}

// VNNI: acc (int32 lanes) += the products of 4-byte lanes, straight from the bytes (one
// vpdpbusd where maddubs + int16 adds + madd are three or more instructions)
template <bool Unsigned>
inline __m256i dot_acc(__m256i acc, __m256i v, const Act& A, int64_t off) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.xq + off));
  if constexpr (Unsigned) return qwenrun::dot4_acc(acc, v, x);
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.xa + off));
  return qwenrun::dot4_acc(acc, a, _mm256_sign_epi8(v, x));
}

// The 5-bit plane of a row (G = 32): 32 bytes per full group of 256 and per half group of 128,
// then a 32-bit word per chunk of the plain rest. One description for the kernel, the dequantizer
// and the size check (gguf_linear._plane5 writes it).
struct Plane5 {
  int64_t group_chunks;  // chunks covered by the group planes (8 per group, 4 for a half group)
  int64_t rest_at;       // byte offset of the rest's words
  explicit Plane5(int64_t K) {
    const int64_t ng = K / 256, nh = (K % 256) >= 128;
    group_chunks = 8 * ng + 4 * nh;
    rest_at = 32 * (ng + nh);
  }
  int64_t bytes(int64_t K) const { return rest_at + 4 * (K / 32 - group_chunks); }
  // h such that the word of rest chunk c is at h + 4 c
  const uint8_t* rest_words(const uint8_t* h) const { return h + rest_at - 4 * group_chunks; }
};

struct RowPtrs {
  const uint8_t* w;
  const uint8_t* h;
  const uint16_t* d;
  const int8_t* sc;
  const uint16_t* dm;
  const int8_t* mn;
};

// One interleaved group of U units (8, or a half group of 4) starting at value v0 (chunk c0) of
// the row: adds its dot products with A[n] to acc[n] (and the offsets to macc[n]).
template <int Bits, int Zp, int G, bool Min, bool Sc, int NR, int U>
inline void bq_group(const Weight& W, const RowPtrs& P, int64_t v0, const Act* A, __m256* acc, __m256* macc) {
  // Q6_K's zero point goes into the offsets (zp * d * sc * activation sums per 16), so its
  // integers stay unsigned (0..63): no sign trick, no |x| load
  constexpr bool Unsigned = Bits != 8;
  constexpr int R = U * G, CPG = R / 32;  // values and activation chunks in the group
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t c0 = v0 / 32;
  const uint8_t* wg = P.w + (Bits == 8 ? v0 : v0 / 2);
  const uint8_t* hg = Bits == 6 ? P.h + v0 / 4 : Bits == 5 ? P.h + 32 * (v0 / 256) : nullptr;  // 5: a plane per group
  constexpr int64_t kBytes = Bits == 8 ? R : R / 2;
  for (int64_t b = 0; b < kBytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(wg + b + kPrefetch), _MM_HINT_T0);
  if constexpr (Bits == 6) _mm_prefetch(reinterpret_cast<const char*>(hg + kPrefetch / 2), _MM_HINT_T0);
  if constexpr (Bits == 5) _mm_prefetch(reinterpret_cast<const char*>(hg + kPrefetch / 4), _MM_HINT_T0);
  // the units' weight scales: d (per chunk or per super-block) times sc
  __m256 wsc;
  if constexpr (G == 16) {
    wsc = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(P.d[v0 >> 8])), load_i8x8(P.sc + v0 / 16, 8));
  } else {
    const __m256 dv = W.sshift ? _mm256_set1_ps(_cvtsh_ss(P.d[v0 >> 8])) : load_f16x8(P.d + c0, CPG);
    wsc = Sc ? _mm256_mul_ps(dv, load_i8x8(P.sc + c0, CPG)) : dv;
  }
  __m256 fs[NR];
  for (int n = 0; n < NR; ++n) {
    if constexpr (G == 16) {  // units 2c, 2c + 1 share chunk c's activation scale
      const __m256 xs = _mm256_castps128_ps256(_mm_loadu_ps(A[n].xs + c0));
      fs[n] = _mm256_mul_ps(wsc, _mm256_permutevar8x32_ps(xs, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
    } else {  // (scales / sums are padded: lanes past a half group read zeros and get zero scales)
      fs[n] = _mm256_mul_ps(wsc, _mm256_loadu_ps(A[n].xs + c0));
    }
  }
  if constexpr (Min) {  // offsets (G == 32): dm * mn per chunk times the activation block sums
    const __m256 dmv = W.sshift ? _mm256_set1_ps(_cvtsh_ss(P.dm[v0 >> 8])) : load_f16x8(P.dm + c0, CPG);
    const __m256 off = _mm256_mul_ps(dmv, load_i8x8(P.mn + c0, CPG));
    for (int n = 0; n < NR; ++n) macc[n] = _mm256_fmadd_ps(off, _mm256_loadu_ps(A[n].xsum + c0), macc[n]);
  }
  if constexpr (Zp != 0) {  // G == 16: xsum holds sums per 16
    const __m256 offz = _mm256_mul_ps(wsc, _mm256_set1_ps(static_cast<float>(Zp)));
    for (int n = 0; n < NR; ++n) macc[n] = _mm256_fmadd_ps(offz, _mm256_loadu_ps(A[n].xsum + 2 * c0), macc[n]);
  }
  __m256i iL[NR], iH[NR], sL[NR], sH[NR];
  for (int n = 0; n < NR; ++n) iL[n] = iH[n] = sL[n] = sH[n] = _mm256_setzero_si256();
#pragma GCC unroll 4
  for (int k = 0; k < R / 64; ++k) {
    __m256i vL, vH;
    slot_pair<Bits, 0>(wg, hg, 2 * k, vL, vH);
    for (int n = 0; n < NR; ++n) {
      const int64_t off = v0 + 64 * k;
      if constexpr (qwenrun::kVnni) {
        iL[n] = dot_acc<Unsigned>(iL[n], vL, A[n], off);
        iH[n] = dot_acc<Unsigned>(iH[n], vH, A[n], off + 32);
        continue;
      }
      const __m256i pL = mul_pairs<Unsigned>(vL, A[n], off), pH = mul_pairs<Unsigned>(vH, A[n], off + 32);
      if constexpr (Bits == 8) {
        iL[n] = _mm256_add_epi32(iL[n], _mm256_madd_epi16(pL, ones));
        iH[n] = _mm256_add_epi32(iH[n], _mm256_madd_epi16(pH, ones));
      } else {  // |pair| <= 2*15*127 (4-bit), 2*31*127 (5-bit), 2*63*127 (6-bit): R / 64 (4, 4, 2) of them fit int16
        sL[n] = _mm256_add_epi16(sL[n], pL);
        sH[n] = _mm256_add_epi16(sH[n], pH);
      }
    }
  }
  const __m256i idxL = U == 8 ? _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6) : _mm256_setr_epi32(0, 2, 0, 2, 0, 2, 0, 2);
  const __m256i idxH = U == 8 ? _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7) : _mm256_setr_epi32(1, 3, 1, 3, 1, 3, 1, 3);
  for (int n = 0; n < NR; ++n) {
    if constexpr (Bits != 8 && !qwenrun::kVnni) iL[n] = _mm256_madd_epi16(sL[n], ones), iH[n] = _mm256_madd_epi16(sH[n], ones);
    acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iL[n]), _mm256_permutevar8x32_ps(fs[n], idxL), acc[n]);
    acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iH[n]), _mm256_permutevar8x32_ps(fs[n], idxH), acc[n]);
  }
}

// y[n] = dot(W row o, A[n]) for n < NR (before the bias)
template <int Bits, int Zp, int G, bool Min, bool Sc, int NR>
inline void bq_rows(const Weight& W, int64_t o, const Act* A, float* y) {
  constexpr bool Unsigned = Bits != 8 && Zp == 0;
  const __m256i ones = _mm256_set1_epi16(1);
  const RowPtrs P{W.q + o * W.ldq, (Bits == 5 || Bits == 6) ? W.qh + o * W.ldh : nullptr, W.d + o * W.ldd,
                  Sc ? W.sc + o * W.ldg : nullptr, Min ? W.dm + o * W.ldd : nullptr, Min ? W.mn + o * W.ldg : nullptr};
  __m256 acc[NR], macc[NR];
  for (int n = 0; n < NR; ++n) acc[n] = macc[n] = _mm256_setzero_ps();
  // the scales of the row two ahead in this stream: small separate arrays the prefetchers miss
  auto ahead = [](const void* p, int64_t row_bytes) {
    for (int64_t b = 0; b < row_bytes; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p) + 2 * row_bytes + b, _MM_HINT_T0);
  };
  ahead(P.d, W.ldd * 2);
  if constexpr (Sc) ahead(P.sc, W.ldg);
  if constexpr (Min) ahead(P.mn, W.ldg), ahead(P.dm, W.ldd * 2);
  int64_t v0 = 0;
  for (; v0 + 8 * G <= W.K; v0 += 8 * G) bq_group<Bits, Zp, G, Min, Sc, NR, 8>(W, P, v0, A, acc, macc);
  if constexpr (G == 32) {
    if (v0 + 4 * G <= W.K) bq_group<Bits, Zp, G, Min, Sc, NR, 4>(W, P, v0, A, acc, macc), v0 += 4 * G;
    // 5-bit: the rest's words follow the groups' planes
    const uint8_t* hr = Bits == 5 ? Plane5(W.K).rest_words(P.h) : P.h;
    for (int64_t c = v0 / 32; c < W.nb; ++c) {  // the plain-order rest: chunk by chunk, scales broadcast
      const __m256i v = load_chunk<Bits, Zp>(P.w, hr, c);
      const float wsc = _cvtsh_ss(P.d[c >> W.sshift]) * (Sc ? static_cast<float>(P.sc[c]) : 1.f);
      const float off = Min ? _cvtsh_ss(P.dm[c >> W.sshift]) * static_cast<float>(P.mn[c]) : 0.f;
      for (int n = 0; n < NR; ++n) {
        const __m256i d32 = qwenrun::kVnni ? dot_acc<Unsigned>(_mm256_setzero_si256(), v, A[n], c * kChunk)
                                           : _mm256_madd_epi16(mul_pairs<Unsigned>(v, A[n], c * kChunk), ones);
        const __m256 p = _mm256_cvtepi32_ps(d32);
        acc[n] = _mm256_fmadd_ps(p, _mm256_set1_ps(wsc * A[n].xs[c]), acc[n]);
        if constexpr (Min) macc[n] = _mm256_add_ps(macc[n], _mm256_setr_ps(off * A[n].xsum[c], 0, 0, 0, 0, 0, 0, 0));
      }
    }
  }
  for (int n = 0; n < NR; ++n) {
    y[n] = hsum(acc[n]);
    if constexpr (Min || Zp != 0) y[n] -= hsum(macc[n]);
  }
}

using RowsFn = void (*)(const Weight&, int64_t, const Act*, float*);

template <int Bits, int Zp, int G, bool Min, bool Sc>
RowsFn pick_nr(int nr) {
  switch (nr) {
    case 1: return &bq_rows<Bits, Zp, G, Min, Sc, 1>;
    case 2: return &bq_rows<Bits, Zp, G, Min, Sc, 2>;
    case 3: return &bq_rows<Bits, Zp, G, Min, Sc, 3>;
    default: return &bq_rows<Bits, Zp, G, Min, Sc, 4>;
  }
}

// The layouts gguf_linear.py produces (see its table); anything else is refused.
RowsFn pick(const Weight& W, int64_t G, bool min, bool sc, int nr) {
  const int b = W.bits;
  if (G == 16) {
    TORCH_CHECK(sc && !min && ((b == 6 && W.zp == 32) || (b == 8 && W.zp == 0)),
                "groups of 16 are Q6_K's layout: sub-scales, no offset, 6-bit planes (zero point 32) or int8");
    return b == 6 ? pick_nr<6, 32, 16, false, true>(nr) : pick_nr<8, 0, 16, false, true>(nr);
  }
  TORCH_CHECK(G == 32, "group size must be 16 or 32");
  TORCH_CHECK(W.zp == 0, "a zero point is only supported with groups of 16 (Q6_K)");
  if (b == 8) {
    if (min) return sc ? pick_nr<8, 0, 32, true, true>(nr) : pick_nr<8, 0, 32, true, false>(nr);
    return sc ? pick_nr<8, 0, 32, false, true>(nr) : pick_nr<8, 0, 32, false, false>(nr);
  }
  TORCH_CHECK(min, "4- and 5-bit storage holds unsigned values and needs an offset (dm, mn)");
  if (b == 4) return sc ? pick_nr<4, 0, 32, true, true>(nr) : pick_nr<4, 0, 32, true, false>(nr);
  TORCH_CHECK(b == 5, "bits must be 4, 5, 6 or 8");
  return sc ? pick_nr<5, 0, 32, true, true>(nr) : pick_nr<5, 0, 32, true, false>(nr);
}

Weight make_weight(const torch::Tensor& q, const c10::optional<torch::Tensor>& qh, const torch::Tensor& d,
                   const c10::optional<torch::Tensor>& sc, const c10::optional<torch::Tensor>& dm,
                   const c10::optional<torch::Tensor>& mn, int64_t G, int64_t S, int64_t bits, int64_t zp) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, "bits must be 4, 5, 6 or 8");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.element_size() == 1, "q must be a contiguous 2-D byte tensor");
  const bool nib = bits != 8;
  const int64_t O = q.size(0), K = nib ? q.size(1) * 2 : q.size(1);
  TORCH_CHECK(K % kChunk == 0 && (!nib || K % 64 == 0) && (bits != 6 || K % 256 == 0),
              "K must be a multiple of 32 (64 for nibbles, 256 for 6-bit planes)");
  TORCH_CHECK(S == 32 || S == 256, "super-block must be 32 or 256");
  TORCH_CHECK(K % S == 0 && S % G == 0, "K must be a multiple of the super-block");
  TORCH_CHECK(zp >= 0 && zp < 64, "bad zero point");
  // 5-bit planes: 32 bytes per group (and half group), then a word per 32 of the rest
  const int64_t hbytes = bits == 5 ? Plane5(K).bytes(K) : bits == 6 ? K / 4 : 0;
  TORCH_CHECK(qh.has_value() == (hbytes > 0), "a high-bit plane comes with 5- and 6-bit storage only");
  if (qh) TORCH_CHECK(qh->is_contiguous() && qh->element_size() == 1 && qh->dim() == 2 && qh->size(0) == O &&
                      qh->size(1) == hbytes, "bad qh");
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
  W.qh = qh ? reinterpret_cast<const uint8_t*>(qh->data_ptr()) : nullptr;
  W.d = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  W.sc = sc ? sc->data_ptr<int8_t>() : nullptr;
  W.dm = dm ? reinterpret_cast<const uint16_t*>(dm->data_ptr<at::Half>()) : nullptr;
  W.mn = mn ? mn->data_ptr<int8_t>() : nullptr;
  W.K = K;
  W.nb = K / kChunk;
  W.ldq = q.size(1);
  W.ldh = hbytes;
  W.ldd = K / S;
  W.ldg = K / G;
  W.sshift = S == 256 ? 3 : 0;
  W.bits = static_cast<int>(bits);
  W.zp = static_cast<int>(zp);
  return W;
}

// The integers (u - zp) of row o in the stored (interleaved) order, K bytes: exact.
inline void stored_ints(const Weight& W, int64_t o, int8_t* stored) {
  const uint8_t* w = W.q + o * W.ldq;
  const uint8_t* h = W.qh ? W.qh + o * W.ldh : nullptr;
  if (W.bits == 8 && W.zp == 0) {
    std::memcpy(stored, w, W.K);
    return;
  }
  if ((W.bits == 4 || W.bits == 6) && W.nb % 2 == 0) {  // two chunks per unpack
    const __m256i z = _mm256_set1_epi8(static_cast<char>(W.zp));
    for (int64_t b = 0; b < W.nb; b += 2) {
      __m256i v0, v1;
      if (W.bits == 4) load_pair<4, 0>(w, h, b, v0, v1);
      else load_pair<6, 0>(w, h, b, v0, v1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(stored + b * kChunk), _mm256_sub_epi8(v0, z));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(stored + (b + 1) * kChunk), _mm256_sub_epi8(v1, z));
    }
    return;
  }
  for (int64_t b = 0; b < W.nb; ++b) {  // the row's integers u - zp (exact), stored order
    __m256i qv;
    switch (W.bits) {
      case 4: qv = load_chunk<4, 0>(w, h, b); break;
      case 5: {  // nibbles + bit 4 from the group's plane (or the rest's word)
        const Plane5 pl(W.K);
        if (b < pl.group_chunks) {
          const int64_t gi = b / 8, bit = b % 8;  // (a half group is group K / 256, bits 0-3)
          const __m256i plane = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 32 * gi));
          // bit `bit` of each byte -> bit 4 (16-bit shifts: the mask keeps each byte's own bit)
          const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(plane, _mm_cvtsi32_si128(static_cast<int>(bit))), _mm256_set1_epi8(1));
          qv = _mm256_or_si256(load_chunk<4, 0>(w, h, b), _mm256_slli_epi16(hb, 4));
        } else {
          qv = load_chunk<5, 0>(w, pl.rest_words(h), b);
        }
        break;
      }
      case 6: qv = load_chunk<6, 0>(w, h, b); break;
      default: qv = load_chunk<8, 0>(w, h, b); break;
    }
    if (W.zp) qv = _mm256_sub_epi8(qv, _mm256_set1_epi8(static_cast<char>(W.zp)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(stored + b * kChunk), qv);
  }
}

// ---- Many rows on AMX tiles ----
// QWENRUN_AMX (quant/kernels.py, from the CPU's flags): 1 = Intel AMX-INT8 tiles (Sapphire
// Rapids and later), 2 = the same code with the tile product emulated in AVX2 (tests: any CPU
// runs the blocking, the layouts and the scale arithmetic a tile CPU runs), 0 = not built.
//
// y[m, o] = sum_u xs[m, u] * ws[o, u] * D[m, o, u] - sum_u xsum[m, u] * off[o, u]
//
// u runs over the weight's scale groups (units of G = 32, or 16 for Q6_K), D[m, o, u] is the exact
// int32 dot product of the unit's int8 activations (quantized per 32, as the GEMV above) with the
// weight's stored integers (u - zp: Q8_0 int8, 4/5/6-bit values, Q6_K's minus 32, all signed
// int8, so one TDPBSSD serves every format and Q8_0's -128 needs no sign trick), ws = d * sc and
// off = dm * mn as the GEMV computes them. Per block of 16 weight rows the integers are gathered
// once (weight order, VNNI tile layout: row kk of unit u's tile = word kk of the unit for the 16
// rows) and reused by every 16 activation rows; each unit's 16 x 16 int32 tile is converted and
// scaled into 16 zmm accumulators. The integers are those of the GEMV, only the order of the fp32
// sums differs (tests/test_gguf_amx.py bounds it).
#ifndef QWENRUN_AMX
#define QWENRUN_AMX 0
#endif

#if QWENRUN_AMX
// From this many activation rows on, bq_linear takes the tiles: gathering a block's integers and
// scales (~2 ms per 4B-sized weight, mostly reading it) pays off from ~12 rows. Sapphire Rapids, 2
// threads, ms GEMV / tiles (benchmarks/bench_tiles.py): 6912 x 2560 Q4_K N=8 1.13/2.00, N=12
// 1.98/1.90, N=16 2.37/2.01, N=32 4.75/2.88; Q8_0 N=16 2.92/1.99; 2560 x 6912 Q6_K N=16
// 3.27/2.58; 9728 x 896 Q5_0 N=16 1.65/1.75, N=32 3.23/2.18; N=256 about 2.5x faster.
int64_t g_amx_min_rows = 16;

#if QWENRUN_AMX == 1
bool amx_ready() {
  // Linux hands out the 8 KiB tile state only to a process that asks for it once
  // (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); without it a tile instruction faults.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One thread's tile registers for a call, two sets (S = 0, 1) so one unit's product runs while
// the previous one is stored and scaled: A (tiles 0 / 3) 16 x G bytes, B (1 / 4) G/4 x 64 bytes,
// C (2 / 5) 16 x 16 int32.
class Tiles {
 public:
  explicit Tiles(int64_t G) {
    TileConfig c;
    for (int t : {0, 3}) c.rows[t] = 16, c.colsb[t] = static_cast<uint16_t>(G);
    for (int t : {1, 4}) c.rows[t] = static_cast<uint8_t>(G / 4), c.colsb[t] = 64;
    for (int t : {2, 5}) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
  }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
  // C_S = a . b: a = 16 rows of G bytes (contiguous), b = the unit's tile layout
  template <int S>
  void issue(const int8_t* a, const int8_t* b, int64_t G) const {
    if constexpr (S == 0) {
      _tile_loadd(0, a, G);
      _tile_loadd(1, b, 64);
      _tile_zero(2);
      _tile_dpbssd(2, 0, 1);
    } else {
      _tile_loadd(3, a, G);
      _tile_loadd(4, b, 64);
      _tile_zero(5);
      _tile_dpbssd(5, 3, 4);
    }
  }
  template <int S>
  void store(int32_t* c) const {
    if constexpr (S == 0) _tile_stored(2, c, 64);
    else _tile_stored(5, c, 64);
  }
};

using V16 = __m512;  // 16 fp32 lanes = one output row of a tile
inline V16 v16_zero() { return _mm512_setzero_ps(); }
inline V16 v16_load(const float* p) { return _mm512_loadu_ps(p); }
inline V16 v16_set1(float v) { return _mm512_set1_ps(v); }
inline V16 v16_cvt(const int32_t* p) { return _mm512_cvtepi32_ps(_mm512_loadu_si512(p)); }
inline V16 v16_scale(V16 a, float s) { return _mm512_mul_ps(a, _mm512_set1_ps(s)); }
inline V16 v16_fma(V16 a, V16 b, V16 c) { return _mm512_fmadd_ps(a, b, c); }
inline void v16_store(float* p, V16 v) { _mm512_storeu_ps(p, v); }
// dst[w * 16 + n] = word pos[w] of row n (rows K bytes apart), for the words w of [w0, w1)
inline void gather_words(const int8_t* rows, int64_t K, const int32_t* pos, int64_t w0, int64_t w1, int32_t* dst) {
  const __m512i rowoff = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(K / 4)));
  for (int64_t w = w0; w < w1; ++w)
    _mm512_storeu_si512(dst + w * 16, _mm512_i32gather_epi32(_mm512_add_epi32(rowoff, _mm512_set1_epi32(pos[w])), rows, 4));
}
#else  // QWENRUN_AMX == 2: the tile product in plain integer arithmetic, AVX2 vectors for the rest
bool amx_ready() { return true; }

class Tiles {
 public:
  explicit Tiles(int64_t) {}
  template <int S>
  void issue(const int8_t* a, const int8_t* b, int64_t G) const {
    int32_t* c = c_[S];
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 16; ++n) {
        int32_t s = 0;
        for (int64_t kk = 0; kk < G / 4; ++kk)
          for (int j = 0; j < 4; ++j) s += int32_t(a[r * G + 4 * kk + j]) * int32_t(b[kk * 64 + 4 * n + j]);
        c[16 * r + n] = s;
      }
  }
  template <int S>
  void store(int32_t* c) const {
    std::memcpy(c, c_[S], sizeof(c_[S]));
  }

 private:
  mutable int32_t c_[2][256];
};

struct V16 {
  __m256 lo, hi;
};
inline V16 v16_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 v16_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V16 v16_set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline V16 v16_cvt(const int32_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
          _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8)))};
}
inline V16 v16_scale(V16 a, float s) { return {_mm256_mul_ps(a.lo, _mm256_set1_ps(s)), _mm256_mul_ps(a.hi, _mm256_set1_ps(s))}; }
inline V16 v16_fma(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline void v16_store(float* p, V16 v) { _mm256_storeu_ps(p, v.lo), _mm256_storeu_ps(p + 8, v.hi); }
inline void gather_words(const int8_t* rows, int64_t K, const int32_t* pos, int64_t w0, int64_t w1, int32_t* dst) {
  for (int64_t w = w0; w < w1; ++w)
    for (int n = 0; n < 16; ++n) std::memcpy(dst + w * 16 + n, rows + n * K + 4 * int64_t(pos[w]), 4);
}
#endif

// The block's scales in tile order: ws[u * 16 + n] = d * sc of unit u of row o0 + n (0 past the
// last row), wo the same for the offsets dm * mn; fp32 products exactly as the GEMV forms them.
inline void tile_scales(const Weight& W, int64_t G, int64_t o0, int64_t no, bool rows_follow, float* ws, float* wo) {
  const int64_t nu = W.K / G, ushift = W.sshift + (G == 16 ? 1 : 0);  // unit -> super-block
#if QWENRUN_AMX == 1
  // 16 rows at once, gathers across the rows (one vector per unit); the 4-byte gathers of 1- and
  // 2-byte values read up to 3 bytes past the element, so a row must follow (not the last block)
  if (no == 16 && rows_follow) {
    const __m512i rows = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i offd = _mm512_mullo_epi32(rows, _mm512_set1_epi32(static_cast<int>(W.ldd)));
    const __m512i offg = _mm512_mullo_epi32(rows, _mm512_set1_epi32(static_cast<int>(W.ldg)));
    const uint16_t* d = W.d + o0 * W.ldd;
    const uint16_t* dm = W.dm ? W.dm + o0 * W.ldd : nullptr;
    const int8_t* sc = W.sc ? W.sc + o0 * W.ldg : nullptr;
    const int8_t* mn = W.mn ? W.mn + o0 * W.ldg : nullptr;
    auto f16s = [&](const uint16_t* base, int64_t i) {  // 16 fp16 (row n: base[n * ldd + i]) -> fp32, exact
      // 2-byte elements through 4-byte gathers at byte offsets (the low half is the value)
      const __m512i v = _mm512_i32gather_epi32(_mm512_add_epi32(_mm512_slli_epi32(offd, 1), _mm512_set1_epi32(static_cast<int>(2 * i))), base, 1);
      return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    };
    auto i8s = [&](const int8_t* base, int64_t i) {  // 16 int8 (row n: base[n * ldg + i]) -> fp32
      const __m512i v = _mm512_i32gather_epi32(_mm512_add_epi32(offg, _mm512_set1_epi32(static_cast<int>(i))), base, 1);
      return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24));
    };
    for (int64_t u = 0; u < nu; ++u) {
      __m512 s = f16s(d, u >> ushift);
      if (sc) s = _mm512_mul_ps(s, i8s(sc, u));
      _mm512_storeu_ps(ws + u * 16, s);
      if (wo) _mm512_storeu_ps(wo + u * 16, _mm512_mul_ps(f16s(dm, u >> ushift), i8s(mn, u)));
    }
    return;
  }
#endif
  for (int64_t n = 0; n < 16; ++n) {
    const int64_t o = o0 + n;
    for (int64_t u = 0; u < nu; ++u) {
      float s = 0.f, off = 0.f;
      if (n < no) {
        s = _cvtsh_ss(W.d[o * W.ldd + (u >> ushift)]);
        if (W.sc) s *= static_cast<float>(W.sc[o * W.ldg + u]);
        if (wo) off = _cvtsh_ss(W.dm[o * W.ldd + (u >> ushift)]) * static_cast<float>(W.mn[o * W.ldg + u]);
      }
      ws[u * 16 + n] = s;
      if (wo) wo[u * 16 + n] = off;
    }
  }
}

// bq_linear for many rows (see above); x [N, K] fp32 or bf16, y in x's dtype
torch::Tensor bq_linear_tiles(const Weight& W, const torch::Tensor& x, int64_t G, int64_t O, const float* bias) {
  TORCH_CHECK(amx_ready(), "this process may not use AMX tiles (arch_prctl refused)");
  const int64_t N = x.size(0), K = W.K, nb = W.nb, nu = K / G, Np = (N + 15) / 16 * 16;
  const bool min = W.dm != nullptr;
  // activations: int8 per 32 in weight order (rows past N zero), scales, and -(block sums) for the offsets
  // xq in tile order: [Np / 16][nu][16 rows][G], so each unit's A tile is 16 G contiguous bytes
  std::vector<int8_t> xq(Np * K, 0);
  std::vector<float> xs(Np * nb, 0.f), nsum(min ? Np * nb : 0, 0.f);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> xf;
    std::vector<int8_t> q(K);
    for (int64_t n = n0; n < n1; ++n) {
      quantize_row(x_row(x, n, xf), K, K, kChunk, q.data(), xs.data() + n * nb);
      int8_t* tile = xq.data() + (n / 16) * 16 * K + (n % 16) * G;
      for (int64_t u = 0; u < nu; ++u) std::memcpy(tile + u * 16 * G, q.data() + u * G, G);
      if (!min) continue;
      for (int64_t b = 0; b < nb; ++b) {  // exact integer sum, in the block's scale (as the GEMV)
        int32_t s = 0;
        for (int64_t i = 0; i < kChunk; ++i) s += q[b * kChunk + i];
        nsum[n * nb + b] = -(xs[n * nb + b] * static_cast<float>(s));
      }
    }
  });
  // pos[w] = the stored word that holds weight word w (the inverse of the interleaving)
  std::vector<int32_t> ident(K / 4), pos(K / 4);
  for (int64_t m = 0; m < K / 4; ++m) ident[m] = static_cast<int32_t>(m);
  permute_words(reinterpret_cast<const int8_t*>(ident.data()), reinterpret_cast<int8_t*>(pos.data()), K, G, true);
  auto y = torch::empty({N, O}, x.options());
  const YWriter out(y);
  const int64_t ntiles = (O + 15) / 16;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    const Tiles T(G);
    std::vector<int8_t> rows(16 * K);
    std::vector<int32_t> bt(16 * K / 4);  // the block's integers, tile layout, unit after unit
    std::vector<float> ws(16 * nu), wo(min ? 16 * nu : 0);
    constexpr int64_t kLag = 3, kLagBufs = 4;  // kLagBufs > kLag
    alignas(64) int32_t cb[256 * kLagBufs];
    alignas(64) float yr[16];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = 16 * t, no = std::min<int64_t>(16, O - o0);
      for (int64_t n = 0; n < 16; ++n) {
        if (n < no) stored_ints(W, o0 + n, rows.data() + n * K);
        else std::memset(rows.data() + n * K, 0, K);
      }
      tile_scales(W, G, o0, no, o0 + 16 < O, ws.data(), min ? wo.data() : nullptr);
      gather_words(rows.data(), K, pos.data(), 0, K / 4, bt.data());
      const int8_t* B = reinterpret_cast<const int8_t*>(bt.data());
      for (int64_t m0 = 0; m0 < N; m0 += 16) {
        V16 acc[16];
        for (auto& a : acc) a = v16_zero();
        const int8_t* A = xq.data() + m0 * K;  // this row tile's units, 16 G bytes each
        auto apply = [&](int64_t u, const int32_t* c) {
          const V16 wsu = v16_load(ws.data() + 16 * u);
          const int64_t cu = G == 32 ? u : u / 2;  // the unit's activation block
          const float* xsm = xs.data() + m0 * nb + cu;
          for (int r = 0; r < 16; ++r) acc[r] = v16_fma(v16_cvt(c + 16 * r), v16_scale(wsu, xsm[r * nb]), acc[r]);
          if (min) {
            const V16 wou = v16_load(wo.data() + 16 * u);
            const float* sm = nsum.data() + m0 * nb + u;
            for (int r = 0; r < 16; ++r) acc[r] = v16_fma(wou, v16_set1(sm[r * nb]), acc[r]);
          }
        };
        // software pipeline over the units: unit u + 1's product is issued before unit u's tile
        // is stored, and unit u - 1 (stored one step earlier) is scaled meanwhile
        // (a stored tile is read back kLag units later: the loads then find it in L1)
        T.issue<0>(A, B, G);
        for (int64_t u = 0; u < nu; u += 2) {
          if (u + 1 < nu) T.issue<1>(A + (u + 1) * 16 * G, B + (u + 1) * 16 * G, G);
          T.store<0>(cb + 256 * (u % kLagBufs));
          if (u >= kLag) apply(u - kLag, cb + 256 * ((u - kLag) % kLagBufs));
          if (u + 1 < nu) {
            if (u + 2 < nu) T.issue<0>(A + (u + 2) * 16 * G, B + (u + 2) * 16 * G, G);
            T.store<1>(cb + 256 * ((u + 1) % kLagBufs));
            if (u + 1 >= kLag) apply(u + 1 - kLag, cb + 256 * ((u + 1 - kLag) % kLagBufs));
          }
        }
        for (int64_t u = std::max<int64_t>(0, nu - kLag); u < nu; ++u) apply(u, cb + 256 * (u % kLagBufs));
        for (int64_t r = 0; r < std::min<int64_t>(16, N - m0); ++r) {
          v16_store(yr, acc[r]);
          for (int64_t n = 0; n < no; ++n) out(m0 + r, o0 + n, yr[n] + (bias ? bias[o0 + n] : 0.f));
        }
      }
    }
  });
  return y;
}
#endif  // QWENRUN_AMX

struct Scratch {
  std::vector<int8_t> q, p;
  std::vector<uint8_t> a;
  std::vector<float> s, sum, xf;
};
thread_local Scratch scratch;

void bq_gemv(const Weight& W, int64_t G, int64_t O, const void* x, bool xbf16, int64_t N, const YWriter& out,
             const float* bp);

}  // namespace

// y[N, O] = x[N, K] @ W.T + bias, W in the block format above; x and y fp32 or bf16 (y in x's dtype)
torch::Tensor bq_linear(const torch::Tensor& x, const torch::Tensor& q, const c10::optional<torch::Tensor>& qh,
                        const torch::Tensor& d, const c10::optional<torch::Tensor>& sc,
                        const c10::optional<torch::Tensor>& dm, const c10::optional<torch::Tensor>& mn, int64_t G,
                        int64_t S, int64_t bits, int64_t zp, const c10::optional<torch::Tensor>& bias) {
  const Weight W = make_weight(q, qh, d, sc, dm, mn, G, S, bits, zp);
  const int64_t N = x.size(0), K = W.K, O = q.size(0);
  qwenrun::check_common(x, q, bias, O);
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weight ", K);
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
#if QWENRUN_AMX
  if (N >= g_amx_min_rows) return bq_linear_tiles(W, x, G, O, bp);
#endif
  auto y = torch::empty({N, O}, x.options());
  bq_gemv(W, G, O, x.data_ptr(), x.scalar_type() == torch::kBFloat16, N, YWriter(y), bp);
  return y;
}

namespace {
// The GEMV path of bq_linear on raw rows: x [N, K] (fp32 or bf16), y through `out`.
void bq_gemv(const Weight& W, int64_t G, int64_t O, const void* x, bool xbf16, int64_t N, const YWriter& out,
             const float* bp) {
  const int64_t K = W.K, nb = W.nb;
  const int64_t nbp = (nb + kGroup - 1) / kGroup * kGroup;  // scales / sums padded with zeros
  const bool has_min = W.dm != nullptr, has_sc = W.sc != nullptr;
  const RowsFn rows_full = pick(W, G, has_min, has_sc, kMaxNR);
  const RowsFn rows_tail = pick(W, G, has_min, has_sc, static_cast<int>(N % kMaxNR));
  Scratch& scr = scratch;
  if (static_cast<int64_t>(scr.q.size()) < N * K) scr.q.resize(N * K), scr.a.resize(N * K), scr.p.resize(N * K);
  const int64_t per = G == 16 ? 2 : 1;  // activation sums per 32 (offsets), or per 16 (Q6_K's zero point)
  if (static_cast<int64_t>(scr.s.size()) < N * nbp) scr.s.resize(N * nbp);
  if (static_cast<int64_t>(scr.sum.size()) < N * nbp * per) scr.sum.resize(N * nbp * per);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t n = 0; n < N; ++n) {
    int8_t* xq = scr.q.data() + n * K;
    float* xs = scr.s.data() + n * nbp;
    quantize_row(x_row(x, xbf16, n, K, scr.xf), K, K, kChunk, xq, xs);
    float* xsum = scr.sum.data() + n * nbp * per;
    for (int64_t b = nb; b < nbp; ++b) xs[b] = 0.f;
    for (int64_t b = nb * per; b < nbp * per; ++b) xsum[b] = 0.f;
    // the weights' interleaved order (see bq_rows), then |x| of it for the sign trick
    int8_t* xp = scr.p.data() + n * K;
    permute_words(xq, xp, K, G, false);
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kChunk));
      const __m256i vp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + b * kChunk));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(scr.a.data() + n * K + b * kChunk), _mm256_abs_epi8(vp));
      // block sum of the quantized activations (exact in int32), in the block's scale
      const __m256i s32 = qwenrun::kVnni ? qwenrun::dot4_acc(_mm256_setzero_si256(), ones8, v)
                                         : _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16);
      alignas(32) int32_t t[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), s32);
      const int32_t lo = t[0] + t[1] + t[2] + t[3], hi = t[4] + t[5] + t[6] + t[7];  // values 0-15, 16-31
      if (per == 2) xsum[2 * b] = xs[b] * static_cast<float>(lo), xsum[2 * b + 1] = xs[b] * static_cast<float>(hi);
      else xsum[b] = xs[b] * static_cast<float>(lo + hi);
    }
  }
  std::vector<Act> acts(N);
  for (int64_t n = 0; n < N; ++n)
    acts[n] = Act{scr.p.data() + n * K, scr.a.data() + n * K, scr.s.data() + n * nbp, scr.sum.data() + n * nbp * per};
  const int64_t row_bytes = W.ldq + W.ldh + W.ldd * 2 * (W.dm ? 2 : 1) + (W.sc ? W.ldg : 0) + (W.mn ? W.ldg : 0);
  auto one_row = [&](int64_t o, int64_t n0, int64_t n1) {
    float r[kMaxNR];
    for (int64_t n = n0; n < n1; n += kMaxNR) {
      const int64_t m = std::min<int64_t>(kMaxNR, n1 - n);
      (m == kMaxNR ? rows_full : rows_tail)(W, o, acts.data() + n, r);
      for (int64_t i = 0; i < m; ++i) out(n + i, o, r[i] + (bp ? bp[o] : 0.f));
    }
  };
  constexpr int64_t kRowsBlock = 16;  // many rows: a block of weight rows stays in L2 for all of x
  if (N <= 2 * kMaxNR) {
    at::parallel_for(0, O, grain_for(row_bytes * N), [&](int64_t o0, int64_t o1) {
      for_rows_streamed(o0, o1, [&](int64_t o) { one_row(o, 0, N); });
    });
  } else {
    at::parallel_for(0, (O + kRowsBlock - 1) / kRowsBlock, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o0 = b * kRowsBlock, o1 = std::min(O, o0 + kRowsBlock);
        for (int64_t n = 0; n < N; n += kMaxNR)  // these activation rows stay in L1 for the block
          for (int64_t o = o0; o < o1; ++o) one_row(o, n, std::min(N, n + kMaxNR));
      }
    });
  }
}
}  // namespace

// A GGUF linear validated once, for callers in C++ (fused_ops.cpp's decode plan): bq_linear's
// arithmetic on raw rows, y written ld elements apart (into a slice of a wider buffer).
namespace qwenrun {
namespace {
struct BqPrepared final : PreparedLinear {
  Weight W;
  int64_t G;
  const float* bias;
  void apply(const void* x, bool xbf16, int64_t N, void* y, int64_t ldy) const override {
#if QWENRUN_AMX
    if (N >= g_amx_min_rows) {  // many rows: the tiles, as bq_linear (rare in a decode step)
      const auto opt = torch::TensorOptions().dtype(xbf16 ? torch::kBFloat16 : torch::kFloat32);
      auto xt = torch::from_blob(const_cast<void*>(x), {N, W.K}, opt);
      auto yt = bq_linear_tiles(W, xt, G, O, bias);
      torch::from_blob(y, {N, O}, {ldy, 1}, opt).copy_(yt);
      return;
    }
#endif
    bq_gemv(W, G, O, x, xbf16, N, YWriter(y, xbf16, ldy), bias);
  }
};
}  // namespace

std::shared_ptr<PreparedLinear> bq_prepare(const torch::Tensor& q, const c10::optional<torch::Tensor>& qh,
                                           const torch::Tensor& d, const c10::optional<torch::Tensor>& sc,
                                           const c10::optional<torch::Tensor>& dm,
                                           const c10::optional<torch::Tensor>& mn, int64_t G, int64_t S, int64_t bits,
                                           int64_t zp, const c10::optional<torch::Tensor>& bias) {
  auto p = std::make_shared<BqPrepared>();
  p->W = make_weight(q, qh, d, sc, dm, mn, G, S, bits, zp);
  p->G = G, p->O = q.size(0), p->K = p->W.K;
  if (bias) TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->numel() == p->O && bias->is_contiguous(), "bad bias");
  p->bias = bias ? bias->data_ptr<float>() : nullptr;
  for (const auto* t : {&qh, &sc, &dm, &mn, &bias})
    if (t->has_value()) p->keep.push_back(**t);
  p->keep.push_back(q), p->keep.push_back(d);
  return p;
}
}  // namespace qwenrun

namespace {
// Row o of W in weight order, exactly gguf's values, into out (fp32, or bf16 rounded to nearest even)
void dequant_row(const Weight& W, int64_t G, int64_t o, float* of, uint16_t* oh, int8_t* stored, int8_t* row) {
  const int64_t K = W.K;
  alignas(32) float buf[kChunk];
  stored_ints(W, o, stored);
  permute_words(stored, row, K, G, true);  // -> weight order
  for (int64_t b = 0; b < W.nb; ++b) {
    const int64_t s = b >> W.sshift;
    const float dv = _cvtsh_ss(W.d[o * W.ldd + s]);
    const int8_t* qb = row + b * kChunk;
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
    if (oh) for (int64_t i = 0; i < kChunk; ++i) oh[b * kChunk + i] = f32_to_bf16(buf[i]);
    else std::memcpy(of + b * kChunk, buf, sizeof(buf));
  }
}

// out [n, K] fp32 / bf16: row i is W's row row_of(i)
template <typename RowOf>
void dequant_rows_into(const Weight& W, int64_t G, int64_t n, const RowOf& row_of, torch::Tensor& out) {
  const int64_t K = W.K;
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == n && out.size(1) == K &&
              (out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16), "bad out tile");
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* oh = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, n, std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, K)), [&](int64_t a, int64_t e) {
    std::vector<int8_t> stored(K), row(K);
    for (int64_t i = a; i < e; ++i)
      dequant_row(W, G, row_of(i), of ? of + i * K : nullptr, oh ? oh + i * K : nullptr, stored.data(), row.data());
  });
}
}  // namespace

// Rows r0..r1 of W, exactly as gguf's dequantization computes them, into out [r1 - r0, K]
// (fp32, or bf16 rounded to nearest even).
torch::Tensor bq_dequant(const torch::Tensor& q, const c10::optional<torch::Tensor>& qh, const torch::Tensor& d,
                         const c10::optional<torch::Tensor>& sc, const c10::optional<torch::Tensor>& dm,
                         const c10::optional<torch::Tensor>& mn, int64_t G, int64_t S, int64_t bits, int64_t zp,
                         int64_t r0, int64_t r1, torch::Tensor out) {
  const Weight W = make_weight(q, qh, d, sc, dm, mn, G, S, bits, zp);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= q.size(0), "bad row range");
  dequant_rows_into(W, G, r1 - r0, [&](int64_t i) { return r0 + i; }, out);
  return out;
}

// The rows ids[i] of W (an embedding lookup), exactly as bq_dequant, into out [len(ids), K].
torch::Tensor bq_dequant_ids(const torch::Tensor& q, const c10::optional<torch::Tensor>& qh, const torch::Tensor& d,
                             const c10::optional<torch::Tensor>& sc, const c10::optional<torch::Tensor>& dm,
                             const c10::optional<torch::Tensor>& mn, int64_t G, int64_t S, int64_t bits, int64_t zp,
                             const torch::Tensor& ids, torch::Tensor out) {
  const Weight W = make_weight(q, qh, d, sc, dm, mn, G, S, bits, zp);
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1 && ids.is_contiguous(), "ids: int64 [n] contiguous");
  const int64_t n = ids.numel(), O = q.size(0);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < O, "index ", ip[i], " is out of range for ", O, " rows");
  dequant_rows_into(W, G, n, [&](int64_t i) { return ip[i]; }, out);
  return out;
}

// Load-time repacking into the interleaved order, one pass, both cores, straight from the mapped
// file's blocks (gguf_linear.py has the same in torch ops for machines without this extension).
// src [O, nb, head + Bb] bytes (the last dimension contiguous, any strides else): each block's
// first `head` bytes (scales) are copied to heads [O, nb * head]; of the rest, groups of gb blocks,
// word m of an output group = word table[m] of the input group; a last partial group is copied.
// With find_m128, also per row whether the values hold the byte 0x80 (Q8_0's -128, which the
// GEMV's sign trick cannot take: gguf_linear routes such a tensor to the exact path).
// One pass over the mapped file on all threads (its page faults are most of a load's time).
std::vector<torch::Tensor> bq_permute_words(const torch::Tensor& src, const torch::Tensor& table, int64_t gb,
                                            const c10::optional<torch::Tensor>& table_half, int64_t head,
                                            bool find_m128) {
  TORCH_CHECK(src.dim() == 3 && src.element_size() == 1 && src.stride(2) == 1, "src must be [O, nb, B] bytes");
  TORCH_CHECK(head >= 0 && head < src.size(2), "bad head");
  const int64_t O = src.size(0), nb = src.size(1), Bb = src.size(2) - head;
  TORCH_CHECK(Bb % 4 == 0 && gb >= 1, "blocks must be whole words");
  const int64_t gw = gb * Bb / 4, wpb = Bb / 4;  // words per group, per block
  TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.numel() == gw && table.is_contiguous(), "bad table");
  const int64_t* tab = table.data_ptr<int64_t>();
  for (int64_t m = 0; m < gw; ++m) TORCH_CHECK(0 <= tab[m] && tab[m] < gw, "table out of range");
  // a last half group (gb / 2 blocks) with its own table, when given
  const int64_t* tabh = nullptr;
  if (table_half) {
    TORCH_CHECK(gb % 2 == 0 && table_half->scalar_type() == torch::kInt64 && table_half->numel() == gw / 2 &&
                table_half->is_contiguous(), "bad half table");
    tabh = table_half->data_ptr<int64_t>();
    for (int64_t m = 0; m < gw / 2; ++m) TORCH_CHECK(0 <= tabh[m] && tabh[m] < gw / 2, "half table out of range");
  }
  const int64_t so = src.stride(0), sb = src.stride(1), ng = nb / gb;
  // output word m of a group <- the bytes at this offset from the group's first block (input word
  // tab[m] = word tab[m] % wpb of block tab[m] / wpb): no staging copy of the group
  std::vector<int64_t> off(gw), offh(tabh ? gw / 2 : 0);
  for (int64_t m = 0; m < gw; ++m) off[m] = (tab[m] / wpb) * sb + 4 * (tab[m] % wpb);
  for (int64_t m = 0; m < static_cast<int64_t>(offh.size()); ++m) offh[m] = (tabh[m] / wpb) * sb + 4 * (tabh[m] % wpb);
  auto out = torch::empty({O, nb * Bb}, torch::kUInt8);
  auto heads = torch::empty({O, nb * head}, torch::kUInt8);
  auto m128 = torch::zeros({find_m128 ? O : 0}, torch::kBool);  // per row: holds the byte 0x80 (Q8_0's -128)
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src.data_ptr()) + head;
  uint8_t* d = reinterpret_cast<uint8_t*>(out.data_ptr());
  uint8_t* hd = heads.data_ptr<uint8_t>();
  bool* mf = m128.data_ptr<bool>();
  at::parallel_for(0, O, std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, nb * Bb)), [&](int64_t o0, int64_t o1) {
    auto words = [](uint8_t* dst, const uint8_t* g, const int64_t* of, int64_t n) {
      for (int64_t m = 0; m < n; ++m) std::memcpy(dst + 4 * m, g + of[m], 4);
    };
    for (int64_t o = o0; o < o1; ++o) {
      uint8_t* row = d + o * nb * Bb;
      const uint8_t* so_row = s + o * so;
      if (head)
        for (int64_t b = 0; b < nb; ++b) std::memcpy(hd + (o * nb + b) * head, so_row + b * sb - head, head);
      for (int64_t g = 0; g < ng; ++g) words(row + g * gb * Bb, so_row + g * gb * sb, off.data(), gw);
      int64_t b = ng * gb;
      if (tabh && nb - b >= gb / 2) {
        words(row + b * Bb, so_row + b * sb, offh.data(), gw / 2);
        b += gb / 2;
      }
      for (; b < nb; ++b) std::memcpy(row + b * Bb, so_row + b * sb, Bb);
      if (find_m128) {  // the row just written is in L1/L2
        const int64_t n = nb * Bb;
        __m256i hit = _mm256_setzero_si256();
        const __m256i v80 = _mm256_set1_epi8(static_cast<char>(0x80));
        int64_t i = 0;
        for (; i + 32 <= n; i += 32)
          hit = _mm256_or_si256(hit, _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)), v80));
        bool any = !_mm256_testz_si256(hit, hit);
        for (; i < n; ++i) any |= row[i] == 0x80;
        mf[o] = any;
      }
    }
  });
  return {out, heads, m128};
}

// Q6_K blocks [O, nb, 210] (ql 128, qh 64, scales 16, d 2) -> the kernels' 6-bit storage:
// q [O, K/2] nibbles and qh [O, K/4] plane, both in the interleaved order (G = 16).
std::vector<torch::Tensor> bq_pack_q6k(const torch::Tensor& src) {
  TORCH_CHECK(src.dim() == 3 && src.element_size() == 1 && src.stride(2) == 1 && src.size(2) == 210,
              "src must be Q6_K blocks [O, nb, 210]");
  const int64_t O = src.size(0), nb = src.size(1), K = nb * 256;
  auto q = torch::empty({O, K / 2}, torch::kUInt8), qh = torch::empty({O, K / 4}, torch::kUInt8);
  auto tail = torch::empty({O, nb * 18}, torch::kUInt8);  // per block: 16 int8 scales, fp16 d
  uint8_t* pt = tail.data_ptr<uint8_t>();
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src.data_ptr());
  uint8_t* pq = q.data_ptr<uint8_t>();
  uint8_t* ph = qh.data_ptr<uint8_t>();
  const int64_t so = src.stride(0), sb = src.stride(1);
  int64_t tab[32];
  for (int64_t m = 0; m < 32; ++m) tab[m] = sigma_word(m, 16, 8);
  at::parallel_for(0, O, std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, K)), [&](int64_t o0, int64_t o1) {
    uint8_t u[256], st[128];
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = s + o * so + b * sb;
        std::memcpy(pt + (o * nb + b) * 18, blk + 192, 18);
        for (int half = 0; half < 2; ++half) {  // the file's order: per 128, ql[l] low = l, high = 64 + l
          const uint8_t* ql = blk + 64 * half;
          const uint8_t* hh = blk + 128 + 32 * half;
          uint8_t* uu = u + 128 * half;
          for (int l = 0; l < 64; ++l) {
            uu[l] = ql[l] & 15;
            uu[64 + l] = ql[l] >> 4;
          }
          for (int l = 0; l < 32; ++l)
            for (int c = 0; c < 4; ++c) uu[32 * c + l] |= ((hh[l] >> (2 * c)) & 3) << 4;
        }
        for (int grp = 0; grp < 2; ++grp) {  // two groups of 128 (8 units of 16)
          for (int64_t m = 0; m < 32; ++m) std::memcpy(st + 4 * m, u + 128 * grp + 4 * tab[m], 4);
          uint8_t* oq = pq + o * (K / 2) + b * 128 + grp * 64;
          uint8_t* oh = ph + o * (K / 4) + b * 64 + grp * 32;
          for (int i = 0; i < 32; ++i) {  // nibbles per 64 stored values; plane per 128
            oq[i] = (st[i] & 15) | ((st[32 + i] & 15) << 4);
            oq[32 + i] = (st[64 + i] & 15) | ((st[96 + i] & 15) << 4);
            oh[i] = static_cast<uint8_t>((st[i] >> 4) | ((st[32 + i] >> 4) << 2) | ((st[64 + i] >> 4) << 4) |
                                         ((st[96 + i] >> 4) << 6));
          }
        }
      }
    }
  });
  return {q, qh, tail};
}

// Q5_0 / Q5_1 blocks [O, nb, 22 or 24] (fp16 d, [fp16 m,] 32-bit high-bit word, 16 nibble bytes)
// -> (q nibbles [O, K/2], qh plane [O, Plane5 bytes], heads [O, nb * (2 or 4)]): the 5-bit
// storage of gguf_linear._store in the interleaved order, from one pass over the mapped blocks
// (the torch path builds a [O, K] value tensor, permutes it, and packs it in separate passes).
// K % 64 == 0 (other rows keep int8 storage, on the torch path).
std::vector<torch::Tensor> bq_pack_q5(const torch::Tensor& src, int64_t head) {
  TORCH_CHECK(src.dim() == 3 && src.element_size() == 1 && src.stride(2) == 1 && (head == 2 || head == 4) &&
                  src.size(2) == head + 20, "src must be Q5_0 / Q5_1 blocks [O, nb, 22 / 24]");
  const int64_t O = src.size(0), nb = src.size(1), K = nb * 32;
  TORCH_CHECK(K % 64 == 0, "5-bit storage needs rows of a multiple of 64 weights");
  const Plane5 pl(K);
  auto q = torch::empty({O, K / 2}, torch::kUInt8), qh = torch::empty({O, pl.bytes(K)}, torch::kUInt8);
  auto heads = torch::empty({O, nb * head}, torch::kUInt8);
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src.data_ptr());
  uint8_t *pq = q.data_ptr<uint8_t>(), *ph = qh.data_ptr<uint8_t>(), *pd = heads.data_ptr<uint8_t>();
  const int64_t so = src.stride(0), sb = src.stride(1), ng = K / 256, nh = (K % 256) >= 128, ldh = pl.bytes(K);
  at::parallel_for(0, O, std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, K)), [&](int64_t o0, int64_t o1) {
    std::vector<uint8_t> v(K), st(K);
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t b = 0; b < nb; ++b) {  // values in weight order (gguf: byte j low nibble = j, high = 16 + j)
        const uint8_t* blk = s + o * so + b * sb;
        std::memcpy(pd + (o * nb + b) * head, blk, head);
        uint32_t hw;
        std::memcpy(&hw, blk + head, 4);
        const uint8_t* qs = blk + head + 4;
        uint8_t* vb = v.data() + 32 * b;
        for (int j = 0; j < 16; ++j) {
          vb[j] = static_cast<uint8_t>((qs[j] & 15) | (((hw >> j) & 1) << 4));
          vb[16 + j] = static_cast<uint8_t>((qs[j] >> 4) | (((hw >> (16 + j)) & 1) << 4));
        }
      }
      permute_words(reinterpret_cast<const int8_t*>(v.data()), reinterpret_cast<int8_t*>(st.data()), K, 32, false);
      uint8_t* oq = pq + o * (K / 2);
      for (int64_t c = 0; c < K / 64; ++c)  // nibbles per 64 stored values: low i, high 32 + i
        for (int i = 0; i < 32; ++i) oq[32 * c + i] = (st[64 * c + i] & 15) | ((st[64 * c + 32 + i] & 15) << 4);
      uint8_t* oh = ph + o * ldh;
      auto plane = [&](int64_t v0, int units, uint8_t* dst) {  // bit u of byte p = stored value v0 + 32 u + p
        for (int p = 0; p < 32; ++p) {
          uint8_t byte = 0;
          for (int u = 0; u < units; ++u) byte |= ((st[v0 + 32 * u + p] >> 4) & 1) << u;
          dst[p] = byte;
        }
      };
      for (int64_t g = 0; g < ng; ++g) plane(256 * g, 8, oh + 32 * g);
      if (nh) plane(256 * ng, 4, oh + 32 * ng);
      uint8_t* rest = oh + pl.rest_at;  // then per 8 stored values a byte, bit i = value i
      for (int64_t m = 256 * ng + 128 * nh, k = 0; m < K; m += 8, ++k) {
        uint8_t byte = 0;
        for (int i = 0; i < 8; ++i) byte |= ((st[m + i] >> 4) & 1) << i;
        rest[k] = byte;
      }
    }
  });
  return {q, qh, heads};
}


// The many-row tile path: "amx" (the CPU's tiles), "amx (emulated)" or "" (not built), and the
// row count from which bq_linear takes it (set_min_rows >= 0 changes it: tests, benchmarks).
std::string bq_tiles(int64_t set_min_rows) {
#if QWENRUN_AMX
  if (set_min_rows >= 0) g_amx_min_rows = std::max<int64_t>(1, set_min_rows);
  return QWENRUN_AMX == 1 ? "amx" : "amx (emulated)";
#else
  (void)set_min_rows;
  return "";
#endif
}

int64_t bq_tiles_min_rows() {
#if QWENRUN_AMX
  return g_amx_min_rows;
#else
  return -1;
#endif
}
