// N:M masks: in every group of m consecutive entries along dim 1, keep the n largest |x|, the
// lower index pruned first among equal magnitudes (docs/design.md, N:M masks).
//
// A tensor is read row-major as (A, C, B): A the size of dim 0, C of dim 1, B the product of
// the rest. A row (a, c / m) holds m * B entries: B groups whose m entries lie B apart. When
// B == 1 (Linear weights) a row is one group of m adjacent entries. Each entry counts the
// entries of its group that rank above it (m - 1 comparisons) and is kept when fewer than n
// do; the loops are written so that the compiler vectorizes them over entries.
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

// One row of strided groups (B > 1): entry j of group b at x[j * B + b]. The loop over b reads
// each of the M lines of the row contiguously; M a compile-time constant, or 0 for any (m).
template <int M, typename bits_t>
void strided_row(const bits_t* __restrict x, uint8_t* __restrict out, int64_t B, int m, int n) {
  constexpr bits_t kMask = magnitude_bits<bits_t>();
  const int size = M ? M : m;
  for (int i = 0; i < size; ++i) {
    for (int64_t b = 0; b < B; ++b) {
      const bits_t key = x[i * B + b] & kMask;
      int above = 0;
      for (int j = 0; j < size; ++j) above += ranks_above<bits_t>(x[j * B + b] & kMask, key, j > i);
      out[i * B + b] = above < n;
    }
  }
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

// One tensor, viewed as (A, C, B) and cut into rows of m * B entries.
struct Rows {
  const void* data;
  uint8_t* mask;
  int64_t row_numel;  // m * B
  int64_t inner;      // B
  int64_t index;      // in xs
  uint32_t inf_key;   // the key of Inf in the tensor's dtype
  size_t width;       // bytes per entry
};

// A run of rows of one tensor: the unit of work.
struct Work {
  int64_t tensor;
  int64_t begin;  // first row
  int64_t end;
};

// The masks of rows [begin, end) of a tensor; false if they hold a NaN (masks unwritten).
template <typename bits_t>
bool write_rows(const Rows& t, int64_t begin, int64_t end, int m, int n) {
  const bits_t* x = static_cast<const bits_t*>(t.data);
  if (largest_key(x + begin * t.row_numel, (end - begin) * t.row_numel) > t.inf_key) {
    return false;
  }
  if (t.inner == 1) {  // a row is one group: entries [begin * m, end * m)
    const int64_t from = begin * m, to = end * m;
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
  for (int64_t r = begin; r < end; ++r) {
    const bits_t* row = x + r * t.row_numel;
    uint8_t* out = t.mask + r * t.row_numel;
    switch (m) {
      case 2: strided_row<2>(row, out, t.inner, m, n); break;
      case 4: strided_row<4>(row, out, t.inner, m, n); break;
      case 8: strided_row<8>(row, out, t.inner, m, n); break;
      default: strided_row<0>(row, out, t.inner, m, n); break;
    }
  }
  return true;
}

uint32_t inf_key(at::ScalarType dtype) {
  return dtype == at::kFloat ? 0x7F800000u : dtype == at::kHalf ? 0x7C00u : 0x7F80u;
}

std::vector<at::Tensor> nm_masks(at::TensorList xs, int64_t n, int64_t m) {
  TORCH_CHECK(1 <= n && n < m && m <= 64, "dsd_cpp.nm_masks: pattern ", n, ":", m,
              " needs 1 <= n < m <= 64");
  std::vector<at::Tensor> masks, keep_alive;
  std::vector<Rows> tensors;
  std::vector<Work> work;
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK(x.dim() >= 2 && x.size(1) % m == 0, "dsd_cpp.nm_masks: xs[", i,
                "] needs 2+ dims and dim 1 a multiple of ", m);
    masks.push_back(at::empty(x.sizes(), x.options().dtype(at::kBool)));
    if (x.numel() == 0) continue;
    keep_alive.push_back(x.contiguous());
    const at::Tensor& xc = keep_alive.back();
    const int64_t inner = x.numel() / (x.size(0) * x.size(1));
    const int64_t rows = x.numel() / (m * inner);
    const int64_t t = static_cast<int64_t>(tensors.size());
    tensors.push_back({xc.data_ptr(), reinterpret_cast<uint8_t*>(masks.back().data_ptr<bool>()),
                       m * inner, inner, static_cast<int64_t>(i), inf_key(x.scalar_type()),
                       static_cast<size_t>(xc.element_size())});
    const int64_t per_task = std::max<int64_t>(1, kChunk / (m * inner));
    for (int64_t r = 0; r < rows; r += per_task) {
      work.push_back({t, r, std::min(rows, r + per_task)});
    }
  }
  std::vector<char> written(work.size());
  parallel_dynamic(static_cast<int64_t>(work.size()), [&](int64_t w) {
    const Work& unit = work[w];
    const Rows& t = tensors[unit.tensor];
    const int mi = static_cast<int>(m), ni = static_cast<int>(n);
    written[w] = t.width == 4 ? write_rows<uint32_t>(t, unit.begin, unit.end, mi, ni)
                              : write_rows<uint16_t>(t, unit.begin, unit.end, mi, ni);
  });
  for (size_t w = 0; w < work.size(); ++w) {
    TORCH_CHECK_VALUE(written[w], "xs[", tensors[work[w].tensor].index,
                      "] contains NaN; magnitudes are undefined");
  }
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("nm_masks", TORCH_FN(nm_masks));
}

}  // namespace dsd_cpp
