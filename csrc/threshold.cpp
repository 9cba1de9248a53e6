// Exact k-th smallest |x| over a list of tensors: a parallel histogram radix select on the fp32
// bit patterns of |x| (dsd_cpu.h), reading each tensor where it is, never concatenating them.
//
// Each pass counts the next digit of every key that still shares the digits chosen so far,
// then chooses the digit whose bucket holds the k-th smallest.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace dsd_cpp {
namespace {

struct RadixPass {
  int shift;  // the digit is (key >> shift) & (2^bits - 1)
  int bits;
};

// The 31 bits of a key in digits. Wide digits leave fewer candidates after the first pass, so
// later passes only skim memory, but each thread's histograms take 1 MiB: worth it for large
// inputs; small ones (one tensor of many, per layer) take 32 KiB histograms that stay in L1.
const std::vector<RadixPass> kWidePasses = {{15, 16}, {0, 15}};
const std::vector<RadixPass> kNarrowPasses = {{20, 11}, {9, 11}, {0, 9}};
constexpr int64_t kWideMinNumel = int64_t{1} << 22;

// Elements per parallel task.
constexpr int64_t kChunk = int64_t{1} << 16;

// Each thread counts into kCopies interleaved 32-bit histograms: runs of equal digits would
// otherwise serialize on one counter. They are added up into 64-bit counts after each
// kFlushEvery elements, before any 32-bit count could overflow.
constexpr int64_t kCopies = 4;
constexpr int64_t kFlushEvery = int64_t{1} << 32;

using iVec = at::vec::Vectorized<int32_t>;

// Adds to `copies` (kCopies histograms of 2^pass.bits bins) the digits of the keys in
// [begin, end) that are still candidates.
void count_digits(const std::vector<Segment>& segments, int64_t begin, int64_t end,
                  const RadixPass& pass, uint32_t prefix, int prefix_shift, uint32_t* copies) {
  const int64_t bins = int64_t{1} << pass.bits;
  const uint32_t digit_mask = static_cast<uint32_t>(bins - 1);
  const int shift = pass.shift;
  auto count = [=](int64_t j, uint32_t key) {
    ++copies[(j & (kCopies - 1)) * bins + ((key >> shift) & digit_mask)];
  };
  auto count_candidate = [&](int64_t j, const uint32_t* bits) {
    const uint32_t key = bits[j] & kKeyMask;
    if ((key >> prefix_shift) == prefix) count(j, key);
  };
  const bool every_key = prefix_shift == 31;  // the first pass
  // Keys are < 2^31, so they shift and compare alike as int32.
  const iVec key_mask_vec(static_cast<int32_t>(kKeyMask));
  const iVec prefix_vec(static_cast<int32_t>(prefix));
  const iVec prefix_shift_vec(prefix_shift);
  for_each_key_block(segments, begin, end, [&](const Segment&, int64_t, const uint32_t* bits,
                                               int64_t n) {
    if (every_key) {
      for (int64_t j = 0; j < n; ++j) count(j, bits[j] & kKeyMask);
      return;
    }
    // Later passes: few keys are candidates, so test a vector of keys at once and look at
    // single keys only where one matched.
    int64_t j = 0;
    for (; j + iVec::size() <= n; j += iVec::size()) {
      const iVec keys = iVec::loadu(bits + j) & key_mask_vec;
      if (at::vec::VecMask<int32_t, 1>((keys >> prefix_shift_vec) == prefix_vec).all_zero()) {
        continue;
      }
      for (int64_t i = j; i < j + iVec::size(); ++i) count_candidate(i, bits);
    }
    for (; j < n; ++j) count_candidate(j, bits);
  });
}

at::Tensor kth_smallest_abs(at::TensorList xs, int64_t k) {
  std::vector<at::Tensor> keep_alive;
  const std::vector<Segment> segments = make_segments(xs, keep_alive);
  TORCH_CHECK(1 <= k && k <= total_numel(segments), "dsd_cpp.kth_smallest_abs: k=", k,
              " is outside [1, ", total_numel(segments), "]");
  at::ScalarType dtype = xs[0].scalar_type();
  for (const auto& x : xs) dtype = c10::promoteTypes(dtype, x.scalar_type());
  // The k-th smallest is one of the inputs' magnitudes, so the promoted dtype holds it exactly.
  return at::scalar_tensor(key_to_float(select_kth(segments, k).key),
                           at::TensorOptions().dtype(dtype));
}

// Below this many keys, one thread copying them and running nth_element is faster than the
// radix passes, whose fixed cost (clearing and summing per-thread histograms in three parallel
// regions) dominates small tensors such as a network's biases and small layers.
constexpr int64_t kSmallNumel = int64_t{1} << 14;

Selection select_kth_small(const std::vector<Segment>& segments, int64_t k) {
  std::vector<uint32_t> keys;
  keys.reserve(total_numel(segments));
  for_each_key_block(segments, 0, total_numel(segments),
                     [&](const Segment&, int64_t, const uint32_t* bits, int64_t n) {
                       for (int64_t j = 0; j < n; ++j) keys.push_back(bits[j] & kKeyMask);
                     });
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
  const uint32_t key = keys[k - 1];
  int64_t less = 0;
  int64_t equal = 0;
  for (const uint32_t other : keys) {
    less += other < key;
    equal += other == key;
  }
  return {key, less, equal};
}

}  // namespace

Selection select_kth(const std::vector<Segment>& segments, int64_t k) {
  const int64_t total = total_numel(segments);
  if (total <= kSmallNumel) return select_kth_small(segments, k);
  const std::vector<RadixPass>& passes = total >= kWideMinNumel ? kWidePasses : kNarrowPasses;
  const int64_t chunks = (std::min(total, kFlushEvery) + kChunk - 1) / kChunk;
  const int64_t threads = std::min<int64_t>(std::max(1, at::get_num_threads()), chunks);
  const int64_t bins = int64_t{1} << passes[0].bits;  // the widest digit comes first
  std::vector<uint32_t> copies(threads * kCopies * bins);  // per thread
  std::vector<int64_t> counts(bins);
  uint32_t prefix = 0;    // the digits chosen so far, most significant first
  int prefix_shift = 31;  // a key is still a candidate iff (key >> prefix_shift) == prefix
  int64_t rank = k;       // the answer's rank among the candidates
  int64_t less = 0;       // keys known to be below the answer
  int64_t equal = 0;
  for (const RadixPass& pass : passes) {
    const int64_t pass_bins = int64_t{1} << pass.bits;
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t lo = 0; lo < total; lo += kFlushEvery) {
      const int64_t hi = std::min(total, lo + kFlushEvery);
      std::fill(copies.begin(), copies.end(), 0);
      parallel_dynamic((hi - lo + kChunk - 1) / kChunk, [&](int64_t c) {
        count_digits(segments, lo + c * kChunk, std::min(hi, lo + (c + 1) * kChunk), pass,
                     prefix, prefix_shift, copies.data() + at::get_thread_num() * kCopies * bins);
      });
      for (int64_t t = 0; t < threads; ++t) {
        const uint32_t* thread_copies = copies.data() + t * kCopies * bins;
        for (int64_t b = 0; b < kCopies * pass_bins; ++b) counts[b % pass_bins] += thread_copies[b];
      }
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
