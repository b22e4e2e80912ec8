// Native CPU kernel: the greedy tokens of the LM head, screened through an 8-bit copy (issue 16).
//
// A greedy decode step needs only each row's argmax of x W^T, and at few rows the bf16 head is
// a plain read of W: 257 MB on the small preset (half its batch-4 step), 1.16 GB on the 20b.
// screened_argmax reads an 8-bit copy of W instead (half the bytes), which gives every logit
// with a proven error bound, then recomputes exactly only the groups of 16 outputs where some
// upper bound reaches the row's best lower bound. At many rows the product, not the read, takes
// the time; integer products there do twice the work of bf16 ones per instruction. The token is linear_interleaved's argmax at the same row count, bit for bit (of the
// logits rounded to bf16, NaN above every number, the first index of the maximum; the groups
// are recomputed with that kernel's own product), whatever the weights: when the bound admits
// many groups (flat logits, a zero row, NaN or inf in x) the exact pass just covers more of
// them, up to all.
//
// The copy (native_cpu.ScreenedHead): per output v a scale s_v = max_j |W[v, j]| / 127 and
// bytes u = round(W / s_v) + 128 in [1, 255], laid out U[g][k][r][4] = u[16 g + r][4 k + 0..3],
// so that one 64-byte load is 4 inputs of 16 outputs for VPDPBUSD (unsigned weights, signed
// activations), and l1_v = sum_j |W[v, j]| rounded up.
//
// The bound. Per row, x is quantized in two signed digits, x ~ x' = dx (a1 + a2 / 128) with
// dx = max |x| / 127, a1 in [-127, 127], a2 in [-64, 64], so |x - x'| <= dx / 256. Wider calls,
// one digit (a2 = 0, |x - x'| <= dx / 2: the term below grows with max|x| / mean|x|, so only
// rows without outlier features). The integer products are exact; the 128 of the unsigned
// weights comes off as 128 sum(a). Then, with `step` dx / 256 or dx / 2,
//   |x.W_v - s_v q_v.x'| <= l1_v step + (s_v / 2) |x'|_1,
// plus the fp32 roundings of this estimate and of the exact pass (at most (H + 2) 2^-24 of
// l1_v max|x|), all taken by 1% of slack. A token v can be the argmax only if upper_v >= the
// best lower bound L; and tokens that round to the same bf16 maximum lie within one bf16 step
// (2^-7 relative) below it, so the threshold is L - |L| 2^-7.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "interleaved.h"
#include "runs.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace {

using gptoss::Best;

#if GPTOSS_LINEAR_X86
#define GPTOSS_THEAD __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vnni")))

constexpr int kChunk = 4;  // rows of x per pass over a group (2 accumulators each)
// One digit only if every row's max|x| H / |x|_1 stays under this: the one-digit term l1_v dx / 2
// grows with it (about 5 for Gaussian rows; a trained model's outlier features go far higher).
// Wider calls with such rows are not screened at all (the op returns -1): two digits there
// cost more than the bf16 kernel's products.
constexpr double kOneDigitPeakRatio = 8;

// One row of x as the screen reads it; its digits go to the chunk's interleaved buffer.
struct ScreenRow {
  float dx = 0;                // x' = dx (a1 + a2 / 128)
  int32_t sum1 = 0, sum2 = 0;  // sum(a1), sum(a2): the unsigned weights' offset, times 128
  float slack_scale = 0;       // eps_v = s_v * slack_scale + l1_v * slack_l1
  float slack_l1 = 0;
  bool finite = true;
};

// max|x| and |x|_1 of a row (NaN if x is not finite).
std::pair<double, double> row_norms(const uint16_t* x, int64_t H) {
  double amax = 0, l1 = 0;
  for (int64_t j = 0; j < H; ++j) {
    const double v = bf16_to_f32(x[j]);
    if (!std::isfinite(v)) return {NAN, NAN};
    amax = std::max(amax, std::fabs(v));
    l1 += std::fabs(v);
  }
  return {amax, l1};
}

// Row x's digits into D[k][r][2] (4 digits of a1, then of a2, per 4 inputs k; a stride of
// kChunk rows), so that a chunk's rows read one sequential stream. One digit: a2 = 0, and
// |x - x'| <= dx / 2.
ScreenRow quantize_row(const uint16_t* x, int64_t H, std::pair<double, double> norms, bool two_digits, int8_t* D) {
  ScreenRow r;
  const auto [amax, l1] = norms;
  r.finite = std::isfinite(amax);
  if (!r.finite) return r;
  r.dx = static_cast<float>(amax / 127);
  double l1_digits = 0;
  for (int64_t j = 0; j < H; ++j) {
    const double t = r.dx > 0 ? bf16_to_f32(x[j]) / static_cast<double>(r.dx) : 0.0;
    const double d1 = std::clamp(std::nearbyint(t), -127.0, 127.0);
    const double d2 = two_digits ? std::clamp(std::nearbyint((t - d1) * 128), -64.0, 64.0) : 0.0;
    int8_t* at = D + (j / 4) * kChunk * 8 + (j % 4);
    at[0] = static_cast<int8_t>(d1);
    at[4] = static_cast<int8_t>(d2);
    r.sum1 += static_cast<int32_t>(d1);
    r.sum2 += static_cast<int32_t>(d2);
    l1_digits += std::fabs(d1) + std::fabs(d2) / 128;
  }
  const double dx = r.dx, step = two_digits ? dx / 256 : dx / 2;
  // (s_v / 2) |x'|_1, and the fp32 rounding of the estimate s_v dx (dot1 + dot2 / 128) itself.
  const double by_scale = 0.5 * (l1 + H * step) + std::ldexp(127 * dx * l1_digits, -20);
  // l1_v times x's quantization step, the exact pass's rounding and a bf16 denormal's flush.
  const double by_l1 = step + (H + 2) * std::ldexp(amax, -24) + std::ldexp(1.0, -125);
  r.slack_scale = static_cast<float>(1.01 * by_scale);
  r.slack_l1 = static_cast<float>(1.01 * by_l1);
  return r;
}

// Rows [n0, n0 + NR) of x against groups [g, g + NG): each row's highest upper bound per group
// into upper ([N, G]), and its lower bounds into the lane-wise running maxima `lower`. The tile
// shares each weight load across NR rows and each broadcast of digits across NG groups: with
// one group at a time, the loads (a 64-byte weight, a broadcast per row) held VPDPBUSD to
// ~0.6 per cycle.
template <int NR, int NG, bool TWO>
GPTOSS_THEAD void screen_tile(const uint8_t* U, int64_t K4, const std::vector<ScreenRow>& rows, int64_t n0,
                              const int8_t* D, const float* scale, const float* l1, int64_t V, int64_t G, int64_t g,
                              float* upper, float* lower) {
  __m512i acc1[NR][NG], acc2[NR][NG];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NG; ++j) acc1[r][j] = acc2[r][j] = _mm512_setzero_si512();
  const uint8_t* Ug = U + g * K4 * 64;
  for (int64_t k = 0; k < K4; ++k) {
    __m512i w[NG];
    for (int j = 0; j < NG; ++j) w[j] = _mm512_loadu_si512(Ug + (j * K4 + k) * 64);
    for (int r = 0; r < NR; ++r) {
      int32_t d1, d2;
      std::memcpy(&d1, D + (k * kChunk + r) * 8, 4);
      const __m512i b1 = _mm512_set1_epi32(d1);
      for (int j = 0; j < NG; ++j) acc1[r][j] = _mm512_dpbusd_epi32(acc1[r][j], w[j], b1);
      if (TWO) {
        std::memcpy(&d2, D + (k * kChunk + r) * 8 + 4, 4);
        const __m512i b2 = _mm512_set1_epi32(d2);
        for (int j = 0; j < NG; ++j) acc2[r][j] = _mm512_dpbusd_epi32(acc2[r][j], w[j], b2);
      }
    }
  }
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int j = 0; j < NG; ++j) {
    const int64_t o = (g + j) * 16;
    const __mmask16 valid = V - o >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (V - o)) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(valid, scale + o);
    const __m512 l = _mm512_maskz_loadu_ps(valid, l1 + o);
    for (int r = 0; r < NR; ++r) {
      const ScreenRow& row = rows[n0 + r];
      __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc1[r][j], _mm512_set1_epi32(128 * row.sum1)));
      if (TWO) {
        const __m512 dot2 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc2[r][j], _mm512_set1_epi32(128 * row.sum2)));
        dot = _mm512_fmadd_ps(dot2, _mm512_set1_ps(1.0f / 128), dot);
      }
      const __m512 a = _mm512_mul_ps(s, _mm512_mul_ps(_mm512_set1_ps(row.dx), dot));
      const __m512 eps =
          _mm512_fmadd_ps(s, _mm512_set1_ps(row.slack_scale), _mm512_mul_ps(l, _mm512_set1_ps(row.slack_l1)));
      upper[(n0 + r) * G + g + j] = _mm512_mask_reduce_max_ps(valid, _mm512_add_ps(a, eps));
      float* lanes = lower + (n0 + r) * 16;
      _mm512_storeu_ps(lanes, _mm512_max_ps(_mm512_loadu_ps(lanes), _mm512_mask_sub_ps(ninf, valid, a, eps)));
    }
  }
}

template <int NG, bool TWO>
GPTOSS_THEAD void screen_rows(int nr, const uint8_t* U, int64_t K4, const std::vector<ScreenRow>& rows, int64_t n0,
                              const int8_t* D, const float* scale, const float* l1, int64_t V, int64_t G, int64_t g,
                              float* upper, float* lower) {
  switch (nr) {
    case 4: screen_tile<4, NG, TWO>(U, K4, rows, n0, D, scale, l1, V, G, g, upper, lower); break;
    case 3: screen_tile<3, NG, TWO>(U, K4, rows, n0, D, scale, l1, V, G, g, upper, lower); break;
    case 2: screen_tile<2, NG, TWO>(U, K4, rows, n0, D, scale, l1, V, G, g, upper, lower); break;
    default: screen_tile<1, NG, TWO>(U, K4, rows, n0, D, scale, l1, V, G, g, upper, lower); break;
  }
}

// Groups [g0, g1) for every row: tiles of kChunk rows by NG groups, the range's last groups one
// by one. Two digits go one group at a time: they serve few rows, where the weight's bytes
// bound the time, and a second group there measured slower (0.84 of the bf16 kernel's time at
// one row against 0.52).
template <bool TWO>
GPTOSS_THEAD void screen_range(const uint8_t* U, int64_t K4, const std::vector<ScreenRow>& rows, const int8_t* D,
                               const float* scale, const float* l1, int64_t V, int64_t G, int64_t g0, int64_t g1,
                               float* upper, float* lower) {
  constexpr int NG = TWO ? 1 : 4;
  const int64_t N = static_cast<int64_t>(rows.size());
  for (int64_t g = g0; g < g1;) {
    const bool whole = g + NG <= g1;
    for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
      const int nr = static_cast<int>(std::min<int64_t>(kChunk, N - n0));
      if (whole)
        screen_rows<NG, TWO>(nr, U, K4, rows, n0, D + n0 * K4 * 8, scale, l1, V, G, g, upper, lower);
      else
        screen_rows<1, TWO>(nr, U, K4, rows, n0, D + n0 * K4 * 8, scale, l1, V, G, g, upper, lower);
    }
    g += whole ? NG : 1;
  }
}

// The exact pass over group g for row n of N: the product linear_interleaved runs at N rows
// (so the same fp32 sums), rounded to bf16, offered lane by lane.
GPTOSS_LT512 void exact_group(const uint16_t* P, int64_t K2, const uint16_t* X, int64_t H, int64_t N, int64_t n,
                              int64_t V, int64_t g, Best& best) {
  const uint16_t* Pg = P + g * K2 * 32;
  __m512 acc;
  if (N <= 2) {
    __m512 both[2];
    if (N == 2)
      gptoss::group_rows<2>(Pg, K2, X, H, both);
    else
      gptoss::group_rows<1>(Pg, K2, X, H, both);
    acc = both[n];
  } else {
    __m512 tile[1][4];
    gptoss::tile_rows<1, 1>(Pg, K2, X + n * H, H, tile);
    acc = tile[0][0];
  }
  alignas(64) uint16_t r[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(r), (__m256i)_mm512_cvtneps_pbh(acc));
  const int64_t o = g * 16;
  for (int64_t l = 0; l < 16 && o + l < V; ++l) best.offer(bf16_to_f32(r[l]), o + l);
}
#endif

int64_t screened_argmax(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& screen, const at::Tensor& scale,
                     const at::Tensor& l1, int64_t vocab, int64_t two_digit_rows, at::Tensor& ids,
                     const c10::optional<at::Tensor>& recomputed) {
  TORCH_CHECK(GPTOSS_LINEAR_X86 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni"),
              "screened_argmax needs AVX-512 BF16 and VNNI");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous bf16 [N, H]");
  const int64_t N = x.size(0), H = x.size(1), G = (vocab + 15) / 16;
  TORCH_CHECK(vocab > 0 && H % 4 == 0, "need a vocabulary and H a multiple of 4");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(0) == G && packed.size(1) * 2 == H && packed.size(2) == 16 && packed.size(3) == 2,
              "packed must be contiguous bf16 [ceil(V / 16), H / 2, 16, 2]");
  TORCH_CHECK(screen.scalar_type() == at::kByte && screen.is_contiguous() && screen.dim() == 4 &&
                  screen.size(0) == G && screen.size(1) * 4 == H && screen.size(2) == 16 && screen.size(3) == 4,
              "screen must be contiguous uint8 [ceil(V / 16), H / 4, 16, 4]");
  for (const at::Tensor* t : {&scale, &l1})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == G * 16,
                "scale and l1 must be contiguous fp32 [ceil(V / 16) * 16]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.numel() == N, "ids must be int64 [N]");
  const bool count = recomputed && recomputed->defined();
  TORCH_CHECK(!count || (recomputed->scalar_type() == at::kLong && recomputed->is_contiguous() && recomputed->numel() == N),
              "recomputed must be int64 [N]");
  if (N == 0) return 0;
#if GPTOSS_LINEAR_X86
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* P = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  const auto* U = screen.data_ptr<uint8_t>();
  const int64_t K4 = H / 4;
  // Up to two_digit_rows rows, two digits (the caller's measured limit); wider, one.
  const bool two = N <= two_digit_rows;
  std::vector<std::pair<double, double>> norms(N);
  for (int64_t n = 0; n < N; ++n) {
    norms[n] = row_norms(X + n * H, H);
    const auto [amax, l1] = norms[n];
    if (!two && amax * H > kOneDigitPeakRatio * l1) return -1;  // a NaN row is recomputed whole anyway
  }
  // The digits of chunk c (rows 4c..4c+3) at D + 4 c K4 * 8 ([K4][kChunk][2][4] bytes).
  std::vector<int8_t> D(((N + kChunk - 1) / kChunk) * kChunk * K4 * 8, 0);
  std::vector<ScreenRow> rows;
  rows.reserve(N);
  for (int64_t n = 0; n < N; ++n)
    rows.push_back(quantize_row(X + n * H, H, norms[n], two, D.data() + (n / kChunk) * kChunk * K4 * 8 + (n % kChunk) * 8));

  // The screen: every group's highest upper bound per row, and per thread the lane-wise best
  // lower bounds.
  const int64_t workers = gptoss::run_workers();
  std::vector<float> upper(N * G);
  std::vector<float> lower(workers * N * 16, -std::numeric_limits<float>::infinity());
  gptoss::parallel_runs(G, 4, 8, [&](int64_t begin, int64_t end, int64_t w) {
    (two ? screen_range<true> : screen_range<false>)(U, K4, rows, D.data(), scale.data_ptr<float>(),
                                                     l1.data_ptr<float>(), vocab, G, begin, end, upper.data(),
                                                     lower.data() + w * N * 16);
  });

  // Each row's threshold: -inf (every group) where the bound says nothing (non-finite x or
  // bound).
  std::vector<float> threshold(N);
  for (int64_t n = 0; n < N; ++n) {
    float best_lower = -std::numeric_limits<float>::infinity();
    for (int64_t w = 0; w < workers; ++w)
      for (int l = 0; l < 16; ++l) best_lower = std::max(best_lower, lower[(w * N + n) * 16 + l]);
    const bool useful = rows[n].finite && std::isfinite(best_lower);
    threshold[n] = useful ? best_lower - std::fabs(best_lower) * 0x1p-7f - 0x1p-120f
                          : -std::numeric_limits<float>::infinity();
  }
  // The groups to recompute, (group, row) flattened group by group, so that rows sharing a group
  // read it once from memory.
  std::vector<int64_t> items;
  std::vector<int64_t> per_row(N, 0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t n = 0; n < N; ++n)
      if (!(upper[n * G + g] < threshold[n])) {  // NaN counts
        items.push_back(g * N + n);
        ++per_row[n];
      }
  if (count) std::copy(per_row.begin(), per_row.end(), recomputed->data_ptr<int64_t>());

  const int64_t K2 = H / 2;
  std::vector<std::vector<Best>> mine(workers, std::vector<Best>(N));
  gptoss::parallel_runs(static_cast<int64_t>(items.size()), 1, 8, [&](int64_t begin, int64_t end, int64_t w) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = items[i] / N, n = items[i] % N;
      exact_group(P, K2, X, H, N, n, vocab, g, mine[w][n]);
    }
  });
  int64_t* out = ids.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    Best best;
    for (const auto& m : mine)
      if (m[n].index >= 0) best.offer(m[n].value, m[n].index);
    out[n] = best.index;
  }
  return static_cast<int64_t>(items.size());
#else
  return -1;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptoss_native, m) {
  m.def(
      "screened_argmax(Tensor x, Tensor packed, Tensor screen, Tensor scale, Tensor l1, int vocab, int two_digit_rows, "
      "Tensor(a!) ids, "
      "Tensor(b!)? recomputed) -> int",
      &screened_argmax);
}
