// Exact k-th smallest |x| over a list of tensors: one group for the selection engine
// (select.cpp), reading each tensor where it is, never concatenating them.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <vector>

namespace dsd_cpp {
namespace {

// The dtype thresholds are returned in (dsd_kernels/_ops.py, magnitude_dtype). The k-th
// smallest is one of the inputs' magnitudes, so it holds each of them exactly.
at::ScalarType magnitude_dtype(at::TensorList xs) {
  at::ScalarType dtype = xs[0].scalar_type();
  for (const auto& x : xs) dtype = c10::promoteTypes(dtype, x.scalar_type());
  return dtype;
}

at::Tensor kth_smallest_abs(at::TensorList xs, int64_t k) {
  std::vector<at::Tensor> keep_alive;
  const std::vector<Segment> segments = make_segments(xs, keep_alive);
  TORCH_CHECK(1 <= k && k <= total_numel(segments), "dsd_cpp.kth_smallest_abs: k=", k,
              " is outside [1, ", total_numel(segments), "]");
  const Selection selected = select_groups({segments}, {k}).selected[0];
  return at::scalar_tensor(key_to_float(selected.key),
                           at::TensorOptions().dtype(magnitude_dtype(xs)));
}

// Every tensor a group of its own: all thresholds from one sample each and one pass over all.
at::Tensor kth_smallest_abs_per_tensor(at::TensorList xs, at::IntArrayRef ks) {
  TORCH_CHECK(ks.size() == xs.size(), "dsd_cpp.kth_smallest_abs_per_tensor: ", ks.size(),
              " ks for ", xs.size(), " tensors");
  std::vector<at::Tensor> keep_alive;
  std::vector<Group> groups;
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(1 <= ks[i] && ks[i] <= xs[i].numel(), "dsd_cpp.kth_smallest_abs_per_tensor: ks[",
                i, "]=", ks[i], " is outside [1, ", xs[i].numel(), "]");
    groups.push_back(make_segments({xs[i]}, keep_alive));
  }
  const Selections selections = select_groups(groups, ks.vec());
  at::Tensor out =
      at::empty({static_cast<int64_t>(xs.size())}, at::TensorOptions().dtype(at::kFloat));
  float* values = out.data_ptr<float>();
  for (size_t i = 0; i < xs.size(); ++i) values[i] = key_to_float(selections.selected[i].key);
  return out.to(magnitude_dtype(xs));
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("kth_smallest_abs", TORCH_FN(kth_smallest_abs));
  m.impl("kth_smallest_abs_per_tensor", TORCH_FN(kth_smallest_abs_per_tensor));
}

}  // namespace dsd_cpp
