#include "reptile.h"

#include <algorithm>

namespace fastmeta {

template <typename Scalar>
void reptile_direction(const Scalar* theta, const Scalar* task_weights, int64_t num_tasks,
                       int64_t num_params, Scalar* direction) {
  // Parameters are split into cache-sized chunks; inside a chunk the task loop is
  // outermost so every pass is a contiguous, vectorisable stream.
  constexpr int64_t kChunk = 2048;
  const int64_t num_chunks = (num_params + kChunk - 1) / kChunk;
  const Scalar inv_tasks = Scalar(1) / Scalar(num_tasks);
#pragma omp parallel for schedule(static) if (num_params > 4 * kChunk)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t begin = c * kChunk;
    const int64_t end = std::min(num_params, begin + kChunk);
    Scalar sum[kChunk];
    std::fill(sum, sum + (end - begin), Scalar(0));
    for (int64_t t = 0; t < num_tasks; ++t) {
      const Scalar* row = task_weights + t * num_params;
#pragma omp simd
      for (int64_t p = begin; p < end; ++p) sum[p - begin] += row[p];
    }
#pragma omp simd
    for (int64_t p = begin; p < end; ++p) direction[p] = theta[p] - sum[p - begin] * inv_tasks;
  }
}

template void reptile_direction<float>(const float*, const float*, int64_t, int64_t, float*);
template void reptile_direction<double>(const double*, const double*, int64_t, int64_t,
                                        double*);

}  // namespace fastmeta
