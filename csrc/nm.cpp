// N:M masks: in every group of m consecutive entries along dim 1, keep the n largest |x|, the
// lower index pruned first among equal magnitudes (docs/design.md, N:M masks).
//
// A tensor is ranked with dim 1 last, as (A * B, C): A the size of dim 0, C of dim 1, B the
// product of the rest. For a Linear weight (B == 1) that is the tensor itself; another one is
// copied in that order first (a Conv weight's entries of a group lie B apart in memory, too
// few in a row to vectorize over), and its mask copied back. Then every group is M adjacent
// entries. Each entry counts the entries of its group that rank above it (M - 1 comparisons)
// and is kept when fewer than n do; the loops are written so that the compiler vectorizes
// them over entries.
//
// Keys are the magnitude bits of the tensor's own dtype (fp32: x & 0x7FFFFFFF; fp16 and bf16:
// x & 0x7FFF). Within one dtype they order and tie exactly as the fp32 keys of the other
// kernels do: fp16 and bf16 convert to fp32 exactly and monotonically.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <limits>
#include <type_traits>

namespace dsd_cpp {
namespace {

// Entries per parallel task.
constexpr int64_t kChunk = int64_t{1} << 16;

template <typename bits_t>
constexpr bits_t magnitude_bits() {
  return static_cast<bits_t>(std::numeric_limits<bits_t>::max() >> 1);
}

// Whether `other`, at position j of the group, ranks above `key` at position i: a larger key,
// or an equal one at a higher index.
template <typename bits_t>
inline int ranks_above(bits_t other, bits_t key, bool later) {
  return (other > key) | ((other == key) & later);
}

// One group of m adjacent entries, any m (<= 64).
template <typename bits_t>
void adjacent_group(const bits_t* x, uint8_t* out, int m, int n) {
  constexpr bits_t kMask = magnitude_bits<bits_t>();
  for (int i = 0; i < m; ++i) {
    int above = 0;
    for (int j = 0; j < m; ++j) above += ranks_above<bits_t>(x[j] & kMask, x[i] & kMask, j > i);
    out[i] = above < n;
  }
}

#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vectors of signed keys (GCC's vector extensions: one AVX-512 register, two AVX2
// ones), and the bytes of one vector's mask.
template <typename key_t>
struct KeyVector;
template <>
struct KeyVector<int32_t> {
  typedef int32_t type __attribute__((vector_size(64)));
  typedef uint8_t bytes __attribute__((vector_size(16)));
};
template <>
struct KeyVector<int16_t> {
  typedef int16_t type __attribute__((vector_size(64)));
  typedef uint8_t bytes __attribute__((vector_size(32)));
};

// Groups of M adjacent entries, a vector of them at a time (M divides the lane count, so no
// group straddles two vectors); `count` is a multiple of the lane count. For each rotation r,
// every lane meets its partner j = (i + r) % M by a shuffle. Keys are < 2^(bits - 1), so
// signed compares order them, and "other ranks above key" (larger, or equal and later) is
// other > key - later.
template <int M, typename bits_t>
void adjacent_vectors(const bits_t* x, uint8_t* out, int64_t count, int n) {
  using key_t = std::make_signed_t<bits_t>;
  using V = typename KeyVector<key_t>::type;
  using Bytes = typename KeyVector<key_t>::bytes;
  constexpr int kLanes = 64 / sizeof(key_t);
  constexpr key_t kMask = static_cast<key_t>(magnitude_bits<bits_t>());
  V partner[M], later[M];
  for (int r = 1; r < M; ++r) {
    for (int l = 0; l < kLanes; ++l) {
      const int i = l % M;
      partner[r][l] = static_cast<key_t>(l - i + (i + r) % M);
      later[r][l] = static_cast<key_t>(i + r < M);
    }
  }
  for (int64_t p = 0; p < count; p += kLanes) {
    V key;
    std::memcpy(&key, x + p, sizeof(V));
    key &= kMask;
    V above = {};
    for (int r = 1; r < M; ++r) {
      const V other = __builtin_shuffle(key, partner[r]);
      above -= other > key - later[r];  // a true compare is -1
    }
    const Bytes keep = __builtin_convertvector((above < static_cast<key_t>(n)) & 1, Bytes);
    std::memcpy(out + p, &keep, sizeof(Bytes));
  }
}
#endif

// Entries [begin, end) (multiples of M) of a tensor whose groups are M adjacent entries
// (B == 1): whole vectors of groups, then the groups left one by one.
template <int M, typename bits_t>
void adjacent_groups(const bits_t* x, uint8_t* out, int64_t begin, int64_t end, int n) {
  int64_t done = begin;
#if defined(__GNUC__) && !defined(__clang__)
  constexpr int64_t kLanes = 64 / sizeof(bits_t);
  const int64_t vectors = (end - begin) / kLanes * kLanes;
  adjacent_vectors<M>(x + begin, out + begin, vectors, n);
  done += vectors;
#endif
  for (int64_t g = done; g < end; g += M) adjacent_group(x + g, out + g, M, n);
}

// The largest magnitude key of x[0, count): a NaN's is above Inf's. Run on a work unit just
// before its masks, so that it brings the unit into cache rather than reading memory twice.
template <typename bits_t>
bits_t largest_key(const bits_t* x, int64_t count) {
  constexpr bits_t kMask = magnitude_bits<bits_t>();
  bits_t largest = 0;
  for (int64_t p = 0; p < count; ++p) largest = std::max<bits_t>(largest, x[p] & kMask);
  return largest;
}

// One tensor as groups of m adjacent entries.
struct Groups {
  const void* data;
  uint8_t* mask;
  int64_t index;     // in xs
  uint32_t inf_key;  // the key of Inf in the tensor's dtype
  size_t width;      // bytes per entry
};

// A run of groups of one tensor: the unit of work.
struct Work {
  int64_t tensor;
  int64_t begin;  // first group
  int64_t end;
};

// The masks of groups [begin, end) of a tensor; false if they hold a NaN (masks unwritten).
template <typename bits_t>
bool write_groups(const Groups& t, int64_t begin, int64_t end, int m, int n) {
  const bits_t* x = static_cast<const bits_t*>(t.data);
  const int64_t from = begin * m, to = end * m;
  if (largest_key(x + from, to - from) > t.inf_key) return false;
  switch (m) {
    case 2: adjacent_groups<2>(x, t.mask, from, to, n); break;
    case 4: adjacent_groups<4>(x, t.mask, from, to, n); break;
    case 8: adjacent_groups<8>(x, t.mask, from, to, n); break;
    case 16: adjacent_groups<16>(x, t.mask, from, to, n); break;
    default:
      for (int64_t g = from; g < to; g += m) adjacent_group(x + g, t.mask + g, m, n);
  }
  return true;
}

uint32_t inf_key(at::ScalarType dtype) {
  return dtype == at::kFloat ? 0x7F800000u : dtype == at::kHalf ? 0x7C00u : 0x7F80u;
}

std::vector<at::Tensor> nm_masks(at::TensorList xs, int64_t n, int64_t m) {
  TORCH_CHECK(1 <= n && n < m && m <= 64, "dsd_cpp.nm_masks: pattern ", n, ":", m,
              " needs 1 <= n < m <= 64");
  std::vector<at::Tensor> masks, grouped, grouped_masks;
  std::vector<Groups> tensors;
  std::vector<Work> work;
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK(x.dim() >= 2 && x.size(1) % m == 0, "dsd_cpp.nm_masks: xs[", i,
                "] needs 2+ dims and dim 1 a multiple of ", m);
    masks.push_back(at::empty(x.sizes(), x.options().dtype(at::kBool)));
    if (x.numel() == 0) continue;
    const bool moved = x.dim() > 2;  // dim 1 is last only for a 2-D tensor
    grouped.push_back((moved ? x.movedim(1, -1) : x).contiguous());
    grouped_masks.push_back(moved ? at::empty(grouped.back().sizes(), masks.back().options())
                                  : masks.back());
    const int64_t t = static_cast<int64_t>(tensors.size());
    tensors.push_back({grouped.back().data_ptr(),
                       reinterpret_cast<uint8_t*>(grouped_masks.back().data_ptr<bool>()),
                       static_cast<int64_t>(i), inf_key(x.scalar_type()),
                       static_cast<size_t>(x.element_size())});
    const int64_t groups = x.numel() / m, per_task = std::max<int64_t>(1, kChunk / m);
    for (int64_t g = 0; g < groups; g += per_task) {
      work.push_back({t, g, std::min(groups, g + per_task)});
    }
  }
  std::vector<char> written(work.size());
  parallel_dynamic(static_cast<int64_t>(work.size()), [&](int64_t w) {
    const Work& unit = work[w];
    const Groups& t = tensors[unit.tensor];
    const int mi = static_cast<int>(m), ni = static_cast<int>(n);
    written[w] = t.width == 4 ? write_groups<uint32_t>(t, unit.begin, unit.end, mi, ni)
                              : write_groups<uint16_t>(t, unit.begin, unit.end, mi, ni);
  });
  for (size_t w = 0; w < work.size(); ++w) {
    TORCH_CHECK_VALUE(written[w], "xs[", tensors[work[w].tensor].index,
                      "] contains NaN; magnitudes are undefined");
  }
  for (size_t t = 0; t < tensors.size(); ++t) {
    at::Tensor& mask = masks[tensors[t].index];
    if (!grouped_masks[t].is_same(mask)) mask.copy_(grouped_masks[t].movedim(-1, 1));
  }
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("nm_masks", TORCH_FN(nm_masks));
}

}  // namespace dsd_cpp
