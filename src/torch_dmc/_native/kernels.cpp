// torch-dmc's CPU kernels for grid mode (docs/method.md § Grid mode, § Compiled kernels): the
// histogram of a site's sampled values and the table lookup of every activation value, one pass
// each, and a whole site in one call, instead of the chains of PyTorch operators in
// src/torch_dmc/transport.py (`_histogram`, `_lookup`, `grid_transport`).
//
// Each kernel repeats the floating-point operations of the operators it replaces, in the same
// order and without contraction into fused multiply-adds (built with -ffp-contract=off), so the
// results are the same bit for bit: tests/test_native.py compares both on random and adversarial
// inputs. Loaded by src/torch_dmc/native.py; CPU float32 only.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <limits>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// 1.5 * 2^23: for 0 <= t < 2^22, (t + kRound) - kRound is t rounded to the nearest integer, ties
// to even: what torch.round and grid_sample's nearest mode compute, without a library call.
constexpr float kRound = 12582912.0f;

inline float round_even(float t) { return (t + kRound) - kRound; }

// x * y + z as torch.addcmul computes it on this machine: fused (one rounding) where its CPU
// kernels use fused multiply-adds, else multiplied, then added. native.py finds out which.
template <bool kFused>
inline float mul_add(float x, float y, float z) {
  if constexpr (kFused) {
    return std::fma(x, y, z);
  } else {
    return z + x * y;
  }
}

// The sizes of x before and after `axis`: x is outer x C x inner in memory (contiguous).
std::pair<int64_t, int64_t> outer_inner(const at::Tensor& x, int64_t axis) {
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= x.size(d);
  for (int64_t d = axis + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {outer, inner};
}

void check_float_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              name, " must be a float32 CPU tensor, found ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimension(s), found ", t.dim());
}

constexpr int64_t kChunk = 1024;  // values whose cells are computed before they are counted

// The cells of n values (0 for a non-finite one; `finite` says which are, unless kMasked is
// false: every value is known to be finite), vectorisable.
template <bool kFused, bool kMasked>
inline void cells_of(const float* __restrict x, int64_t stride, int64_t n, float shift, float inv,
                     float top, int32_t* __restrict cell, bool* __restrict finite) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j * stride];
    if constexpr (kMasked) finite[j] = std::fabs(v) <= std::numeric_limits<float>::max();
    const float t = mul_add<kFused>(v, inv, shift);
    // clamp, then round: the same as round, then clamp (the bounds are integers); a NaN goes
    // to 0 (only possible for a non-finite v, not counted)
    const float c = std::min(top, std::max(0.0f, t));
    cell[j] = static_cast<int32_t>(round_even(c));
  }
}

// Counts one row's values into its cells (`cells_of`) as four partial counts part[i * size + k]
// (i = 0..3, overwritten), so that runs of equal cells do not wait on each other's stores.
// Non-finite values are not counted (kMasked = false: the caller has checked that every value is
// finite, and no mask is kept).
template <bool kFused, bool kMasked>
void count_parts(const float* v, int64_t stride, int64_t m, float shift, float inv, int64_t size,
                 int32_t* part) {
  const float top = static_cast<float>(size - 1);
  int32_t cell[kChunk];
  bool finite[kChunk];
  std::fill(part, part + 4 * size, 0);
  for (int64_t start = 0; start < m; start += kChunk) {
    const int64_t n = std::min(kChunk, m - start);
    if (stride == 1) {  // the common case, vectorised without strided loads
      cells_of<kFused, kMasked>(v + start, 1, n, shift, inv, top, cell, finite);
    } else {
      cells_of<kFused, kMasked>(v + start * stride, stride, n, shift, inv, top, cell, finite);
    }
    // one per finite value (without a mask: one per value, the mask never read)
    auto one = [&](int64_t j) -> int32_t { return kMasked ? finite[j] : 1; };
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      part[cell[j]] += one(j);
      part[size + cell[j + 1]] += one(j + 1);
      part[2 * size + cell[j + 2]] += one(j + 2);
      part[3 * size + cell[j + 3]] += one(j + 3);
    }
    for (; j < n; ++j) part[cell[j]] += one(j);
  }
}

// `count_parts` summed: cnt (size int64, overwritten) gets each cell's count. part: 4 * size
// int32 scratch.
template <bool kFused>
void count_row(const float* v, int64_t stride, int64_t m, float shift, float inv, int64_t size,
               int32_t* part, int64_t* cnt) {
  count_parts<kFused, true>(v, stride, m, shift, inv, size, part);
  for (int64_t k = 0; k < size; ++k)
    cnt[k] = static_cast<int64_t>(part[k]) + part[size + k] + part[2 * size + k] + part[3 * size + k];
}

template <bool kFused>
void count_cells(const float* v, int64_t s0, int64_t s1, int64_t rows, int64_t m, const float* shp,
                 const float* ivp, int64_t size, int64_t* out) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> part(4 * size);
    for (int64_t r = begin; r < end; ++r)
      count_row<kFused>(v + r * s0, s1, m, shp[r], ivp[r], size, part.data(), out + r * size);
  });
}

// Cell counts of `transport._histogram`'s finite path: value v of row r falls in cell
// round(clamp(shift[r] + v * inv[r], 0, size - 1)) (torch.addcmul, round_, clamp_); non-finite
// values are left out. values: C x M (any strides); shift, inv: C; fused: as `mul_add`.
// Returns C x size int64.
at::Tensor histogram(const at::Tensor& values, const at::Tensor& shift, const at::Tensor& inv,
                     int64_t size, bool fused) {
  check_float_cpu(values, "values", 2);
  check_float_cpu(shift, "shift", 1);
  check_float_cpu(inv, "inv", 1);
  const int64_t rows = values.size(0), m = values.size(1);
  TORCH_CHECK(shift.size(0) == rows && inv.size(0) == rows, "shift and inv need ", rows, " entries");
  TORCH_CHECK(size >= 2 && size < (1 << 22), "size must be in [2, 2^22), found ", size);
  TORCH_CHECK(m <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 values per row, found ", m);
  auto counts = at::empty({rows, size}, values.options().dtype(at::kLong));  // every count written
  const auto sh = shift.contiguous(), iv = inv.contiguous();
  const float* v = values.data_ptr<float>();
  const float* shp = sh.data_ptr<float>();
  const float* ivp = iv.data_ptr<float>();
  int64_t* out = counts.data_ptr<int64_t>();
  if (fused) {
    count_cells<true>(v, values.stride(0), values.stride(1), rows, m, shp, ivp, size, out);
  } else {
    count_cells<false>(v, values.stride(0), values.stride(1), rows, m, shp, ivp, size, out);
  }
  return counts;
}

// One value's lookup: its table entry (table row `row`) if finite, else `through`.
template <bool kFused>
inline float look_up_one(float v, float scale, float shift, const float* row, float top,
                         float half, float through) {
  const float g = mul_add<kFused>(v, scale, shift);
  const float u = (g + 1.0f) * half;
  const float k = std::min(top, std::max(0.0f, u));  // a NaN goes to 0, as in grid_sample
  const float y = row[static_cast<int32_t>(round_even(k))];
  return std::fabs(v) <= std::numeric_limits<float>::max() ? y : through;
}

// `look_up_one` of n values x[i] of the channels ch[i] = c0 + (kPerValue ? i : 0): scale, shift,
// a, b and the table rows are read at ch[i]; eight at a time where AVX2 is compiled in, with the
// same operations (so the same result) as `look_up_one`.
template <bool kFused, bool kAffine, bool kPerValue>
inline void look_up_span(const float* __restrict x, float* __restrict y, int64_t n, int64_t c0,
                         const float* scp, const float* shp, const float* ap, const float* bp,
                         const float* tab, int64_t row_stride, float top, float half) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 vtop = _mm256_set1_ps(top), vhalf = _mm256_set1_ps(half);
  const __m256 vone = _mm256_set1_ps(1.0f), vround = _mm256_set1_ps(kRound);
  const __m256 vzero = _mm256_setzero_ps();
  const __m256 vmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  const __m256 vabs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vstride = _mm256_set1_epi32(static_cast<int32_t>(row_stride));
  __m256 vs = _mm256_set1_ps(scp[c0]), vsh = _mm256_set1_ps(shp[c0]);
  const float* base = tab + c0 * row_stride;
  // In spans of up to kSpan values: the table indices eight at a time (and whether every value
  // is finite), then the table read by scalar loads (a little faster than an AVX2 gather on the
  // Intel Xeon measured) straight into y, then, only in a span that holds one, the non-finite
  // values passed through.
  constexpr int64_t kSpan = 64;
  alignas(32) int32_t index[kSpan];
  while (i + 8 <= n) {
    const int64_t len = std::min<int64_t>(kSpan, (n - i) & ~int64_t{7});
    __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t j = 0; j < len; j += 8) {
      __m256i rows = _mm256_setzero_si256();
      if constexpr (kPerValue) {
        vs = _mm256_loadu_ps(scp + c0 + i + j);
        vsh = _mm256_loadu_ps(shp + c0 + i + j);
        rows = _mm256_mullo_epi32(_mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int32_t>(i + j))),
                                  vstride);
      }
      const __m256 v = _mm256_loadu_ps(x + i + j);
      finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_and_ps(v, vabs), vmax, _CMP_LE_OQ));
      __m256 g;
      if constexpr (kFused) {
        g = _mm256_fmadd_ps(v, vs, vsh);
      } else {
        g = _mm256_add_ps(vsh, _mm256_mul_ps(v, vs));
      }
      const __m256 u = _mm256_mul_ps(_mm256_add_ps(g, vone), vhalf);
      // max(u, 0) returns 0 for a NaN u (the second operand), then min with the last node
      const __m256 k = _mm256_min_ps(vtop, _mm256_max_ps(u, vzero));
      const __m256 node = _mm256_sub_ps(_mm256_add_ps(k, vround), vround);
      _mm256_store_si256(reinterpret_cast<__m256i*>(index + j),
                         _mm256_add_epi32(rows, _mm256_cvttps_epi32(node)));
    }
    for (int64_t j = 0; j < len; ++j) y[i + j] = base[index[j]];
    if (_mm256_movemask_ps(finite) != 0xff) {
      for (int64_t j = i; j < i + len; ++j) {
        if (std::fabs(x[j]) <= std::numeric_limits<float>::max()) continue;
        const int64_t c = c0 + (kPerValue ? j : 0);
        y[j] = kAffine ? x[j] * ap[c] + bp[c] : x[j];  // transport.affine_values' order
      }
    }
    i += len;
  }
#endif
  for (; i < n; ++i) {
    const int64_t c = c0 + (kPerValue ? i : 0);
    const float through = kAffine ? x[i] * ap[c] + bp[c] : x[i];
    y[i] = look_up_one<kFused>(x[i], scp[c], shp[c], tab + c * row_stride, top, half, through);
  }
}

template <bool kFused, bool kAffine>
void look_up(const float* xp, const float* tab, int64_t row_stride, const float* scp,
             const float* shp, const float* ap, const float* bp, int64_t outer, int64_t channels,
             int64_t inner, int64_t nodes, float* op) {
  const float top = static_cast<float>(nodes - 1);
  const float half = top / 2;
  constexpr int64_t grain = 16384;
  if (inner == 1) {  // channels last: rows of C values
    at::parallel_for(0, outer, std::max<int64_t>(1, grain / channels), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o)
        look_up_span<kFused, kAffine, true>(xp + o * channels, op + o * channels, channels, 0,
                                            scp, shp, ap, bp, tab, row_stride, top, half);
    });
  } else {  // blocks of `inner` values of one channel, in memory order (the prefetcher follows)
    at::parallel_for(0, outer * channels, std::max<int64_t>(1, grain / inner), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk)
        look_up_span<kFused, kAffine, false>(xp + blk * inner, op + blk * inner, inner, blk % channels,
                                             scp, shp, ap, bp, tab, row_stride, top, half);
    });
  }
}

// `transport._lookup` of a float32 activation: value v of channel c becomes
// image[c, round(clamp(((shift[c] + v * scale[c]) + 1) * ((B - 1) / 2), 0, B - 1))]
// (torch.addcmul, then grid_sample's nearest mode with border padding and align_corners), and a
// non-finite v passes through (as v * a[c] + b[c] when a, b are given); fused: as `mul_add`.
// x: contiguous, channels on `axis`; image: at least C x B, contiguous; scale, shift: C.
at::Tensor lookup(const at::Tensor& x, const at::Tensor& image, const at::Tensor& scale,
                  const at::Tensor& shift, int64_t axis, const c10::optional<at::Tensor>& a,
                  const c10::optional<at::Tensor>& b, bool fused) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 CPU tensor");
  check_float_cpu(image, "image", 2);
  check_float_cpu(scale, "scale", 1);
  check_float_cpu(shift, "shift", 1);
  TORCH_CHECK(axis >= 0 && axis < x.dim(), "axis ", axis, " out of range for ", x.dim(), " dims");
  TORCH_CHECK(a.has_value() == b.has_value(), "a and b go together");
  const int64_t channels = x.size(axis);
  TORCH_CHECK(image.size(0) >= channels && scale.size(0) == channels && shift.size(0) == channels,
              "image, scale and shift need ", channels, " rows");
  const auto [outer, inner] = outer_inner(x, axis);
  const int64_t nodes = image.size(1);
  TORCH_CHECK(nodes >= 2 && nodes < (1 << 22), "the table needs [2, 2^22) nodes, found ", nodes);
  // (the vectorised lookup of a channels-last activation indexes the table with int32)
  TORCH_CHECK(channels * nodes <= std::numeric_limits<int32_t>::max(), "a table of ", channels,
              " x ", nodes, " entries is too large");
  auto out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  const auto img = image.contiguous(), sc = scale.contiguous(), sh = shift.contiguous();
  at::Tensor ta, tb;
  if (a.has_value()) {
    check_float_cpu(*a, "a", 1);
    check_float_cpu(*b, "b", 1);
    ta = a->contiguous();
    tb = b->contiguous();
  }
  const float* xp = x.data_ptr<float>();
  const float* tab = img.data_ptr<float>();
  const float* scp = sc.data_ptr<float>();
  const float* shp = sh.data_ptr<float>();
  const float* ap = a.has_value() ? ta.data_ptr<float>() : nullptr;
  const float* bp = a.has_value() ? tb.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t rs = img.stride(0);
  if (fused && ap != nullptr) {
    look_up<true, true>(xp, tab, rs, scp, shp, ap, bp, outer, channels, inner, nodes, op);
  } else if (fused) {
    look_up<true, false>(xp, tab, rs, scp, shp, ap, bp, outer, channels, inner, nodes, op);
  } else if (ap != nullptr) {
    look_up<false, true>(xp, tab, rs, scp, shp, ap, bp, outer, channels, inner, nodes, op);
  } else {
    look_up<false, false>(xp, tab, rs, scp, shp, ap, bp, outer, channels, inner, nodes, op);
  }
  return out;
}

// ---- a whole grid-mode site: `transport.grid_transport` when every sampled value is finite ----

// c ? x : y, without a branch (for conditions that are true as often as not).
inline float pick(bool c, float x, float y) {
  uint32_t xb, yb;
  std::memcpy(&xb, &x, 4);
  std::memcpy(&yb, &y, 4);
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  const uint32_t bits = (xb & mask) | (yb & ~mask);
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// torch.lerp(a, b, w) for 0 <= w <= 1, as its CPU kernel computes it: a + w (b - a) for
// w < 1/2, else b - (1 - w)(b - a); without a branch (w is as likely below 1/2 as above).
template <bool kFused>
inline float lerp(float a, float b, float w) {
  const float d = b - a;
  const bool low = std::fabs(w) < 0.5f;
  if constexpr (kFused) {
    return std::fma(pick(low, w, w - 1.0f), d, pick(low, a, b));
  } else {
    return pick(low, a + w * d, b - d * (1.0f - w));
  }
}

// First index of the non-decreasing levels[0:n] at or above t (torch.searchsorted, left side).
inline int64_t search_left(const float* levels, int64_t n, float t) {
  return std::lower_bound(levels, levels + n, t) - levels;
}

// A running minimum and maximum, and whether every value folded in is finite, of values that
// arrive in pieces (the blocks of a channel), eight lanes at a time where AVX2 is compiled in.
class RunningRange {
 public:
  // Folds in n values in[j * stride], times a plus b where kAffine (transport.affine_values:
  // multiplied, then added), and writes them to out (unless out is null).
  template <bool kAffine>
  void copy(const float* in, int64_t stride, int64_t n, float a, float b, float* out) {
    int64_t j = 0;
#ifdef __AVX2__
    if (stride == 1) {
      const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
      for (; j + 8 <= n; j += 8) {
        __m256 x = _mm256_loadu_ps(in + j);
        if constexpr (kAffine) x = _mm256_add_ps(_mm256_mul_ps(x, va), vb);
        if (out != nullptr) _mm256_storeu_ps(out + j, x);
        ok_ = _mm256_and_ps(ok_, _mm256_cmp_ps(_mm256_and_ps(x, abs_), big_, _CMP_LE_OQ));
        vlo_ = _mm256_min_ps(vlo_, x);
        vhi_ = _mm256_max_ps(vhi_, x);
      }
    }
#endif
    for (; j < n; ++j) {
      const float x = kAffine ? in[j * stride] * a + b : in[j * stride];
      if (out != nullptr) out[j] = x;
      finite_ &= std::fabs(x) <= std::numeric_limits<float>::max();
      lo_ = std::min(lo_, x);
      hi_ = std::max(hi_, x);
    }
  }

  // Whether every value was finite; their minimum and maximum if so.
  bool result(float& lo, float& hi) const {
    lo = lo_;
    hi = hi_;
#ifdef __AVX2__
    if (_mm256_movemask_ps(ok_) != 0xff) return false;
    alignas(32) float l[8], h[8];
    _mm256_store_ps(l, vlo_);
    _mm256_store_ps(h, vhi_);
    for (int i = 0; i < 8; ++i) {
      lo = std::min(lo, l[i]);
      hi = std::max(hi, h[i]);
    }
#endif
    return finite_;
  }

 private:
  static constexpr float kInf = std::numeric_limits<float>::infinity();
  float lo_ = kInf, hi_ = -kInf;
  bool finite_ = true;
#ifdef __AVX2__
  __m256 vlo_ = _mm256_set1_ps(kInf), vhi_ = _mm256_set1_ps(-kInf);
  __m256 ok_ = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  const __m256 abs_ = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 big_ = _mm256_set1_ps(std::numeric_limits<float>::max());
#endif
};

// Whether the n values v[j * stride] are all finite, and their minimum and maximum if so.
inline bool finite_range(const float* v, int64_t stride, int64_t n, float& lo, float& hi) {
  RunningRange range;
  range.copy<false>(v, stride, n, 1.0f, 0.0f, nullptr);
  return range.result(lo, hi);
}

// Grid mode's knot-range constants (transport.OUTLIER_LEVEL, OUTLIER_MARGIN, REFINEMENTS).
struct KnotRule {
  float p_low, p_high;  // OUTLIER_LEVEL and 1 - OUTLIER_LEVEL, as float32
  double margin;
  int64_t refinements;
};

// transport._histogram of one row of m finite values on `size` nodes over [lo, hi]: the node
// levels into `level` (size floats); returns the node spacing. part: 4 * size int32 scratch.
template <bool kFused>
float row_levels(const float* v, int64_t stride, int64_t m, float lo, float hi, int64_t size,
                 int32_t* part, float* level) {
  // the step, then (masked_fill, clamp_min) for equal values and subnormal ranges
  float step = (hi - lo) / static_cast<float>(size - 1);
  if (step == 0.0f) step = 1.0f;
  step = std::max(step, std::numeric_limits<float>::min());
  const float inv = 1.0f / step;
  count_parts<kFused, false>(v, stride, m, -lo * inv, inv, size, part);
  // level = (cumsum(counts) - counts / 2) / M. cumsum accumulates exactly (in double) and rounds
  // each partial sum to float32; so does this integer sum (m < 2^31), converted in a second loop
  // (eight at a time where AVX2 is compiled in: the same rounding) free of the sum's dependency
  // chain: part[size + k] becomes cell k's count (the four partial counts summed, a loop the
  // compiler vectorises), part[k] the sum of counts up to cell k.
  int32_t* own = part + size;
  for (int64_t k = 0; k < size; ++k) own[k] += part[k] + part[2 * size + k] + part[3 * size + k];
  int32_t cum = 0;
  for (int64_t k = 0; k < size; ++k) {
    cum += own[k];
    part[k] = cum;
  }
  const float total = static_cast<float>(m);
  int64_t j = 0;
#ifdef __AVX2__
  const __m256 vtotal = _mm256_set1_ps(total), vhalf = _mm256_set1_ps(0.5f);
  for (; j + 8 <= size; j += 8) {
    const __m256 sum = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(part + j)));
    const __m256 own = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(part + size + j)));
    _mm256_storeu_ps(level + j, _mm256_div_ps(_mm256_sub_ps(sum, _mm256_mul_ps(vhalf, own)), vtotal));
  }
#endif
  for (; j < size; ++j)
    level[j] = (static_cast<float>(part[j]) - 0.5f * static_cast<float>(part[size + j])) / total;
  return step;
}

// transport._invert_levels of one row at one level t: the value where the piecewise-linear CDF
// through (lo + j step, level[j]) reaches t.
inline float invert_level(const float* level, int64_t size, float lo, float step, float t) {
  const int64_t hi = std::min<int64_t>(std::max<int64_t>(search_left(level, size, t), 1), size - 1);
  const int64_t below = hi - 1;
  const float l0 = level[below], l1 = level[hi];
  const float frac = std::min(std::max((t - l0) / std::max(l1 - l0, 1e-12f), 0.0f), 1.0f);
  return lo + (static_cast<float>(below) + frac) * step;
}

// transport._surely_wide for one row: its knot range cannot narrow.
inline bool surely_wide(const float* level, int64_t size, const KnotRule& rule) {
  auto node = [&](float t) {
    return std::min<int64_t>(std::max<int64_t>(search_left(level, size, t), 1), size - 1);
  };
  const double d = static_cast<double>(std::max<int64_t>(node(rule.p_high) - node(rule.p_low) - 1, 0));
  return 2 * ((1 + rule.margin) * d + 1) >= 1.01 * static_cast<double>(size - 1);
}

// One row's knots: the first node and the spacing.
struct RowKnots {
  float lo = 0, step = 1;
  bool finite = true;
};

// One row's values: `blocks` runs of `block_len` values `stride` apart, the runs `block_stride`
// apart (a C x M sample: one run; all of an N x C x ... activation's channel: N runs).
struct RowValues {
  const float* base;
  int64_t blocks, block_len, block_stride, stride;
  int64_t count() const { return blocks * block_len; }
};

// `transport._finite_levels` of one row (values v, or a * v + b with `affine_ab`): range,
// histogram, and the knot-range refinement (`transport._refine`) where the range may narrow;
// the node levels into `level` (size floats). A row on its own takes the same steps as in
// `_refine`, which refines every row together: a row that does not narrow keeps its histogram.
// Sets finite = false, and stops, when a value or the range is not finite (`grid_transport`
// then takes its general path).
template <bool kFused>
RowKnots row_knots(const RowValues& row, const float* affine_ab, int64_t size,
                   const KnotRule& rule, std::vector<float>& scratch, std::vector<int32_t>& part,
                   float* level) {
  RowKnots k;
  const int64_t m = row.count();
  const float* v = row.base;
  int64_t stride = row.stride;
  float lo, hi;
  bool finite;
  if (affine_ab != nullptr || row.blocks > 1) {  // one contiguous row (the order counts for nothing)
    scratch.resize(m);
    RunningRange range;  // the range of the copy, taken while it is written
    for (int64_t blk = 0; blk < row.blocks; ++blk) {
      const float* in = row.base + blk * row.block_stride;
      float* out = scratch.data() + blk * row.block_len;
      if (affine_ab != nullptr) {
        range.copy<true>(in, stride, row.block_len, affine_ab[0], affine_ab[1], out);
      } else {
        range.copy<false>(in, stride, row.block_len, 1.0f, 0.0f, out);
      }
    }
    finite = range.result(lo, hi);
    v = scratch.data();
    stride = 1;
  } else {
    finite = finite_range(v, stride, m, lo, hi);
  }
  if (!finite || !(std::fabs(hi - lo) <= std::numeric_limits<float>::max())) {
    k.finite = false;
    return k;
  }
  float step = row_levels<kFused>(v, stride, m, lo, hi, size, part.data(), level);
  if (!surely_wide(level, size, rule)) {
    for (int64_t i = 0; i < rule.refinements; ++i) {
      const float q0 = invert_level(level, size, lo, step, rule.p_low);
      const float q1 = invert_level(level, size, lo, step, rule.p_high);
      const float margin = static_cast<float>(rule.margin) * (q1 - q0) + step;
      const float new_lo = std::max(lo, q0 - margin), new_hi = std::min(hi, q1 + margin);
      if (!((new_hi - new_lo) * 2.0f < hi - lo)) break;
      lo = new_lo;
      hi = new_hi;
      step = row_levels<kFused>(v, stride, m, lo, hi, size, part.data(), level);
    }
  }
  k.lo = lo;
  k.step = step;
  return k;
}

// Q_ref at one row's node levels (transport._lerp_at(q_ref, level * (K - 1))), in place.
template <bool kFused>
void table_row(float* level, int64_t size, const float* q, int64_t k) {
  const float last = static_cast<float>(k - 2);
  const float scale = static_cast<float>(k - 1);
  int64_t j = 0;
#ifdef __AVX2__
  // eight at a time, the same operations (levels are finite and non-negative, so min and floor
  // agree with std::min and std::floor); the two table entries read by AVX2 gathers (faster here
  // than scalar loads into a buffer, whose vector reload waits on eight stores)
  const __m256 vlast = _mm256_set1_ps(last), vscale = _mm256_set1_ps(scale);
  const __m256 vhalf = _mm256_set1_ps(0.5f), vone = _mm256_set1_ps(1.0f);
  const __m256 vabs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; j + 8 <= size; j += 8) {
    const __m256 pos = _mm256_mul_ps(_mm256_loadu_ps(level + j), vscale);
    const __m256 node = _mm256_min_ps(_mm256_floor_ps(pos), vlast);
    const __m256i index = _mm256_cvttps_epi32(node);
    const __m256 a = _mm256_i32gather_ps(q, index, 4), b = _mm256_i32gather_ps(q + 1, index, 4);
    const __m256 w = _mm256_sub_ps(pos, node), d = _mm256_sub_ps(b, a);
    const __m256 low = _mm256_cmp_ps(_mm256_and_ps(w, vabs), vhalf, _CMP_LT_OQ);
    __m256 out;
    if constexpr (kFused) {
      out = _mm256_fmadd_ps(_mm256_blendv_ps(_mm256_sub_ps(w, vone), w, low), d, _mm256_blendv_ps(b, a, low));
    } else {
      out = _mm256_blendv_ps(_mm256_sub_ps(b, _mm256_mul_ps(d, _mm256_sub_ps(vone, w))),
                             _mm256_add_ps(a, _mm256_mul_ps(w, d)), low);
    }
    _mm256_storeu_ps(level + j, out);
  }
#endif
  for (; j < size; ++j) {
    const float pos = level[j] * scale;
    const float node = std::min(std::floor(pos), last);
    const int64_t i = static_cast<int64_t>(node);
    level[j] = lerp<kFused>(q[i], q[i + 1], pos - node);
  }
}

template <bool kFused>
std::tuple<at::Tensor, bool> site(const at::Tensor& x, const c10::optional<at::Tensor>& values,
                                  const at::Tensor& q_ref, int64_t size, int64_t axis,
                                  const float* ap, const float* bp, const KnotRule& rule) {
  const int64_t channels = x.size(axis), k = q_ref.size(1);
  const auto [outer, inner] = outer_inner(x, axis);
  const float* xp = x.data_ptr<float>();
  auto row_values = [&](int64_t r) -> RowValues {
    if (values.has_value()) {
      return {values->data_ptr<float>() + r * values->stride(0), 1, values->size(1), 0,
              values->stride(1)};
    }
    if (inner == 1) return {xp + r, 1, outer, 0, channels};  // channels last: one strided run
    return {xp + r * inner, outer, inner, channels * inner, 1};
  };
  std::vector<RowKnots> knots(channels);
  // each row's node levels, turned into its table in place (not zero-filled: every entry is written)
  std::unique_ptr<float[]> table(new float[channels * size]);
  const auto q = q_ref.contiguous();
  const float* qp = q.data_ptr<float>();
  std::vector<float> scale(channels), shift(channels);
  auto out = at::empty(x.sizes(), x.options());
  float* op = out.data_ptr<float>();
  const float top = static_cast<float>(size - 1), half = top / 2;
  // row r's table and lookup coordinates (transport._lookup's grid coordinate: 2 / ((B - 1) *
  // step) as reciprocal, then times 2)
  auto finish_row = [&](int64_t r) {
    table_row<kFused>(table.get() + r * size, size, qp + r * k, k);
    const float sc = 2.0f * (1.0f / (static_cast<float>(size - 1) * knots[r].step));
    const float sh = -knots[r].lo * sc - 1.0f;
    scale[r] = ap == nullptr ? sc : ap[r] * sc;
    shift[r] = ap == nullptr ? sh : mul_add<kFused>(bp[r], sc, sh);
  };
  // A site whose values are read in place, channel blocks of `inner` values: each channel is
  // looked up right after its table is built, while its values are still in cache.
  const bool row_by_row = !values.has_value() && inner > 1;
  std::atomic<bool> all_finite{true};
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    std::vector<int32_t> part(4 * size);
    for (int64_t r = begin; r < end; ++r) {
      const float ab[2] = {ap == nullptr ? 1.0f : ap[r], bp == nullptr ? 0.0f : bp[r]};
      knots[r] = row_knots<kFused>(row_values(r), ap == nullptr ? nullptr : ab, size, rule, scratch,
                                   part, table.get() + r * size);
      if (!knots[r].finite) {
        all_finite = false;
        continue;
      }
      if (!row_by_row) continue;
      finish_row(r);
      // row_knots found every value of the row finite (after the BatchNorm map, folded into
      // scale and shift), so none passes through and no affine map is needed for one
      for (int64_t o = 0; o < outer; ++o) {
        const int64_t at = (o * channels + r) * inner;
        look_up_span<kFused, false, false>(xp + at, op + at, inner, r, scale.data(), shift.data(),
                                           nullptr, nullptr, table.get(), size, top, half);
      }
    }
  });
  if (!all_finite) return {at::Tensor(), false};
  if (row_by_row) return {out, true};
  at::parallel_for(0, channels, std::max<int64_t>(1, 16384 / size), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) finish_row(r);
  });
  if (ap == nullptr) {
    look_up<kFused, false>(xp, table.get(), size, scale.data(), shift.data(),
                           nullptr, nullptr, outer, channels, inner, size, op);
  } else {
    look_up<kFused, true>(xp, table.get(), size, scale.data(), shift.data(), ap,
                          bp, outer, channels, inner, size, op);
  }
  return {out, true};
}

// `transport.grid_transport(x, values, q_ref, size, axis, affine=(a, b))` in one call, for the
// case its fast path takes: every sampled value (after the affine map) finite, knot range refined
// where it may narrow. Returns (output, true); or (undefined, false) when a sampled value or a
// row's range is not finite, and the caller takes the general path. x: contiguous, C channels on
// `axis` (its non-finite values pass through); values: C x M, M >= 1 (any strides), or absent:
// every value of x, read in place (`values = x.movedim(axis, 0).reshape(C, -1)`); q_ref: C x K,
// K >= 2; a, b: C or absent; outlier_level, outlier_margin, refinements: transport.OUTLIER_LEVEL,
// OUTLIER_MARGIN, REFINEMENTS.
std::tuple<at::Tensor, bool> grid_site(const at::Tensor& x, const c10::optional<at::Tensor>& values,
                                       const at::Tensor& q_ref, int64_t size, int64_t axis,
                                       const c10::optional<at::Tensor>& a,
                                       const c10::optional<at::Tensor>& b, double outlier_level,
                                       double outlier_margin, int64_t refinements, bool fused) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 CPU tensor");
  check_float_cpu(q_ref, "q_ref", 2);
  TORCH_CHECK(axis >= 0 && axis < x.dim(), "axis ", axis, " out of range for ", x.dim(), " dims");
  const int64_t channels = x.size(axis);
  const int64_t m = values.has_value() ? values->size(1) : (channels ? x.numel() / channels : 0);
  if (values.has_value()) {
    check_float_cpu(*values, "values", 2);
    TORCH_CHECK(values->size(0) == channels, "x and values need ", channels, " channels");
  }
  TORCH_CHECK(q_ref.size(0) == channels, "x and q_ref need ", channels, " channels");
  TORCH_CHECK(m >= 1 && q_ref.size(1) >= 2, "values need a column, q_ref two");
  TORCH_CHECK(m <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 values per row, found ", m);
  TORCH_CHECK(size >= 2 && size < (1 << 22), "size must be in [2, 2^22), found ", size);
  TORCH_CHECK(channels * size <= std::numeric_limits<int32_t>::max(), "a table of ", channels,
              " x ", size, " entries is too large");
  TORCH_CHECK(a.has_value() == b.has_value(), "a and b go together");
  at::Tensor ta, tb;
  if (a.has_value()) {
    check_float_cpu(*a, "a", 1);
    check_float_cpu(*b, "b", 1);
    TORCH_CHECK(a->size(0) == channels && b->size(0) == channels, "a and b need ", channels, " entries");
    ta = a->contiguous();
    tb = b->contiguous();
  }
  const float* ap = a.has_value() ? ta.data_ptr<float>() : nullptr;
  const float* bp = a.has_value() ? tb.data_ptr<float>() : nullptr;
  if (x.numel() == 0) return {at::empty(x.sizes(), x.options()), true};
  const KnotRule rule{static_cast<float>(outlier_level), static_cast<float>(1.0 - outlier_level),
                      outlier_margin, refinements};
  return fused ? site<true>(x, values, q_ref, size, axis, ap, bp, rule)
               : site<false>(x, values, q_ref, size, axis, ap, bp, rule);
}

// flat[offsets[i]] for every i, in order (`Tensor.index_select(0, offsets)` on a 1-D float32
// tensor): the reads run ahead with prefetches, so that the cache misses of values spread over a
// large activation overlap. offsets: int32 or int64, each in [0, flat.numel()).
template <typename index_t>
void take_values(const float* flat, const index_t* offsets, int64_t n, float* out) {
  constexpr int64_t ahead = 32;
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + ahead < end) __builtin_prefetch(flat + offsets[i + ahead]);
      out[i] = flat[offsets[i]];
    }
  });
}

at::Tensor take(const at::Tensor& flat, const at::Tensor& offsets) {
  check_float_cpu(flat, "flat", 1);
  TORCH_CHECK(flat.is_contiguous(), "flat must be contiguous");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.dim() == 1 && offsets.is_contiguous() &&
                  (offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong),
              "offsets must be a contiguous 1-D int32 or int64 CPU tensor");
  const int64_t n = offsets.size(0), size = flat.numel();
  auto in_range = [&](const auto* p) {
    bool ok = true;
    for (int64_t i = 0; i < n; ++i) ok &= p[i] >= 0 && p[i] < size;
    return ok;
  };
  TORCH_CHECK(offsets.scalar_type() == at::kInt ? in_range(offsets.data_ptr<int32_t>())
                                                : in_range(offsets.data_ptr<int64_t>()),
              "offsets must lie in [0, ", size, ")");
  auto out = at::empty({n}, flat.options());
  if (offsets.scalar_type() == at::kInt) {
    take_values(flat.data_ptr<float>(), offsets.data_ptr<int32_t>(), offsets.size(0), out.data_ptr<float>());
  } else {
    take_values(flat.data_ptr<float>(), offsets.data_ptr<int64_t>(), offsets.size(0), out.data_ptr<float>());
  }
  return out;
}


// ---- the fit's quantile sketch (src/torch_dmc/sketch.py): sort, merge, compress ----
//
// torch.sort is not stable: equal values keep no particular order, and the masses that follow the
// values (gathered by the sort's indices) then come in the order it happened to leave them. The
// sketch's results are the same for any order of equal values exactly when those values have the
// same bits (no -0.0 beside +0.0) and the same masses; the kernels below check that, and say so
// where it does not hold (the caller then runs torch.sort itself). Otherwise the sorted values and
// their masses are what torch.sort gives, bit for bit.

// Whether every row's flag is set.
inline bool all_rows(const std::vector<char>& ok) {
  return std::all_of(ok.begin(), ok.end(), [](char c) { return c != 0; });
}

inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

// An unsigned key in the order of the floats (-0.0 just below +0.0), and back.
inline uint32_t order_key(float v) {
  const uint32_t b = float_bits(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

inline float from_order_key(uint32_t k) {
  const uint32_t b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

// The order keys of a row of n values; false where torch.sort could order the row otherwise than
// any other sort: a NaN, or zeros of both signs (equal, with other bits).
inline bool row_keys(const float* in, int64_t n, uint32_t* keys) {
  bool nan = false, negative_zero = false, positive_zero = false;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = float_bits(in[i]);
    nan |= (b & 0x7fffffffu) > 0x7f800000u;
    negative_zero |= b == 0x80000000u;
    positive_zero |= b == 0u;
    keys[i] = order_key(in[i]);
  }
  return !nan && !(negative_zero && positive_zero);
}

// n keys sorted by a least-significant-digit radix sort of kBits-bit digits, between keys and
// swap; returns the one that holds them. count: scratch.
template <int kBits>
uint32_t* radix_sort(uint32_t* keys, uint32_t* swap, int64_t n, std::vector<int64_t>& count) {
  constexpr int kPasses = (32 + kBits - 1) / kBits;
  constexpr uint32_t kMask = (uint32_t{1} << kBits) - 1;
  count.assign(static_cast<size_t>(kPasses) << kBits, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int pass = 0; pass < kPasses; ++pass) ++count[(pass << kBits) + ((keys[i] >> (pass * kBits)) & kMask)];
  }
  uint32_t* from = keys;
  uint32_t* to = swap;
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = pass * kBits;
    int64_t* c = count.data() + (static_cast<int64_t>(pass) << kBits);
    if (c[(from[0] >> shift) & kMask] == n) continue;  // one digit for all: already in order
    int64_t start = 0;
    for (uint32_t d = 0; d <= kMask; ++d) {
      const int64_t here = c[d];
      c[d] = start;
      start += here;
    }
    for (int64_t i = 0; i < n; ++i) to[c[(from[i] >> shift) & kMask]++] = from[i];
    std::swap(from, to);
  }
  return from;
}

// One row of n values sorted into out (the values torch.sort gives: any sort gives them where
// row_keys holds), or false, with out unset. keys, swap: n scratch keys each.
bool sort_row(const float* in, float* out, int64_t n, uint32_t* keys, uint32_t* swap,
              std::vector<int64_t>& count) {
  if (!row_keys(in, n, keys)) return false;
  const uint32_t* sorted = keys;
  if (n <= 64) {
    std::sort(keys, keys + n);
  } else if (n < 4096) {
    sorted = radix_sort<8>(keys, swap, n, count);
  } else {
    sorted = radix_sort<11>(keys, swap, n, count);
  }
  for (int64_t i = 0; i < n; ++i) out[i] = from_order_key(sorted[i]);
  return true;
}

// Each row of values (C x n) sorted, as torch.sort(dim=1) gives its values; ok = false where a
// row could come out otherwise (see sort_row: the caller sorts with torch then).
std::tuple<at::Tensor, bool> sort_rows(const at::Tensor& values) {
  check_float_cpu(values, "values", 2);
  const auto v = values.contiguous();
  const int64_t rows = v.size(0), n = v.size(1);
  auto out = at::empty({rows, n}, v.options());
  if (n == 0) return {out, true};
  const float* in = v.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  std::vector<char> ok(rows, 1);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(n), swap(n);
    std::vector<int64_t> count;
    for (int64_t r = begin; r < end; ++r) {
      ok[r] = sort_row(in + r * n, dst + r * n, n, keys.data(), swap.data(), count);
    }
  });
  return {out, all_rows(ok)};
}

// Whether v[0:n] is non-decreasing without a NaN.
inline bool ascending(const float* v, int64_t n) {
  bool ok = n == 0 || v[0] == v[0];
  for (int64_t i = 1; i < n; ++i) ok &= v[i - 1] <= v[i];
  return ok;
}

// Two summaries' rows merged (sketch._merge): the values of torch.cat([a, b], 1).sort(1) and
// their masses in that order. ok = false where that order is not the only one (equal values with
// other bits or other masses), or an input row is not ascending: the caller sorts with torch.
std::tuple<at::Tensor, at::Tensor, bool> merge_rows(const at::Tensor& a_values, const at::Tensor& a_masses,
                                                    const at::Tensor& b_values, const at::Tensor& b_masses) {
  check_float_cpu(a_values, "a_values", 2);
  check_float_cpu(a_masses, "a_masses", 2);
  check_float_cpu(b_values, "b_values", 2);
  check_float_cpu(b_masses, "b_masses", 2);
  TORCH_CHECK(a_masses.sizes() == a_values.sizes() && b_masses.sizes() == b_values.sizes() &&
                  a_values.size(0) == b_values.size(0),
              "merge_rows: masses must have their values' shape, and a and b as many rows");
  const auto av = a_values.contiguous(), am = a_masses.contiguous();
  const auto bv = b_values.contiguous(), bm = b_masses.contiguous();
  const int64_t rows = av.size(0), na = av.size(1), nb = bv.size(1), n = na + nb;
  auto values = at::empty({rows, n}, av.options());
  auto masses = at::empty({rows, n}, av.options());
  const float *pav = av.data_ptr<float>(), *pam = am.data_ptr<float>();
  const float *pbv = bv.data_ptr<float>(), *pbm = bm.data_ptr<float>();
  float *pv = values.data_ptr<float>(), *pm = masses.data_ptr<float>();
  std::vector<char> ok(rows, 1);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *x = pav + r * na, *xm = pam + r * na, *y = pbv + r * nb, *ym = pbm + r * nb;
      if (!ascending(x, na) || !ascending(y, nb)) {
        ok[r] = 0;
        continue;
      }
      float *v = pv + r * n, *m = pm + r * n;
      int64_t i = 0, j = 0, k = 0;
      while (i < na && j < nb) {
        const bool take_b = y[j] < x[i];
        v[k] = take_b ? y[j] : x[i];
        m[k] = take_b ? ym[j] : xm[i];
        i += !take_b;
        j += take_b;
        ++k;
      }
      for (; i < na; ++i, ++k) v[k] = x[i], m[k] = xm[i];
      for (; j < nb; ++j, ++k) v[k] = y[j], m[k] = ym[j];
      bool unique = true;  // every run of equal values has one bit pattern and one mass
      for (int64_t t = 1; t < n; ++t) {
        unique &= !(v[t] == v[t - 1]) ||
                  (float_bits(v[t]) == float_bits(v[t - 1]) && float_bits(m[t]) == float_bits(m[t - 1]));
      }
      ok[r] = unique;
    }
  });
  return {values, masses, all_rows(ok)};
}

// torch.searchsorted(side="left")'s binary search, step for step (any input, sorted or not).
inline int64_t torch_lower_bound(const float* v, int64_t n, float t) {
  int64_t start = 0, end = n;
  while (start < end) {
    const int64_t mid = start + ((end - start) >> 1);
    if (!(v[mid] >= t)) {
      start = mid + 1;
    } else {
      end = mid;
    }
  }
  return start;
}

// One summary row (values, masses: s points, s >= 2) read at `levels` of its midpoint CDF
// (sketch._compress: _interp_rows(_midpoint_cdf(s), values, levels)) into out; mid: s scratch.
template <bool kFused>
void compress_row(const float* v, const float* m, int64_t s, const float* levels, int64_t count,
                  bool levels_ascending, float* mid, float* out) {
  double sum = 0;  // torch.cumsum accumulates in double, rounding each partial sum to float32
  for (int64_t i = 0; i < s; ++i) {
    sum += m[i];
    mid[i] = static_cast<float>(sum);
  }
  const float total = mid[s - 1];
  for (int64_t i = 0; i < s; ++i) mid[i] = (mid[i] - m[i] / 2.0f) / total;
  const bool walk = levels_ascending && ascending(mid, s);  // else torch's binary search
  int64_t j = 0;
  for (int64_t l = 0; l < count; ++l) {
    const float t = levels[l];
    int64_t hi;
    if (walk) {
      while (j < s && mid[j] < t) ++j;
      hi = j;
    } else {
      hi = torch_lower_bound(mid, s, t);
    }
    hi = std::min<int64_t>(std::max<int64_t>(hi, 1), s - 1);
    const float x0 = mid[hi - 1], x1 = mid[hi];
    const float frac = std::min(std::max((t - x0) / std::max(x1 - x0, 1e-12f), 0.0f), 1.0f);
    out[l] = lerp<kFused>(v[hi - 1], v[hi], frac);
  }
}

// Each row of a summary (values, masses: C x S, S >= 2) read at the levels (L) of its midpoint
// CDF: sketch._compress's values, C x L.
at::Tensor compress_rows(const at::Tensor& values, const at::Tensor& masses, const at::Tensor& levels,
                         bool fused) {
  check_float_cpu(values, "values", 2);
  check_float_cpu(masses, "masses", 2);
  check_float_cpu(levels, "levels", 1);
  TORCH_CHECK(masses.sizes() == values.sizes(), "compress_rows: masses must have the values' shape");
  TORCH_CHECK(values.size(1) >= 2, "compress_rows: needs at least 2 points per row, found ",
              values.size(1));
  const auto v = values.contiguous(), m = masses.contiguous(), l = levels.contiguous();
  const int64_t rows = v.size(0), s = v.size(1), count = l.size(0);
  auto out = at::empty({rows, count}, v.options());
  const float *pv = v.data_ptr<float>(), *pm = m.data_ptr<float>(), *pl = l.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const bool levels_ascending = ascending(pl, count);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mid(s);
    for (int64_t r = begin; r < end; ++r) {
      if (fused) {
        compress_row<true>(pv + r * s, pm + r * s, s, pl, count, levels_ascending, mid.data(), po + r * count);
      } else {
        compress_row<false>(pv + r * s, pm + r * s, s, pl, count, levels_ascending, mid.data(), po + r * count);
      }
    }
  });
  return out;
}


// Per-channel minimum and maximum of a contiguous activation (C channels on `axis`), in one
// pass: sketch.channel_extremes's amin and amax. ok = false where a value is not finite (amin
// and amax then propagate a NaN) or an extreme is zero (which of -0.0 and +0.0 torch's reduction
// returns depends on its order): the caller reduces with torch then.
std::tuple<at::Tensor, at::Tensor, bool> channel_extremes(const at::Tensor& x, int64_t axis) {
  check_float_cpu(x, "x", x.dim());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(axis >= 0 && axis < x.dim(), "axis ", axis, " out of range for ", x.dim(), " dimensions");
  const int64_t c = x.size(axis);
  const auto [outer, inner] = outer_inner(x, axis);
  auto lo = at::empty({c}, x.options()), hi = at::empty({c}, x.options());
  float *plo = lo.data_ptr<float>(), *phi = hi.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  constexpr float inf = std::numeric_limits<float>::infinity();
  std::vector<char> ok(c, 1);
  if (c == 0 || outer * inner == 0) return {lo, hi, c == 0};
  if (inner > 1) {  // each channel: outer runs of inner contiguous values
    at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        float l = inf, h = -inf;
        bool finite = true;
        for (int64_t o = 0; o < outer && finite; ++o) {
          float rl, rh;
          finite = finite_range(px + (o * c + ch) * inner, 1, inner, rl, rh);
          l = std::min(l, rl);
          h = std::max(h, rh);
        }
        plo[ch] = l;
        phi[ch] = h;
        ok[ch] = finite && l != 0.0f && h != 0.0f;
      }
    });
  } else {  // channels last: outer rows of c values, reduced per thread, then together
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), outer));
    std::vector<float> part_lo(threads * c, inf), part_hi(threads * c, -inf);
    std::vector<char> part_ok(threads, 1);
    const int64_t per = (outer + threads - 1) / threads;
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* l = part_lo.data() + t * c;
        float* h = part_hi.data() + t * c;
        bool finite = true;
        for (int64_t o = t * per; o < std::min(outer, (t + 1) * per); ++o) {
          const float* row = px + o * c;
          for (int64_t ch = 0; ch < c; ++ch) {
            const float v = row[ch];
            finite &= std::fabs(v) <= std::numeric_limits<float>::max();
            l[ch] = std::min(l[ch], v);
            h[ch] = std::max(h[ch], v);
          }
        }
        part_ok[t] = finite;
      }
    });
    const bool finite = std::all_of(part_ok.begin(), part_ok.end(), [](char v) { return v != 0; });
    for (int64_t ch = 0; ch < c; ++ch) {
      float l = inf, h = -inf;
      for (int64_t t = 0; t < threads; ++t) {
        l = std::min(l, part_lo[t * c + ch]);
        h = std::max(h, part_hi[t * c + ch]);
      }
      plo[ch] = l;
      phi[ch] = h;
      ok[ch] = finite && l != 0.0f && h != 0.0f;
    }
  }
  return {lo, hi, all_rows(ok)};
}


// The per-sample reference's sum (fit.SiteObserver.observe with per_sample): rows (B*C x P,
// ordered sample, channel) each sorted and read at the K shared positions of
// transport.empirical_quantiles (lerp(v[lo], v[hi], frac)), the B tables summed per channel in
// double: C x K. That sum is exact here, so its order does not matter and it is the one
// torch.sum(dim=0, dtype=float64) computes: every value is a multiple of the smallest ulp u among
// them, and their absolute sum is below 2^52 u, so every partial sum, in any order, is exact.
// ok = false where that does not hold, a table holds -0.0, or a row has a NaN, an infinity or zeros
// of both signs.
// One sample's table (a sorted row v read at the shared positions) added to the running sums:
// sum and absolute (of |q|), smallest (nonzero |q|), negative_zero (a -0.0 seen), per level.
template <bool kFused>
void add_table(const float* __restrict v, const int32_t* __restrict lo, const int32_t* __restrict hi,
               const float* __restrict frac, int64_t k, double* __restrict sum, double* __restrict absolute,
               float* __restrict smallest, uint32_t* __restrict negative_zero) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    const float q = lerp<kFused>(v[lo[j]], v[hi[j]], frac[j]);
    const float a = std::fabs(q);
    sum[j] += q;
    absolute[j] += a;
    smallest[j] = std::min(smallest[j], a == 0.0f ? inf : a);
    negative_zero[j] |= static_cast<uint32_t>(float_bits(q) == 0x80000000u);
  }
}

std::tuple<at::Tensor, bool> sample_table_sum(const at::Tensor& rows, int64_t samples, const at::Tensor& lo,
                                              const at::Tensor& hi, const at::Tensor& frac, bool fused) {
  check_float_cpu(rows, "rows", 2);
  check_float_cpu(frac, "frac", 1);
  TORCH_CHECK(samples >= 1 && rows.size(0) % samples == 0, "rows (", rows.size(0),
              ") must hold `samples` (", samples, ") tables of C rows");
  TORCH_CHECK(lo.scalar_type() == at::kLong && hi.scalar_type() == at::kLong && lo.dim() == 1 &&
                  lo.sizes() == hi.sizes() && lo.sizes() == frac.sizes(),
              "lo, hi must be int64 and lo, hi, frac of one length K");
  const auto x = rows.contiguous(), f = frac.contiguous();
  const int64_t n = x.size(1), k = lo.size(0), channels = x.size(0) / samples;
  TORCH_CHECK(n < (int64_t{1} << 31), "rows must have fewer than 2^31 values each");
  const auto l = lo.contiguous(), h = hi.contiguous();
  const int64_t *pl = l.data_ptr<int64_t>(), *ph = h.data_ptr<int64_t>();
  std::vector<int32_t> below(k), above(k);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t a = pl[j], b = ph[j];
    TORCH_CHECK(a >= 0 && a < n && b >= 0 && b < n, "lo and hi must lie in [0, ", n, ")");
    below[j] = static_cast<int32_t>(a);
    above[j] = static_cast<int32_t>(b);
  }
  auto out = at::empty({channels, k}, x.options().dtype(at::kDouble));
  const float* px = x.data_ptr<float>();
  const float* pf = f.data_ptr<float>();
  double* po = out.data_ptr<double>();
  std::vector<char> ok(channels, 1);
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(n), swap(n);
    std::vector<int64_t> count;
    std::vector<float> v(n), smallest(k);
    std::vector<double> absolute(k);
    std::vector<uint32_t> negative_zero(k);
    for (int64_t c = begin; c < end; ++c) {
      double* sum = po + c * k;
      std::fill(sum, sum + k, 0.0);
      std::fill(absolute.begin(), absolute.end(), 0.0);
      std::fill(smallest.begin(), smallest.end(), std::numeric_limits<float>::infinity());
      std::fill(negative_zero.begin(), negative_zero.end(), 0u);
      for (int64_t s = 0; s < samples && ok[c]; ++s) {
        const float* row = px + (s * channels + c) * n;
        bool finite = true;
        for (int64_t i = 0; i < n; ++i) finite &= std::fabs(row[i]) <= std::numeric_limits<float>::max();
        if (!finite || !sort_row(row, v.data(), n, keys.data(), swap.data(), count)) {
          ok[c] = 0;
        } else if (fused) {
          add_table<true>(v.data(), below.data(), above.data(), pf, k, sum, absolute.data(), smallest.data(),
                          negative_zero.data());
        } else {
          add_table<false>(v.data(), below.data(), above.data(), pf, k, sum, absolute.data(), smallest.data(),
                           negative_zero.data());
        }
      }
      // exact: every |q| a multiple of u = ulp(smallest nonzero |q|) = 2^(max(e, 1) - 150), and
      // the absolute sum below 2^52 u; all zeros: exact too, unless one is -0.0
      for (int64_t j = 0; j < k && ok[c]; ++j) {
        const int e = static_cast<int>((float_bits(smallest[j]) >> 23) & 0xff);
        ok[c] = !negative_zero[j] &&
                (e == 255 || absolute[j] <= std::ldexp(1.0, std::max(e, 1) - 150 + 52));
      }
    }
  });
  return {out, all_rows(ok)};
}

}  // namespace

TORCH_LIBRARY(torch_dmc, m) {
  m.def("histogram(Tensor values, Tensor shift, Tensor inv, int size, bool fused) -> Tensor");
  m.def("grid_site(Tensor x, Tensor? values, Tensor q_ref, int size, int axis, Tensor? a, Tensor? b, "
        "float outlier_level, float outlier_margin, int refinements, bool fused) -> (Tensor, bool)");
  m.def("take(Tensor flat, Tensor offsets) -> Tensor");
  m.def("lookup(Tensor x, Tensor image, Tensor scale, Tensor shift, int axis, Tensor? a, Tensor? b, bool fused) -> Tensor");
  m.def("sort_rows(Tensor values) -> (Tensor, bool)");
  m.def("sample_table_sum(Tensor rows, int samples, Tensor lo, Tensor hi, Tensor frac, bool fused) -> (Tensor, bool)");
  m.def("channel_extremes(Tensor x, int axis) -> (Tensor, Tensor, bool)");
  m.def("merge_rows(Tensor a_values, Tensor a_masses, Tensor b_values, Tensor b_masses) -> (Tensor, Tensor, bool)");
  m.def("compress_rows(Tensor values, Tensor masses, Tensor levels, bool fused) -> Tensor");
}

TORCH_LIBRARY_IMPL(torch_dmc, CPU, m) {
  m.impl("histogram", &histogram);
  m.impl("lookup", &lookup);
  m.impl("grid_site", &grid_site);
  m.impl("take", &take);
  m.impl("sort_rows", &sort_rows);
  m.impl("sample_table_sum", &sample_table_sum);
  m.impl("channel_extremes", &channel_extremes);
  m.impl("merge_rows", &merge_rows);
  m.impl("compress_rows", &compress_rows);
}
