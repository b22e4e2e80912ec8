// bf16 <-> fp32 bit helpers shared by moe.cpp and attention.cpp. Always inlined: attention.cpp
// compiles its kernel once per ISA (target_clones), and a call out of a clone would not be
// vectorised with it.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#define GPTOSS_INLINE inline __attribute__((always_inline))

GPTOSS_INLINE float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

GPTOSS_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

GPTOSS_INLINE float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch's float -> bf16 conversion.
GPTOSS_INLINE uint16_t f32_to_bf16(float f) { return c10::BFloat16(f).x; }
