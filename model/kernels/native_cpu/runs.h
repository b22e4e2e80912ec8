// The work split the native kernels share (moe.cpp, linear.cpp): every thread takes the next run
// of consecutive work items as it finishes one, instead of a fixed share.
// - Items differ in cost (an expert with 20 rows against one with 1).
// - Consecutive items are adjacent in memory (row groups of a weight), so a long run keeps the
//   hardware prefetcher trained: single items alternating between two threads read 26 GB/s of
//   this machine's 35 (bench/moe_kernel.py).
// - This machine has as many cores as threads: when another thread (the server's event loop)
//   takes a core for a moment, the other thread takes over the rest instead of waiting.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace gptoss {

// The number of threads parallel_runs uses (its `worker` argument is below this).
inline int64_t run_workers() { return std::max<int64_t>(1, at::get_num_threads()); }

// f(begin, end, worker) over [0, n) in runs of about n / (workers * runs_per_worker) items, at
// least min_run; `worker` in [0, run_workers()) names the calling thread (for its scratch).
template <class F>
void parallel_runs(int64_t n, int64_t min_run, int64_t runs_per_worker, const F& f) {
  if (n <= 0) return;
  const int64_t workers = run_workers();
  const int64_t step = std::max(min_run, n / (workers * runs_per_worker));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w)
      for (int64_t i = next.fetch_add(step, std::memory_order_relaxed); i < n;
           i = next.fetch_add(step, std::memory_order_relaxed))
        f(i, std::min(n, i + step), w);
  });
}

}  // namespace gptoss
