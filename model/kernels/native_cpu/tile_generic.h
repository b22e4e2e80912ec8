// The portable tile kernel (see moe.cpp for the layout). moe.cpp includes this file twice:
// once for the baseline ISA and once under `#pragma GCC target("avx2,fma")`, so one body
// serves every x86-64 CPU and is auto-vectorised for AVX2 where there is AVX2. Not a header
// to include from anywhere else (no include guard, on purpose).

// C[r][n] = sum_k A[r][k] * W[n][k] for r < R, n < 16, k < 32 * G: A is bf16 [R, lda]
// (read from column 0), W one group of 16 rows ([G][16 byte columns][16 rows] nibbles plus
// [G][16] scale bytes). Each block is dequantized once per RT rows into fp32 (exactly the
// reference's values: FP4 * 2^(s-127) rounded once), then multiplied in fp32.
static void tile(const uint8_t* W, const uint8_t* S, int G, const uint16_t* A, int64_t lda, int R,
                 float* C) {
  constexpr int RT = 4;
  const DequantTable& dq = dequant_table();
  for (int r0 = 0; r0 < R; r0 += RT) {
    const int rt = std::min(RT, R - r0);
    float acc[RT][kRows] = {};
    for (int g = 0; g < G; ++g) {
      alignas(64) float wb[kBlock][kRows];
      const uint8_t* wg = W + static_cast<int64_t>(g) * kGroupBytes;
      const uint8_t* sg = S + static_cast<int64_t>(g) * kRows;
      for (int p = 0; p < kBlock / 2; ++p) {
        for (int n = 0; n < kRows; ++n) {
          const uint8_t b = wg[p * kRows + n];
          const float* values = dq.v[sg[n]];
          wb[2 * p][n] = values[b & 15];
          wb[2 * p + 1][n] = values[b >> 4];
        }
      }
      for (int r = 0; r < rt; ++r) {
        const uint16_t* a = A + static_cast<int64_t>(r0 + r) * lda + static_cast<int64_t>(g) * kBlock;
        for (int kk = 0; kk < kBlock; ++kk) {
          const float av = bf16_to_f32(a[kk]);
          for (int n = 0; n < kRows; ++n) acc[r][n] += av * wb[kk][n];
        }
      }
    }
    for (int r = 0; r < rt; ++r)
      for (int n = 0; n < kRows; ++n) C[static_cast<int64_t>(r0 + r) * kRows + n] = acc[r][n];
  }
}
