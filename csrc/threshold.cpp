// Exact k-th smallest |x| over a list of tensors: one group for the selection engine
// (select.cpp), reading each tensor where it is, never concatenating them.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <vector>

namespace dsd_cpp {
namespace {

at::Tensor kth_smallest_abs(at::TensorList xs, int64_t k) {
  std::vector<at::Tensor> keep_alive;
  const std::vector<Segment> segments = make_segments(xs, keep_alive);
  TORCH_CHECK(1 <= k && k <= total_numel(segments), "dsd_cpp.kth_smallest_abs: k=", k,
              " is outside [1, ", total_numel(segments), "]");
  at::ScalarType dtype = xs[0].scalar_type();
  for (const auto& x : xs) dtype = c10::promoteTypes(dtype, x.scalar_type());
  const Selection selected = select_groups({segments}, {k}).selected[0];
  // The k-th smallest is one of the inputs' magnitudes, so the promoted dtype holds it exactly.
  return at::scalar_tensor(key_to_float(selected.key), at::TensorOptions().dtype(dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("kth_smallest_abs", TORCH_FN(kth_smallest_abs));
}

}  // namespace dsd_cpp
