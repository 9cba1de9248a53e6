// The exact k-th smallest magnitude key of many groups at once (dsd_cpu.h, select_groups): the
// engine under kth_smallest_abs and magnitude_masks. A sampled bracket, then nth_element on
// its copies or the radix passes of dsd_kernels/radix.py's plan; the bracket's counts also give
// the masks' tie ranks. See docs/design.md, The bracket, Radix passes and Tie ranks and masks.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

namespace dsd_cpp {
namespace {

// The bracket's constants: copies of dsd_kernels/radix.py's (tests/test_constants.py ties
// them). See docs/design.md, The bracket.
constexpr int64_t kSmallNumel = int64_t{1} << 14;  // radix.BRACKETED_NUMEL
constexpr int64_t kSampleBlock = 64;               // radix.SAMPLE_BLOCK
constexpr double kSamplePerRoot = 16.0;            // radix.SAMPLE_PER_ROOT
constexpr int64_t kMinSample = 4096;               // radix.MIN_SAMPLE
constexpr int64_t kMaxSample = int64_t{1} << 16;   // radix.MAX_SAMPLE
constexpr double kSigmas = 4.5;                    // radix.SIGMAS
constexpr double kSlackRanks = 8.0;                // radix.SLACK_RANKS

// Keys a chunk may copy: an eighth of a chunk (docs/design.md, The bracket).
constexpr int64_t kChunkRoom = kSelectChunk / 8;

// The bins of the histogram that finds the bucket of the copies holding the k-th smallest.
constexpr int kCopyDigitBits = 12;

// For tests (registered at the end of this file): a scale of the bracket's width (0: lo = hi
// = the sample's quantile, which misses unless the k-th smallest is tied there), and the
// misses so far.
std::atomic<double> bracket_scale{1.0};
std::atomic<int64_t> bracket_misses{0};

using iVec = at::vec::Vectorized<int32_t>;

// A chunk's room and a vector's worth of slots past it, which take the stores past its end.
constexpr int64_t kRoomSlots = kChunkRoom + iVec::size();

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// AVX2 has no compressing store: per 8-bit lane mask, the permutation that moves the chosen
// lanes to the front.
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
  constexpr CompressTable() : lanes() {
    for (int mask = 0; mask < 256; ++mask) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if ((mask >> lane) & 1) lanes[mask][next++] = lane;
      }
    }
  }
};
constexpr CompressTable kCompress{};
#endif

// Stores the lanes of `keys` where `chosen` is all-ones at room[count...] (in lane order; the
// store may write up to a vector past them) and counts them. Past kChunkRoom copies, the
// stores land in the slots past the room and only the count goes on.
inline void append_chosen(const iVec& keys, const iVec& chosen, uint32_t* room, int64_t& count) {
  uint32_t* at = room + std::min(count, kChunkRoom);
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 mask = _mm512_movepi32_mask(chosen);
  // Compress in a register, then store the whole vector: a compressing store to memory is
  // microcoded and slow on some CPUs (AMD Zen 4).
  _mm512_storeu_si512(at, _mm512_maskz_compress_epi32(mask, keys));
  count += __builtin_popcount(mask);
#elif defined(CPU_CAPABILITY_AVX2)
  const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(chosen));
  const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.lanes[mask]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(at), _mm256_permutevar8x32_epi32(keys, order));
  count += __builtin_popcount(mask);
#else
  alignas(64) int32_t key_lanes[iVec::size()];
  alignas(64) int32_t chosen_lanes[iVec::size()];
  keys.store(key_lanes);
  chosen.store(chosen_lanes);
  for (int64_t i = 0; i < iVec::size(); ++i) {
    room[std::min(count, kChunkRoom)] = static_cast<uint32_t>(key_lanes[i]);
    count += chosen_lanes[i] != 0;
  }
#endif
}

struct Bracket {
  uint32_t lo;
  uint32_t hi;  // >= lo
};

// What a chunk's pass found.
struct ChunkCounts {
  int64_t below = 0;   // keys < lo
  int64_t at_lo = 0;   // keys == lo
  int64_t at_hi = 0;   // keys == hi, when hi != lo
  int64_t inside = 0;  // lo < key < hi; the first kChunkRoom of them are copied
};

Bracket bracket_of(const Group& group, int64_t k) {
  const int64_t total = total_numel(group);
  const int64_t wanted = std::clamp<int64_t>(
      std::llround(kSamplePerRoot * std::sqrt(static_cast<double>(total))), kMinSample,
      kMaxSample);
  const int64_t blocks = std::max<int64_t>(1, std::min(wanted, total / 4) / kSampleBlock);
  std::vector<uint32_t> sample;
  sample.reserve(blocks * kSampleBlock);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = std::min(total - kSampleBlock, (2 * b + 1) * total / (2 * blocks));
    for_each_key_block(group, begin, begin + kSampleBlock,
                       [&](const Segment&, int64_t, const uint32_t* bits, int64_t n) {
                         for (int64_t j = 0; j < n; ++j) sample.push_back(bits[j] & kKeyMask);
                       });
  }
  const double size = static_cast<double>(sample.size());
  const double quantile = (static_cast<double>(k) - 0.5) / static_cast<double>(total);
  const double centre = quantile * size;  // where the k-th smallest is expected in the sample
  const double scale = bracket_scale.load();
  const double half_width =
      scale * (kSigmas * std::sqrt(size * quantile * (1 - quantile)) + kSlackRanks);
  const int64_t last = static_cast<int64_t>(sample.size()) - 1;
  int64_t lo_rank = static_cast<int64_t>(std::floor(centre - half_width));
  int64_t hi_rank = static_cast<int64_t>(std::ceil(centre + half_width));
  if (scale == 0) lo_rank = hi_rank = std::clamp<int64_t>(lo_rank, 0, last);
  Bracket bracket{0, kKeyMask};  // a rank past the sample's ends leaves that side open
  if (lo_rank >= 0) {
    std::nth_element(sample.begin(), sample.begin() + lo_rank, sample.end());
    bracket.lo = sample[lo_rank];
  }
  if (hi_rank <= last) {
    const auto from = sample.begin() + std::max<int64_t>(lo_rank, 0);
    std::nth_element(from, sample.begin() + hi_rank, sample.end());
    bracket.hi = sample[hi_rank];
  }
  return bracket;
}

// Counts one chunk's keys against the bracket, copying those strictly inside into `room`.
ChunkCounts count_chunk(const Group& group, const Chunk& chunk, const Bracket& bracket,
                        uint32_t* room) {
  ChunkCounts counts;
  const uint32_t lo = bracket.lo;
  const uint32_t hi = bracket.hi;
  // Keys are < 2^31, so they compare alike as int32; -1 equals no key (hi == lo is counted
  // at lo only).
  const iVec lo_vec(static_cast<int32_t>(lo));
  const iVec hi_vec(static_cast<int32_t>(hi));
  const iVec at_hi_vec(hi == lo ? -1 : static_cast<int32_t>(hi));
  const iVec key_mask_vec(static_cast<int32_t>(kKeyMask));
  // Comparisons give all-ones (-1) lanes: subtracting them counts.
  iVec below(0), at_lo(0), at_hi(0);
  auto count_one = [&](uint32_t key) {  // the same, branch-free, for the tail of a block
    counts.below += key < lo;
    counts.at_lo += key == lo;
    counts.at_hi += hi != lo && key == hi;
    room[std::min(counts.inside, kChunkRoom)] = key;
    counts.inside += lo < key && key < hi;
  };
  for_each_key_block(group, chunk.begin, chunk.end,
                     [&](const Segment&, int64_t, const uint32_t* bits, int64_t n) {
    int64_t j = 0;
    for (; j + iVec::size() <= n; j += iVec::size()) {
      const iVec keys = iVec::loadu(bits + j) & key_mask_vec;
      below = below - (keys < lo_vec);
      at_lo = at_lo - (keys == lo_vec);
      at_hi = at_hi - (keys == at_hi_vec);
      // No branch: whether a vector holds a copy is unpredictable at a few percent a key.
      append_chosen(keys, (keys > lo_vec) & (keys < hi_vec), room, counts.inside);
    }
    for (; j < n; ++j) count_one(bits[j] & kKeyMask);
  });
  alignas(64) int32_t lanes[3][iVec::size()];
  below.store(lanes[0]);
  at_lo.store(lanes[1]);
  at_hi.store(lanes[2]);
  for (int64_t i = 0; i < iVec::size(); ++i) {
    counts.below += lanes[0][i];
    counts.at_lo += lanes[1][i];
    counts.at_hi += lanes[2][i];
  }
  return counts;
}

// The rank-th smallest (1-based) of `keys`, reordered in place, with how many of them are below
// it and equal to it.
Selection nth_smallest(std::vector<uint32_t>& keys, int64_t rank) {
  std::nth_element(keys.begin(), keys.begin() + (rank - 1), keys.end());
  const uint32_t key = keys[rank - 1];
  int64_t less = 0;
  int64_t equal = 0;
  for (const uint32_t other : keys) {
    less += other < key;
    equal += other == key;
  }
  return {key, less, equal};
}

// The copies of a group: chunk c's are rooms[room_of[c]...] (counts[c].inside of them).
struct Copies {
  const uint32_t* rooms;
  const std::vector<int64_t>& room_of;
  const std::vector<ChunkCounts>& counts;
  int64_t first;  // the group's chunks
  int64_t end;

  template <typename F>
  void for_each(const F& f) const {
    for (int64_t c = first; c < end; ++c) {
      const uint32_t* room = rooms + room_of[c];
      for (int64_t j = 0; j < counts[c].inside; ++j) f(room[j]);
    }
  }
};

// The rank-th smallest (1-based) of the copies, all strictly between lo and hi, with how many
// copies are below it and equal to it. A histogram of the top kCopyDigitBits of key - lo
// finds the bucket that holds it; nth_element runs on that bucket only.
Selection select_copy(const Copies& copies, uint32_t lo, uint32_t hi, int64_t rank) {
  const uint32_t span = hi - lo;  // offsets key - lo are in [1, span)
  int shift = 0;
  while ((span >> shift) >> kCopyDigitBits) ++shift;
  std::vector<int64_t> bins(int64_t{1} << kCopyDigitBits, 0);
  copies.for_each([&](uint32_t key) { ++bins[(key - lo) >> shift]; });
  uint32_t bucket = 0;
  int64_t less = 0;
  for (; less + bins[bucket] < rank; ++bucket) less += bins[bucket];
  std::vector<uint32_t> inside;
  inside.reserve(bins[bucket]);
  copies.for_each([&](uint32_t key) {
    if (((key - lo) >> shift) == bucket) inside.push_back(key);
  });
  const Selection within = nth_smallest(inside, rank - less);
  return {within.key, less + within.less, within.equal};
}

// A group of at most kSmallNumel keys (one chunk): nth_element on a copy.
Selection select_small(const Group& group, int64_t k) {
  std::vector<uint32_t> keys;
  keys.reserve(total_numel(group));
  for_each_key_block(group, 0, total_numel(group),
                     [&](const Segment&, int64_t, const uint32_t* bits, int64_t n) {
                       for (int64_t j = 0; j < n; ++j) keys.push_back(bits[j] & kKeyMask);
                     });
  return nth_smallest(keys, k);
}

// The radix select over digit histograms for the groups `missed`, all of them in one parallel
// loop per digit.
void select_by_digits(const std::vector<Group>& groups, const std::vector<int64_t>& ks,
                      const std::vector<int64_t>& missed, std::vector<Selection>& selected) {
  std::vector<Segment> segments;  // the missed groups' segments in one concatenation
  std::vector<int64_t> rows;
  int passes = 0;
  for (size_t r = 0; r < missed.size(); ++r) {
    for (Segment segment : groups[missed[r]]) {
      segment.start = total_numel(segments);
      segments.push_back(segment);
      rows.push_back(static_cast<int64_t>(r));
      passes = std::max(passes, digit_passes(segment.dtype));
    }
  }
  std::vector<int64_t> prefixes(missed.size(), 0);
  std::vector<int64_t> ranks(missed.size());  // the answer's rank among the row's candidates
  std::vector<int64_t> less(missed.size(), 0);
  std::vector<int64_t> equal(missed.size(), 0);
  for (size_t r = 0; r < missed.size(); ++r) ranks[r] = ks[missed[r]];
  for (int p = 0; p < passes; ++p) {
    const Digit digit = kDigits[p];
    const int64_t bins = int64_t{1} << digit.bits;
    const std::vector<int64_t> hist =
        digit_histograms(segments, rows, prefixes, digit.shift, digit.bits);
    for (size_t r = 0; r < missed.size(); ++r) {
      const int64_t* counts = hist.data() + r * bins;
      int64_t d = 0;
      for (; counts[d] < ranks[r]; ++d) {
        ranks[r] -= counts[d];
        less[r] += counts[d];
      }
      equal[r] = counts[d];
      prefixes[r] = (prefixes[r] << digit.bits) | d;
    }
  }
  for (size_t r = 0; r < missed.size(); ++r) {
    const uint32_t key = static_cast<uint32_t>(prefixes[r] << kDigits[passes - 1].shift);
    selected[missed[r]] = {key, less[r], equal[r]};
  }
}

}  // namespace

Selections select_groups(const std::vector<Group>& groups, const std::vector<int64_t>& ks) {
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  Selections out;
  for (int64_t g = 0; g < num_groups; ++g) {
    out.first_chunk.push_back(static_cast<int64_t>(out.chunks.size()));
    const int64_t total = total_numel(groups[g]);
    for (int64_t begin = 0; begin < total; begin += kSelectChunk) {
      out.chunks.push_back({g, begin, std::min(total, begin + kSelectChunk)});
    }
  }
  out.first_chunk.push_back(static_cast<int64_t>(out.chunks.size()));
  out.selected.assign(num_groups, Selection{0, 0, 0});
  out.chunk_ties.assign(out.chunks.size(), 0);
  out.ties_known.assign(num_groups, 0);

  std::vector<int64_t> small, bracketed;
  for (int64_t g = 0; g < num_groups; ++g) {
    if (ks[g] == 0) continue;
    (total_numel(groups[g]) <= kSmallNumel ? small : bracketed).push_back(g);
  }
  parallel_dynamic(static_cast<int64_t>(small.size()), [&](int64_t i) {
    const int64_t g = small[i];
    out.selected[g] = select_small(groups[g], ks[g]);
    out.chunk_ties[out.first_chunk[g]] = out.selected[g].equal;  // a small group is one chunk
    out.ties_known[g] = 1;
  });

  std::vector<Bracket> brackets(num_groups);
  parallel_dynamic(static_cast<int64_t>(bracketed.size()), [&](int64_t i) {
    brackets[bracketed[i]] = bracket_of(groups[bracketed[i]], ks[bracketed[i]]);
  });
  std::vector<int64_t> work;  // the chunks of bracketed groups
  for (const int64_t g : bracketed) {
    for (int64_t c = out.first_chunk[g]; c < out.first_chunk[g + 1]; ++c) work.push_back(c);
  }
  // Uninitialised: only the copies are ever written or read.
  std::unique_ptr<uint32_t[]> rooms(new uint32_t[std::max<size_t>(1, work.size()) * kRoomSlots]);
  std::vector<ChunkCounts> counts(out.chunks.size());
  std::vector<int64_t> room_of(out.chunks.size(), 0);
  for (size_t w = 0; w < work.size(); ++w) room_of[work[w]] = static_cast<int64_t>(w) * kRoomSlots;
  parallel_dynamic(static_cast<int64_t>(work.size()), [&](int64_t w) {
    const Chunk& chunk = out.chunks[work[w]];
    counts[work[w]] = count_chunk(groups[chunk.group], chunk, brackets[chunk.group],
                                  rooms.get() + room_of[work[w]]);
  });

  std::vector<char> missed_flags(num_groups, 0);
  parallel_dynamic(static_cast<int64_t>(bracketed.size()), [&](int64_t i) {
    const int64_t g = bracketed[i];
    const int64_t first = out.first_chunk[g], end = out.first_chunk[g + 1];
    ChunkCounts sum;
    bool overflow = false;
    for (int64_t c = first; c < end; ++c) {
      sum.below += counts[c].below;
      sum.at_lo += counts[c].at_lo;
      sum.at_hi += counts[c].at_hi;
      sum.inside += counts[c].inside;
      overflow |= counts[c].inside > kChunkRoom;
    }
    const Bracket& bracket = brackets[g];
    const int64_t k = ks[g];
    if (k <= sum.below) {
      missed_flags[g] = 1;
    } else if (k <= sum.below + sum.at_lo) {
      out.selected[g] = {bracket.lo, sum.below, sum.at_lo};
      for (int64_t c = first; c < end; ++c) out.chunk_ties[c] = counts[c].at_lo;
      out.ties_known[g] = 1;
    } else if (k <= sum.below + sum.at_lo + sum.inside) {
      if (overflow) {
        missed_flags[g] = 1;
        return;
      }
      const Copies copies{rooms.get(), room_of, counts, first, end};
      const Selection among = select_copy(copies, bracket.lo, bracket.hi,
                                          k - sum.below - sum.at_lo);
      out.selected[g] = {among.key, sum.below + sum.at_lo + among.less, among.equal};
      // The chunks' ties, for masks that keep some of them: count their copies.
      if (k - out.selected[g].less < among.equal) {
        for (int64_t c = first; c < end; ++c) {
          const uint32_t* room = rooms.get() + room_of[c];
          out.chunk_ties[c] = std::count(room, room + counts[c].inside, among.key);
        }
        out.ties_known[g] = 1;
      }
    } else if (k <= sum.below + sum.at_lo + sum.inside + sum.at_hi) {
      out.selected[g] = {bracket.hi, sum.below + sum.at_lo + sum.inside, sum.at_hi};
      for (int64_t c = first; c < end; ++c) out.chunk_ties[c] = counts[c].at_hi;
      out.ties_known[g] = 1;
    } else {
      missed_flags[g] = 1;
    }
  });

  std::vector<int64_t> missed;
  for (const int64_t g : bracketed) {
    if (missed_flags[g]) missed.push_back(g);
  }
  if (!missed.empty()) {
    bracket_misses += static_cast<int64_t>(missed.size());
    select_by_digits(groups, ks, missed, out.selected);
  }
  return out;
}

void count_chunk_ties(const std::vector<Group>& groups, Selections& selections,
                      const std::vector<char>& wanted) {
  std::vector<int64_t> work;
  for (size_t c = 0; c < selections.chunks.size(); ++c) {
    const int64_t g = selections.chunks[c].group;
    if (wanted[g] && !selections.ties_known[g]) work.push_back(static_cast<int64_t>(c));
  }
  parallel_dynamic(static_cast<int64_t>(work.size()), [&](int64_t w) {
    const Chunk& chunk = selections.chunks[work[w]];
    const uint32_t key = selections.selected[chunk.group].key;
    int64_t ties = 0;
    for_each_key_block(groups[chunk.group], chunk.begin, chunk.end,
                       [&](const Segment&, int64_t, const uint32_t* bits, int64_t n) {
                         for (int64_t j = 0; j < n; ++j) ties += (bits[j] & kKeyMask) == key;
                       });
    selections.chunk_ties[work[w]] = ties;
  });
  for (size_t g = 0; g < groups.size(); ++g) selections.ties_known[g] |= wanted[g];
}

namespace {

double set_bracket_scale(double scale) { return bracket_scale.exchange(scale); }

int64_t bracket_miss_count() { return bracket_misses.load(); }

}  // namespace

// Not dsd ops: the tests' handles on the bracket (tests/test_select.py).
TORCH_LIBRARY_FRAGMENT(dsd_cpp, m) {
  m.def("set_bracket_scale(float scale) -> float", &set_bracket_scale);
  m.def("bracket_misses() -> int", &bracket_miss_count);
}

}  // namespace dsd_cpp
