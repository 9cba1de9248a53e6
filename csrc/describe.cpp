// What a launch table is built from, read in one pass in C++: the Triton backend's tables are
// cached under a description of the tensors they hold (dsd_kernels/backends/triton/tables.py),
// and reading it attribute by attribute in Python costs more host time per step than the
// launches. This is the extension's one Python function (the kernels are torch ops).
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kNone = -1;  // a None in a list (a tensor without a mask)

// Appends one tensor's words: device, dtype, rank, data address, sizes, strides.
void describe_tensor(const at::Tensor& t, std::vector<int64_t>& words) {
  const c10::Device device = t.device();
  words.push_back(static_cast<int64_t>(device.type()) << 16 | (device.index() & 0xffff));
  words.push_back(static_cast<int64_t>(t.scalar_type()));
  words.push_back(t.dim());
  words.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  for (int64_t size : t.sizes()) words.push_back(size);
  for (int64_t stride : t.strides()) words.push_back(stride);
}

// (hash, bytes): the bytes are every list's length and every element's words, so two calls
// give equal bytes exactly when the lists hold tensors at the same addresses with the same
// devices, dtypes, sizes and strides; the hash is of the bytes (a cache key hashes cheaply).
py::tuple describe_tensors(const py::sequence& lists) {
  std::vector<int64_t> words;
  for (const py::handle list : lists) {
    PyObject* tensors = list.ptr();
    if (!PyList_Check(tensors) && !PyTuple_Check(tensors)) {
      throw py::type_error("describe_tensors: takes a sequence of lists or tuples");
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(tensors);
    words.push_back(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PySequence_Fast_GET_ITEM(tensors, i);
      if (item == Py_None) {
        words.push_back(kNone);
      } else if (THPVariable_Check(item)) {
        describe_tensor(THPVariable_Unpack(item), words);
      } else {
        throw py::type_error("describe_tensors: an element is neither a tensor nor None");
      }
    }
  }
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over the words
  for (int64_t word : words) hash = (hash ^ static_cast<uint64_t>(word)) * 1099511628211ull;
  const char* data = reinterpret_cast<const char*>(words.data());
  return py::make_tuple(static_cast<int64_t>(hash >> 1),
                        py::bytes(data, words.size() * sizeof(int64_t)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("describe_tensors", &describe_tensors,
        "(hash, bytes) describing lists of tensors (or None): addresses, devices, dtypes, "
        "sizes and strides");
}
