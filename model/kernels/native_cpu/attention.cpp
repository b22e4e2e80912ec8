// Decode attention over the paged KV cache, reading the cache blocks where they are (issue 16).
//
// The reference (model/paged_attention.py) gathers every decode sequence's blocks into one
// padded copy and runs two matmuls over it: each key and value is read, written and read
// again. Here each (sequence, KV head) pair walks its blocks in place through the plan's
// block list and mask, so each key and value is read once per step.
//
// Maths, per sequence b and KV head h with its G query heads (GQA):
//   s[g][j] = (q[g] . k[j]) * scale        for every slot j the mask admits (causal range,
//                                         sliding window; padding slots are masked)
//   m[g]    = max(sink[g], max_j s[g][j])
//   out[g]  = sum_j exp(s[g][j] - m[g]) v[j] / (exp(sink[g] - m[g]) + sum_j exp(s[g][j] - m[g]))
// the sink being one more logit in the denominator, as gpt-oss defines it. Products and
// sums are fp32; the result is rounded once to the cache's dtype. (The reference, in bf16,
// also rounds the scores and the probabilities to bf16; the difference stays inside the
// parity tests' tolerance.)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "bf16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define GPTOSS_ATTN_X86 1
#else
#define GPTOSS_ATTN_X86 0
#endif

namespace {

GPTOSS_INLINE float widen(float x) { return x; }
GPTOSS_INLINE float widen(uint16_t h) { return bf16_to_f32(h); }

// exp(x) for the softmax's x <= 0 (scores minus their maximum), vectorisable (std::exp is a
// scalar call per score, which dominated this kernel): 2^(x log2 e) split into 2^n 2^f with
// f in [-0.5, 0.5] and 2^f from Cephes' exp2f polynomial (relative error ~2e-7; coefficients
// highest degree first, shared with the 16-lane form below).
constexpr float kExp2Poly[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.f};

GPTOSS_INLINE float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float f = t - n;
  float p = kExp2Poly[0];
  for (int i = 1; i < 7; ++i) p = p * f + kExp2Poly[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

inline void narrow(float x, float* dst) { *dst = x; }
inline void narrow(float x, uint16_t* dst) { *dst = f32_to_bf16(x); }

struct Shape {
  int64_t kvh, num_blocks, bs, d, g, nblk;
};

// One (sequence, KV head): q [G][D] as fp32; kh, vh this head's cache [num_blocks][bs][D];
// blocks [nblk] physical blocks in logical order; mask [nblk * bs]; sink [G]; scratch: scores
// [G][nblk * bs], acc [G][D], row [D]; out [G][D] (the head's rows of the output token).
// Inlined into one function per ISA (below), which compiles it for that ISA's vector width.
template <typename T>
GPTOSS_INLINE void attend(const Shape& sh, const float* q, const T* kh, const T* vh, const int64_t* blocks,
                          const bool* mask, const float* sink, float scale, float* scores, float* acc,
                          float* row, T* out) {
  const int64_t n = sh.nblk * sh.bs, d = sh.d, g_count = sh.g;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float row_max[64], denom[64];  // G <= 64 (checked by the caller)
  for (int64_t g = 0; g < g_count; ++g) row_max[g] = sink[g];
  for (int64_t j = 0; j < sh.nblk; ++j) {
    const T* kb = kh + blocks[j] * sh.bs * d;
    for (int64_t s = 0; s < sh.bs; ++s) {
      const int64_t slot = j * sh.bs + s;
      if (!mask[slot]) {
        for (int64_t g = 0; g < g_count; ++g) scores[g * n + slot] = kNegInf;
        continue;
      }
      const T* key = kb + s * d;
      for (int64_t i = 0; i < d; ++i) row[i] = widen(key[i]);  // once for the G heads
      for (int64_t g = 0; g < g_count; ++g) {
        const float* qg = q + g * d;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; ++i) dot += qg[i] * row[i];
        dot *= scale;
        scores[g * n + slot] = dot;
        row_max[g] = std::max(row_max[g], dot);
      }
    }
  }
  for (int64_t g = 0; g < g_count; ++g) {
    float* sg = scores + g * n;
    const float m = row_max[g];
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t slot = 0; slot < n; ++slot) {
      const float p = mask[slot] ? exp_nonpositive(sg[slot] - m) : 0.f;  // -inf where masked
      sg[slot] = p;
      total += p;
    }
    denom[g] = total + std::exp(sink[g] - m);
  }
  std::fill(acc, acc + g_count * d, 0.f);
  for (int64_t j = 0; j < sh.nblk; ++j) {
    const T* vb = vh + blocks[j] * sh.bs * d;
    for (int64_t s = 0; s < sh.bs; ++s) {
      const int64_t slot = j * sh.bs + s;
      if (!mask[slot]) continue;
      const T* val = vb + s * d;
      for (int64_t i = 0; i < d; ++i) row[i] = widen(val[i]);
      for (int64_t g = 0; g < g_count; ++g) {
        const float p = scores[g * n + slot];
        float* ag = acc + g * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) ag[i] += p * row[i];
      }
    }
  }
  for (int64_t g = 0; g < g_count; ++g) {
    const float inv = 1.f / denom[g];
    for (int64_t i = 0; i < d; ++i) narrow(acc[g * d + i] * inv, out + g * d + i);
  }
}

}  // namespace

#if GPTOSS_ATTN_X86
// The bf16 path with AVX-512 BF16 dot products (VDPBF16PS), for head sizes that are a
// multiple of 32 and even block sizes: the fp32 path above widens every key and value and
// reduces one dot product per (key, head) in fp32 FMAs, which made bf16 decode slower than
// the reference's oneDNN matmuls (bench/attention_kernel.py). Here q . k is 32 products per
// instruction straight from the bf16 cache, and the values go in pairs of slots: each
// instruction adds p[s] v[s] + p[s+1] v[s+1] for 16 dimensions, with the probabilities rounded
// to bf16 first, as the reference's second matmul rounds them. The pairs are interleaved
// with unpacklo/hi, which permutes the dimensions within each 32 (undone when writing out).
// Masked slots are read as zeros, never as whatever the cache holds there.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
#define GPTOSS_A512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// Dimension of lane k (0..31) of a pair-interleaved accumulator chunk: lanes 0-15 come from
// unpacklo (dims 8L..8L+3 of each 128-bit lane L), lanes 16-31 from unpackhi (8L+4..8L+7).
GPTOSS_INLINE int64_t pair_lane_dim(int64_t k) {
  const int64_t half = k / 16, r = k % 16;
  return (r / 4) * 8 + half * 4 + r % 4;
}

// The 16-lane sums of a[0..7] into out[0..7], sharing the shuffles between the eight (eight
// separate horizontal sums take about three times the instructions).
GPTOSS_INLINE void reduce8(const __m512* a, float* out) {
  __m512 t[4];
  for (int i = 0; i < 4; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_ps(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm_storeu_ps(out, _mm512_castps512_ps128(w));
  _mm_storeu_ps(out + 4, _mm512_extractf32x4_ps(w, 2));
}

// exp_nonpositive on 16 lanes (same polynomial; -inf and very negative x give ~0).
GPTOSS_INLINE __m512 exp_nonpositive16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 nr = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, nr);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(nr), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Ask for a block's cache lines ahead of its use.
GPTOSS_INLINE void prefetch_block(const uint16_t* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// r[i] (16 dwords of row i) -> r[c] (dword c of rows 0..15, in row order): a 16x16 transpose.
GPTOSS_INLINE void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// The scores of 16 consecutive keys (rows of `keys`, head size 64) for 8 query heads, without a
// horizontal sum per key: the keys' bf16 pairs are transposed so that a lane holds one key, and
// each VDPBF16PS adds one pair of dimensions of 16 keys for one head (q's pair broadcast).
// Returns each head's 16 scores (times scale) in acc[g].
GPTOSS_INLINE void scores_16keys(const uint16_t* keys, const uint16_t* q, float scale, __m512* acc) {
  alignas(64) int32_t kt[32][16];  // kt[p] = dimension pair p of the 16 keys
  for (int c = 0; c < 2; ++c) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(keys + i * 64 + 32 * c);
    transpose16(r);
    for (int p = 0; p < 16; ++p) _mm512_store_si512(kt[16 * c + p], r[p]);
  }
  for (int g = 0; g < 8; ++g) acc[g] = _mm512_setzero_ps();
  for (int p = 0; p < 32; ++p) {
    const __m512bh kp = (__m512bh)_mm512_load_si512(kt[p]);
    for (int g = 0; g < 8; ++g) {
      int32_t pair;
      std::memcpy(&pair, q + g * 64 + 2 * p, 4);
      acc[g] = _mm512_dpbf16_ps(acc[g], kp, (__m512bh)_mm512_set1_epi32(pair));
    }
  }
  for (int g = 0; g < 8; ++g) acc[g] = _mm512_mul_ps(acc[g], _mm512_set1_ps(scale));
}

// q [G][D] bf16; probs: scratch [G][n] bf16 probabilities (unnormalised). GW: G known at
// compile time (gpt-oss has 8 query heads per KV head), or 0. With G fixed a head group's 8
// accumulators stay in registers; with a run-time width they went through the stack, and
// decode attention took 1.4-2.1x as long (bench/attention_kernel.py).
template <int64_t GW>
GPTOSS_A512 void attend_bf16_dot(const Shape& sh, const uint16_t* q, const uint16_t* kh, const uint16_t* vh,
                                 const int64_t* blocks, const bool* mask, const float* sink, float scale,
                                 float* scores, uint16_t* probs, uint16_t* out) {
  const int64_t n = sh.nblk * sh.bs, d = sh.d, g_count = GW ? GW : sh.g, chunks = d / 32;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float row_max[64], denom[64], dots[8];
  alignas(64) uint16_t order[32];  // order[dim] = the accumulator lane holding dim
  for (int64_t k = 0; k < 32; ++k) order[pair_lane_dim(k)] = static_cast<uint16_t>(k);
  const __m512i unpermute = _mm512_load_si512(order);
  for (int64_t g = 0; g < g_count; ++g) row_max[g] = sink[g];
  const int64_t block_bytes = sh.bs * d * 2;
  // gpt-oss's shape (8 heads per KV head, head size 64) in whole tiles of 16 keys.
  const bool tiles = GW == 8 && d == 64 && sh.bs % 16 == 0;
  __m512 tile_max[8];
  for (int64_t g = 0; g < 8; ++g) tile_max[g] = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < sh.nblk; ++j) {
    const uint16_t* kb = kh + blocks[j] * sh.bs * d;
    // Blocks lie anywhere in the cache, so the hardware prefetcher cannot guess the next one.
    if (j + 1 < sh.nblk) prefetch_block(kh + blocks[j + 1] * sh.bs * d, block_bytes);
    if (tiles) {
      for (int64_t s = 0; s < sh.bs; s += 16) {
        const int64_t slot = j * sh.bs + s;
        const __mmask16 live = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mask + slot)),
                                                  _mm_set1_epi8(1));
        __m512 acc[8];
        scores_16keys(kb + s * d, q, scale, acc);
        for (int64_t g = 0; g < 8; ++g) {
          const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), live, acc[g]);
          _mm512_storeu_ps(scores + g * n + slot, sc);
          tile_max[g] = _mm512_max_ps(tile_max[g], sc);
        }
      }
      continue;
    }
    for (int64_t s = 0; s < sh.bs; ++s) {
      const int64_t slot = j * sh.bs + s;
      if (!mask[slot]) {
        for (int64_t g = 0; g < g_count; ++g) scores[g * n + slot] = kNegInf;
        continue;
      }
      const uint16_t* key = kb + s * d;
      for (int64_t g0 = 0; g0 < g_count; g0 += 8) {
        const int64_t width = std::min<int64_t>(8, g_count - g0);
        __m512 a[8];
        for (int64_t i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512bh kc = (__m512bh)_mm512_loadu_si512(key + 32 * c);
          for (int64_t i = 0; i < width; ++i)
            a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_loadu_si512(q + (g0 + i) * d + 32 * c), kc);
        }
        reduce8(a, dots);
        for (int64_t i = 0; i < width; ++i) {
          const float dot = dots[i] * scale;
          scores[(g0 + i) * n + slot] = dot;
          row_max[g0 + i] = std::max(row_max[g0 + i], dot);
        }
      }
    }
  }
  if (tiles)
    for (int64_t g = 0; g < 8; ++g) row_max[g] = std::max(row_max[g], _mm512_reduce_max_ps(tile_max[g]));
  // Probabilities 16 slots at a time (n is a whole number of even blocks; masked slots and
  // the -inf scores they hold give 0).
  for (int64_t g = 0; g < g_count; ++g) {
    const float* sg = scores + g * n;
    uint16_t* pg = probs + g * n;
    const __m512 m = _mm512_set1_ps(row_max[g]);
    __m512 total = _mm512_setzero_ps();
    int64_t slot = 0;
    for (; slot + 16 <= n; slot += 16) {
      const __mmask16 live = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mask + slot)),
                                                _mm_set1_epi8(1));
      const __m512 p = _mm512_maskz_mov_ps(live, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(sg + slot), m)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pg + slot), (__m256i)_mm512_cvtneps_pbh(p));
      total = _mm512_add_ps(total, p);
    }
    float rest = 0.f;
    for (; slot < n; ++slot) {
      const float p = mask[slot] ? exp_nonpositive(sg[slot] - row_max[g]) : 0.f;
      pg[slot] = f32_to_bf16(p);
      rest += p;
    }
    denom[g] = _mm512_reduce_add_ps(total) + rest + std::exp(sink[g] - row_max[g]);
  }
  // The values, one 32-dimension chunk and up to 8 heads at a time, so that the 16
  // accumulators stay in registers while every slot pair passes.
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t g0 = 0; g0 < g_count; g0 += 8) {
      const int64_t width = std::min<int64_t>(8, g_count - g0);
      __m512 lo_acc[8], hi_acc[8];
      for (int64_t i = 0; i < 8; ++i) lo_acc[i] = hi_acc[i] = _mm512_setzero_ps();
      for (int64_t j = 0; j < sh.nblk; ++j) {
        const uint16_t* vb = vh + blocks[j] * sh.bs * d + 32 * c;
        if (j + 1 < sh.nblk && g0 == 0) prefetch_block(vh + blocks[j + 1] * sh.bs * d, block_bytes);
        for (int64_t s = 0; s < sh.bs; s += 2) {
          const int64_t slot = j * sh.bs + s;
          const bool m0 = mask[slot], m1 = mask[slot + 1];
          if (!m0 && !m1) continue;
          const __m512i v0 = _mm512_maskz_loadu_epi16(m0 ? ~__mmask32(0) : 0, vb + s * d);
          const __m512i v1 = _mm512_maskz_loadu_epi16(m1 ? ~__mmask32(0) : 0, vb + (s + 1) * d);
          const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(v0, v1);
          const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
          for (int64_t i = 0; i < width; ++i) {
            uint32_t pair;  // p[slot] in the low half, p[slot + 1] in the high half
            std::memcpy(&pair, probs + (g0 + i) * n + slot, 4);
            const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            lo_acc[i] = _mm512_dpbf16_ps(lo_acc[i], p, lo);
            hi_acc[i] = _mm512_dpbf16_ps(hi_acc[i], p, hi);
          }
        }
      }
      // Normalise, round to bf16 (nearest even) and put the dimensions back in order.
      for (int64_t i = 0; i < width; ++i) {
        const __m512 inv = _mm512_set1_ps(1.f / denom[g0 + i]);
        const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi_acc[i], inv),
                                                            _mm512_mul_ps(lo_acc[i], inv));
        _mm512_storeu_si512(out + (g0 + i) * d + 32 * c, _mm512_permutexvar_epi16(unpermute, packed));
      }
    }
  }
}

GPTOSS_A512 void gptoss_attend_bf16_dot(const Shape& sh, const uint16_t* q, const uint16_t* kh, const uint16_t* vh,
                                        const int64_t* blocks, const bool* mask, const float* sink, float scale,
                                        float* scores, uint16_t* probs, uint16_t* out) {
  if (sh.g == 8)
    attend_bf16_dot<8>(sh, q, kh, vh, blocks, mask, sink, scale, scores, probs, out);
  else
    attend_bf16_dot<0>(sh, q, kh, vh, blocks, mask, sink, scale, scores, probs, out);
}
#pragma GCC pop_options
#endif

// One clone per ISA, picked once at load by the CPU's features (GCC's function multiversioning).
#define GPTOSS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
GPTOSS_CLONES void gptoss_attend_f32(const Shape& sh, const float* q, const float* kh, const float* vh,
                                     const int64_t* blocks, const bool* mask, const float* sink, float scale,
                                     float* scores, float* acc, float* row, float* out) {
  attend<float>(sh, q, kh, vh, blocks, mask, sink, scale, scores, acc, row, out);
}
GPTOSS_CLONES void gptoss_attend_bf16(const Shape& sh, const float* q, const uint16_t* kh, const uint16_t* vh,
                                      const int64_t* blocks, const bool* mask, const float* sink, float scale,
                                      float* scores, float* acc, float* row, uint16_t* out) {
  attend<uint16_t>(sh, q, kh, vh, blocks, mask, sink, scale, scores, acc, row, out);
}

namespace {

inline void attend_isa(const Shape& sh, const float* q, const float* kh, const float* vh, const int64_t* blocks,
                       const bool* mask, const float* sink, float scale, float* scores, float* acc, float* row,
                       float* out) {
  gptoss_attend_f32(sh, q, kh, vh, blocks, mask, sink, scale, scores, acc, row, out);
}
inline void attend_isa(const Shape& sh, const float* q, const uint16_t* kh, const uint16_t* vh,
                       const int64_t* blocks, const bool* mask, const float* sink, float scale, float* scores,
                       float* acc, float* row, uint16_t* out) {
  gptoss_attend_bf16(sh, q, kh, vh, blocks, mask, sink, scale, scores, acc, row, out);
}

template <typename T>
void run(const Shape& sh, const T* q, const T* kc, const T* vc, const int64_t* rows, const int64_t* blocks,
         const bool* mask, const float* sinks, float scale, int64_t b_count, int64_t heads, bool bf16_dot, T* out) {
  const int64_t d = sh.d, n = sh.nblk * sh.bs;
  at::parallel_for(0, b_count * sh.kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(sh.g * d), scores(sh.g * n), acc(sh.g * d), row(d);
    std::vector<uint16_t> probs(bf16_dot ? sh.g * n : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / sh.kvh, h = item % sh.kvh;
      const int64_t head0 = h * sh.g;
      const T* qrow = q + (rows[b] * heads + head0) * d;
      const int64_t head_stride = sh.num_blocks * sh.bs * d;
#if GPTOSS_ATTN_X86
      if constexpr (std::is_same_v<T, uint16_t>) {
        if (bf16_dot) {
          gptoss_attend_bf16_dot(sh, qrow, kc + h * head_stride, vc + h * head_stride, blocks + b * sh.nblk,
                                 mask + b * n, sinks + head0, scale, scores.data(), probs.data(),
                                 out + (rows[b] * heads + head0) * d);
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < sh.g * d; ++i) qf[i] = widen(qrow[i]);
      attend_isa(sh, qf.data(), kc + h * head_stride, vc + h * head_stride, blocks + b * sh.nblk, mask + b * n,
                 sinks + head0, scale, scores.data(), acc.data(), row.data(), out + (rows[b] * heads + head0) * d);
    }
  });
}

void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& rows, const at::Tensor& blocks, const at::Tensor& mask,
                            const at::Tensor& sinks, double sm_scale, bool bf16_dot, at::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [T, H, D] tensor");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q must be fp32 or bf16");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "the caches must have q's dtype");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "caches must be contiguous [KVH, blocks, block_size, D]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(),
              "out must be contiguous, with q's shape and dtype");
  const int64_t heads = q.size(1), d = q.size(2), kvh = k_cache.size(0);
  TORCH_CHECK(k_cache.size(3) == d && kvh > 0 && heads % kvh == 0 && heads / kvh <= 64,
              "head dims must match, with at most 64 query heads per KV head");
  const int64_t b_count = rows.numel();
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be contiguous int64");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.is_contiguous(), "blocks must be contiguous int64");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == b_count && mask.is_contiguous(),
              "mask must be a contiguous bool [B, slots] tensor");
  TORCH_CHECK(sinks.scalar_type() == at::kFloat && sinks.numel() == heads && sinks.is_contiguous(),
              "sinks must be contiguous fp32 [H]");
  if (b_count == 0) return;
  const int64_t bs = k_cache.size(2);
  TORCH_CHECK(blocks.numel() % b_count == 0 && mask.size(1) == blocks.numel() / b_count * bs,
              "blocks must be [B * NBLK] and mask [B, NBLK * block_size]");
  const Shape sh{kvh, k_cache.size(1), bs, d, heads / kvh, blocks.numel() / b_count};
  const int64_t* blk = blocks.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < blocks.numel(); ++i)
    TORCH_CHECK(blk[i] >= 0 && blk[i] < sh.num_blocks, "block index out of range");
  for (int64_t b = 0; b < b_count; ++b) TORCH_CHECK(row[b] >= 0 && row[b] < q.size(0), "row out of range");
  const float scale = static_cast<float>(sm_scale);
  if (q.scalar_type() == at::kFloat) {
    run<float>(sh, q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), row, blk,
               mask.data_ptr<bool>(), sinks.data_ptr<float>(), scale, b_count, heads, false, out.data_ptr<float>());
  } else {
    auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); };
    // The dot-product path needs whole 32-wide chunks of a head and slots in pairs.
    const bool dot = bf16_dot && GPTOSS_ATTN_X86 && d % 32 == 0 && bs % 2 == 0;
    run<uint16_t>(sh, u16(q), u16(k_cache), u16(v_cache), row, blk, mask.data_ptr<bool>(), sinks.data_ptr<float>(),
                  scale, b_count, heads, dot, reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptoss_native, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor blocks, "
      "Tensor mask, Tensor sinks, float sm_scale, bool bf16_dot, Tensor(a!) out) -> ()",
      &paged_decode_attention);
}
