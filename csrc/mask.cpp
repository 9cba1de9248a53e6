// Magnitude masks with the exact tie rule, and in-place mask application: pruned entries
// set to +0.0 (apply_masks_) or to a value per tensor (fill_pruned_).
//
// A mask prunes the k smallest |x| of its segment: every |x| below the k-th smallest
// magnitude t, plus the first k - count(|x| < t) entries equal to t in position order (lower
// flat index, then earlier tensor). True = kept.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <string_view>

namespace dsd_cpp {
namespace {

// Elements per parallel task of apply_masks_.
constexpr int64_t kChunk = int64_t{1} << 16;

// Writes every group's masks so that the ks[g] smallest |x| of its concatenation are pruned:
// one selection for all groups (select.cpp), then one parallel pass over all their chunks.
void write_masks(const std::vector<Group>& groups, const std::vector<int64_t>& ks) {
  Selections selections = select_groups(groups, ks);
  // Tie ranks are needed only where some of the selected key's entries are kept.
  std::vector<char> ranked(groups.size(), 0);
  for (size_t g = 0; g < groups.size(); ++g) {
    ranked[g] = ks[g] > 0 && ks[g] - selections.selected[g].less < selections.selected[g].equal;
  }
  count_chunk_ties(groups, selections, ranked);
  std::vector<int64_t> ties_before(selections.chunks.size(), 0);  // in the group's earlier chunks
  for (size_t g = 0; g < groups.size(); ++g) {
    int64_t ties = 0;
    for (int64_t c = selections.first_chunk[g]; c < selections.first_chunk[g + 1]; ++c) {
      ties_before[c] = ties;
      ties += selections.chunk_ties[c];
    }
  }
  parallel_dynamic(static_cast<int64_t>(selections.chunks.size()), [&](int64_t c) {
    const Chunk& chunk = selections.chunks[c];
    const int64_t g = chunk.group;
    const Selection& selected = selections.selected[g];
    const uint32_t threshold = selected.key;
    const int64_t ties_to_prune = ks[g] - selected.less;  // in [1, selected.equal] when k > 0
    // Where the chunk's ties are all pruned (or all kept), no tie needs its rank.
    enum { kKeepAll, kKeepAbove, kKeepFromThreshold, kRankTies } rule;
    if (ks[g] == 0) rule = kKeepAll;
    else if (!ranked[g] || ties_before[c] + selections.chunk_ties[c] <= ties_to_prune)
      rule = kKeepAbove;
    else if (ties_before[c] >= ties_to_prune) rule = kKeepFromThreshold;
    else rule = kRankTies;
    int64_t rank = ties_before[c];  // 1-based rank of the last tie seen
    for_each_key_block(groups[g], chunk.begin, chunk.end,
                       [&](const Segment& s, int64_t i, const uint32_t* bits, int64_t n) {
      bool* out = s.mask + i;
      switch (rule) {
        case kKeepAll:
          std::fill(out, out + n, true);
          break;
        case kKeepAbove:
          for (int64_t j = 0; j < n; ++j) out[j] = (bits[j] & kKeyMask) > threshold;
          break;
        case kKeepFromThreshold:
          for (int64_t j = 0; j < n; ++j) out[j] = (bits[j] & kKeyMask) >= threshold;
          break;
        case kRankTies:
          for (int64_t j = 0; j < n; ++j) {
            const uint32_t key = bits[j] & kKeyMask;
            const bool tied = key == threshold;
            rank += tied;
            out[j] = key > threshold || (tied && rank > ties_to_prune);
          }
          break;
      }
    });
  });
}

// ks: the entries to prune of each segment, one per tensor for scope "layer", one for "global".
std::vector<at::Tensor> magnitude_masks(at::TensorList xs, at::IntArrayRef ks,
                                        std::string_view scope) {
  TORCH_CHECK(scope == "layer" || scope == "global", "dsd_cpp.magnitude_masks: unknown scope ",
              scope);
  const size_t segment_count = scope == "global" ? 1 : xs.size();
  TORCH_CHECK(ks.size() == segment_count, "dsd_cpp.magnitude_masks: ", ks.size(),
              " counts for ", segment_count, " segments");
  std::vector<at::Tensor> masks;
  for (const auto& x : xs) masks.push_back(at::empty(x.sizes(), x.options().dtype(at::kBool)));
  std::vector<at::Tensor> keep_alive;
  const std::vector<Segment> segments = make_segments(xs, keep_alive, masks);
  std::vector<Group> groups;
  std::vector<int64_t> counts;
  if (scope == "global") {
    groups.push_back(segments);
    counts.push_back(ks[0]);
  } else {
    size_t next = 0;  // the segments are the non-empty tensors, in order
    for (size_t i = 0; i < xs.size(); ++i) {
      if (xs[i].numel() == 0) continue;
      Segment segment = segments[next++];
      segment.start = 0;
      groups.push_back({segment});
      counts.push_back(ks[i]);
    }
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    const int64_t numel = total_numel(groups[g]);
    TORCH_CHECK(0 <= counts[g] && counts[g] <= numel, "dsd_cpp.magnitude_masks: a count of ",
                counts[g], " is outside [0, ", numel, "]");
  }
  write_masks(groups, counts);
  return masks;
}

// Writes `value`'s bits at pruned entries: (x & keep) | (value & ~keep), whatever x was, NaN
// included. A branch-free integer loop, which the compiler vectorizes for every element width
// only if the mask is read as bytes (GCC cannot vectorize a bool-to-integer conversion) and
// the two pointers are known apart.
template <typename bits_t>
void fill_pruned(bits_t* __restrict x, const uint8_t* __restrict keep, bits_t value, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const bits_t kept = bits_t{0} - static_cast<bits_t>(keep[j] != 0);
    x[j] = static_cast<bits_t>((x[j] & kept) | (value & ~kept));
  }
}

// The bits of `value` rounded to `dtype` as torch's fill rounds it (through fp32).
uint32_t value_bits(double value, at::ScalarType dtype) {
  uint32_t bits = 0;
  dispatch_float_dtype(dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t rounded = at::Scalar(value).to<scalar_t>();
    if constexpr (sizeof(scalar_t) == 4) {
      std::memcpy(&bits, &rounded, 4);
    } else {
      uint16_t half_bits;
      std::memcpy(&half_bits, &rounded, 2);
      bits = half_bits;
    }
  });
  return bits;
}

void fill_pruned_(at::TensorList xs, at::TensorList masks, at::ArrayRef<double> values) {
  TORCH_CHECK(xs.size() == masks.size() && xs.size() == values.size(), "dsd_cpp.fill_pruned_: ",
              xs.size(), " tensors, ", masks.size(), " masks and ", values.size(), " values");
  std::vector<at::Tensor> targets, keeps;
  std::vector<int64_t> numels;
  std::vector<uint32_t> bits;
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(masks[i].scalar_type() == at::kBool && masks[i].sizes() == xs[i].sizes(),
                "dsd_cpp.fill_pruned_: masks[", i, "] must be a bool tensor shaped like xs[", i,
                "]");
    targets.push_back(dense_layout(xs[i]));
    keeps.push_back(in_layout(masks[i], targets.back()));
    numels.push_back(xs[i].numel());
    bits.push_back(value_bits(values[i], xs[i].scalar_type()));
  }
  const std::vector<Span> spans = split_spans(numels, kChunk);
  parallel_dynamic(static_cast<int64_t>(spans.size()), [&](int64_t s) {
    const Span& span = spans[s];
    const at::Tensor& x = targets[span.tensor];
    const auto* keep =
        reinterpret_cast<const uint8_t*>(keeps[span.tensor].data_ptr<bool>()) + span.begin;
    const int64_t n = span.end - span.begin;
    if (x.element_size() == 4) {
      fill_pruned(static_cast<uint32_t*>(x.data_ptr()) + span.begin, keep, bits[span.tensor], n);
    } else {
      fill_pruned(static_cast<uint16_t*>(x.data_ptr()) + span.begin, keep,
                  static_cast<uint16_t>(bits[span.tensor]), n);
    }
  });
  for (size_t i = 0; i < xs.size(); ++i) write_back(targets[i], xs[i]);
}

// fill_pruned_ with +0.0 everywhere.
void apply_masks_(at::TensorList xs, at::TensorList masks) {
  TORCH_CHECK(xs.size() == masks.size(), "dsd_cpp.apply_masks_: ", xs.size(), " tensors but ",
              masks.size(), " masks");
  fill_pruned_(xs, masks, std::vector<double>(xs.size(), 0.0));
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("magnitude_masks", TORCH_FN(magnitude_masks));
  m.impl("apply_masks_", TORCH_FN(apply_masks_));
  m.impl("fill_pruned_", TORCH_FN(fill_pruned_));
}

}  // namespace dsd_cpp
