// RMSNorm and the RoPE rotation as one pass each (issue 16).
//
// At decode batch 1 a layer's two norms and two rotations are ~20 small torch ops (an fp32
// copy, a square, a mean, an rsqrt, two products, a rounding; the rotation's slices,
// products, differences and copy), about 30 us each on the CPU: ~1 ms of a 25 ms token.
// Here each is one op over one row at a time, with the reference's arithmetic:
//
// rms_norm: out = round(scale * (x * (1 / sqrt(mean(x^2) + eps)))) with fp32 statistics, as
//   model.layers.rms_norm. The sum of squares runs in 16 fp32 lanes (torch's reduction also
//   sums in vector lanes, in another order), so results may differ from the reference's by
//   an ulp of the mean before rounding; nothing else differs.
// rope: out[.., :D/2] = x1 * cos - x2 * sin and out[.., D/2:] = x2 * cos + x1 * sin in fp32,
//   rounded once to x's dtype, as YarnRope.apply: every product and difference is its own
//   fp32 statement, so no compiler contracts them into a fused multiply-add, and the result
//   is bit-identical to the reference's.
//
// Plain C++ (no ISA-specific code): the loops are small and the compiler vectorises them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "bf16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int kLanes = 16;

template <typename T>
GPTOSS_INLINE float load_f32(const T* p, int64_t i);
template <>
GPTOSS_INLINE float load_f32<float>(const float* p, int64_t i) {
  return p[i];
}
template <>
GPTOSS_INLINE float load_f32<uint16_t>(const uint16_t* p, int64_t i) {
  return bf16_to_f32(p[i]);
}

GPTOSS_INLINE void store_f32(float* p, int64_t i, float v) { p[i] = v; }
GPTOSS_INLINE void store_f32(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

template <typename T>
void rms_norm_rows(const T* x, int64_t ldx, const float* scale, float eps, T* out, int64_t rows,
                   int64_t h) {
  // Rows below this count run on the calling thread: a decode row is ~1 us of work.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * ldx;
      T* outr = out + r * h;
      float lanes[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= h; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const float v = load_f32(xr, i + j);
          lanes[j] += v * v;
        }
      }
      for (; i < h; ++i) {
        const float v = load_f32(xr, i);
        lanes[i % kLanes] += v * v;
      }
      float sum = 0.0f;
      for (int j = 0; j < kLanes; ++j) sum += lanes[j];
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
      for (int64_t c = 0; c < h; ++c) {
        const float normed = load_f32(xr, c) * inv;
        store_f32(outr, c, scale[c] * normed);
      }
    }
  });
}

template <typename T>
void rope_rows(const T* x, int64_t ld_row, int64_t ld_head, const float* cos, const float* sin,
               T* out, int64_t rows, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(heads * d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cos + r * half;
      const float* s = sin + r * half;
      for (int64_t hd = 0; hd < heads; ++hd) {
        const T* xr = x + r * ld_row + hd * ld_head;
        T* o = out + (r * heads + hd) * d;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = load_f32(xr, i);
          const float x2 = load_f32(xr, half + i);
          const float a = x1 * c[i];
          const float b = x2 * s[i];
          const float e = x2 * c[i];
          const float f = x1 * s[i];
          store_f32(o, i, a - b);
          store_f32(o, half + i, e + f);
        }
      }
    }
  });
}

bool is_supported(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
}

void rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps, at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && is_supported(x), "rms_norm: x must be fp32 or bf16 on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [T, H] with unit column stride");
  const int64_t rows = x.size(0), h = x.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == h,
              "rms_norm: scale must be fp32 [H]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == rows && out.size(1) == h,
              "rms_norm: out must be contiguous [T, H] in x's dtype");
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows(x.data_ptr<float>(), x.stride(0), scale.data_ptr<float>(), e, out.data_ptr<float>(), rows, h);
  } else {
    rms_norm_rows(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), scale.data_ptr<float>(), e,
                  reinterpret_cast<uint16_t*>(out.data_ptr()), rows, h);
  }
}

void rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && is_supported(x), "rope: x must be fp32 or bf16 on the CPU");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rope: x must be [T, heads, D] with unit last stride and even D");
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == rows &&
                    t->size(1) == d / 2,
                "rope: cos and sin must be contiguous fp32 [T, D/2]");
  }
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() && out.sizes() == x.sizes(),
              "rope: out must be contiguous [T, heads, D] in x's dtype");
  if (x.scalar_type() == at::kFloat) {
    rope_rows(x.data_ptr<float>(), x.stride(0), x.stride(1), cos.data_ptr<float>(), sin.data_ptr<float>(),
              out.data_ptr<float>(), rows, heads, d);
  } else {
    rope_rows(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), x.stride(1), cos.data_ptr<float>(),
              sin.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()), rows, heads, d);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptoss_native, m) {
  m.def("rms_norm(Tensor x, Tensor scale, float eps, Tensor(a!) out) -> ()", &rms_norm);
  m.def("rope(Tensor x, Tensor cos, Tensor sin, Tensor(a!) out) -> ()", &rope);
}
