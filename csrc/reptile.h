// Reptile's interpolation over a meta-batch of task weights.
#pragma once
#include <cstdint>

namespace fastmeta {

// direction[p] = theta[p] - (1/T) * sum_t task_weights[t, p]
//
// An SGD step of learning rate eps along `direction` is exactly Reptile's
// interpolation theta <- theta + eps * (mean_t phi_t - theta). The sum over tasks
// runs in task order for every p, so the result does not depend on the thread count.
template <typename Scalar>
void reptile_direction(const Scalar* theta, const Scalar* task_weights, int64_t num_tasks,
                       int64_t num_params, Scalar* direction);

}  // namespace fastmeta
