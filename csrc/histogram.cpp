// One digit's histogram of the magnitude keys of many tensors at once, one row per group of
// tensors (dsd_kernels/_ops.py, magnitude_histogram): a pass of a radix select that a caller
// drives: the sharded threshold, which sums the rows of every rank between passes, and the
// C++ selection's fallback (select.cpp).
//
// All tensors are cut into chunks of one parallel loop; a task counts its chunk into a local
// 32-bit histogram and adds it to the chunk's row under a lock once, so many small tensors cost
// one parallel region, not one per tensor.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace dsd_cpp {

namespace {
constexpr int64_t kMinChunk = int64_t{1} << 16;
}  // namespace

std::vector<int64_t> digit_histograms(const std::vector<Segment>& segments,
                                      const std::vector<int64_t>& segment_rows,
                                      const std::vector<int64_t>& prefixes, int shift, int bits) {
  const int64_t bins = int64_t{1} << bits;
  std::vector<int64_t> hist(prefixes.size() * bins, 0);
  const int64_t total = total_numel(segments);
  const uint32_t digit_mask = static_cast<uint32_t>(bins - 1);
  const int prefix_shift = shift + bits;
  // Adding a local histogram costs `bins` additions: a chunk is much longer than that.
  const int64_t chunk = std::max(kMinChunk, 16 * bins);
  std::mutex adding;
  parallel_dynamic((total + chunk - 1) / chunk, [&](int64_t c) {
    std::vector<uint32_t> counts(bins, 0);
    int64_t row = -1;
    auto add_counts = [&] {
      if (row < 0) return;
      std::lock_guard<std::mutex> guard(adding);
      int64_t* target = hist.data() + row * bins;
      for (int64_t b = 0; b < bins; ++b) target[b] += counts[b];
      std::fill(counts.begin(), counts.end(), 0);
    };
    for_each_key_block(segments, c * chunk, std::min(total, (c + 1) * chunk),
                       [&](const Segment& segment, int64_t, const uint32_t* keys, int64_t n) {
      const int64_t segment_row = segment_rows[&segment - segments.data()];
      if (segment_row != row) {
        add_counts();
        row = segment_row;
      }
      // Keys are < 2^31; the prefix of the first digit (shift + bits == 31) is 0 for all.
      const uint32_t wanted = static_cast<uint32_t>(prefixes[row]);
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t key = keys[j] & kKeyMask;
        if ((key >> prefix_shift) == wanted) ++counts[(key >> shift) & digit_mask];
      }
    });
    add_counts();
  });
  return hist;
}

namespace {

at::Tensor magnitude_histogram(at::TensorList xs, at::IntArrayRef rows, const at::Tensor& prefixes,
                               int64_t shift, int64_t bits) {
  TORCH_CHECK(rows.size() == xs.size(), "dsd_cpp.magnitude_histogram: ", rows.size(),
              " rows for ", xs.size(), " tensors");
  TORCH_CHECK(1 <= bits && bits <= 8 && 0 <= shift && shift + bits <= 31,
              "dsd_cpp.magnitude_histogram: digit of ", bits, " bits at ", shift,
              " is not inside the 31 key bits");
  const at::Tensor prefix_values = prefixes.to(at::kLong).contiguous();
  const int64_t num_rows = prefix_values.numel();
  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided inputs
  std::vector<at::Tensor> nonempty;
  std::vector<int64_t> segment_rows;
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(0 <= rows[i] && rows[i] < num_rows, "dsd_cpp.magnitude_histogram: rows[", i,
                "]=", rows[i], " is outside [0, ", num_rows, ")");
    if (xs[i].numel() == 0) continue;
    nonempty.push_back(xs[i]);
    segment_rows.push_back(rows[i]);
  }
  const std::vector<Segment> segments = make_segments(nonempty, keep_alive);
  const int64_t* prefix = prefix_values.data_ptr<int64_t>();
  std::vector<int64_t> counts = digit_histograms(
      segments, segment_rows, std::vector<int64_t>(prefix, prefix + num_rows),
      static_cast<int>(shift), static_cast<int>(bits));
  return at::tensor(counts, prefixes.options().dtype(at::kLong))
      .reshape({num_rows, int64_t{1} << bits});
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("magnitude_histogram", TORCH_FN(magnitude_histogram));
}

}  // namespace dsd_cpp
