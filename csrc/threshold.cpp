// Exact k-th smallest |x| over a list of tensors: a parallel histogram radix select on the fp32
// bit patterns of |x| (dsd_cpu.h), reading each tensor where it is, never concatenating them.
#include "dsd_cpu.h"

#include <torch/library.h>

namespace dsd_cpp {
namespace {

// Three passes of 11, 11 and 9 bits cover the 31 bits of a key. 2^11 int64 counts (16 KiB)
// per thread stay in L1 while the tensors stream through.
struct RadixPass {
  int shift;
  int bits;
};
constexpr RadixPass kPasses[] = {{20, 11}, {9, 11}, {0, 9}};
constexpr int64_t kBins = int64_t{1} << 11;

// Elements per parallel task.
constexpr int64_t kGrain = int64_t{1} << 16;

at::Tensor kth_smallest_abs(at::TensorList xs, int64_t k) {
  std::vector<at::Tensor> keep_alive;
  const std::vector<Segment> segments = make_segments(xs, keep_alive);
  TORCH_CHECK(1 <= k && k <= total_numel(segments), "dsd_cpp.kth_smallest_abs: k=", k,
              " is outside [1, ", total_numel(segments), "]");
  at::ScalarType dtype = xs[0].scalar_type();
  for (const auto& x : xs) dtype = c10::promoteTypes(dtype, x.scalar_type());
  // The k-th smallest is one of the inputs' magnitudes, so the promoted dtype holds it exactly.
  return at::scalar_tensor(key_to_float(select_kth(segments, k).key), at::TensorOptions().dtype(dtype));
}

}  // namespace

Selection select_kth(const std::vector<Segment>& segments, int64_t k) {
  const int64_t total = total_numel(segments);
  const int64_t threads = std::max(1, at::get_num_threads());
  std::vector<int64_t> histograms(threads * kBins);
  std::vector<int64_t> counts(kBins);
  uint32_t prefix = 0;    // the digits chosen so far, most significant first
  int prefix_shift = 31;  // a key is still a candidate iff (key >> prefix_shift) == prefix
  int64_t rank = k;       // the answer's rank among the candidates
  int64_t less = 0;       // keys already known to be below the answer
  int64_t equal = 0;
  for (const RadixPass& pass : kPasses) {
    std::fill(histograms.begin(), histograms.end(), 0);
    const uint32_t digit_mask = (uint32_t{1} << pass.bits) - 1;
    at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
      int64_t* histogram = histograms.data() + at::get_thread_num() * kBins;
      for_each_key_block(segments, begin, end,
                         [&](const Segment&, int64_t, const uint32_t* keys, int64_t n) {
                           for (int64_t j = 0; j < n; ++j) {
                             const uint32_t key = keys[j];
                             if ((key >> prefix_shift) == prefix) {
                               ++histogram[(key >> pass.shift) & digit_mask];
                             }
                           }
                         });
    });
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t t = 0; t < threads; ++t) {
      for (int64_t b = 0; b < kBins; ++b) counts[b] += histograms[t * kBins + b];
    }
    uint32_t digit = 0;
    for (; counts[digit] < rank; ++digit) {
      rank -= counts[digit];
      less += counts[digit];
    }
    equal = counts[digit];
    prefix = (prefix << pass.bits) | digit;
    prefix_shift = pass.shift;
  }
  return {prefix, less, equal};
}

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("kth_smallest_abs", TORCH_FN(kth_smallest_abs));
}

}  // namespace dsd_cpp
