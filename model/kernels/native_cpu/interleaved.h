// What linear.cpp, head.cpp and moe.cpp share: linear_interleaved's weight layout, its products
// (one or two rows streamed, a register tile from three), and the argmax merge in torch's order.
// head.cpp recomputes a group with the very product linear_interleaved uses at the same row
// count, so its tokens are bit for bit that kernel's; moe.cpp runs the register tile on experts
// decoded into that layout.
#pragma once

#include "bf16.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#define GPTOSS_LINEAR_X86 1
#else
#define GPTOSS_LINEAR_X86 0
#endif

namespace gptoss {

// The argmax so far of one row: torch.argmax's order (NaN above every number, ties to the
// first index), so merging the per-thread results in any order gives torch's answer.
struct Best {
  float value = -std::numeric_limits<float>::infinity();
  int64_t index = -1;
  bool nan = false;

  void offer(float v, int64_t i) {
    const bool vn = std::isnan(v);
    bool take;
    if (index < 0) {
      take = true;
    } else if (vn != nan) {
      take = vn;
    } else if (vn || v == value) {
      take = i < index;
    } else {
      take = v > value;
    }
    if (take) {
      value = v;
      index = i;
      nan = vn;
    }
  }
};

#if GPTOSS_LINEAR_X86
#define GPTOSS_LT512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// linear_interleaved's weight: P[g][k][r][2] = W[16 g + r][2 k + {0, 1}], rows past O zero
// (packed once at load by native_cpu.InterleavedLinear). One 64-byte load is a bf16 pair of 16
// output rows, which VDPBF16PS multiplies by one broadcast pair of x: a lane accumulates one
// output, so no horizontal sums, and a group's weights (32 H bytes) stay in L1/L2 while every
// row of x passes over them, read from memory once per call.

// The weight line kAheadLines past p, asked for with the non-temporal hint. A decode step
// streams every weight once (6 GB on the 20b at batch 4); with plain loads those lines fill the
// caches and evict what the step's small ops (norms, RoPE, the router, the Python around them)
// read again, which then come from memory: on the 20b's batch-4 decode, with this hint here and
// in moe.cpp, RMSNorm took 1.5 against 2.9 ms a step and the forward 195 against 207 ms
// (AMD EPYC, 2026-12-08, through a run-time switch in one process; the builds as shipped,
// process against process, differed by less than the noise); prefill (compute-bound) no
// different.
// moe.cpp's packed tiles ask the same way for their blocks (prefetch_ahead).
constexpr int64_t kAheadLines = 16;
GPTOSS_INLINE void prefetch_nta(const void* line) {
  _mm_prefetch(static_cast<const char*>(line), _MM_HINT_NTA);
}
GPTOSS_INLINE void prefetch_ahead_nta(const uint16_t* p) { prefetch_nta(p + kAheadLines * 32); }

// acc += pairs(w) . broadcast(pair at x), the broadcast folded into the instruction.
GPTOSS_LT512 GPTOSS_INLINE void dpbf16_broadcast(__m512& acc, __m512i w, const uint16_t* x) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(x)));
}

// One or two rows of x against one group of 16 outputs; CH partial sums per row hide the
// VDPBF16PS latency.
template <int NB>
GPTOSS_LT512 GPTOSS_INLINE void group_rows(const uint16_t* P, int64_t K2, const uint16_t* x, int64_t ldx,
                                           __m512* acc) {
  constexpr int CH = NB == 1 ? 4 : 2;
  __m512 part[NB][CH];
  for (int n = 0; n < NB; ++n)
    for (int c = 0; c < CH; ++c) part[n][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + CH <= K2; k += CH)
    for (int c = 0; c < CH; ++c) {
      const __m512i w = _mm512_loadu_si512(P + (k + c) * 32);
      prefetch_ahead_nta(P + (k + c) * 32);
      for (int n = 0; n < NB; ++n) dpbf16_broadcast(part[n][c], w, x + n * ldx + 2 * (k + c));
    }
  for (; k < K2; ++k) {
    const __m512i w = _mm512_loadu_si512(P + k * 32);
    for (int n = 0; n < NB; ++n) dpbf16_broadcast(part[n][0], w, x + n * ldx + 2 * k);
  }
  for (int n = 0; n < NB; ++n) {
    __m512 sum = part[n][0];
    for (int c = 1; c < CH; ++c) sum = _mm512_add_ps(sum, part[n][c]);
    acc[n] = sum;
  }
}

// Three rows of x or more: the product is compute-bound, so a register tile of NR rows x NG
// groups (NR * NG accumulators) shares each x broadcast across NG groups and each weight load
// across NR rows, as a GEMM microkernel does.
template <int NR, int NG>
GPTOSS_LT512 GPTOSS_INLINE void tile_rows(const uint16_t* P, int64_t K2, const uint16_t* x, int64_t ldx,
                                          __m512 (*acc)[4]) {
  __m512 a[NR][NG];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NG; ++j) a[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512i w[NG];
    for (int j = 0; j < NG; ++j) w[j] = _mm512_loadu_si512(P + (j * K2 + k) * 32);
    for (int j = 0; j < NG; ++j) prefetch_ahead_nta(P + (j * K2 + k) * 32);
    for (int r = 0; r < NR; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * k, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NG; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], (__m512bh)w[j], xb);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NG; ++j) acc[r][j] = a[r][j];
}

// tile_rows for nr (1 to 6) rows of x.
template <int NG>
GPTOSS_LT512 inline void tile_dispatch(int nr, const uint16_t* P, int64_t K2, const uint16_t* x, int64_t ldx,
                                       __m512 (*acc)[4]) {
  switch (nr) {
    case 6: tile_rows<6, NG>(P, K2, x, ldx, acc); break;
    case 5: tile_rows<5, NG>(P, K2, x, ldx, acc); break;
    case 4: tile_rows<4, NG>(P, K2, x, ldx, acc); break;
    case 3: tile_rows<3, NG>(P, K2, x, ldx, acc); break;
    case 2: tile_rows<2, NG>(P, K2, x, ldx, acc); break;
    default: tile_rows<1, NG>(P, K2, x, ldx, acc); break;
  }
}

#endif  // GPTOSS_LINEAR_X86

}  // namespace gptoss
