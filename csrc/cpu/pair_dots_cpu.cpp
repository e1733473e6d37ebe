// dmlkern::pair_dots and pair_row_sums on the CPU: the two products of a sparse matrix given as
// listed row pairs, without the (pairs x K) gathered rows or the dense (rows x rows) products that
// hold them. pair_dots: <a_i, b_j> per pair; pair_row_sums: per row r, the sum over its pairs of
// w_p b_j (times a row of `scale`). AngularLoss's blocked path (dmlkern/fused/angular.py) takes
// each positive pair's G = <A_a, B_p> over the M reference rows, and its gradient's sums over a
// row's positive pairs, this way: the per-group products they replace (a few classes' rows
// against each other at a time) were MKL products of small outputs (or small depth) that run at a
// fraction of a core's rate, one core at a time, and computed the entries between classes too.
// Every sum runs in a fixed order (pair_dots: in double, entry k into lane k mod kLanes, in k
// order, the lanes then combined by a fixed tree; pair_row_sums: per entry, in the input's dtype,
// a row's pairs in their listed order), without fused multiply-adds (no_fp_contract.h): the bits
// depend neither on the vector width (the loops are compiled for AVX-512, AVX2 and baseline) nor
// on the chunks and the thread count. A product of two fp32 entries is exact in double.
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

#include <optional>
#include <vector>

#include "../checks.h"

#include "no_fp_contract.h"  // last: the sums below without fused multiply-adds

namespace dmlkern {

namespace {

constexpr int kLanes = 16;
// Pairs are summed kBlockPairs at a time, their entries kChunk at a time: the rows of a block's
// pairs (a class's rows against each other, for AngularLoss) are read from memory once per block
// and reused from the L1 cache across its pairs. Neither changes any pair's order of addition.
constexpr int64_t kBlockPairs = 64;
constexpr int64_t kChunk = 256;

// Adds entries k0 .. k1 - 1 (whole lanes) of R pairs that share their a row (pa) against the b
// rows pb[0 .. R - 1] into their lanes: a's entries are loaded once for the R of them.
template <int R, typename T>
DMLK_CPU_INLINE void add_lanes(const T* pa, const T* const* pb, int64_t k0, int64_t k1, double (*lanes)[kLanes]) {
  double lane[R][kLanes];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < kLanes; ++l) lane[r][l] = lanes[r][l];
  for (int64_t k = k0; k < k1; k += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double av = double(pa[k + l]);
      for (int r = 0; r < R; ++r) lane[r][l] += av * double(pb[r][k + l]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < kLanes; ++l) lanes[r][l] = lane[r][l];
}

// Pairs p0 .. p1 - 1. Each pair's sum: entry k into lane k mod kLanes, in k order, then the
// lanes by a fixed tree. Consecutive pairs with the same i (a row's pairs, listed row by row) go
// through add_lanes four, two or one at a time.
template <typename T>
DMLK_CPU_CLONES void pair_dots_range(const T* a, int64_t as0, const T* b, int64_t bs0, int64_t d,
                                     const int64_t* ii, const int64_t* jj, int64_t p0, int64_t p1, T* out) {
  const int64_t whole = d / kLanes * kLanes;
  double lanes[kBlockPairs][kLanes];
  for (int64_t q0 = p0; q0 < p1; q0 += kBlockPairs) {
    const int64_t q1 = std::min(p1, q0 + kBlockPairs);
    for (int64_t q = q0; q < q1; ++q)
      for (int l = 0; l < kLanes; ++l) lanes[q - q0][l] = 0.0;
    for (int64_t k0 = 0; k0 < whole; k0 += kChunk) {
      const int64_t k1 = std::min(whole, k0 + kChunk);
      int64_t p = q0;
      while (p < q1) {
        int64_t run = 1;
        while (run < 4 && p + run < q1 && ii[p + run] == ii[p]) ++run;
        run = run == 3 ? 2 : run;
        const T* pa = a + ii[p] * as0;
        const T* pb[4];
        for (int64_t r = 0; r < run; ++r) pb[r] = b + jj[p + r] * bs0;
        if (run == 4) {
          add_lanes<4>(pa, pb, k0, k1, lanes + (p - q0));
        } else if (run == 2) {
          add_lanes<2>(pa, pb, k0, k1, lanes + (p - q0));
        } else {
          add_lanes<1>(pa, pb, k0, k1, lanes + (p - q0));
        }
        p += run;
      }
    }
    for (int64_t q = q0; q < q1; ++q) {
      double* lane = lanes[q - q0];
      const T* pa = a + ii[q] * as0;
      const T* pb = b + jj[q] * bs0;
      for (int64_t k = whole; k < d; ++k) lane[k - whole] += double(pa[k]) * double(pb[k]);
      for (int w = kLanes / 2; w > 0; w /= 2) {
        for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
      }
      out[q] = static_cast<T>(lane[0]);
    }
  }
}

// Rows r0 .. r1 - 1 of pair_row_sums: out[r] = (sum over r's pairs p, in listed order, of
// w[p] b[j[p]]) times scale[r] when given: per row, one pass along each pair's b row into out's
// row (in the L1 / L2 cache), an independent sum per column, so no order depends on the vector
// width.
template <typename T>
DMLK_CPU_CLONES void pair_row_sums_rows(const T* b, int64_t bs0, int64_t d, const int64_t* jj, const T* w,
                                        const int64_t* order, const int64_t* start, const T* scale,
                                        int64_t ss0, T* out, int64_t os0, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* o = out + r * os0;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) o[c] = T(0);
    for (int64_t q = start[r]; q < start[r + 1]; ++q) {
      const int64_t p = order[q];
      const T* row = b + jj[p] * bs0;
      const T wp = w[p];
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] += wp * row[c];
    }
    if (scale != nullptr) {
      const T* sc = scale + r * ss0;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] = sc[c] * o[c];
    }
  }
}

// t (the op's index argument `name`) as a contiguous int64 CPU tensor of rows of `rows`.
at::Tensor checked_index(const at::Tensor& t, const char* op, const char* name, int64_t bound, const char* rows) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.device().is_cpu(), "dmlkern: ", op, ": ", name,
              " must be a 1-D int64 CPU tensor, got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  at::Tensor c = t.contiguous();
  const int64_t* v = c.data_ptr<int64_t>();
  for (int64_t p = 0; p < c.size(0); ++p) {
    TORCH_CHECK(v[p] >= 0 && v[p] < bound, "dmlkern: ", op, ": ", name, "[", p, "] = ", v[p],
                " is not a row of ", rows, " (", bound, " rows)");
  }
  return c;
}

// t itself where its rows' entries are contiguous (the callers' buffers), else a contiguous copy.
at::Tensor with_contiguous_rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// (P,) in a's dtype: out[p] = <a[i[p]], b[j[p]]>.
at::Tensor pair_dots_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& i_in,
                         const at::Tensor& j_in) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2, "dmlkern: pair_dots: a and b must be 2-D (R, K) and (Q, K), got ",
              a_in.sizes(), " and ", b_in.sizes());
  TORCH_CHECK(a_in.size(1) == b_in.size(1), "dmlkern: pair_dots: a and b must have the same width K, got ",
              a_in.sizes(), " and ", b_in.sizes());
  TORCH_CHECK(a_in.device().is_cpu() && b_in.device().is_cpu(), "dmlkern: pair_dots: CPU tensors only");
  check_cpu_dtype(a_in, "a");
  TORCH_CHECK(b_in.scalar_type() == a_in.scalar_type(), "dmlkern: pair_dots: a and b must have the same dtype, got ",
              a_in.scalar_type(), " and ", b_in.scalar_type());
  const at::Tensor ii = checked_index(i_in, "pair_dots", "i", a_in.size(0), "a");
  const at::Tensor jj = checked_index(j_in, "pair_dots", "j", b_in.size(0), "b");
  TORCH_CHECK(ii.size(0) == jj.size(0), "dmlkern: pair_dots: i and j must have the same length, got ", ii.size(0),
              " and ", jj.size(0));
  const at::Tensor a = with_contiguous_rows(a_in), b = with_contiguous_rows(b_in);
  const int64_t pairs = ii.size(0), d = a.size(1);
  auto out = at::empty({pairs}, a.options());
  if (pairs == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_dots", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    const int64_t* pi = ii.data_ptr<int64_t>();
    const int64_t* pj = jj.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    // ~2^16 multiply-adds per task at least: one pair's result never depends on the split.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(d, 1));
    at::parallel_for(0, pairs, grain, [&](int64_t p0, int64_t p1) {
      pair_dots_range<scalar_t>(pa, a.stride(0), pb, b.stride(0), d, pi, pj, p0, p1, po);
    });
  });
  return out;
}

// out (R, K) = per row r, sum over the pairs p with i[p] == r (in listed order) of w[p] b[j[p]],
// times scale[r] (R, K) when given; 0 (times scale) for a row without pairs.
void pair_row_sums_cpu(const at::Tensor& b_in, const at::Tensor& i_in, const at::Tensor& j_in,
                       const at::Tensor& w_in, const std::optional<at::Tensor>& scale_in, at::Tensor& out) {
  TORCH_CHECK(b_in.dim() == 2 && out.dim() == 2 && b_in.size(1) == out.size(1),
              "dmlkern: pair_row_sums: b and out must be 2-D (Q, K) and (R, K), got ", b_in.sizes(), " and ",
              out.sizes());
  TORCH_CHECK(b_in.device().is_cpu() && out.device().is_cpu(), "dmlkern: pair_row_sums: CPU tensors only");
  check_cpu_dtype(b_in, "b");
  TORCH_CHECK(out.scalar_type() == b_in.scalar_type() && out.stride(1) == 1,
              "dmlkern: pair_row_sums: out must have b's dtype and contiguous rows, got ", out.scalar_type(),
              " with strides ", out.strides());
  const at::Tensor ii = checked_index(i_in, "pair_row_sums", "i", out.size(0), "out");
  const at::Tensor jj = checked_index(j_in, "pair_row_sums", "j", b_in.size(0), "b");
  TORCH_CHECK(ii.size(0) == jj.size(0) && w_in.dim() == 1 && w_in.size(0) == ii.size(0) &&
                  w_in.scalar_type() == b_in.scalar_type() && w_in.device().is_cpu(),
              "dmlkern: pair_row_sums: i, j and w must have one entry per pair (w in b's dtype), got ",
              ii.sizes(), ", ", jj.sizes(), " and ", w_in.sizes(), " ", w_in.scalar_type());
  at::Tensor scale;
  if (scale_in.has_value()) {
    TORCH_CHECK(scale_in->sizes() == out.sizes() && scale_in->scalar_type() == out.scalar_type() &&
                    scale_in->device().is_cpu(),
                "dmlkern: pair_row_sums: scale must have out's shape ", out.sizes(), " and dtype, got ",
                scale_in->sizes(), " ", scale_in->scalar_type());
    scale = with_contiguous_rows(*scale_in);
  }
  // out's rows hold the running sums while b's and scale's are read: they must not share memory.
  TORCH_CHECK(!out.is_alias_of(b_in) && !(scale.defined() && out.is_alias_of(scale)),
              "dmlkern: pair_row_sums: out must not share memory with b or scale");
  const at::Tensor b = with_contiguous_rows(b_in), w = w_in.contiguous();
  const int64_t rows = out.size(0), pairs = ii.size(0), d = out.size(1);
  // Each row's pairs in listed order (a stable counting sort by i).
  std::vector<int64_t> start(rows + 1, 0), order(pairs), next;
  const int64_t* pi = ii.data_ptr<int64_t>();
  for (int64_t p = 0; p < pairs; ++p) ++start[pi[p] + 1];
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  next.assign(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) order[next[pi[p]]++] = p;
  if (rows == 0 || d == 0) return;
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "pair_row_sums", [&] {
    const scalar_t* sc = scale.defined() ? scale.data_ptr<scalar_t>() : nullptr;
    const int64_t ss0 = scale.defined() ? scale.stride(0) : 0;
    const int64_t work = (pairs / std::max<int64_t>(rows, 1) + 1) * d;  // per row, about
    at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(work, 1)),
                     [&](int64_t r0, int64_t r1) {
                       pair_row_sums_rows<scalar_t>(b.data_ptr<scalar_t>(), b.stride(0), d,
                                                    jj.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), order.data(),
                                                    start.data(), sc, ss0, out.data_ptr<scalar_t>(),
                                                    out.stride(0), r0, r1);
                     });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("pair_dots", &pair_dots_cpu);
  m.impl("pair_row_sums", &pair_row_sums_cpu);
}

}  // namespace dmlkern
