// Host helpers read in one pass in C++, where reading the same attributes tensor by tensor in
// Python costs more host time per step than the step's launches: the Triton backend caches
// its launch tables under a description of the tensors they hold, and the masked optimizers
// reuse a step's plan while the kinds of its parameters and gradients are unchanged. These are
// the extension's Python functions (the kernels are torch ops); dsd_kernels/backends/cpp.py
// installs them in dsd_kernels/host.py, which holds their Python versions.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kNone = -1;  // a None in a list (a tensor without a mask, or a gradient)

int64_t device_word(const at::Tensor& t) {
  const c10::Device device = t.device();
  return static_cast<int64_t>(device.type()) << 16 | (device.index() & 0xffff);
}

// One tensor's words for describe_tensors: device, dtype, rank, data address, sizes, strides.
void describe_tensor(PyObject*, const at::Tensor& t, std::vector<int64_t>& words) {
  words.push_back(device_word(t));
  words.push_back(static_cast<int64_t>(t.scalar_type()));
  words.push_back(t.dim());
  words.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  for (int64_t size : t.sizes()) words.push_back(size);
  for (int64_t stride : t.strides()) words.push_back(stride);
}

// One tensor's words for tensor_kinds: its Python type, layout, device and dtype.
void kind_of_tensor(PyObject* item, const at::Tensor& t, std::vector<int64_t>& words) {
  words.push_back(reinterpret_cast<int64_t>(Py_TYPE(item)));
  words.push_back(static_cast<int64_t>(t.layout()));
  words.push_back(device_word(t));
  words.push_back(static_cast<int64_t>(t.scalar_type()));
}

// Every list's length and every element's words (kNone for None), as int64 words.
template <typename Words>
std::vector<int64_t> read_lists(const py::sequence& lists, const char* name, Words words_of) {
  std::vector<int64_t> words;
  for (const py::handle list : lists) {
    PyObject* tensors = list.ptr();
    if (!PyList_Check(tensors) && !PyTuple_Check(tensors)) {
      throw py::type_error(std::string(name) + ": takes a sequence of lists or tuples");
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(tensors);
    words.push_back(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PySequence_Fast_GET_ITEM(tensors, i);
      if (item == Py_None) {
        words.push_back(kNone);
      } else if (THPVariable_Check(item)) {
        words_of(item, THPVariable_Unpack(item), words);
      } else {
        throw py::type_error(std::string(name) + ": an element is neither a tensor nor None");
      }
    }
  }
  return words;
}

py::bytes as_bytes(const std::vector<int64_t>& words) {
  return py::bytes(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
}

// (hash, bytes): equal bytes exactly when the lists hold tensors at the same addresses with
// the same devices, dtypes, sizes and strides; the hash is of the bytes (a cache key hashes
// cheaply).
py::tuple describe_tensors(const py::sequence& lists) {
  const std::vector<int64_t> words = read_lists(lists, "describe_tensors", describe_tensor);
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over the words
  for (int64_t word : words) hash = (hash ^ static_cast<uint64_t>(word)) * 1099511628211ull;
  return py::make_tuple(static_cast<int64_t>(hash >> 1), as_bytes(words));
}

// Bytes equal exactly when the lists hold None at the same places and tensors of the same
// Python types, layouts, devices and dtypes elsewhere.
py::bytes tensor_kinds(const py::sequence& lists) {
  return as_bytes(read_lists(lists, "tensor_kinds", kind_of_tensor));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("describe_tensors", &describe_tensors,
        "(hash, bytes) describing lists of tensors (or None): addresses, devices, dtypes, "
        "sizes and strides");
  m.def("tensor_kinds", &tensor_kinds,
        "bytes describing lists of tensors (or None): Python types, layouts, devices and "
        "dtypes");
}
