// Masks of the entries that are not zero (+0.0 and -0.0 both pruned), in one pass that also
// finds a NaN: the masks of a model that is already sparse.
//
// An entry's key is its bit pattern without the sign (fp32: x & 0x7FFFFFFF; fp16 and bf16:
// x & 0x7FFF): 0 exactly for the two zeros, above Inf's key exactly for a NaN. The loop is
// branch-free integer code over the tensor's own element width, which the compiler
// vectorizes: a compare to 0 narrowed to bytes, and a running maximum of the keys.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <limits>

namespace dsd_cpp {
namespace {

// Elements per parallel task.
constexpr int64_t kChunk = int64_t{1} << 16;

// keep[j] = key(x[j]) != 0 for j in [0, n); returns the largest key (a NaN's is above Inf's).
template <typename bits_t>
bits_t nonzero_span(const bits_t* __restrict x, uint8_t* __restrict keep, int64_t n) {
  constexpr bits_t kMask = static_cast<bits_t>(std::numeric_limits<bits_t>::max() >> 1);
  bits_t largest = 0;
  for (int64_t j = 0; j < n; ++j) {
    const bits_t key = static_cast<bits_t>(x[j] & kMask);
    keep[j] = key != 0;
    largest = std::max(largest, key);
  }
  return largest;
}

uint32_t inf_key(at::ScalarType dtype) {
  return dtype == at::kFloat ? 0x7F800000u : dtype == at::kHalf ? 0x7C00u : 0x7F80u;
}

std::vector<at::Tensor> nonzero_masks(at::TensorList xs) {
  std::vector<at::Tensor> sources, masks;
  std::vector<int64_t> numels;
  for (const auto& x : xs) {
    dispatch_float_dtype(x.scalar_type(), [](auto) {});  // refuses other dtypes
    sources.push_back(dense_layout(x));  // walked in memory order; the mask in the same layout
    masks.push_back(at::empty_strided(sources.back().sizes(), sources.back().strides(),
                                      x.options().dtype(at::kBool)));
    numels.push_back(x.numel());
  }
  const std::vector<Span> spans = split_spans(numels, kChunk);
  std::vector<char> has_nan(spans.size(), 0);
  parallel_dynamic(static_cast<int64_t>(spans.size()), [&](int64_t s) {
    const Span& span = spans[s];
    const at::Tensor& x = sources[span.tensor];
    uint8_t* keep = reinterpret_cast<uint8_t*>(masks[span.tensor].data_ptr<bool>()) + span.begin;
    const int64_t n = span.end - span.begin;
    const uint32_t largest =
        x.element_size() == 4
            ? nonzero_span(static_cast<const uint32_t*>(x.data_ptr()) + span.begin, keep, n)
            : nonzero_span(static_cast<const uint16_t*>(x.data_ptr()) + span.begin, keep, n);
    has_nan[s] = largest > inf_key(x.scalar_type());
  });
  for (size_t s = 0; s < spans.size(); ++s) {
    TORCH_CHECK_VALUE(!has_nan[s], "xs[", spans[s].tensor,
                      "] contains NaN; a NaN weight is neither zero nor a number to keep");
  }
  for (auto& mask : masks) mask = mask.contiguous();  // a copy only for a permuted layout
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("nonzero_masks", TORCH_FN(nonzero_masks));
}

}  // namespace dsd_cpp
