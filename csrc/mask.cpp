// Magnitude masks with the exact tie rule, and in-place mask application.
//
// A mask prunes the k = floor(sparsity * N) smallest |x|: every |x| below the k-th smallest
// magnitude t, plus the first k - count(|x| < t) entries equal to t in position order (lower
// flat index, then earlier tensor). True = kept.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <numeric>
#include <string_view>

namespace dsd_cpp {
namespace {

// Elements per parallel task. Tied entries are ranked chunk by chunk: counting the ties of
// every chunk first tells each chunk the rank of its first tie, whatever thread runs it.
constexpr int64_t kChunk = int64_t{1} << 16;

// Per-layer masks: a tensor this large is split across threads; smaller ones go one per thread.
constexpr int64_t kSplitNumel = int64_t{1} << 20;

// Writes each segment's mask so that the k smallest |x| of their concatenation are pruned.
void write_masks(const std::vector<Segment>& segments, int64_t k) {
  const int64_t total = total_numel(segments);
  if (k == 0) {
    for (const Segment& s : segments) std::fill(s.mask, s.mask + s.numel, true);
    return;
  }
  const Selection selected = select_kth(segments, k);
  const uint32_t threshold = selected.key;
  const int64_t ties_to_prune = k - selected.less;  // in [1, selected.equal]
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  auto for_each_in_chunk = [&](int64_t c, const auto& f) {
    for_each_key_block(segments, c * kChunk, std::min(total, (c + 1) * kChunk), f);
  };
  if (ties_to_prune == selected.equal) {
    parallel_dynamic(chunks, [&](int64_t c) {
      for_each_in_chunk(c, [&](const Segment& s, int64_t i, const uint32_t* bits, int64_t n) {
        bool* out = s.mask + i;
        for (int64_t j = 0; j < n; ++j) out[j] = (bits[j] & kKeyMask) > threshold;
      });
    });
    return;
  }
  std::vector<int64_t> ties_before(chunks + 1, 0);  // ties in the chunks before chunk c
  parallel_dynamic(chunks, [&](int64_t c) {
    int64_t ties = 0;
    for_each_in_chunk(c, [&](const Segment&, int64_t, const uint32_t* bits, int64_t n) {
      for (int64_t j = 0; j < n; ++j) ties += (bits[j] & kKeyMask) == threshold;
    });
    ties_before[c + 1] = ties;
  });
  std::partial_sum(ties_before.begin(), ties_before.end(), ties_before.begin());
  parallel_dynamic(chunks, [&](int64_t c) {
    int64_t rank = ties_before[c];  // 1-based rank of the last tie seen
    for_each_in_chunk(c, [&](const Segment& s, int64_t i, const uint32_t* bits, int64_t n) {
      bool* out = s.mask + i;
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t key = bits[j] & kKeyMask;
        const bool tied = key == threshold;
        rank += tied;
        out[j] = key > threshold || (tied && rank > ties_to_prune);
      }
    });
  });
}

// floor(sparsity * n) in double, as Python's math.floor(sparsity * n) computes it.
int64_t pruned_count(double sparsity, int64_t n) {
  return static_cast<int64_t>(std::floor(sparsity * static_cast<double>(n)));
}

std::vector<at::Tensor> magnitude_masks(at::TensorList xs, double sparsity, std::string_view scope) {
  TORCH_CHECK(scope == "layer" || scope == "global", "dsd_cpp.magnitude_masks: unknown scope ",
              scope);
  TORCH_CHECK(0.0 <= sparsity && sparsity < 1.0, "dsd_cpp.magnitude_masks: sparsity ", sparsity,
              " is outside [0, 1)");
  std::vector<at::Tensor> masks;
  for (const auto& x : xs) masks.push_back(at::empty(x.sizes(), x.options().dtype(at::kBool)));
  std::vector<at::Tensor> keep_alive;
  const std::vector<Segment> segments = make_segments(xs, keep_alive, masks);
  if (scope == "global") {
    write_masks(segments, pruned_count(sparsity, total_numel(segments)));
    return masks;
  }
  auto write_layer = [&](const Segment& segment) {
    Segment alone = segment;
    alone.start = 0;
    write_masks({alone}, pruned_count(sparsity, alone.numel));
  };
  std::vector<const Segment*> small;
  for (const Segment& s : segments) {
    if (s.numel >= kSplitNumel) write_layer(s);
    else small.push_back(&s);
  }
  parallel_dynamic(static_cast<int64_t>(small.size()), [&](int64_t i) { write_layer(*small[i]); });
  return masks;
}

// Clears the bits of pruned entries: the result is +0.0 whatever x was, NaN included. A
// branch-free integer loop, which the compiler vectorizes for every element width.
template <typename bits_t>
void zero_pruned(bits_t* x, const bool* keep, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] &= static_cast<bits_t>(-static_cast<bits_t>(keep[j]));
}

void apply_masks_(at::TensorList xs, at::TensorList masks) {
  TORCH_CHECK(xs.size() == masks.size(), "dsd_cpp.apply_masks_: ", xs.size(), " tensors but ",
              masks.size(), " masks");
  std::vector<at::Tensor> targets, keeps;
  std::vector<int64_t> numels;
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(masks[i].scalar_type() == at::kBool && masks[i].sizes() == xs[i].sizes(),
                "dsd_cpp.apply_masks_: masks[", i, "] must be a bool tensor shaped like xs[", i, "]");
    targets.push_back(dense_layout(xs[i]));
    keeps.push_back(in_layout(masks[i], targets.back()));
    numels.push_back(xs[i].numel());
  }
  const std::vector<Span> spans = split_spans(numels, kChunk);
  parallel_dynamic(static_cast<int64_t>(spans.size()), [&](int64_t s) {
    const Span& span = spans[s];
    const at::Tensor& x = targets[span.tensor];
    const bool* keep = keeps[span.tensor].data_ptr<bool>() + span.begin;
    const int64_t n = span.end - span.begin;
    if (x.element_size() == 4) {
      zero_pruned(static_cast<uint32_t*>(x.data_ptr()) + span.begin, keep, n);
    } else {
      zero_pruned(static_cast<uint16_t*>(x.data_ptr()) + span.begin, keep, n);
    }
  });
  for (size_t i = 0; i < xs.size(); ++i) write_back(targets[i], xs[i]);
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("magnitude_masks", TORCH_FN(magnitude_masks));
  m.impl("apply_masks_", TORCH_FN(apply_masks_));
}

}  // namespace dsd_cpp
