// Shared pieces of the C++ CPU kernels: dtype dispatch, fp32 loads/stores of 2 vectors,
// operand layouts for elementwise kernels, and the magnitude keys of the threshold search.
// C++17 throughout: torch 2.11 still builds extensions with -std=c++17.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace dsd_cpp {

using fVec = at::vec::Vectorized<float>;

// Elementwise loops advance 2 fp32 vectors at a time: one vector of fp16/bf16 holds as many.
constexpr int64_t kStep = 2 * fVec::size();

// Calls f(scalar_t{}) for the three parameter dtypes the public API admits.
template <typename F>
void dispatch_float_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, "dsd_cpp: unsupported dtype ", dtype);
  }
}

// `count` (<= kStep) elements as two fp32 vectors; lanes past `count` read as 0.
template <typename scalar_t>
inline std::pair<fVec, fVec> load_fp32(const scalar_t* ptr, int64_t count = kStep) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (count == kStep) return {fVec::loadu(ptr), fVec::loadu(ptr + fVec::size())};
    return {fVec::loadu(ptr, std::min<int64_t>(count, fVec::size())),
            fVec::loadu(ptr + fVec::size(), std::max<int64_t>(count - fVec::size(), 0))};
  } else {
    using Vec = at::vec::Vectorized<scalar_t>;
    auto vec = count == kStep ? Vec::loadu(ptr) : Vec::loadu(ptr, count);
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(vec);
    return {lo, hi};
  }
}

// Stores the first `count` lanes of (lo, hi), rounding once to scalar_t.
template <typename scalar_t>
inline void store_fp32(scalar_t* ptr, const fVec& lo, const fVec& hi, int64_t count = kStep) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (count == kStep) {
      lo.store(ptr);
      hi.store(ptr + fVec::size());
      return;
    }
    lo.store(ptr, std::min<int64_t>(count, fVec::size()));
    if (count > fVec::size()) hi.store(ptr + fVec::size(), count - fVec::size());
  } else {
    auto vec = at::vec::convert_from_float<scalar_t>(lo, hi);
    if (count == kStep) vec.store(ptr);
    else vec.store(ptr, count);
  }
}

// All-ones bits where the mask keeps, 0 where it prunes: `value & keep` writes a pruned
// position as +0.0 whatever the value (NaN included), which a multiply would not. The integer
// loop compiles to byte-to-int widening instructions.
inline std::pair<fVec, fVec> keep_bits(const bool* mask, int64_t count = kStep) {
  alignas(64) int32_t bits[kStep];
  if (count == kStep) {
    for (int64_t j = 0; j < kStep; ++j) bits[j] = -static_cast<int32_t>(mask[j]);
  } else {
    for (int64_t j = 0; j < kStep; ++j) bits[j] = j < count ? -static_cast<int32_t>(mask[j]) : 0;
  }
  return {fVec::loadu(bits), fVec::loadu(bits + fVec::size())};
}

// Elementwise kernels walk every operand of a parameter linearly in memory, so the operands
// must share one dense layout: the parameter's own when it is dense (channels_last stays
// channels_last), else row-major.
inline at::Tensor dense_layout(const at::Tensor& param) {
  return param.is_non_overlapping_and_dense() ? param : param.contiguous();
}

// `t` itself when it already has `layout`'s strides, else a copy in that layout.
inline at::Tensor in_layout(const at::Tensor& t, const at::Tensor& layout) {
  if (t.strides() == layout.strides()) return t;
  return at::empty_strided(layout.sizes(), layout.strides(), t.options()).copy_(t);
}

// Results computed in a copy (see in_layout) go back to the caller's tensor.
inline void write_back(const at::Tensor& computed, const at::Tensor& target) {
  if (!computed.is_same(target)) target.copy_(computed);
}

// ---- magnitude keys -----------------------------------------------------------------------
// A magnitude is compared by its key: the fp32 bit pattern of x without the sign bit, which is
// the bit pattern of |x|. For non-negative floats the order of the bit patterns is the order of
// the values, +0.0 and -0.0 both give key 0, and fp16/bf16 convert to fp32 exactly. Keys of
// finite inputs are < 2^31.
constexpr uint32_t kKeyMask = 0x7FFFFFFF;

// One tensor of a threshold search, placed in the virtual concatenation of all of them.
struct Segment {
  const void* data;     // contiguous, so the flat index is the logical (row-major) one
  at::ScalarType dtype;
  int64_t numel;        // > 0
  int64_t start;        // flat index of the first element in the concatenation
  bool* mask = nullptr; // where magnitude_masks writes this tensor's mask
};

// The non-empty tensors of `xs` in one concatenation, each with its mask from `masks` when
// given. `keep_alive` holds the contiguous copies of strided inputs.
inline std::vector<Segment> make_segments(at::TensorList xs, std::vector<at::Tensor>& keep_alive,
                                          at::TensorList masks = {}) {
  std::vector<Segment> segments;
  int64_t start = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    if (xs[i].numel() == 0) continue;
    keep_alive.push_back(xs[i].contiguous());
    const at::Tensor& x = keep_alive.back();
    bool* mask = masks.empty() ? nullptr : masks[i].data_ptr<bool>();
    segments.push_back({x.data_ptr(), x.scalar_type(), x.numel(), start, mask});
    start += x.numel();
  }
  return segments;
}

inline int64_t total_numel(const std::vector<Segment>& segments) {
  return segments.empty() ? 0 : segments.back().start + segments.back().numel;
}

// fp16/bf16 are converted to fp32 bits in blocks this long (4 KiB: they stay in L1 until used).
constexpr int64_t kConvertBlock = 1024;

template <typename scalar_t>
inline void fp32_bits(const scalar_t* src, int64_t n, uint32_t* bits) {
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    auto [lo, hi] = load_fp32(src + i);
    lo.store(bits + i);
    hi.store(bits + i + fVec::size());
  }
  for (; i < n; ++i) {
    const float value = static_cast<float>(src[i]);
    std::memcpy(bits + i, &value, sizeof(float));
  }
}

// Calls f(segment, local index of the first element, bits, n) over the elements with flat
// indices [begin, end) of the concatenation, in order; `bits[j] & kKeyMask` is the key of the
// j-th. fp32 tensors are read in place, fp16/bf16 ones converted block by block.
template <typename F>
void for_each_key_block(const std::vector<Segment>& segments, int64_t begin, int64_t end,
                        const F& f) {
  uint32_t converted[kConvertBlock];
  auto it = std::upper_bound(segments.begin(), segments.end(), begin,
                             [](int64_t pos, const Segment& s) { return pos < s.start; });
  for (--it; it != segments.end() && it->start < end; ++it) {
    const Segment& segment = *it;
    const int64_t lo = std::max(begin, segment.start) - segment.start;
    const int64_t hi = std::min(end, segment.start + segment.numel) - segment.start;
    dispatch_float_dtype(segment.dtype, [&](auto zero) {
      using scalar_t = decltype(zero);
      if constexpr (std::is_same_v<scalar_t, float>) {
        f(segment, lo, static_cast<const uint32_t*>(segment.data) + lo, hi - lo);
      } else {
        const auto* src = static_cast<const scalar_t*>(segment.data);
        for (int64_t i = lo; i < hi; i += kConvertBlock) {
          const int64_t n = std::min(kConvertBlock, hi - i);
          fp32_bits(src + i, n, converted);
          f(segment, i, converted, n);
        }
      }
    });
  }
}

// The k-th smallest key of a concatenation, with how many keys are below it and equal to it.
struct Selection {
  uint32_t key;
  int64_t less;
  int64_t equal;
};

// ---- selection (select.cpp) -----------------------------------------------------------
// A group is ranked on its own: the concatenation of its segments (starts relative to the
// group). One group of all tensors for a global threshold, one group per tensor per layer.
using Group = std::vector<Segment>;

// A range [begin, end) of a group's concatenation: the unit of work of the selection and of
// the mask writer. Each group's concatenation is cut at multiples of kSelectChunk.
struct Chunk {
  int64_t group;
  int64_t begin;
  int64_t end;
};
constexpr int64_t kSelectChunk = int64_t{1} << 16;

struct Selections {
  std::vector<Chunk> chunks;          // every group's chunks, group by group, in order
  std::vector<int64_t> first_chunk;   // per group, its first chunk; then chunks.size()
  std::vector<Selection> selected;    // per group with k > 0
  std::vector<int64_t> chunk_ties;    // per chunk: its keys equal to the group's selected key
  std::vector<char> ties_known;       // per group: chunk_ties is filled for its chunks
};

// Per group g with ks[g] >= 1 (and <= its size), the ks[g]-th smallest key; ks[g] == 0
// selects nothing. Exact for every input.
Selections select_groups(const std::vector<Group>& groups, const std::vector<int64_t>& ks);

// Fills chunk_ties for the chunks of every group with `wanted[g]` whose ties are not known.
void count_chunk_ties(const std::vector<Group>& groups, Selections& selections,
                      const std::vector<char>& wanted);

// ---- digit histograms (histogram.cpp) ------------------------------------------------------
// The digit plan of the exact radix select, most significant first: the one of
// dsd_kernels/radix.py (DIGITS, PASSES), which the Triton kernels and the sharded path use.
struct Digit {
  int shift;
  int bits;
};
constexpr Digit kDigits[] = {{24, 7}, {16, 8}, {8, 8}, {0, 8}};

// Digits a dtype needs: below its mantissa the fp32 pattern of |x| is zero.
inline int digit_passes(at::ScalarType dtype) {
  return dtype == at::kFloat ? 4 : dtype == at::kHalf ? 3 : 2;
}

// hist[r * 2^bits + d]: keys of the segments with segment_rows[i] == r whose bits above
// shift + bits equal prefixes[r] and whose digit is d (magnitude_histogram's contract).
std::vector<int64_t> digit_histograms(const std::vector<Segment>& segments,
                                      const std::vector<int64_t>& segment_rows,
                                      const std::vector<int64_t>& prefixes, int shift, int bits);

inline float key_to_float(uint32_t key) {
  float value;
  std::memcpy(&value, &key, sizeof(float));
  return value;
}

// A range of one tensor's elements: the unit of work of the elementwise kernels.
struct Span {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// The elements of tensors with these sizes, cut into spans of at most `chunk` elements, so one
// parallel loop covers a whole list of tensors.
inline std::vector<Span> split_spans(const std::vector<int64_t>& numels, int64_t chunk) {
  std::vector<Span> spans;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += chunk) {
      spans.push_back({static_cast<int64_t>(t), begin, std::min(numels[t], begin + chunk)});
    }
  }
  return spans;
}

// Runs f(i) for i in [0, n) on every thread, each taking the next index when it is free: work
// of uneven size, or a thread slowed down by another process, does not hold the others up.
template <typename F>
void parallel_dynamic(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1)) < n;) f(i);
  });
}

}  // namespace dsd_cpp
