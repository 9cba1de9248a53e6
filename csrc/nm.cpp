// N:M masks: in every group of m consecutive entries along dim 1, keep the n largest |x|, the
// lower index pruned first among equal magnitudes (docs/design.md, N:M masks).
//
// A tensor is read row-major as (A, C, B): A the size of dim 0, C of dim 1, B the product of
// the rest. A row (a, c / m) holds m * B entries: B groups whose m entries lie B apart. When
// B == 1 (Linear weights) a row is one group of m adjacent entries, and rows are batched.
//
// Keys are the magnitude bits of the tensor's own dtype (fp32: x & 0x7FFFFFFF; fp16 and bf16:
// x & 0x7FFF). Within one dtype they order and tie exactly as the fp32 keys of the other
// kernels do: fp16 and bf16 convert to fp32 exactly and monotonically.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <limits>

namespace dsd_cpp {
namespace {

// Entries per parallel task.
constexpr int64_t kChunk = int64_t{1} << 16;

template <typename bits_t>
constexpr bits_t magnitude_bits() {
  return static_cast<bits_t>(std::numeric_limits<bits_t>::max() >> 1);
}

// keep[i] for one group of M keys: fewer than n keys rank above key i (a larger key, or an
// equal key at a higher index).
template <typename bits_t>
inline bool kept(const bits_t* keys, int i, int m, int n) {
  int above = 0;
  for (int j = 0; j < m; ++j) {
    above += (keys[j] > keys[i]) | ((keys[j] == keys[i]) & (j > i));
  }
  return above < n;
}

// Rows of adjacent groups (B == 1): `groups` groups of M entries from x to out. M is a
// compile-time constant for the common patterns so the compiler unrolls and vectorizes.
template <int M, typename bits_t>
void adjacent_groups(const bits_t* __restrict x, uint8_t* __restrict out, int64_t groups,
                     int n) {
  constexpr bits_t kMask = magnitude_bits<bits_t>();
  for (int64_t g = 0; g < groups; ++g) {
    bits_t keys[M];
    for (int j = 0; j < M; ++j) keys[j] = x[g * M + j] & kMask;
    for (int i = 0; i < M; ++i) {
      int above = 0;
      for (int j = 0; j < M; ++j) above += (keys[j] > keys[i]) | ((keys[j] == keys[i]) & (j > i));
      out[g * M + i] = above < n;
    }
  }
}

// Any M (<= 64), B == 1.
template <typename bits_t>
void adjacent_groups_any(const bits_t* x, uint8_t* out, int64_t groups, int m, int n) {
  constexpr bits_t kMask = magnitude_bits<bits_t>();
  bits_t keys[64];
  for (int64_t g = 0; g < groups; ++g) {
    for (int j = 0; j < m; ++j) keys[j] = x[g * m + j] & kMask;
    for (int i = 0; i < m; ++i) out[g * m + i] = kept(keys, i, m, n);
  }
}

// One row of strided groups (B > 1): entry j of group b at x[j * B + b]. The loop over b
// reads each of the m lines of the row contiguously.
template <typename bits_t>
void strided_row(const bits_t* __restrict x, uint8_t* __restrict out, int64_t B, int m,
                 int n) {
  constexpr bits_t kMask = magnitude_bits<bits_t>();
  for (int i = 0; i < m; ++i) {
    const bits_t* xi = x + i * B;
    uint8_t* oi = out + i * B;
    for (int64_t b = 0; b < B; ++b) {
      const bits_t key = xi[b] & kMask;
      int above = 0;
      for (int j = 0; j < m; ++j) {
        const bits_t other = x[j * B + b] & kMask;
        above += (other > key) | ((other == key) & (j > i));
      }
      oi[b] = above < n;
    }
  }
}

// One tensor, viewed as (A, C, B) and cut into rows of m * B entries.
struct Rows {
  const void* data;
  uint8_t* mask;
  int64_t row_numel;  // m * B
  int64_t inner;      // B
  size_t width;       // bytes per entry
};

// A run of rows of one tensor: the unit of work.
struct Work {
  int64_t tensor;
  int64_t begin;  // first row
  int64_t end;
};

template <typename bits_t>
void write_rows(const Rows& t, int64_t begin, int64_t end, int m, int n) {
  const bits_t* x = static_cast<const bits_t*>(t.data) + begin * t.row_numel;
  uint8_t* out = t.mask + begin * t.row_numel;
  if (t.inner == 1) {
    const int64_t groups = end - begin;
    switch (m) {
      case 2: return adjacent_groups<2>(x, out, groups, n);
      case 4: return adjacent_groups<4>(x, out, groups, n);
      case 8: return adjacent_groups<8>(x, out, groups, n);
      case 16: return adjacent_groups<16>(x, out, groups, n);
      default: return adjacent_groups_any(x, out, groups, m, n);
    }
  }
  for (int64_t r = begin; r < end; ++r) {
    strided_row(x, out, t.inner, m, n);
    x += t.row_numel;
    out += t.row_numel;
  }
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
                       m * inner, inner, static_cast<size_t>(xc.element_size())});
    const int64_t per_task = std::max<int64_t>(1, kChunk / (m * inner));
    for (int64_t r = 0; r < rows; r += per_task) {
      work.push_back({t, r, std::min(rows, r + per_task)});
    }
  }
  parallel_dynamic(static_cast<int64_t>(work.size()), [&](int64_t w) {
    const Work& unit = work[w];
    const Rows& t = tensors[unit.tensor];
    if (t.width == 4) {
      write_rows<uint32_t>(t, unit.begin, unit.end, static_cast<int>(m), static_cast<int>(n));
    } else {
      write_rows<uint16_t>(t, unit.begin, unit.end, static_cast<int>(m), static_cast<int>(n));
    }
  });
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("nm_masks", TORCH_FN(nm_masks));
}

}  // namespace dsd_cpp
