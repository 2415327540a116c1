// LayerNorm and RMSNorm over the rows of a (rows, D) array, for XLA:CPU through JAX's FFI.
//
// Forward:  y = xhat * scale + offset with xhat = ((x - x0) - m) * r, where x0 is the
//           row's first element, m = mean(x - x0) and r = rsqrt(mean(((x - x0) - m)^2) + eps)
//           (RMSNorm: xhat = x * r, r = rsqrt(mean(x^2) + eps)). Saves m and r per row.
// Per example: scale and offset are (D,), or (E, D), one per example of rows / E rows.
// Backward: with v = ct * scale,
//           dx = r * (v - c * mean(v) - xhat * mean(v * xhat))   (c = 1 LayerNorm, 0 RMSNorm)
//           dscale[g] = sum over group g's rows of ct * xhat, doffset[g] = sum of ct.
//
// Statistics are float32; inputs and outputs may be float32, bfloat16 or float16 (where the
// compiler has _Float16: EqxNormDtypes() says which were built).
// Safety: a registered target can be called by anyone with any shapes, so every handler
// checks every buffer's dimensions and element type and returns an error naming the buffer;
// nothing is read or written before the checks pass, and then every output is written
// (mean_shift and rstd NaN for rows of D = 0, a mean over no values).
// Determinism: the work is cut into chunks by shape only (never by thread count), every
// sum runs in a fixed order (16 fixed lanes inside a row, chunks reduced in index order),
// so results are bitwise identical across runs and thread counts.
// Threads: XLA's intra-op pool (ffi::ThreadPool); the calling thread takes chunks too, so
// a busy pool only slows the call down, it cannot deadlock it.
// Stores: a call that moves more than 32 MiB writes y (forward) and dx (backward) by
// non-temporal stores (common.h's store_run), the same values, without reading each line
// of the output first; h, which the forward reads back, is always stored normally.
// Portability: plain C++17 loops written for the auto-vectorizer; on x86-64 with GCC the
// hot loops are also cloned for x86-64-v3/v4 and picked at load time (target_clones).

#include "common.h"

namespace {

using namespace eqx;  // common.h

// ---------------------------------------------------------------------------------------
// Forward.

struct ForwardArgs {
  const void* x;
  const void* r;  // the residual (rows, D), or null; then h = x + r is stored and normalized
  void* h;
  const float* scale;   // (D,), or (E, D): row `row` takes scale[row / per_example]
  const float* offset;
  void* y;
  float* mean_shift;  // mean - x[row, 0] (0 for RMSNorm)
  float* rstd;
  int64_t d;
  int64_t per_example;  // rows per example of the affine (all rows when it is shared)
  float epsilon;
  bool center;
  bool stream;  // y by non-temporal stores (common.h's store_run)
};

// Y: x's and y's element type; H: the residual's and h's (with Residual, the row normalized
// is h = store_H(load(x) + load(r)), as stored; without, x itself).
template <class Y, class H, bool Residual>
EQX_CLONES void forward_rows(const ForwardArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Y::T;
  using TH = typename H::T;
  const int64_t d = a.d;
  const float inv_d = 1.0f / static_cast<float>(d);
  auto mean = [inv_d](double sum) { return static_cast<float>(sum) * inv_d; };
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * d;
    T* y = static_cast<T*>(a.y) + row * d;
    const TH* h = nullptr;
    if constexpr (Residual) {
      const TH* r = static_cast<const TH*>(a.r) + row * d;
      TH* h_out = static_cast<TH*>(a.h) + row * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) h_out[i] = H::store(Y::load(x[i]) + H::load(r[i]));
      h = h_out;
    }
    auto v = [&](int64_t i) -> float {
      if constexpr (Residual) {
        return H::load(h[i]);
      } else {
        return Y::load(x[i]);
      }
    };
    const float* scale = a.scale + (row / a.per_example) * d;
    const float* offset = a.offset + (row / a.per_example) * d;
    float m = 0.0f, r;
    if (a.center) {
      const Stats stats = shifted_stats(d, a.epsilon, mean, v);
      const float shift = stats.shift;
      m = stats.mean;
      r = stats.rstd;
      store_run(y, d, a.stream, [&](int64_t i) EQX_INLINE_LAMBDA {
        return Y::store(((v(i) - shift) - m) * r * scale[i] + offset[i]);
      });
    } else {
      const float ms = mean(lane_sum(d, [&](int64_t i) {
        float u = v(i);
        return u * u;
      }));
      r = rstd_of(ms, a.epsilon, d, mean, v);
      store_run(y, d, a.stream, [&](int64_t i) EQX_INLINE_LAMBDA {
        return Y::store(v(i) * r * scale[i] + offset[i]);
      });
    }
    a.mean_shift[row] = m;
    a.rstd[row] = r;
  }
  if (a.stream) stream_fence();
}

using ForwardFn = void (*)(const ForwardArgs&, int64_t, int64_t);

ffi::Error run_forward(ffi::ThreadPool& pool, ffi::AnyBuffer x, const ffi::AnyBuffer* r,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                       ffi::AnyBuffer* y, ffi::AnyBuffer* h, ffi::Buffer<ffi::F32>* mean_shift,
                       ffi::Buffer<ffi::F32>* rstd, float epsilon, bool center) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D (rows, D)");
  const int64_t rows = dims[0], d = dims[1];
  int64_t examples = 1, offset_examples = 1;
  if (auto e = check_affine("scale", scale.dimensions(), rows, d, &examples)) return *e;
  if (auto e = check_affine("offset", offset.dimensions(), rows, d, &offset_examples)) return *e;
  if (offset_examples != examples)
    return ffi::Error::InvalidArgument("offset must have scale's dimensions");
  if (auto e = check_dims("y", y->dimensions(), {rows, d})) return *e;
  if (auto e = check_dims("mean_shift", mean_shift->dimensions(), {rows})) return *e;
  if (auto e = check_dims("rstd", rstd->dimensions(), {rows})) return *e;
  if (r != nullptr) {
    if (auto e = check_dims("residual", r->dimensions(), {rows, d})) return *e;
    if (auto e = check_dims("h", h->dimensions(), {rows, d})) return *e;
  }
  // The element types: x's is served, y has x's; the residual (and h) has float32 or x's.
  const ffi::DataType type = x.element_type();
  ForwardFn fn = nullptr;
  bool served = with_element_type(type, [&](auto y_type) {
    using Y = decltype(y_type);
    if (r == nullptr) {
      fn = forward_rows<Y, Y, false>;
      return;
    }
    with_element_type(r->element_type(), [&](auto h_type) {
      using H = decltype(h_type);
      if constexpr (std::is_same_v<H, Y> || std::is_same_v<H, F32>) fn = forward_rows<Y, H, true>;
    });
  });
  if (!served) return type_error("x", type, EQX_SERVED);
  if (y->element_type() != type) return type_error("y", y->element_type(), type_name(type) + " (x's)");
  if (fn == nullptr)
    return type_error("residual", r->element_type(),
                      type == ffi::F32 ? "float32 (x's)" : "float32 or " + type_name(type) + " (x's)");
  if (r != nullptr && h->element_type() != r->element_type())
    return type_error("h", h->element_type(), type_name(r->element_type()) + " (the residual's)");
  if (rows == 0 || d == 0) {  // empty rows: NaN statistics, as a mean over no values
    std::fill(mean_shift->typed_data(), mean_shift->typed_data() + rows, NAN);
    std::fill(rstd->typed_data(), rstd->typed_data() + rows, NAN);
    return ffi::Error::Success();
  }
  ForwardArgs a{x.untyped_data(), r ? r->untyped_data() : nullptr,
                h ? h->untyped_data() : nullptr, scale.typed_data(), offset.typed_data(),
                y->untyped_data(), mean_shift->typed_data(), rstd->typed_data(), d,
                rows / examples, epsilon, center, stream_outputs(2, rows * d, type)};
  parallel_chunks(pool, rows, units_per_chunk(d, 1 << 16),
                  [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> offset, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::Buffer<ffi::F32>> mean_shift,
                   ffi::Result<ffi::Buffer<ffi::F32>> rstd, float epsilon, bool center) {
  return run_forward(pool, x, nullptr, scale, offset, &*y, nullptr, &*mean_shift, &*rstd,
                     epsilon, center);
}

ffi::Error ResidualForward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer r,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                           ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> h,
                           ffi::Result<ffi::Buffer<ffi::F32>> mean_shift,
                           ffi::Result<ffi::Buffer<ffi::F32>> rstd, float epsilon,
                           bool center) {
  return run_forward(pool, x, &r, scale, offset, &*y, &*h, &*mean_shift, &*rstd, epsilon,
                     center);
}

// ---------------------------------------------------------------------------------------
// Backward.
//
// Rows are cut into chunks that never straddle a group: either whole groups (each group's
// dscale/doffset is summed by one task straight into the output) or parts of one group
// (each part into its own partial buffer, summed afterwards in part order). Rows longer
// than kLongRow are also cut into column blocks: a first pass sums each row's two
// reductions per block (and the column sums), a second pass writes dx.

constexpr int64_t kLongRow = 16384;
constexpr int64_t kColumnBlock = 8192;

struct BackwardArgs {
  const void* x;
  const float* scale;  // (D,), or (E, D): row `row` takes scale[row / per_example]
  const float* mean_shift;
  const float* rstd;
  const void* ct;
  const void* ct_h;  // the residual output's cotangent, added to dx (null: none)
  void* dx;
  int64_t d;
  int64_t per_example;  // rows per example of scale (all rows when it is shared)
  bool center;
  bool want_dx;  // false: only dscale/doffset are wanted, dx is neither computed nor written
  bool stream;   // dx by non-temporal stores (common.h's store_run)
};

// One row's reductions over columns [c0, c1): sum(v) and sum(v * xhat); also adds ct * xhat
// and ct to the column sums dscale/doffset (indexed from c0).
// S: x's (h's) and dx's element type; C: the cotangent's.
template <class S, class C>
EQX_INLINE void row_sums(const BackwardArgs& a, int64_t row, int64_t c0, int64_t c1, float* sv,
                         float* svx, float* dscale, float* doffset) {
  using T = typename S::T;
  const T* x = static_cast<const T*>(a.x) + row * a.d;
  const typename C::T* ct = static_cast<const typename C::T*>(a.ct) + row * a.d;
  const float* scale = a.scale + (row / a.per_example) * a.d;
  const float shift = a.center ? S::load(x[0]) : 0.0f;
  const float m = a.mean_shift[row], r = a.rstd[row];
  const int64_t n = c1 - c0;
  float acc_v[kLanes] = {}, acc_vx[kLanes] = {};
  auto step = [&](int64_t i, int64_t l) {
    const int64_t c = c0 + i;
    float g = C::load(ct[c]);
    float xhat = a.center ? ((S::load(x[c]) - shift) - m) * r : S::load(x[c]) * r;
    float v = g * scale[c];
    acc_v[l] += v;
    acc_vx[l] += v * xhat;
    dscale[i] += g * xhat;
    doffset[i] += g;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) step(i + l, l);
  for (int64_t l = 0; i + l < n; ++l) step(i + l, l);
  *sv = combine(acc_v);
  *svx = combine(acc_vx);
}

// Residual: ct_h is added to dx.
template <class S, class C, bool Residual>
EQX_INLINE void row_dx(const BackwardArgs& a, int64_t row, int64_t c0, int64_t c1, float sv,
                       float svx) {
  using T = typename S::T;
  const T* x = static_cast<const T*>(a.x) + row * a.d;
  const typename C::T* ct = static_cast<const typename C::T*>(a.ct) + row * a.d;
  const T* ct_h = Residual ? static_cast<const T*>(a.ct_h) + row * a.d : nullptr;
  auto extra = [&](int64_t c) -> float {
    if constexpr (Residual) {
      return S::load(ct_h[c]);
    } else {
      return 0.0f;
    }
  };
  T* dx = static_cast<T*>(a.dx) + row * a.d;
  const float* scale = a.scale + (row / a.per_example) * a.d;
  const float inv_d = 1.0f / static_cast<float>(a.d);
  const float shift = a.center ? S::load(x[0]) : 0.0f;
  const float m = a.mean_shift[row], r = a.rstd[row];
  const float mean_v = a.center ? sv * inv_d : 0.0f, mean_vx = svx * inv_d;
  if (a.center) {
    store_run(dx + c0, c1 - c0, a.stream, [&](int64_t i) EQX_INLINE_LAMBDA {
      const int64_t c = c0 + i;
      float xhat = ((S::load(x[c]) - shift) - m) * r;
      return S::store(r * ((C::load(ct[c]) * scale[c] - mean_v) - xhat * mean_vx) + extra(c));
    });
  } else {
    store_run(dx + c0, c1 - c0, a.stream, [&](int64_t i) EQX_INLINE_LAMBDA {
      const int64_t c = c0 + i;
      float xhat = S::load(x[c]) * r;
      return S::store(r * (C::load(ct[c]) * scale[c] - xhat * mean_vx) + extra(c));
    });
  }
}

// Rows [r0, r1), columns [c0, c1): column sums added into dscale/doffset; with `fused` (one
// column block) also dx, else the row sums into sv/svx.
template <class S, class C, bool Residual>
EQX_INLINE void backward_tile(const BackwardArgs& a, int64_t r0, int64_t r1, int64_t c0,
                              int64_t c1, float* dscale, float* doffset, bool fused, float* sv,
                              float* svx) {
  for (int64_t row = r0; row < r1; ++row) {
    float s, sx;
    row_sums<S, C>(a, row, c0, c1, &s, &sx, dscale, doffset);
    if (!a.want_dx) continue;
    if (fused) {
      row_dx<S, C, Residual>(a, row, c0, c1, s, sx);
    } else {
      sv[row] = s;
      svx[row] = sx;
    }
  }
}

struct Tile {
  int64_t r0, r1, c0, c1;
  float* dscale;   // column sums destination (indexed from c0), or null: per-group output
  float* doffset;
  float* sv;
  float* svx;
  bool fused;
};

using TileFn = void (*)(const BackwardArgs&, const Tile&, int64_t rows_per_group,
                        float* out_dscale, float* out_doffset);
using DxFn = void (*)(const BackwardArgs&, int64_t row, int64_t c0, int64_t c1, float sv,
                      float svx);

template <class S, class C, bool Residual>
EQX_CLONES void run_tile(const BackwardArgs& a, const Tile& t, int64_t rows_per_group,
                         float* out_dscale, float* out_doffset) {
  if (t.dscale != nullptr) {  // part of one group: its own partial buffer
    std::fill(t.dscale, t.dscale + (t.c1 - t.c0), 0.0f);
    std::fill(t.doffset, t.doffset + (t.c1 - t.c0), 0.0f);
    backward_tile<S, C, Residual>(a, t.r0, t.r1, t.c0, t.c1, t.dscale, t.doffset, t.fused, t.sv,
                                  t.svx);
    if (a.stream) stream_fence();
    return;
  }
  // whole groups: sum each straight into the output
  for (int64_t r = t.r0; r < t.r1; r += rows_per_group) {
    int64_t g = r / rows_per_group;
    float* ds = out_dscale + g * a.d + t.c0;
    float* db = out_doffset + g * a.d + t.c0;
    std::fill(ds, ds + (t.c1 - t.c0), 0.0f);
    std::fill(db, db + (t.c1 - t.c0), 0.0f);
    backward_tile<S, C, Residual>(a, r, r + rows_per_group, t.c0, t.c1, ds, db, t.fused, t.sv,
                                  t.svx);
  }
  if (a.stream) stream_fence();
}

// dx of one row's columns [c0, c1) from its sums (rows longer than kLongRow).
template <class S, class C, bool Residual>
EQX_CLONES void long_row_dx(const BackwardArgs& a, int64_t row, int64_t c0, int64_t c1,
                            float sv, float svx) {
  row_dx<S, C, Residual>(a, row, c0, c1, sv, svx);
}

EQX_CLONES void add_columns(float* out, const float* parts, int64_t count, int64_t stride,
                            int64_t n) {
  std::fill(out, out + n, 0.0f);
  for (int64_t p = 0; p < count; ++p) {
    const float* part = parts + p * stride;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] += part[i];
  }
}

// x is the row normalized (h for the residual backward); with ct_h, dx is h's total
// cotangent, dh = (d y / d h)^T ct + ct_h, in h's element type.
ffi::Error run_backward(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean_shift, ffi::Buffer<ffi::F32> rstd,
                        ffi::AnyBuffer ct, const ffi::AnyBuffer* ct_h, ffi::AnyBuffer* dx,
                        ffi::Buffer<ffi::F32>* dscale, ffi::Buffer<ffi::F32>* doffset,
                        bool center, int64_t groups, bool want_dx) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D (rows, D)");
  const int64_t rows = dims[0], d = dims[1];
  if (groups < 1 || rows % groups != 0)
    return ffi::Error::InvalidArgument("groups must be >= 1 and divide the number of rows");
  int64_t examples = 1;
  if (auto e = check_affine("scale", scale.dimensions(), rows, d, &examples)) return *e;
  if (auto e = check_dims("mean_shift", mean_shift.dimensions(), {rows})) return *e;
  if (auto e = check_dims("rstd", rstd.dimensions(), {rows})) return *e;
  if (auto e = check_dims("ct", ct.dimensions(), {rows, d})) return *e;
  if (ct_h != nullptr) {
    if (auto e = check_dims("ct_h", ct_h->dimensions(), {rows, d})) return *e;
  }
  if (want_dx) {
    if (auto e = check_dims("dx", dx->dimensions(), {rows, d})) return *e;
  } else if (dx->element_count() != 0) {
    return ffi::Error::InvalidArgument("dx must be empty when want_dx is false");
  }
  if (auto e = check_dims("dscale", dscale->dimensions(), {groups, d})) return *e;
  if (auto e = check_dims("doffset", doffset->dimensions(), {groups, d})) return *e;
  // The element types (S x's, C ct's): x's is served, ct has x's, or for the residual
  // backward y's (h float32, or h's type); ct_h and dx have x's.
  const ffi::DataType type = x.element_type();
  TileFn tile_fn = nullptr;
  DxFn dx_fn = nullptr;
  bool served = with_element_type(type, [&](auto s_type) {
    using S = decltype(s_type);
    with_element_type(ct.element_type(), [&](auto c_type) {
      using C = decltype(c_type);
      if constexpr (std::is_same_v<C, S>) {
        if (ct_h == nullptr) {
          tile_fn = run_tile<S, C, false>;
          dx_fn = long_row_dx<S, C, false>;
        }
      }
      if constexpr (std::is_same_v<C, S> || std::is_same_v<S, F32>) {
        if (ct_h != nullptr) {
          tile_fn = run_tile<S, C, true>;
          dx_fn = long_row_dx<S, C, true>;
        }
      }
    });
  });
  if (!served) return type_error(ct_h ? "h" : "x", type, EQX_SERVED);
  if (tile_fn == nullptr) {
    std::string own = type_name(type) + (ct_h ? " (h's)" : " (x's)");
    return type_error("ct", ct.element_type(), ct_h && type == ffi::F32 ? EQX_SERVED : own);
  }
  if (ct_h != nullptr && ct_h->element_type() != type)
    return type_error("ct_h", ct_h->element_type(), type_name(type) + " (h's)");
  if (dx->element_type() != type)
    return type_error(ct_h ? "dh" : "dx", dx->element_type(),
                      type_name(type) + (ct_h ? " (h's)" : " (x's)"));
  float* out_dscale = dscale->typed_data();
  float* out_doffset = doffset->typed_data();
  if (rows == 0 || d == 0) {
    std::fill(out_dscale, out_dscale + groups * d, 0.0f);
    std::fill(out_doffset, out_doffset + groups * d, 0.0f);
    return ffi::Error::Success();
  }
  BackwardArgs a{x.untyped_data(), scale.typed_data(), mean_shift.typed_data(),
                 rstd.typed_data(), ct.untyped_data(), ct_h ? ct_h->untyped_data() : nullptr,
                 dx->untyped_data(), d, rows / examples, center, want_dx,
                 stream_outputs(ct_h ? 4 : 3, rows * d, type)};
  const bool long_rows = d > kLongRow;
  const int64_t block = long_rows ? kColumnBlock : d;
  const int64_t blocks = (d + block - 1) / block;
  const int64_t per_group = rows / groups;
  int64_t chunk = units_per_chunk(block, long_rows ? 1 << 18 : 1 << 17);
  // Chunks are whole groups (chunk a multiple of per_group) or parts of one group.
  const bool whole = per_group <= chunk;
  int64_t parts = 1;  // parts per group
  if (whole) {
    chunk = (chunk / per_group) * per_group;
  } else {
    parts = (per_group + chunk - 1) / chunk;
    chunk = (per_group + parts - 1) / parts;  // balanced parts
  }
  std::vector<float> partial;
  if (!whole) partial.resize(static_cast<size_t>(groups * parts) * 2 * d);
  std::vector<float> sums;
  if (long_rows) sums.resize(static_cast<size_t>(rows) * blocks * 2);

  std::vector<Tile> tiles;
  auto add_tiles = [&](int64_t r0, int64_t r1, float* ds, float* db) {
    for (int64_t b = 0; b < blocks; ++b) {
      int64_t c0 = b * block, c1 = std::min(d, c0 + block);
      float* sv = long_rows ? sums.data() + b * rows : nullptr;
      float* svx = long_rows ? sums.data() + (blocks + b) * rows : nullptr;
      tiles.push_back(Tile{r0, r1, c0, c1, ds ? ds + c0 : nullptr, db ? db + c0 : nullptr,
                           sv, svx, !long_rows});
    }
  };
  if (whole) {
    for (int64_t r = 0; r < rows; r += chunk) add_tiles(r, std::min(rows, r + chunk), nullptr, nullptr);
  } else {
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t p = 0; p < parts; ++p) {
        int64_t r0 = g * per_group + p * chunk;
        int64_t r1 = std::min((g + 1) * per_group, r0 + chunk);
        float* base = partial.data() + (g * parts + p) * 2 * d;
        if (r0 < r1) {
          add_tiles(r0, r1, base, base + d);
        } else {  // an empty trailing part still contributes zeros
          std::fill(base, base + 2 * d, 0.0f);
        }
      }
  }
  parallel_for(pool, static_cast<int64_t>(tiles.size()),
               [&](int64_t t) { tile_fn(a, tiles[t], per_group, out_dscale, out_doffset); });

  if (long_rows && want_dx) {
    // Row sums over column blocks in block order, then dx by (row, block) tiles.
    const int64_t row_chunk = std::max<int64_t>(1, (1 << 18) / block);
    const int64_t row_tasks = (rows + row_chunk - 1) / row_chunk;
    parallel_for(pool, row_tasks * blocks, [&](int64_t t) {
      const int64_t rt = t / blocks, b = t % blocks;
      const int64_t c0 = b * block, c1 = std::min(d, c0 + block);
      for (int64_t row = rt * row_chunk; row < std::min(rows, (rt + 1) * row_chunk); ++row) {
        float s = 0.0f, sx = 0.0f;
        for (int64_t k = 0; k < blocks; ++k) {
          s += sums[k * rows + row];
          sx += sums[(blocks + k) * rows + row];
        }
        dx_fn(a, row, c0, c1, s, sx);
      }
      if (a.stream) stream_fence();  // the task's streamed dx, before it is counted done
    });
  }
  if (!whole) {
    // dscale/doffset of each group: its parts summed in part order, by column blocks.
    const int64_t cols = 4096;
    const int64_t col_tasks = (d + cols - 1) / cols;
    parallel_for(pool, groups * 2 * col_tasks, [&](int64_t t) {
      const int64_t g = t / (2 * col_tasks), which = (t / col_tasks) % 2, cb = t % col_tasks;
      const int64_t c0 = cb * cols, n = std::min(d, c0 + cols) - c0;
      float* out = (which == 0 ? out_dscale : out_doffset) + g * d + c0;
      add_columns(out, partial.data() + g * parts * 2 * d + which * d + c0, parts, 2 * d, n);
    });
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> mean_shift, ffi::Buffer<ffi::F32> rstd,
                    ffi::AnyBuffer ct, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::Buffer<ffi::F32>> dscale,
                    ffi::Result<ffi::Buffer<ffi::F32>> doffset, bool center, int64_t groups,
                    bool want_dx) {
  return run_backward(pool, x, scale, mean_shift, rstd, ct, nullptr, &*dx, &*dscale,
                      &*doffset, center, groups, want_dx);
}

ffi::Error ResidualBackward(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> mean_shift, ffi::Buffer<ffi::F32> rstd,
                            ffi::AnyBuffer ct, ffi::AnyBuffer ct_h,
                            ffi::Result<ffi::AnyBuffer> dh,
                            ffi::Result<ffi::Buffer<ffi::F32>> dscale,
                            ffi::Result<ffi::Buffer<ffi::F32>> doffset, bool center,
                            int64_t groups) {
  return run_backward(pool, h, scale, mean_shift, rstd, ct, &ct_h, &*dh, &*dscale, &*doffset,
                      center, groups, true);
}

}  // namespace

// The library's exports: its handlers, EqxNormDtypes and EqxNormPoolThreads.
EQX_EXPORT XLA_FFI_Error* EqxNormRowsForward(XLA_FFI_CallFrame* call_frame);
EQX_EXPORT XLA_FFI_Error* EqxNormRowsBackward(XLA_FFI_CallFrame* call_frame);
EQX_EXPORT XLA_FFI_Error* EqxNormResidualForward(XLA_FFI_CallFrame* call_frame);
EQX_EXPORT XLA_FFI_Error* EqxNormResidualBackward(XLA_FFI_CallFrame* call_frame);

// The element types this build serves, as bits: 1 float32, 2 bfloat16, 4 float16.
EQX_EXPORT int EqxNormDtypes() {
#ifdef __FLT16_MAX__
  return 1 | 2 | 4;
#else
  return 1 | 2;
#endif
}

// The size of XLA's intra-op pool as the last kernel call saw it, 0 before any call: what
// the work of a call may be shared on (tests check that a thread count changed).
EQX_EXPORT int64_t EqxNormPoolThreads() { return eqx::pool_threads_seen.load(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqxNormRowsForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()            // x (rows, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // scale (D,) or (E, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // offset (D,) or (E, D)
                                  .Ret<ffi::AnyBuffer>()            // y (rows, D)
                                  .Ret<ffi::Buffer<ffi::F32>>()     // mean - x[:, 0] (rows,)
                                  .Ret<ffi::Buffer<ffi::F32>>()     // rstd (rows,)
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("center"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqxNormRowsBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()            // x (rows, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // scale (D,) or (E, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // mean - x[:, 0] (rows,)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // rstd (rows,)
                                  .Arg<ffi::AnyBuffer>()            // cotangent (rows, D)
                                  .Ret<ffi::AnyBuffer>()            // dx (rows, D), or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()     // dscale (groups, D)
                                  .Ret<ffi::Buffer<ffi::F32>>()     // doffset (groups, D)
                                  .Attr<bool>("center")
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("want_dx"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqxNormResidualForward, ResidualForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()            // x (rows, D)
                                  .Arg<ffi::AnyBuffer>()            // residual (rows, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // scale (D,) or (E, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // offset (D,) or (E, D)
                                  .Ret<ffi::AnyBuffer>()            // y (rows, D), x's type
                                  .Ret<ffi::AnyBuffer>()            // h = x + r, r's type
                                  .Ret<ffi::Buffer<ffi::F32>>()     // mean - h[:, 0] (rows,)
                                  .Ret<ffi::Buffer<ffi::F32>>()     // rstd (rows,)
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("center"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqxNormResidualBackward, ResidualBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()            // h (rows, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // scale (D,) or (E, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // mean - h[:, 0] (rows,)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // rstd (rows,)
                                  .Arg<ffi::AnyBuffer>()            // y's cotangent (rows, D)
                                  .Arg<ffi::AnyBuffer>()            // h's cotangent (rows, D)
                                  .Ret<ffi::AnyBuffer>()            // dh (rows, D), h's type
                                  .Ret<ffi::Buffer<ffi::F32>>()     // dscale (groups, D)
                                  .Ret<ffi::Buffer<ffi::F32>>()     // doffset (groups, D)
                                  .Attr<bool>("center")
                                  .Attr<int64_t>("groups"));
