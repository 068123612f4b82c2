// Decode attention straight over an int8 KV cache (AVX2), for qwenrun/engine/kv_cache.py.
//
// Cache layout (one layer): K and V int8 [S, Hkv, d] (S = pool slots), scales fp32 [S, Hkv, G]
// with one scale per group of d/G channels: k = k_int8 * scale. Each decode query (one token per
// sequence) attends the slots listed for its sequence, with no dequantized copy of the context:
// every K/V row is converted to fp32 once, in registers/L1, and reused by the query heads that
// share it (GQA). Dequantize-then-SDPA costs three passes over a context twice the size; at
// long context that dominated decode (Qwen1.5-4B shapes, 8K context: 4.7 s per token before).
//
// Work split: one task per (sequence, KV head); the scores of its query heads live in a
// per-task buffer; softmax is exact (max-subtracted) in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 128;  // context positions per work item

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8_i8(const int8_t* x) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
}

// sum_g scale[g] * (q[g-th group] . k[g-th group]) for one head row (d % 8 == 0, gs % 8 == 0).
inline float qk_dot(const float* q, const int8_t* k, const float* scale, int64_t d, int64_t gs) {
  __m256 total = _mm256_setzero_ps();
  for (int64_t g0 = 0, gi = 0; g0 < d; g0 += gs, ++gi) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = g0; i < g0 + gs; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8_i8(k + i), acc);
    total = _mm256_fmadd_ps(acc, _mm256_set1_ps(scale[gi]), total);
  }
  return hsum8(total);
}

// y[0:d] += p * scale[group] * v[0:d]
inline void pv_axpy(float p, const int8_t* v, const float* scale, int64_t d, int64_t gs, float* y) {
  for (int64_t g0 = 0, gi = 0; g0 < d; g0 += gs, ++gi) {
    const __m256 a = _mm256_set1_ps(p * scale[gi]);
    for (int64_t i = g0; i < g0 + gs; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, load8_i8(v + i), _mm256_loadu_ps(y + i)));
  }
}

}  // namespace

// q [B, H, d] fp32; k, v int8 [S, Hkv, d]; ks, vs fp32 [S, Hkv, G]; slots int64 [B, L];
// lens int64 [B] (context length incl. the new token); window <= 0: full causal.
// Returns [B, H, d] fp32.
//
// Three parallel phases, so that each thread streams whole slots (all heads of a position are
// adjacent in memory) rather than one head's strided rows: (1) scores for chunks of positions,
// (2) softmax statistics per (sequence, head), (3) weighted V sums per chunk, reduced per sequence.
torch::Tensor int8kv_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor ks,
                                      torch::Tensor vs, torch::Tensor slots, torch::Tensor lens,
                                      int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(), "q: fp32 [B, H, d]");
  TORCH_CHECK(k.scalar_type() == torch::kInt8 && v.scalar_type() == torch::kInt8, "k, v: int8");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && ks.is_contiguous() && vs.is_contiguous(), "contiguous cache");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.dim() == 2, "slots: int64 [B, L]");
  TORCH_CHECK(lens.scalar_type() == torch::kInt64 && lens.numel() == q.size(0), "lens: int64 [B]");
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2);
  const int64_t S = k.size(0), Hkv = k.size(1), G = ks.size(2), L = slots.size(1);
  TORCH_CHECK(k.size(2) == d && H % Hkv == 0 && d % G == 0, "shape mismatch");
  const int64_t g = H / Hkv, gs = d / G;
  TORCH_CHECK(d % 8 == 0 && gs % 8 == 0, "head_dim and scale groups must be multiples of 8");
  const int8_t* kp = k.data_ptr<int8_t>();
  const int8_t* vp = v.data_ptr<int8_t>();
  const float* ksp = ks.data_ptr<float>();
  const float* vsp = vs.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  const float sc = static_cast<float>(scale);

  // Work items: (sequence, chunk of positions), with each sequence's visible range.
  std::vector<int64_t> first(B), count(B), item_b, item_j0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = std::min<int64_t>(lp[b], L);
    first[b] = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    count[b] = std::max<int64_t>(0, len - first[b]);
    for (int64_t j = 0; j < count[b]; j += kChunk) {
      item_b.push_back(b);
      item_j0.push_back(j);
    }
    for (int64_t j = first[b]; j < first[b] + count[b]; ++j)
      TORCH_CHECK(sp[b * L + j] >= 0 && sp[b * L + j] < S, "slot out of range");
  }
  const int64_t items = static_cast<int64_t>(item_b.size());
  std::vector<float> scores(B * H * L, 0.f);  // [B, H, L]: logits, then probabilities
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = item_b[it], j1 = std::min(count[b], item_j0[it] + kChunk);
      for (int64_t j = item_j0[it]; j < j1; ++j) {
        const int64_t s = sp[b * L + first[b] + j];
        for (int64_t h = 0; h < H; ++h) {
          const int64_t hk = h / g;
          scores[(b * H + h) * L + j] =
              qk_dot(qp + (b * H + h) * d, kp + (s * Hkv + hk) * d, ksp + (s * Hkv + hk) * G, d, gs) * sc;
        }
      }
    }
  });
  std::vector<float> inv(B * H, 0.f);
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = count[r / H];
      if (n == 0) continue;
      float* x = scores.data() + r * L;
      const float m = *std::max_element(x, x + n);
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - m));
      inv[r] = 1.f / sum;
    }
  });
  std::vector<float> partial(items * H * d, 0.f);  // per work item: [H, d]
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = item_b[it], j1 = std::min(count[b], item_j0[it] + kChunk);
      float* acc = partial.data() + it * H * d;
      for (int64_t j = item_j0[it]; j < j1; ++j) {
        const int64_t s = sp[b * L + first[b] + j];
        for (int64_t h = 0; h < H; ++h) {
          const int64_t hk = h / g;
          pv_axpy(scores[(b * H + h) * L + j], vp + (s * Hkv + hk) * d, vsp + (s * Hkv + hk) * G, d, gs,
                  acc + h * d);
        }
      }
    }
  });
  auto out = torch::zeros({B, H, d}, q.options());
  float* op = out.data_ptr<float>();
  for (int64_t it = 0; it < items; ++it) {  // reduce the chunks of each sequence
    const int64_t b = item_b[it];
    const float* acc = partial.data() + it * H * d;
    float* o = op + b * H * d;
    for (int64_t e = 0; e < H * d; ++e) o[e] += acc[e];
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t e = 0; e < d; ++e) op[(b * H + h) * d + e] *= inv[b * H + h];
  return out;
}
