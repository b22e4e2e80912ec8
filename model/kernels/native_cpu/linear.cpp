// Native CPU kernels for bf16 linears and the greedy argmax (issue 16).
//
// linear_interleaved: y = x W^T (+ b) for bf16 x [N, H] and W [O, H] laid out once at load (16
// outputs interleaved per bf16 pair; native_cpu.InterleavedLinear), with VDPBF16PS and fp32
// accumulation, rounded once to bf16 (as oneDNN's bf16 matmul). Decode multiplies big weights
// by few rows, so a step is bound by reading each weight once: one or two rows stream the
// weight in address order, more rows go through a register tile that reads it once per call
// (torch's F.linear instead reorders the weight for oneDNN on every call).
//
// With `ids` defined instead of `out`, it writes the greedy argmax of every row of y (as
// torch.argmax on the bf16 result: NaN counts as the maximum, the first index wins) and never
// writes y: the LM head of a greedy batch then skips a [N, vocab] write and re-read.
//
// argmax_rows: torch.argmax(dim=-1) of [N, V] fp32 or bf16 logits in two vectorised passes
// per row (the maximum, then its first index); torch's CPU argmax is scalar.
//
// Both need AVX-512 BF16 (the Python side checks cpu_isa() >= 2 before calling).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "interleaved.h"
#include "runs.h"

#include <cstring>
#include <vector>

namespace {

using gptoss::Best;

#if GPTOSS_LINEAR_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")

// Groups [g0, g1) of outputs for every row of x: into y (bf16 [N, O]) or best[N].
GPTOSS_LT512 void interleaved_range(const uint16_t* P, const uint16_t* X, const float* bias, int64_t N, int64_t H,
                                    int64_t O, int64_t g0, int64_t g1, uint16_t* y, Best* best) {
  const int64_t K2 = H / 2;
  // The argmax, lane by lane: each lane keeps its first maximum (indices rise within a lane),
  // NaN above every number; the lanes meet in Best at the end. Index -1: nothing yet.
  const int64_t lanes = best ? N : 0;
  std::vector<float> lane_value(lanes * 16, -std::numeric_limits<float>::infinity());
  std::vector<int32_t> lane_index(lanes * 16, -1);
  const __m512i lane_ids = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  // Row n of x against group g: bias, one rounding to bf16, then stored or offered.
  auto emit = [&](int64_t n, int64_t g, __m512 acc) {
    const int64_t o = g * 16;
    const __mmask16 valid = O - o >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (O - o)) - 1);
    if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(valid, bias + o));
    const __m256i r = (__m256i)_mm512_cvtneps_pbh(acc);
    if (y) {
      _mm256_mask_storeu_epi16(y + n * O + o, valid, r);
      return;
    }
    float* bv = lane_value.data() + n * 16;
    int32_t* bi = lane_index.data() + n * 16;
    const __m512 value = _mm512_loadu_ps(bv);
    const __m512i index = _mm512_loadu_si512(bi);
    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));
    const __mmask16 v_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 b_nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    const __mmask16 empty = _mm512_cmpeq_epi32_mask(index, _mm512_set1_epi32(-1));
    const __mmask16 take =
        valid & (empty | _mm512_cmp_ps_mask(v, value, _CMP_GT_OQ) | (v_nan & static_cast<__mmask16>(~b_nan)));
    _mm512_storeu_ps(bv, _mm512_mask_mov_ps(value, take, v));
    _mm512_storeu_si512(bi, _mm512_mask_add_epi32(index, take, lane_ids, _mm512_set1_epi32(static_cast<int32_t>(o))));
  };
  if (N <= 2) {  // memory-bound: one group at a time, the weight read in address order
    for (int64_t g = g0; g < g1; ++g) {
      __m512 acc[2];
      if (N == 2)
        gptoss::group_rows<2>(P + g * K2 * 32, K2, X, H, acc);
      else
        gptoss::group_rows<1>(P + g * K2 * 32, K2, X, H, acc);
      for (int64_t n = 0; n < N; ++n) emit(n, g, acc[n]);
    }
  } else {
    constexpr int kTileRows = 6, kTileGroups = 4;
    for (int64_t g = g0; g < g1; g += kTileGroups) {
      const int ng = static_cast<int>(std::min<int64_t>(kTileGroups, g1 - g));
      for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kTileRows, N - n0));
        __m512 acc[kTileRows][4];
        for (int j = 0; j < ng; ++j) {  // the tile's groups, or the range's last few one by one
          if (ng == kTileGroups) {
            gptoss::tile_dispatch<kTileGroups>(nr, P + g * K2 * 32, K2, X + n0 * H, H, acc);
            break;
          }
          __m512 one[kTileRows][4];
          gptoss::tile_dispatch<1>(nr, P + (g + j) * K2 * 32, K2, X + n0 * H, H, one);
          for (int r = 0; r < nr; ++r) acc[r][j] = one[r][0];
        }
        for (int r = 0; r < nr; ++r)
          for (int j = 0; j < ng; ++j) emit(n0 + r, g + j, acc[r][j]);
      }
    }
  }
  for (int64_t n = 0; n < lanes; ++n)
    for (int l = 0; l < 16; ++l)
      if (lane_index[n * 16 + l] >= 0) best[n].offer(lane_value[n * 16 + l], lane_index[n * 16 + l]);
}

// First index of the maximum of v[0..V) (NaN counting as the maximum).
template <typename T>
GPTOSS_LT512 int64_t argmax_row(const T* v, int64_t V) {
  auto load = [](const T* p, __mmask16 m) -> __m512 {
    if constexpr (sizeof(T) == 4) {
      return _mm512_maskz_loadu_ps(m, p);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(m, p);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  };
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mx = ninf;
  __mmask16 nan = 0;
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 m = V - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (V - i)) - 1);
    const __m512 x = _mm512_mask_mov_ps(ninf, m, load(v + i, m));
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, x);
  }
  const float best = _mm512_reduce_max_ps(mx);
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 m = V - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (V - i)) - 1);
    const __m512 x = load(v + i, m);
    const __mmask16 hit =
        nan ? _mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q) : _mm512_mask_cmp_ps_mask(m, x, _mm512_set1_ps(best), _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // unreachable for V > 0: the maximum is one of the values
}

#pragma GCC pop_options
#endif

void check_isa() {
  TORCH_CHECK(GPTOSS_LINEAR_X86 && __builtin_cpu_supports("avx512bf16"),
              "linear_interleaved / argmax_rows need AVX-512 BF16");
}

// The checks and outputs both linear ops share: x bf16 [N, H], bias fp32 [O], exactly one of
// out (bf16 [N, O]) and ids (int64 [N]).
struct LinearCall {
  int64_t N = 0, H = 0, O = 0;
  const uint16_t* X = nullptr;
  const float* bias = nullptr;
  uint16_t* y = nullptr;
  int64_t* ids = nullptr;

  LinearCall(const at::Tensor& x, int64_t out_features, const c10::optional<at::Tensor>& b,
             const c10::optional<at::Tensor>& out, const c10::optional<at::Tensor>& idx) {
    TORCH_CHECK(x.device().is_cpu(), "linear: CPU tensors only");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous bf16 [N, H]");
    N = x.size(0);
    H = x.size(1);
    O = out_features;
    X = reinterpret_cast<const uint16_t*>(x.data_ptr());
    if (b && b->defined()) {
      TORCH_CHECK(b->scalar_type() == at::kFloat && b->numel() == O && b->is_contiguous(), "bias must be contiguous fp32 [O]");
      bias = b->data_ptr<float>();
    }
    const bool to_out = out && out->defined();
    TORCH_CHECK(to_out != (idx && idx->defined()), "give exactly one of out and ids");
    if (to_out) {
      TORCH_CHECK(out->scalar_type() == at::kBFloat16 && out->is_contiguous() && out->dim() == 2 && out->size(0) == N &&
                      out->size(1) == O,
                  "out must be contiguous bf16 [N, O]");
      y = reinterpret_cast<uint16_t*>(out->data_ptr());
    } else {
      TORCH_CHECK(idx->scalar_type() == at::kLong && idx->is_contiguous() && idx->numel() == N, "ids must be int64 [N]");
      ids = idx->data_ptr<int64_t>();
    }
  }

  // Runs range(begin, end, y, best) over [0, units) in runs (runs.h; at least `grain`, about
  // 8 per thread); with ids, merges the threads' argmaxes in torch's order.
  template <class F>
  void run(int64_t units, int64_t grain, const F& range) const {
    if (N == 0 || O == 0) return;
    std::vector<std::vector<Best>> mine(ids ? gptoss::run_workers() : 0, std::vector<Best>(N));
    gptoss::parallel_runs(units, grain, 8, [&](int64_t begin, int64_t end, int64_t w) {
      range(begin, end, y, ids ? mine[w].data() : nullptr);
    });
    if (!ids) return;
    for (int64_t n = 0; n < N; ++n) {
      Best best;
      for (const auto& m : mine)
        if (m[n].index >= 0) best.offer(m[n].value, m[n].index);  // a thread may have had no run
      ids[n] = best.index;
    }
  }
};

void linear_interleaved(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out,
                        const c10::optional<at::Tensor>& ids) {
  check_isa();
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
                  packed.is_contiguous() && packed.size(0) == (out_features + 15) / 16 &&
                  packed.size(1) * 2 == x.size(1) && packed.size(2) == 16 && packed.size(3) == 2,
              "packed must be contiguous bf16 [ceil(O / 16), H / 2, 16, 2]");
  const LinearCall call(x, out_features, bias, out, ids);
#if GPTOSS_LINEAR_X86
  const auto* P = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  // Whole groups of 16 outputs, contiguous per thread (the weight streams in address order).
  call.run(packed.size(0), 4, [&](int64_t begin, int64_t end, uint16_t* y, Best* best) {
    interleaved_range(P, call.X, call.bias, call.N, call.H, call.O, begin, end, y, best);
  });
#endif
}

void argmax_rows(const at::Tensor& logits, at::Tensor& ids) {
  check_isa();
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0,
              "logits must be a contiguous CPU [N, V] tensor with V > 0");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, "logits must be fp32 or bf16");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.numel() == N, "ids must be int64 [N]");
#if GPTOSS_LINEAR_X86
  int64_t* out = ids.data_ptr<int64_t>();
  const bool fp32 = logits.scalar_type() == at::kFloat;
  const void* base = logits.data_ptr();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      out[n] = fp32 ? argmax_row(static_cast<const float*>(base) + n * V, V)
                    : argmax_row(static_cast<const uint16_t*>(base) + n * V, V);
  });
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptoss_native, m) {
  m.def(
      "linear_interleaved(Tensor x, Tensor packed, int out_features, Tensor? bias, Tensor(a!)? out, Tensor(b!)? ids) "
      "-> ()",
      &linear_interleaved);
  m.def("argmax_rows(Tensor logits, Tensor(a!) ids) -> ()", &argmax_rows);
}
