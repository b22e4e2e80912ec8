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
#include <vector>

namespace {

GPTOSS_INLINE float widen(float x) { return x; }
GPTOSS_INLINE float widen(uint16_t h) { return bf16_to_f32(h); }

// exp(x) for the softmax's x <= 0 (scores minus their maximum), vectorisable (std::exp is a
// scalar call per score, which dominated this kernel): 2^(x log2 e) split into 2^n 2^f with
// f in [-0.5, 0.5] and 2^f from Cephes' exp2f polynomial (relative error ~2e-7).
GPTOSS_INLINE float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
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
         const bool* mask, const float* sinks, float scale, int64_t b_count, int64_t heads, T* out) {
  const int64_t d = sh.d, n = sh.nblk * sh.bs;
  at::parallel_for(0, b_count * sh.kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(sh.g * d), scores(sh.g * n), acc(sh.g * d), row(d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / sh.kvh, h = item % sh.kvh;
      const int64_t head0 = h * sh.g;
      const T* qrow = q + (rows[b] * heads + head0) * d;
      for (int64_t i = 0; i < sh.g * d; ++i) qf[i] = widen(qrow[i]);
      const int64_t head_stride = sh.num_blocks * sh.bs * d;
      attend_isa(sh, qf.data(), kc + h * head_stride, vc + h * head_stride, blocks + b * sh.nblk, mask + b * n,
                 sinks + head0, scale, scores.data(), acc.data(), row.data(), out + (rows[b] * heads + head0) * d);
    }
  });
}

void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& rows, const at::Tensor& blocks, const at::Tensor& mask,
                            const at::Tensor& sinks, double sm_scale, at::Tensor& out) {
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
               mask.data_ptr<bool>(), sinks.data_ptr<float>(), scale, b_count, heads, out.data_ptr<float>());
  } else {
    auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); };
    run<uint16_t>(sh, u16(q), u16(k_cache), u16(v_cache), row, blk, mask.data_ptr<bool>(), sinks.data_ptr<float>(),
                  scale, b_count, heads, reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptoss_native, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor blocks, "
      "Tensor mask, Tensor sinks, float sm_scale, Tensor(a!) out) -> ()",
      &paged_decode_attention);
}
