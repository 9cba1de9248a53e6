// The dsd ops under a private namespace, `dsd_cpp`: the schemas are those of dsd_kernels/_ops.py.
// Python registers these kernels into `dsd` when the C++ backend is selected
// (dsd_kernels/backends/cpp.py), so switching backends never touches a permanent registration.
#include <torch/library.h>

TORCH_LIBRARY(dsd_cpp, m) {
  m.def("kth_smallest_abs(Tensor[] xs, int k) -> Tensor");
  m.def("kth_smallest_abs_per_tensor(Tensor[] xs, int[] ks) -> Tensor");
  m.def(
      "magnitude_histogram(Tensor[] xs, int[] rows, Tensor prefixes, int shift, int bits) "
      "-> Tensor");
  m.def("magnitude_masks(Tensor[] xs, int[] ks, str scope) -> Tensor[]");
  m.def("nm_masks(Tensor[] xs, int n, int m) -> Tensor[]");
  m.def("nonzero_masks(Tensor[] xs) -> Tensor[]");
  m.def("apply_masks_(Tensor(a!)[] xs, Tensor[] masks) -> ()");
  m.def("fill_pruned_(Tensor(a!)[] xs, Tensor[] masks, float[] values) -> ()");
  m.def(
      "masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor?[] masks, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, Tensor? grad_scale) -> ()");
  m.def(
      "masked_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor?[] masks, float[] steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled, bool maximize, "
      "Tensor? grad_scale) -> ()");
}
