// Native CPU kernel for gpt-oss's mixture of experts with MXFP4 experts used packed (issue 16).
//
// Weights are never rebuilt as dense matrices: each output row group streams its packed
// nibbles once per step and decodes them in registers (or into a 1 KB tile that stays in L1).
//
// Layout (built once by PackedExperts in __init__.py from the checkpoint's [E, rows, G, 16]):
//   w[e][rg][g][p][n] = blocks[e][16*rg + n][g][p]   (uint8: 16 rows interleaved per byte column)
//   s[e][rg][g][n]    = scales[e][16*rg + n][g]      (uint8 E8M0)
// so one 16-byte load is byte p of block g for 16 consecutive output rows: after a zero
// extension to 16 dwords, lane n holds the two weights (2p, 2p+1) of row n (low nibble
// first), which is both a row of an AMX B tile and a bf16 pair for VDPBF16PS.
//
// Activations enter as bf16 "virtual rows": a bf16 token is one row; an fp32 token is split
// exactly into three bf16 rows (hi + mid + lo == x), whose products are summed in fp32, so
// fp32 inputs keep fp32 accuracy. Every accumulation is fp32.
//
// Paths, chosen per call from the CPU's features (cpu_isa) and capped by the caller:
//   0 generic      portable C++ (fp32 multiply-add on dequantized 32x16 blocks)
//   1 avx2         the same source compiled for AVX2+FMA
//   2 avx512_bf16  nibbles -> bf16 through a VPERMW table, VDPBF16PS, per-block fp32 scale
//   3 avx512_vnni  bf16 activations only (fp32 stays on avx512_bf16): activations as two
//                  int8 digits per 32-block, nibbles -> int8 through a VPSHUFB table, VPDPBUSD
//                  (llama.cpp's MXFP4 x Q8_0 dot product, plus a second digit for bf16
//                  accuracy); a third of the instructions per weight byte
//   4 amx          AMX-BF16 tiles for experts with many rows (scales folded into the bf16
//                  exponent, valid when every scale byte is in [2, 252]); avx512_vnni below
// Without AMX, an expert with many rows (tile_min_rows) has each row group decoded once into
// bf16, scales folded the same way, and multiplied by linear_interleaved's register tile
// (k512::tile_decoded): a dense bf16 product, where the paths above decode again per 8 rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "bf16.h"
#include "interleaved.h"
#include "runs.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#define GPTOSS_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define GPTOSS_X86 0
#endif

#if GPTOSS_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
// SLEEF's 16-lane exp (within 1 ulp), torch's copy: libtorch_cpu exports it, and the sleef.h
// torch ships declares it only to files compiled for AVX-512 throughout. torch's own vectorised
// exp is this function.
extern "C" __m512 Sleef_expf16_u10avx512f(__m512);
#pragma GCC pop_options
#endif

namespace {

constexpr int kRows = 16;         // output rows per group
constexpr int kBlock = 32;        // values per MXFP4 block
constexpr int kGroupBytes = 256;  // one block of one row group: 16 byte columns x 16 rows
constexpr int kMaxTokensPerChunk = 1024;
constexpr int64_t kQuad = 4;  // row groups per work item: the decoded tile's width

enum Isa : int64_t { kGeneric = 0, kAvx2 = 1, kAvx512Bf16 = 2, kAvx512Vnni = 3, kAmx = 4 };

// Splits x exactly into `ns` bf16 values (ns = 1: rounded; ns = 3: hi + mid + lo == x, each
// part the truncation of what is left, so every part is exact in bf16).
inline void split_bf16(float x, int ns, uint16_t* dst, int64_t stride) {
  if (ns == 1) {
    dst[0] = f32_to_bf16(x);
    return;
  }
  float rest = x;
  for (int s = 0; s < ns; ++s) {
    const uint32_t hi = f32_bits(rest) & 0xFFFF0000u;
    dst[s * stride] = static_cast<uint16_t>(hi >> 16);
    rest -= bits_f32(hi);
  }
}

constexpr double kFp4[16] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                             -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0};

// Every (scale byte, nibble) pair decoded to fp32: FP4 * 2^(s-127) computed in float64 (exact)
// and rounded once, as model/mxfp4.py does.
struct DequantTable {
  float v[256][16];
  DequantTable() {
    for (int s = 0; s < 256; ++s)
      for (int n = 0; n < 16; ++n) v[s][n] = static_cast<float>(kFp4[n] * std::ldexp(1.0, s - 127));
  }
};

const DequantTable& dequant_table() {
  static const DequantTable table;
  return table;
}

// The clamped SwiGLU of mlp1's output (model.layers.swiglu): h interleaves gate (even) and up
// (odd); gate is clamped above, up both sides and gets + 1.
inline float swiglu(float gate, float up, float alpha, float limit) {
  gate = std::min(gate, limit);
  up = std::max(std::min(up, limit), -limit) + 1.0f;
  const float sig = 1.0f / (1.0f + std::exp(-(gate * alpha)));
  return sig * gate * up;
}

// mlp1's epilogue for n tokens and one row group: C [n * ns][16] (each token's ns virtual rows)
// summed, plus the bias, then the 8 gate/up pairs through the SwiGLU into dst (token j at
// dst + j * ns * ld, its ns bf16 parts ld apart).
void swiglu_rows(const float* C, int64_t n, int ns, const float* bias, float alpha, float limit, uint16_t* dst,
                 int64_t ld) {
  for (int64_t j = 0; j < n; ++j) {
    float h[kRows];
    for (int c = 0; c < kRows; ++c) {
      float v = C[(j * ns) * kRows + c];
      for (int s = 1; s < ns; ++s) v += C[(j * ns + s) * kRows + c];
      h[c] = v + bias[c];
    }
    for (int c = 0; c < kRows / 2; ++c)
      split_bf16(swiglu(h[2 * c], h[2 * c + 1], alpha, limit), ns, dst + j * ns * ld + c, ld);
  }
}

namespace generic {
#include "tile_generic.h"
}  // namespace generic

#if GPTOSS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "tile_generic.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

}  // namespace

#if GPTOSS_X86
namespace {

// FP4 E2M1 as bf16 bits, twice (VPERMW reads 5 index bits; bit 4 is the next nibble's lowest
// bit, which the duplicate table ignores).
#define GPTOSS_FP4_BF16                                                                        \
  0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0, 0x8000, 0xBF00, 0xBF80, 0xBFC0, \
      0xC000, 0xC040, 0xC080, 0xC0C0

alignas(64) const uint16_t kFp4Bf16x2[32] = {GPTOSS_FP4_BF16, GPTOSS_FP4_BF16};

// Asks for the block kPrefetchBlocks ahead of wg. The packed tiles compute for long enough
// between a block's loads that the hardware prefetcher alone falls behind the stream: with this
// hint, a 20b-shaped MoE at 1 to 8 tokens ran 12-19% faster, and at 256 tokens no slower; in
// the engine, the 20b's batch-4 decode spent 11% less in the MoE (bench/RESULTS.md). The hint
// is interleaved.h's non-temporal one, as linear_interleaved's: weights read once a step then
// leave the caches first, instead of evicting what the step's small ops read again.
constexpr int kPrefetchBlocks = 8;
GPTOSS_INLINE void prefetch_ahead(const uint8_t* wg) {
  const uint8_t* p = wg + kPrefetchBlocks * kGroupBytes;
#pragma GCC unroll 4
  for (int c = 0; c < kGroupBytes; c += 64) gptoss::prefetch_nta(p + c);
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
#define GPTOSS_T512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

namespace k512 {

// 16 bytes (byte column p of one block, 16 rows) -> 16 bf16 pairs, one per row.
GPTOSS_T512 __attribute__((always_inline)) inline __m512i decode(const uint8_t* src, __m512i table,
                                                                  __m512i* index) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  // Low word: the byte (low nibble in bits 0-3); high word: the high nibble in bits 0-3.
  *index = _mm512_or_si512(d, _mm512_slli_epi32(d, 12));
  return _mm512_permutexvar_epi16(*index, table);
}

// The 16 rows' E8M0 scale bytes of one block as fp32 2^(s-127) (255 -> inf; 0 -> 2^-127, a
// subnormal the exponent field cannot hold).
GPTOSS_T512 __attribute__((always_inline)) inline __m512 block_scales(const uint8_t* s) {
  const __m512i sb = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(sb, 23));
  return _mm512_mask_mov_ps(scale, _mm512_testn_epi32_mask(sb, sb), _mm512_set1_ps(0x1p-127f));
}

// NT virtual rows against one row group: per block, the 16 bf16 pair-products accumulate in
// fp32 with VDPBF16PS, then one FMA applies the 16 rows' scales. With few rows, CH
// independent partial sums per row hide the VDPBF16PS latency.
template <int NT>
GPTOSS_T512 __attribute__((always_inline)) inline void dp_rows(const uint8_t* W, const uint8_t* S, int G,
                                                                const uint16_t* A, int64_t lda, float* C) {
  constexpr int CH = NT == 1 ? 4 : (NT <= 3 ? 2 : 1);
  const __m512i table = _mm512_load_si512(kFp4Bf16x2);
  __m512 acc[NT];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int g = 0; g < G; ++g) {
    const uint8_t* wg = W + static_cast<int64_t>(g) * kGroupBytes;
    const uint16_t* ag = A + static_cast<int64_t>(g) * kBlock;
    prefetch_ahead(wg);
    __m512 part[NT][CH];
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
      for (int c = 0; c < CH; ++c) part[t][c] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int p = 0; p < kBlock / 2; ++p) {
      __m512i index;
      const __m512i w = decode(wg + p * kRows, table, &index);
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        int32_t pair;
        std::memcpy(&pair, ag + t * lda + 2 * p, 4);
        part[t][p % CH] = _mm512_dpbf16_ps(part[t][p % CH], (__m512bh)w, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
    const __m512 scale = k512::block_scales(S + g * kRows);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      __m512 sum = part[t][0];
#pragma GCC unroll 4
      for (int c = 1; c < CH; ++c) sum = _mm512_add_ps(sum, part[t][c]);
      acc[t] = _mm512_fmadd_ps(sum, scale, acc[t]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(C + t * kRows, acc[t]);
}

// One block of a row group decoded to bf16 with the scale folded in: a nonzero bf16 FP4 value
// times 2^(s-127) is the same value with s-127 added to its exponent field (exact, and in
// range for s in [2, 252], which PackedExperts checks: scales_foldable). The 16 stores of 64 bytes are
// pairs (2p, 2p+1) of 16 rows: an AMX B tile, and linear_interleaved's weight layout.
GPTOSS_T512 __attribute__((always_inline)) inline void decode_block(const uint8_t* wg, const uint8_t* sg,
                                                                     uint16_t* dst) {
  const __m512i table = _mm512_load_si512(kFp4Bf16x2);
  const __m512i magnitude = _mm512_set1_epi16(0x0007);
  __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg)));
  e = _mm512_and_si512(_mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(127)), 7),
                       _mm512_set1_epi32(0xFFFF));
  const __m512i exponent = _mm512_or_si512(e, _mm512_slli_epi32(e, 16));
#pragma GCC unroll 16
  for (int p = 0; p < kBlock / 2; ++p) {
    __m512i index;
    __m512i w = decode(wg + p * kRows, table, &index);
    w = _mm512_mask_add_epi16(w, _mm512_test_epi16_mask(index, magnitude), w, exponent);
    _mm512_store_si512(dst + p * 32, w);
  }
}

// Many rows against NG consecutive row groups (compute-bound): each row group decoded once into
// bf16 [K/2][16][2] (scales folded), then linear_interleaved's tile of 6 rows x NG groups over
// them. C is [NG][R][16]. Measured against the int8 two-digit path (2 cores, AVX-512 VNNI):
// 12-15% faster at 128 rows per expert on the 20b's shapes, even at 32, slower at 16.
// ng consecutive row groups (G blocks each) decoded into this thread's buffer, 64-byte aligned:
// [ng][G][512] bf16, valid until the thread's next call. For the AMX tiles and tile_decoded.
GPTOSS_T512 const uint16_t* decode_groups(const uint8_t* W, const uint8_t* S, int G, int ng) {
  static thread_local std::vector<uint16_t> storage;
  storage.resize(static_cast<size_t>(ng) * G * 512 + 32);
  uint16_t* base = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
  for (int64_t b = 0; b < static_cast<int64_t>(ng) * G; ++b)  // block b: row group b / G, block b % G
    decode_block(W + b * kGroupBytes, S + b * kRows, base + b * 512);
  return base;
}

template <int NG>
GPTOSS_T512 void tile_decoded(const uint8_t* W, const uint8_t* S, int G, const uint16_t* A, int64_t lda, int R,
                              float* C) {
  const uint16_t* base = decode_groups(W, S, G, NG);
  const int64_t K2 = static_cast<int64_t>(G) * (kBlock / 2);
  constexpr int kTileRows = 6;
  for (int r = 0; r < R; r += kTileRows) {
    __m512 acc[kTileRows][4];
    const uint16_t* a = A + r * lda;
    const int nr = std::min(kTileRows, R - r);
    gptoss::tile_dispatch<NG>(nr, base, K2, a, lda, acc);
    for (int j = 0; j < NG; ++j)
      for (int i = 0; i < nr; ++i) _mm512_storeu_ps(C + (static_cast<int64_t>(j) * R + r + i) * kRows, acc[i][j]);
  }
}

constexpr int kDpRows = 8;

GPTOSS_T512 void tile(const uint8_t* W, const uint8_t* S, int G, const uint16_t* A, int64_t lda, int R,
                      float* C) {
  int r = 0;
  for (; R - r >= kDpRows; r += kDpRows) dp_rows<kDpRows>(W, S, G, A + r * lda, lda, C + r * kRows);
  const uint16_t* a = A + r * lda;
  float* c = C + r * kRows;
  switch (R - r) {
    case 1: dp_rows<1>(W, S, G, a, lda, c); break;
    case 2: dp_rows<2>(W, S, G, a, lda, c); break;
    case 3: dp_rows<3>(W, S, G, a, lda, c); break;
    case 4: dp_rows<4>(W, S, G, a, lda, c); break;
    case 5: dp_rows<5>(W, S, G, a, lda, c); break;
    case 6: dp_rows<6>(W, S, G, a, lda, c); break;
    case 7: dp_rows<7>(W, S, G, a, lda, c); break;
    default: break;
  }
}

// swiglu_rows on 16 lanes: a token's 16 outputs are one vector, the SwiGLU runs in the even
// (gate) lanes with each odd (up) lane copied down beside it. The same operations in the same
// order as the scalar code but for exp, SLEEF's (within 1 ulp; torch ships it and its own
// vectorised exp uses it), and NaN payloads; the bf16 split is exact either way.
GPTOSS_T512 void swiglu_rows(const float* C, int64_t n, int ns, const float* bias, float alpha, float limit,
                             uint16_t* dst, int64_t ld) {
  const __m512 b = _mm512_loadu_ps(bias);
  const __m512 lim = _mm512_set1_ps(limit), neg_lim = _mm512_set1_ps(-limit), one = _mm512_set1_ps(1.0f);
  const __m512 neg_alpha = _mm512_set1_ps(-alpha);
  for (int64_t j = 0; j < n; ++j) {
    __m512 v = _mm512_loadu_ps(C + (j * ns) * kRows);
    for (int s = 1; s < ns; ++s) v = _mm512_add_ps(v, _mm512_loadu_ps(C + (j * ns + s) * kRows));
    const __m512 h = _mm512_add_ps(v, b);
    // MINPS/MAXPS return their second operand when either is NaN: as std::min(h, limit) and
    // std::max(m, -limit) do with the operands this way round.
    const __m512 gate = _mm512_min_ps(lim, h);
    const __m512 up = _mm512_movehdup_ps(_mm512_add_ps(_mm512_max_ps(neg_lim, gate), one));
    // -(gate * alpha) == gate * -alpha exactly.
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, Sleef_expf16_u10avx512f(_mm512_mul_ps(gate, neg_alpha))));
    __m512 rest = _mm512_maskz_compress_ps(0x5555, _mm512_mul_ps(_mm512_mul_ps(sig, gate), up));
    uint16_t* d = dst + j * ns * ld;
    if (ns == 1) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d), (__m128i)_mm256_cvtneps_pbh(_mm512_castps512_ps256(rest)));
      continue;
    }
    for (int s = 0; s < ns; ++s) {
      const __m512i hi = _mm512_and_si512(_mm512_castps_si512(rest), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + s * ld),
                       _mm256_castsi256_si128(_mm512_cvtepi32_epi16(_mm512_srli_epi32(hi, 16))));
      rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(hi));
    }
  }
}

}  // namespace k512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vnni,avx512vbmi")
#define GPTOSS_TVNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vnni,avx512vbmi")))

// The int8 path. FP4 E2M1 times 2 is an integer in [-12, 12]; VPDPBUSD multiplies unsigned by
// signed bytes, so the table holds 2 * fp4 + 128 in [116, 140] and the activations stay signed:
//   sum_k (2 w_k + 128) a_k = 2 * sum_k w_k a_k + 128 * sum_k a_k,
// where the second sum depends on the activations alone (computed once, at quantizing).
// Activations, per row and 32-block: u = x * 127 / max|x|, a1 = round(u), a2 = round(128 (u -
// a1)), so x = d (a1 + a2 / 128) with d = max|x| / 127, to 2^-15 of the block's largest value:
// finer than bf16's own rounding (2^-9 of each value). llama.cpp stops at a1 (Q8_0); that alone
// measured 3x the reference's error against float64 here, with a2 it is below the reference's.
// A block's dot product is then d / 256 * 2^(s-127) * (128 (S1 - c) + S2), S1 and S2 the
// VPDPBUSD sums against a1 and a2 and c = 128 sum a1 + sum a2 (asum; the offset's share is 128 c): the
// kernel starts a row's sum at -c and shifts it left by 7 between the two digits, so no
// subtraction is left. S1 - c = 2 sum w a1 - sum a2 and the result, 2 sum_k w_k (128 a1 + a2),
// stay below 2^24 in magnitude, so every integer is exact and so is the conversion to fp32.
// (An offset of 12 would have kept the table in [0, 24], but its share, 12 c, is not a
// multiple of 128.)
namespace kvnni {

alignas(64) const uint8_t kFp4x2Plus128[64] = {
#define GPTOSS_FP4_U8 128, 129, 130, 131, 132, 134, 136, 140, 128, 127, 126, 125, 124, 122, 120, 116
    GPTOSS_FP4_U8, GPTOSS_FP4_U8, GPTOSS_FP4_U8, GPTOSS_FP4_U8
#undef GPTOSS_FP4_U8
};

// One 64-byte load of a block is byte columns 4c..4c+3 of 16 rows (column-major, see the
// layout above). VPERMB makes dword lane n hold row n's four bytes; their low nibbles are the
// row's weights 8c + 2i and their high nibbles 8c + 2i + 1 (i = 0..3). A quantized activation
// block is stored in that order: position 8c + 4h + i holds element 8c + 2i + h.
struct Transpose {
  alignas(64) uint8_t index[64];
  constexpr Transpose() : index{} {
    for (int n = 0; n < 16; ++n)
      for (int i = 0; i < 4; ++i) index[4 * n + i] = static_cast<uint8_t>(16 * i + n);
  }
};
constexpr Transpose kTranspose{};

struct ActOrder {
  alignas(32) uint8_t index[32];
  constexpr ActOrder() : index{} {
    for (int p = 0; p < 32; ++p) index[p] = static_cast<uint8_t>(8 * (p / 8) + 2 * (p % 4) + (p % 8) / 4);
  }
};
constexpr ActOrder kActOrder{};

// Bytes per quantized block: a1's 32 then a2's 32 (one cache line).
constexpr int kQBlock = 2 * kBlock;

// K bf16 values (K a multiple of 32) -> K / 32 blocks of kQBlock bytes, and per block the
// scale d / 256 (the 1/2 undoes the table's doubling) and asum = c.
GPTOSS_TVNNI void quantize_row(const uint16_t* src, int64_t K, int8_t* q, float* d, int32_t* asum) {
  const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kActOrder.index));
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 fine = _mm512_set1_ps(128.0f);
  for (int64_t g = 0; g < K / kBlock; ++g) {
    const uint16_t* s = src + g * kBlock;
    const __m512 lo = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s))), 16));
    const __m512 hi = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16))), 16));
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, lo), _mm512_andnot_ps(sign, hi)));
    // (VMAXPS drops a NaN operand, so NaNs are looked for apart.)
    const bool finite = std::isfinite(amax) && !(_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) |
                                                 _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q));
    const float inv = amax > 0.0f && finite ? 127.0f / amax : 0.0f;
    const __m512 ulo = _mm512_mul_ps(lo, _mm512_set1_ps(inv)), uhi = _mm512_mul_ps(hi, _mm512_set1_ps(inv));
    const __m512i a1lo = _mm512_cvtps_epi32(ulo), a1hi = _mm512_cvtps_epi32(uhi);  // to nearest
    const __m512i a2lo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(ulo, _mm512_cvtepi32_ps(a1lo)), fine));
    const __m512i a2hi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(uhi, _mm512_cvtepi32_ps(a1hi)), fine));
    auto store = [&](__m512i l, __m512i h, int8_t* dst) {
      const __m256i bytes =
          _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtsepi32_epi8(l)), _mm512_cvtsepi32_epi8(h), 1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutexvar_epi8(order, bytes));
    };
    int8_t* qg = q + g * kQBlock;
    store(a1lo, a1hi, qg);
    store(a2lo, a2hi, qg + kBlock);
    const int32_t sum1 = _mm512_reduce_add_epi32(_mm512_add_epi32(a1lo, a1hi));
    const int32_t sum2 = _mm512_reduce_add_epi32(_mm512_add_epi32(a2lo, a2hi));
    asum[g] = 128 * sum1 + sum2;
    // A block holding inf or NaN gets a NaN scale, so the result says so rather than 0.
    d[g] = finite ? amax / 127.0f / 256.0f : std::numeric_limits<float>::quiet_NaN();
  }
}

// acc += VPDPBUSD(w, four bytes at a broadcast): the broadcast folded into the instruction
// ({1to16}), which compilers do not do by themselves, saves a shuffle per product.
GPTOSS_TVNNI __attribute__((always_inline)) inline void dpbusd_broadcast(__m512i& acc, __m512i w, const int8_t* a) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(a)));
}

// NT quantized rows (row stride lda bytes; D and Asum ldg per row) against one row group: the
// int8 twin of k512::dp_rows. A block's 8 decoded weight vectors stay in registers for both
// digits, and each row keeps one integer sum: from -c, the a1 products, shifted left by 7, then
// the a2 products (128 (S1 - c) + S2 without a second accumulator, whose registers bought more
// rows per pass and so fewer decodes of each block). With few rows, CH partial sums per row hide
// VPDPBUSD's latency.
template <int NT>
GPTOSS_TVNNI __attribute__((always_inline)) inline void dq_rows(const uint8_t* W, const uint8_t* S, int G,
                                                                 const int8_t* A, const float* D, const int32_t* Asum,
                                                                 int64_t lda, int64_t ldg, float* C) {
  constexpr int CH = NT == 1 ? 4 : (NT <= 3 ? 2 : 1);
  const __m512i table = _mm512_load_si512(kFp4x2Plus128);
  const __m512i transpose = _mm512_load_si512(kTranspose.index);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[NT];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int g = 0; g < G; ++g) {
    const uint8_t* wg = W + static_cast<int64_t>(g) * kGroupBytes;
    const int8_t* ag = A + static_cast<int64_t>(g) * kQBlock;
    prefetch_ahead(wg);
    __m512i w[8];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_permutexvar_epi8(transpose, _mm512_loadu_si512(wg + 64 * c));
      w[2 * c] = _mm512_shuffle_epi8(table, _mm512_and_si512(v, nibble));
      w[2 * c + 1] = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
    }
    __m512i sum[NT][CH];
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      sum[t][0] = _mm512_set1_epi32(-Asum[t * ldg + g]);
#pragma GCC unroll 4
      for (int h = 1; h < CH; ++h) sum[t][h] = _mm512_setzero_si512();
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) dpbusd_broadcast(sum[t][j % CH], w[j], ag + t * lda + 4 * j);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
#pragma GCC unroll 4
      for (int h = 1; h < CH; ++h) {
        sum[t][0] = _mm512_add_epi32(sum[t][0], sum[t][h]);
        sum[t][h] = _mm512_setzero_si512();
      }
      sum[t][0] = _mm512_slli_epi32(sum[t][0], 7);
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) dpbusd_broadcast(sum[t][j % CH], w[j], ag + t * lda + kBlock + 4 * j);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
      for (int h = 1; h < CH; ++h) sum[t][0] = _mm512_add_epi32(sum[t][0], sum[t][h]);
    const __m512 scale = k512::block_scales(S + g * kRows);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum[t][0]), _mm512_set1_ps(D[t * ldg + g])), scale,
                               acc[t]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(C + t * kRows, acc[t]);
}

// Rows per pass: 8 decoded weight vectors + 10 integer sums + 10 fp32 accumulators + 3
// constants fill 31 of the 32 vector registers. Against 8 rows with two sums each (the
// previous layout), a 20b-shaped layer at 256 tokens ran 160 against 165 ms (medians of 7
// alternated runs, AMD EPYC, 2026-12-07).
constexpr int kDqRows = 10;

GPTOSS_TVNNI void tile(const uint8_t* W, const uint8_t* S, int G, const int8_t* A, const float* D,
                       const int32_t* Asum, int64_t lda, int64_t ldg, int R, float* C) {
  int r = 0;
  for (; R - r >= kDqRows; r += kDqRows)
    dq_rows<kDqRows>(W, S, G, A + r * lda, D + r * ldg, Asum + r * ldg, lda, ldg, C + r * kRows);
  const int8_t* a = A + r * lda;
  const float* d = D + r * ldg;
  const int32_t* k = Asum + r * ldg;
  float* c = C + r * kRows;
  switch (R - r) {
    case 1: dq_rows<1>(W, S, G, a, d, k, lda, ldg, c); break;
    case 2: dq_rows<2>(W, S, G, a, d, k, lda, ldg, c); break;
    case 3: dq_rows<3>(W, S, G, a, d, k, lda, ldg, c); break;
    case 4: dq_rows<4>(W, S, G, a, d, k, lda, ldg, c); break;
    case 5: dq_rows<5>(W, S, G, a, d, k, lda, ldg, c); break;
    case 6: dq_rows<6>(W, S, G, a, d, k, lda, ldg, c); break;
    case 7: dq_rows<7>(W, S, G, a, d, k, lda, ldg, c); break;
    case 8: dq_rows<8>(W, S, G, a, d, k, lda, ldg, c); break;
    case 9: dq_rows<9>(W, S, G, a, d, k, lda, ldg, c); break;
    default: break;
  }
}

}  // namespace kvnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16")
#define GPTOSS_TAMX \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16")))

namespace kamx {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C (16 rows x 16 fp32); 4, 5: A (16 rows x 32 bf16); 6: B (16 pairs x 16 rows).
GPTOSS_TAMX void configure() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 7; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

#define GPTOSS_AMX_STEP(c, a)                                                       \
  if constexpr (NC > c) {                                                           \
    _tile_loadd(a, A + (c * 16) * lda + static_cast<int64_t>(g) * kBlock, lda * 2); \
    _tile_dpbf16ps(c, a, 6);                                                        \
  }

// Up to 64 virtual rows (NC C tiles) against one row group; B either decoded here, kRing
// blocks ahead of the tile loads (a tile load right after the stores of its data waits for
// them to drain), or read from a whole row group decoded before (bcache [G][512]).
constexpr int kAhead = 2;
constexpr int kRing = kAhead + 1;

template <int NC>
GPTOSS_TAMX void amx_rows(const uint8_t* W, const uint8_t* S, int G, const uint16_t* A, int64_t lda, int R,
                          float* C, const uint16_t* bcache) {
  alignas(64) uint16_t ring[kRing][16 * 32];
  alignas(64) float cbuf[NC * 16 * 16];
  if constexpr (NC > 0) _tile_zero(0);
  if constexpr (NC > 1) _tile_zero(1);
  if constexpr (NC > 2) _tile_zero(2);
  if constexpr (NC > 3) _tile_zero(3);
  if (bcache == nullptr)
    for (int g = 0; g < std::min(kAhead, G); ++g)
      k512::decode_block(W + static_cast<int64_t>(g) * kGroupBytes, S + g * kRows, ring[g % kRing]);
  for (int g = 0; g < G; ++g) {
    const uint16_t* b;
    if (bcache == nullptr) {
      const int ahead = g + kAhead;
      if (ahead < G)
        k512::decode_block(W + static_cast<int64_t>(ahead) * kGroupBytes, S + ahead * kRows, ring[ahead % kRing]);
      b = ring[g % kRing];
    } else {
      b = bcache + static_cast<int64_t>(g) * 512;
    }
    asm volatile("" ::: "memory");  // the tile loads below read what the stores above wrote
    _tile_loadd(6, b, 64);
    GPTOSS_AMX_STEP(0, 4)
    GPTOSS_AMX_STEP(1, 5)
    GPTOSS_AMX_STEP(2, 4)
    GPTOSS_AMX_STEP(3, 5)
    asm volatile("" ::: "memory");  // and are issued before the ring slot is written again
  }
  if constexpr (NC > 0) _tile_stored(0, cbuf, 64);
  if constexpr (NC > 1) _tile_stored(1, cbuf + 256, 64);
  if constexpr (NC > 2) _tile_stored(2, cbuf + 512, 64);
  if constexpr (NC > 3) _tile_stored(3, cbuf + 768, 64);
  std::memcpy(C, cbuf, sizeof(float) * R * kRows);
}

// Rows beyond R in the last A tile are read (the caller pads A by 16 rows) and discarded.
GPTOSS_TAMX void tile(const uint8_t* W, const uint8_t* S, int G, const uint16_t* A, int64_t lda, int R,
                      float* C) {
  configure();
  const uint16_t* bcache = nullptr;
  if (R > 64) bcache = k512::decode_groups(W, S, G, 1);  // several passes: decode once
  for (int r = 0; r < R; r += 64) {
    const int n = std::min(64, R - r);
    const uint16_t* a = A + r * lda;
    float* c = C + r * kRows;
    switch ((n + 15) / 16) {
      case 1: amx_rows<1>(W, S, G, a, lda, n, c, bcache); break;
      case 2: amx_rows<2>(W, S, G, a, lda, n, c, bcache); break;
      case 3: amx_rows<3>(W, S, G, a, lda, n, c, bcache); break;
      default: amx_rows<4>(W, S, G, a, lda, n, c, bcache); break;
    }
  }
  _tile_release();
}

}  // namespace kamx
#pragma GCC pop_options

bool os_avx512() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  uint32_t lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM state
}

bool os_avx() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;
  uint32_t lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0x6) == 0x6;
}

int64_t detect_isa() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return kGeneric;
  const bool fma = c & (1u << 12);
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return kGeneric;
  const bool avx2 = b & (1u << 5);
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
  const bool amx = (d & (1u << 24)) && (d & (1u << 22));  // AMX-TILE, AMX-BF16
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  const bool bf16 = a1 & (1u << 5);
  const bool vnni = (c & (1u << 11)) && (c & (1u << 1));  // AVX512-VNNI, AVX512-VBMI
  if (!(avx2 && fma && os_avx())) return kGeneric;
  if (!(avx512 && bf16 && os_avx512())) return kAvx2;
  if (!vnni) return kAvx512Bf16;
  if (!amx) return kAvx512Vnni;
  // Linux hands out the AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return kAvx512Vnni;
  return kAmx;
}

}  // namespace
#endif  // GPTOSS_X86

namespace {

int64_t cpu_isa() {
#if GPTOSS_X86
  static const int64_t isa = detect_isa();
  return isa;
#else
  return kGeneric;
#endif
}

// The int8 path's activations: per row, K / 32 blocks of kvnni::kQBlock bytes, and per row and
// block the scale and asum = 128 sum a1 + sum a2 (the int8 path's c; kvnni::quantize_row).
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> asum;
  int64_t row_bytes = 0, blocks = 0;
  void resize(int64_t rows, int64_t k) {
    blocks = k / kBlock;
    row_bytes = blocks * 2 * kBlock;
    q.resize(static_cast<size_t>(rows * row_bytes));
    d.resize(static_cast<size_t>(rows * blocks));
    asum.resize(static_cast<size_t>(rows * blocks));
  }
};

// Quantizes rows [0, rows) of a bf16 [rows, K] matrix into `out` (int8 path only).
void quantize_rows(const uint16_t* src, int64_t rows, int64_t K, Quantized& out) {
  out.resize(rows, K);
#if GPTOSS_X86
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      kvnni::quantize_row(src + r * K, K, out.q.data() + r * out.row_bytes, out.d.data() + r * out.blocks,
                          out.asum.data() + r * out.blocks);
  });
#else
  (void)src;
  TORCH_CHECK(false, "the int8 path needs x86");
#endif
}

// `quant` (rows of the int8 path, from the same first row as A) is used when given and the
// expert does not go to AMX.
void run_tile(int64_t isa, bool use_amx, const uint8_t* W, const uint8_t* S, int G, const uint16_t* A,
              int64_t lda, int R, float* C, const Quantized* quant = nullptr, int64_t row0 = 0) {
#if GPTOSS_X86
  if (use_amx) return kamx::tile(W, S, G, A, lda, R, C);
  if (quant != nullptr) {
    const int64_t ldq = quant->row_bytes, ldg = quant->blocks;
    return kvnni::tile(W, S, G, quant->q.data() + row0 * ldq, quant->d.data() + row0 * ldg,
                       quant->asum.data() + row0 * ldg, ldq, ldg, R, C);
  }
  if (isa >= kAvx512Bf16) return k512::tile(W, S, G, A, lda, R, C);
  if (isa >= kAvx2) return avx2::tile(W, S, G, A, lda, R, C);
#endif
  (void)use_amx;
  (void)isa;
  (void)quant;
  (void)row0;
  generic::tile(W, S, G, A, lda, R, C);
}

// ng (1 to kQuad) consecutive row groups of one expert into C [ng][R][16]: the decoded tile
// where `decoded`, else run_tile row group by row group.
void run_groups(int64_t isa, bool use_amx, bool decoded, const uint8_t* W, const uint8_t* S, int G, int ng,
                const uint16_t* A, int64_t lda, int R, float* C, const Quantized* quant, int64_t row0) {
#if GPTOSS_X86
  if (decoded) {
    switch (ng) {
      case 4: return k512::tile_decoded<4>(W, S, G, A, lda, R, C);
      case 3: return k512::tile_decoded<3>(W, S, G, A, lda, R, C);
      case 2: return k512::tile_decoded<2>(W, S, G, A, lda, R, C);
      default: return k512::tile_decoded<1>(W, S, G, A, lda, R, C);
    }
  }
#endif
  (void)decoded;
  for (int j = 0; j < ng; ++j)
    run_tile(isa, use_amx, W + static_cast<int64_t>(j) * G * kGroupBytes, S + static_cast<int64_t>(j) * G * kRows, G,
             A, lda, R, C + static_cast<int64_t>(j) * R * kRows, quant, row0);
}

// f(item, worker) for every item of [0, n), in runs per thread (runs.h).
template <class F>
void for_each_item(int64_t n, const F& f) {
  gptoss::parallel_runs(n, 1, 4, [&](int64_t begin, int64_t end, int64_t w) {
    for (int64_t i = begin; i < end; ++i) f(i, w);
  });
}

struct Problem {
  int64_t H, I, E, K, G1, G2, R1;
  int ns;
  double alpha, limit;
  int64_t isa;
  bool fold_ok;  // every scale byte in [2, 252]: the tiles may fold scales into bf16 exponents
  int64_t tile_min_rows;
  const uint8_t *w1, *s1, *w2, *s2;
  const float *b1, *b2;
};

// Tokens [t0, t0 + tn) of the batch.
void run_chunk(const Problem& pb, const at::Tensor& x, const float* weights, const int64_t* ids, int64_t t0,
               int64_t tn, at::Tensor& out) {
  const int64_t H = pb.H, I = pb.I, E = pb.E, K = pb.K, R1 = pb.R1;
  const int ns = pb.ns;
  const int64_t P = tn * K;
  // Pairs sorted by expert (stable), as the reference does.
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t q = 0; q < P; ++q) {
    const int64_t e = ids[t0 * K + q];
    TORCH_CHECK(e >= 0 && e < E, "expert id ", e, " out of range [0, ", E, ")");
    ++start[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> pos(start.begin(), start.end() - 1);
  std::vector<int64_t> pair_token(P), slot_pair(P);
  for (int64_t q = 0; q < P; ++q) {
    const int64_t i = pos[ids[t0 * K + q]]++;
    pair_token[i] = q / K;
    slot_pair[q] = i;
  }
  std::vector<int64_t> active;
  int64_t max_rows = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n) active.push_back(e);
    max_rows = std::max(max_rows, n * ns);
  }
  const int64_t rows = P * ns;
  const int64_t pad = 16;  // AMX reads whole 16-row A tiles
  auto bf16 = x.options().dtype(at::kBFloat16);
  at::Tensor xg_t = at::empty({rows + pad, H}, bf16);
  at::Tensor ag_t = at::empty({rows + pad, I}, bf16);
  at::Tensor o_t = at::empty({P, H}, x.options().dtype(at::kFloat));
  uint16_t* xg = reinterpret_cast<uint16_t*>(xg_t.data_ptr());
  uint16_t* ag = reinterpret_cast<uint16_t*>(ag_t.data_ptr());
  float* o = o_t.data_ptr<float>();
  std::memset(xg + rows * H, 0, sizeof(uint16_t) * pad * H);
  std::memset(ag + rows * I, 0, sizeof(uint16_t) * pad * I);
  const int64_t workers = gptoss::run_workers();
  const int64_t cstride = std::max<int64_t>(max_rows, 1) * kRows * kQuad;  // a worker's C
  std::vector<float> cbuf(static_cast<size_t>(workers * cstride));

  // Gather (and split) each pair's input row.
  const bool x_bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, P, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = t0 + pair_token[i];
      uint16_t* dst = xg + i * ns * H;
      if (x_bf16) {
        std::memcpy(dst, reinterpret_cast<const uint16_t*>(x.data_ptr()) + t * H, sizeof(uint16_t) * H);
      } else {
        const float* src = x.data_ptr<float>() + t * H;
        for (int64_t c = 0; c < H; ++c) split_bf16(src[c], ns, dst + c, H);
      }
    }
  });

  auto tile_for = [&](int64_t n_rows) { return pb.isa >= kAmx && pb.fold_ok && n_rows >= pb.tile_min_rows; };
  auto decoded_for = [&](int64_t n_rows) {
    return pb.isa >= kAvx512Bf16 && pb.isa < kAmx && pb.fold_ok && n_rows >= pb.tile_min_rows;
  };
  // bf16 activations go through int8 where the CPU has VNNI; fp32 keeps its exact bf16 split.
  const bool int8 = pb.isa >= kAvx512Vnni && ns == 1;
  Quantized xq, aq;
  if (int8) quantize_rows(xg, rows, H, xq);
  const float limit = static_cast<float>(pb.limit), alpha = static_cast<float>(pb.alpha);

  // One matrix of every active expert (nrg row groups of 16 outputs each, against the rows of A
  // from the expert's first): one item = `width` row groups of one expert (kQuad, the decoded
  // tile's width, when some expert takes that tile; else one, the finer split decode steps
  // keep), their products into the worker's C [ng][R][16], then epilogue(expert, row group,
  // tokens, its C).
  const int64_t width = decoded_for(max_rows) ? kQuad : 1;
  auto products = [&](int64_t nrg, const uint8_t* W, const uint8_t* S, int64_t G, const uint16_t* A, int64_t lda,
                      const Quantized* quant, const auto& epilogue) {
    const int64_t nq = (nrg + width - 1) / width;
    for_each_item(static_cast<int64_t>(active.size()) * nq, [&](int64_t item, int64_t w) {
      const int64_t e = active[item / nq], rg0 = item % nq * width, ng = std::min(width, nrg - rg0);
      const int64_t n = start[e + 1] - start[e], R = n * ns;
      float* C = cbuf.data() + w * cstride;
      const int64_t off = e * nrg + rg0;
      run_groups(pb.isa, tile_for(R), decoded_for(R), W + off * G * kGroupBytes, S + off * G * kRows,
                 static_cast<int>(G), static_cast<int>(ng), A + start[e] * ns * lda, lda, static_cast<int>(R), C,
                 quant, start[e] * ns);
      for (int64_t q = 0; q < ng; ++q) epilogue(e, rg0 + q, n, C + q * R * kRows);
    });
  };

  // mlp1 + SwiGLU: a row group is 16 rows of [2I], 8 gate/up pairs.
  products(R1 / kRows, pb.w1, pb.s1, pb.G1, xg, H, int8 ? &xq : nullptr,
           [&](int64_t e, int64_t rg, int64_t n, const float* Cq) {
             const float* bias = pb.b1 + e * R1 + rg * kRows;
             uint16_t* dst = ag + start[e] * ns * I + rg * (kRows / 2);
#if GPTOSS_X86
             if (pb.isa >= kAvx512Bf16) return k512::swiglu_rows(Cq, n, ns, bias, alpha, limit, dst, I);
#endif
             swiglu_rows(Cq, n, ns, bias, alpha, limit, dst, I);
           });

  if (int8) quantize_rows(ag, rows, I, aq);
  // mlp2: a row group is 16 rows of [H].
  products(H / kRows, pb.w2, pb.s2, pb.G2, ag, I, int8 ? &aq : nullptr,
           [&](int64_t e, int64_t rg, int64_t n, const float* Cq) {
             const float* bias = pb.b2 + e * H + rg * kRows;
             for (int64_t j = 0; j < n; ++j) {
               float* dst = o + (start[e] + j) * H + rg * kRows;
               for (int c = 0; c < kRows; ++c) {
                 float v = Cq[(j * ns) * kRows + c];
                 for (int s = 1; s < ns; ++s) v += Cq[(j * ns + s) * kRows + c];
                 dst[c] = v + bias[c];
               }
             }
           });

  // out[t] = sum_j w[t, j] * o[pair(t, j)], in the reference's order (pairs by expert).
  at::parallel_for(0, tn, 4, [&](int64_t b, int64_t e) {
    std::vector<float> acc(H);
    std::vector<int64_t> order(K);
    for (int64_t t = b; t < e; ++t) {
      for (int64_t j = 0; j < K; ++j) order[j] = j;
      std::sort(order.begin(), order.end(),
                [&](int64_t l, int64_t r) { return slot_pair[t * K + l] < slot_pair[t * K + r]; });
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j : order) {
        const float wt = weights[(t0 + t) * K + j];
        const float* src = o + slot_pair[t * K + j] * H;
        for (int64_t c = 0; c < H; ++c) acc[c] += wt * src[c];
      }
      if (out.scalar_type() == at::kBFloat16) {
        uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr()) + (t0 + t) * H;
        for (int64_t c = 0; c < H; ++c) dst[c] = f32_to_bf16(acc[c]);
      } else {
        std::memcpy(out.data_ptr<float>() + (t0 + t) * H, acc.data(), sizeof(float) * H);
      }
    }
  });
}

void check_layout(const at::Tensor& w, const at::Tensor& s, const at::Tensor& b, int64_t E, int64_t rows,
                  int64_t G, const char* name) {
  TORCH_CHECK(w.scalar_type() == at::kByte && s.scalar_type() == at::kByte, name, ": blocks/scales must be uint8");
  TORCH_CHECK(w.is_contiguous() && s.is_contiguous() && b.is_contiguous(), name, ": tensors must be contiguous");
  TORCH_CHECK(w.dim() == 5 && w.size(0) == E && w.size(1) == rows / kRows && w.size(2) == G && w.size(3) == 16 &&
                  w.size(4) == 16,
              name, ": blocks must be [E, rows/16, G, 16, 16], got ", w.sizes());
  TORCH_CHECK(s.dim() == 4 && s.size(0) == E && s.size(1) == rows / kRows && s.size(2) == G && s.size(3) == 16,
              name, ": scales must be [E, rows/16, G, 16], got ", s.sizes());
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 2 && b.size(0) == E && b.size(1) == rows, name,
              ": bias must be fp32 [E, rows]");
}

void moe_experts(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& w1,
                 const at::Tensor& s1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2,
                 const at::Tensor& b2, double alpha, double limit, int64_t isa, bool fold_ok, int64_t tile_min_rows,
                 at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu(), "moe_experts: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [T, H] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.is_contiguous(),
              "out must be contiguous, with x's shape and dtype");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "ids must be a contiguous int64 [T, k] tensor");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat && weights.is_contiguous(),
              "weights must be a contiguous fp32 [T, k] tensor");
  TORCH_CHECK(H % 32 == 0 && H > 0, "hidden size must be a positive multiple of 32");
  Problem pb{};
  pb.E = w1.size(0);
  pb.H = H;
  pb.R1 = b1.size(1);
  pb.I = pb.R1 / 2;
  TORCH_CHECK(pb.I % 32 == 0 && pb.I > 0, "intermediate size must be a positive multiple of 32");
  pb.K = ids.size(1);
  pb.G1 = H / kBlock;
  pb.G2 = pb.I / kBlock;
  check_layout(w1, s1, b1, pb.E, pb.R1, pb.G1, "mlp1");
  check_layout(w2, s2, b2, pb.E, H, pb.G2, "mlp2");
  pb.ns = x.scalar_type() == at::kBFloat16 ? 1 : 3;
  pb.alpha = alpha;
  pb.limit = limit;
  pb.isa = std::min(isa, cpu_isa());
  pb.fold_ok = fold_ok;
  pb.tile_min_rows = tile_min_rows;
  pb.w1 = w1.data_ptr<uint8_t>();
  pb.s1 = s1.data_ptr<uint8_t>();
  pb.w2 = w2.data_ptr<uint8_t>();
  pb.s2 = s2.data_ptr<uint8_t>();
  pb.b1 = b1.data_ptr<float>();
  pb.b2 = b2.data_ptr<float>();
  if (T == 0) return;
  if (pb.K == 0) {
    std::memset(out.data_ptr(), 0, out.nbytes());
    return;
  }
  for (int64_t t0 = 0; t0 < T; t0 += kMaxTokensPerChunk)
    run_chunk(pb, x, weights.data_ptr<float>(), ids.data_ptr<int64_t>(), t0,
              std::min<int64_t>(kMaxTokensPerChunk, T - t0), out);
}

}  // namespace

TORCH_LIBRARY(gptoss_native, m) {
  m.def("cpu_isa() -> int", &cpu_isa);
  m.def(
      "moe_experts(Tensor x, Tensor weights, Tensor ids, Tensor w1, Tensor s1, Tensor b1, Tensor w2, "
      "Tensor s2, Tensor b2, float alpha, float limit, int isa, bool fold_ok, int tile_min_rows, "
      "Tensor(a!) out) -> ()",
      &moe_experts);
}
