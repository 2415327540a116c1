// GroupNorm and InstanceNorm (one group per channel) for XLA:CPU through JAX's FFI.
//
// x is viewed as 3-D: channels-last (N, S, C), where group g is channels [g K, (g + 1) K)
// (K = C / G) at every position s, or channels-first (N, C, S), where group g is the
// contiguous block of K channels of S positions. Each (n, g) group of M = K S values has
// its own statistics; scale and offset are per channel: (C,), or (E, C), one row per
// example of N / E consecutive examples (the per-example modulation of diffusion models).
// With `silu`, y = u sigmoid(u) for the affine output u (Stable Diffusion's GroupNorm then
// SiLU); the forward also writes sigmoid(u) where its sigmoid buffer has x's shape (float32;
// without silu, or where no derivative will read it, a (N, 1, 1) placeholder of zeros), and the backward multiplies ct by silu's slope, sigmoid(u) (1 + u
// (1 - sigmoid(u))), with u rebuilt from x: no exp in the backward.
//
// Forward:  y = ((x - x0) - m) * (r * scale[c]) + offset[c], where x0 is the group's first
//           element (in memory order), m = mean(x - x0), r = rsqrt(mean(((x - x0) - m)^2)
//           + eps). Saves m and r per (n, g).
// Backward: with v = ct * scale[c] and bars for group means,
//           dx = r * ((v - mean(v)) - xhat * mean(v * xhat)),
//           dscale[c] = sum over n, s of ct * xhat, doffset[c] = sum of ct (per group of
//           N / groups examples: `groups` > 1 under vmap).
//
// Statistics are float32, sums accumulate in float32 over short runs (16 lanes, or 64
// positions) and in double across them. Inputs and outputs may be float32, bfloat16 or
// float16 (see EqxNormDtypes in layer_norm.cc).
// Determinism and batch invariance: the unit of work is one example (channels-last) or one
// (n, g) group (channels-first); each unit is computed the same way wherever it lies in the
// batch and whichever thread runs it, every sum in a fixed order. Units are grouped into
// tasks by their size only. So y and dx of one example are bitwise the same alone or in any
// batch, at any thread count. Per-example parameter sums are kept per (n, c) and added over
// n in index order.
// Memory: per task a few C-long vectors (and the block means of one example); the backward
// keeps two (N, C) double partial sums. Passes over x: forward, three over a contiguous
// group (L1-resident) channels-first, and channels-last two per block of 64 positions (the
// second from L1) and one to write y; backward, one for the sums and one to write dx.
// Stores: a call that moves more than 32 MiB writes y and dx by non-temporal stores
// (common.h's store_run); the values are the same.
// Safety: every buffer's dimensions and element type are checked first, then every output
// is written (NaN statistics for empty groups), as in layer_norm.cc.

#include "common.h"

namespace {

using namespace eqx;  // common.h

constexpr int64_t kPositions = 64;  // channels-last: positions summed in float per block

struct Layout {
  int64_t n, s, c, g, k;  // examples, positions, channels, groups, channels per group
  bool last;
  int64_t group_size() const { return k * s; }
  int64_t example_size() const { return s * c; }
  // float32 mean of a group's values from their sum
  float mean(double sum) const { return static_cast<float>(sum) / static_cast<float>(k * s); }
};

// Two sums at once: (sum f, sum h) over [0, n), same order as lane_sum.
template <class F>
EQX_INLINE void lane_sum2(int64_t n, F f, double* s1, double* s2) {
  double t1 = 0.0, t2 = 0.0;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t end = std::min(n, begin + kBlock);
    float a1[kLanes] = {}, a2[kLanes] = {};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) f(i + l, &a1[l], &a2[l]);
    for (int64_t l = 0; i + l < end; ++l) f(i + l, &a1[l], &a2[l]);
    t1 += combine(a1);
    t2 += combine(a2);
  }
  *s1 = t1;
  *s2 = t2;
}

// ---------------------------------------------------------------------------------------
// Forward.

struct ForwardArgs {
  const void* x;
  const float* scale;  // (C,), or (E, C): example n takes row n / per_example
  const float* offset;
  void* y;
  float* mean_shift;  // (N, G): mean - first element of the group
  float* rstd;        // (N, G)
  float* sigmoid;     // x's shape with Silu: sigmoid(u), kept for the backward
  Layout l;
  int64_t per_example;  // examples per row of scale/offset (N when they are shared)
  float epsilon;
  bool stream;  // y by non-temporal stores (common.h's store_run)
};

// y's value from the affine's output u (Silu: u sigmoid(u); Keep: sigmoid(u) in kept[i]).
template <bool Silu, bool Keep>
EQX_INLINE float activate(float u, float* kept, int64_t i) {
  if constexpr (Silu) {
    const float s = sigmoid(u);
    if constexpr (Keep) kept[i] = s;
    return u * s;
  } else {
    return u;
  }
}

// Channels-first: group u = n * G + g, the contiguous block of M values at u * M.
template <class S, bool Silu, bool Keep>
EQX_INLINE void forward_group_first(const ForwardArgs& a, int64_t u) {
  using T = typename S::T;
  const Layout& l = a.l;
  const int64_t m_size = l.group_size();
  const T* x = static_cast<const T*>(a.x) + u * m_size;
  T* y = static_cast<T*>(a.y) + u * m_size;
  float* kept = Keep ? a.sigmoid + u * m_size : nullptr;
  auto mean = [&l](double sum) { return l.mean(sum); };
  const Stats stats =
      shifted_stats(m_size, a.epsilon, mean, [&](int64_t i) { return S::load(x[i]); });
  const float shift = stats.shift, m = stats.mean, r = stats.rstd;
  const int64_t c0 = (u % l.g) * l.k, row = (u / l.g) / a.per_example * l.c;
  for (int64_t k = 0; k < l.k; ++k) {
    const float sc = r * a.scale[row + c0 + k], of = a.offset[row + c0 + k];
    const T* xr = x + k * l.s;
    T* yr = y + k * l.s;
    float* kr = Keep ? kept + k * l.s : nullptr;
    store_run(yr, l.s, a.stream, [&](int64_t i) EQX_INLINE_LAMBDA {
      return S::store(activate<Silu, Keep>(((S::load(xr[i]) - shift) - m) * sc + of, kr, i));
    });
  }
  a.mean_shift[u] = m;
  a.rstd[u] = r;
}

// Channels-last scratch: per-channel vectors of one example.
struct Scratch {
  std::vector<float> shift, mean, acc, acc2, mul, mv, mvx, block_mean;
  std::vector<double> total, total2;
  Scratch(int64_t c, int64_t blocks)
      : shift(c), mean(c), acc(c), acc2(c), mul(c), mv(c), mvx(c), block_mean(blocks * c),
        total(c), total2(c) {}
};

// Per-channel sums over all positions of f and h, `both(s, c, &f, &h)`, into sc.total and
// sc.total2, in one pass (float within blocks of kPositions positions, double across).
template <class F>
EQX_INLINE void channel_sums(const Layout& l, Scratch& sc, F both) {
  const int64_t c = l.c;
  float* acc = sc.acc.data();
  float* acc2 = sc.acc2.data();
  double* total = sc.total.data();
  double* total2 = sc.total2.data();
  std::fill(total, total + c, 0.0);
  std::fill(total2, total2 + c, 0.0);
  for (int64_t s0 = 0; s0 < l.s; s0 += kPositions) {
    std::fill(acc, acc + c, 0.0f);
    std::fill(acc2, acc2 + c, 0.0f);
    const int64_t s1 = std::min(l.s, s0 + kPositions);
    for (int64_t s = s0; s < s1; ++s) {
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        float f, h;
        both(s, ch, &f, &h);
        acc[ch] += f;
        acc2[ch] += h;
      }
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      total[ch] += acc[ch];
      total2[ch] += acc2[ch];
    }
  }
}

EQX_INLINE double group_total(const Layout& l, const double* total, int64_t g) {
  double t = 0.0;
  for (int64_t k = 0; k < l.k; ++k) t += total[g * l.k + k];
  return t;
}

// Channels-last: example n, (S, C) at n * S * C.
template <class S, bool Silu, bool Keep>
EQX_INLINE void forward_example_last(const ForwardArgs& a, int64_t n, Scratch& sc) {
  using T = typename S::T;
  const Layout& l = a.l;
  const int64_t c = l.c, m_size = l.group_size();
  const T* x = static_cast<const T*>(a.x) + n * l.example_size();
  T* y = static_cast<T*>(a.y) + n * l.example_size();
  float* kept = Keep ? a.sigmoid + n * l.example_size() : nullptr;
  float* shift = sc.shift.data();
  float* mean = sc.mean.data();
  float* mul = sc.mul.data();
  const float* scale = a.scale + (n / a.per_example) * c;
  for (int64_t ch = 0; ch < c; ++ch) shift[ch] = S::load(x[(ch / l.k) * l.k]);
  // Two passes per block of kPositions positions (the second from L1): the block's sums of
  // x - shift and its squared deviations from its own mean, per channel; then the group's
  // mean, and its sum of squares as the blocks' plus the spread of the block means around
  // the group's mean (Chan et al.): x is read once from memory for the statistics.
  float* acc = sc.acc.data();
  float* acc2 = sc.acc2.data();
  double* total = sc.total.data();
  double* squares = sc.total2.data();
  float* block_mean = sc.block_mean.data();
  std::fill(total, total + c, 0.0);
  std::fill(squares, squares + c, 0.0);
  for (int64_t s0 = 0, b = 0; s0 < l.s; s0 += kPositions, ++b) {
    const int64_t s1 = std::min(l.s, s0 + kPositions);
    const float inv_count = 1.0f / static_cast<float>(s1 - s0);
    std::fill(acc, acc + c, 0.0f);
    std::fill(acc2, acc2 + c, 0.0f);
    for (int64_t s = s0; s < s1; ++s) {
      const T* xr = x + s * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) acc[ch] += S::load(xr[ch]) - shift[ch];
    }
    float* bm = block_mean + b * c;
    for (int64_t ch = 0; ch < c; ++ch) bm[ch] = acc[ch] * inv_count;
    for (int64_t s = s0; s < s1; ++s) {
      const T* xr = x + s * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        float v = (S::load(xr[ch]) - shift[ch]) - bm[ch];
        acc2[ch] += v * v;
      }
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      total[ch] += acc[ch];
      squares[ch] += acc2[ch];
    }
  }
  for (int64_t g = 0; g < l.g; ++g) {
    const float m = l.mean(group_total(l, total, g));
    for (int64_t k = 0; k < l.k; ++k) mean[g * l.k + k] = m;
    a.mean_shift[n * l.g + g] = m;
  }
  for (int64_t s0 = 0, b = 0; s0 < l.s; s0 += kPositions, ++b) {
    const double count = static_cast<double>(std::min(l.s, s0 + kPositions) - s0);
    const float* bm = block_mean + b * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float d = bm[ch] - mean[ch];
      squares[ch] += count * static_cast<double>(d * d);
    }
  }
  for (int64_t ch = 0; ch < c; ++ch) total[ch] = squares[ch];  // group_total reads total
  for (int64_t g = 0; g < l.g; ++g) {
    const float var = l.mean(group_total(l, sc.total.data(), g));
    const float x0 = shift[g * l.k], m = mean[g * l.k];
    // the group's i-th value in (position, channel) order, less x0 and m
    auto deviation = [&](int64_t i) {
      return (S::load(x[(i / l.k) * c + g * l.k + i % l.k]) - x0) - m;
    };
    const float r = rstd_of(var, a.epsilon, m_size, [&l](double sum) { return l.mean(sum); },
                            deviation);
    for (int64_t k = 0; k < l.k; ++k) mul[g * l.k + k] = r * scale[g * l.k + k];
    a.rstd[n * l.g + g] = r;
  }
  const float* offset = a.offset + (n / a.per_example) * c;
  for (int64_t s = 0; s < l.s; ++s) {
    const T* xr = x + s * c;
    T* yr = y + s * c;
    float* kr = Keep ? kept + s * c : nullptr;
    store_run(yr, c, a.stream, [&](int64_t ch) EQX_INLINE_LAMBDA {
      return S::store(activate<Silu, Keep>(
          ((S::load(xr[ch]) - shift[ch]) - mean[ch]) * mul[ch] + offset[ch], kr, ch));
    });
  }
}

template <class S, bool Silu, bool Keep>
EQX_CLONES void forward_units(const ForwardArgs& a, int64_t u0, int64_t u1) {
  if (a.l.last) {
    Scratch sc(a.l.c, (a.l.s + kPositions - 1) / kPositions);
    for (int64_t n = u0; n < u1; ++n) forward_example_last<S, Silu, Keep>(a, n, sc);
  } else {
    for (int64_t u = u0; u < u1; ++u) forward_group_first<S, Silu, Keep>(a, u);
  }
  if (a.stream) stream_fence();
}

// Units (examples channels-last, groups channels-first) and units per task: about 64K
// elements per task, by shape only.
int64_t units_of(const Layout& l) { return l.last ? l.n : l.n * l.g; }
int64_t chunk_of(const Layout& l) {
  return units_per_chunk(l.last ? l.example_size() : l.group_size(), 1 << 16);
}

std::optional<ffi::Error> read_layout(ffi::Span<const int64_t> dims, int64_t num_groups,
                                      bool channels_last, Layout* l) {
  if (dims.size() != 3)
    return ffi::Error::InvalidArgument("x must be 3-D: (N, S, C) channels-last or (N, C, S)");
  l->n = dims[0];
  l->last = channels_last;
  l->s = channels_last ? dims[1] : dims[2];
  l->c = channels_last ? dims[2] : dims[1];
  if (num_groups < 1 || l->c % num_groups != 0)
    return ffi::Error::InvalidArgument("num_groups must be >= 1 and divide the channels, got " +
                                       std::to_string(num_groups) + " for " +
                                       std::to_string(l->c) + " channels");
  l->g = num_groups;
  l->k = l->c / num_groups;
  return std::nullopt;
}

using ForwardFn = void (*)(const ForwardArgs&, int64_t, int64_t);

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> offset, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::Buffer<ffi::F32>> mean_shift,
                   ffi::Result<ffi::Buffer<ffi::F32>> rstd,
                   ffi::Result<ffi::Buffer<ffi::F32>> sigmoid, float epsilon, int64_t num_groups,
                   bool channels_last, bool use_silu) {
  Layout l;
  if (auto e = read_layout(x.dimensions(), num_groups, channels_last, &l)) return *e;
  auto dims = x.dimensions();
  int64_t examples = 1, offset_examples = 1;
  if (auto e = check_affine("scale", scale.dimensions(), l.n, l.c, &examples)) return *e;
  if (auto e = check_affine("offset", offset.dimensions(), l.n, l.c, &offset_examples)) return *e;
  if (offset_examples != examples)
    return ffi::Error::InvalidArgument("offset must have scale's dimensions");
  if (auto e = check_dims("y", y->dimensions(), {dims[0], dims[1], dims[2]})) return *e;
  if (auto e = check_dims("mean_shift", mean_shift->dimensions(), {l.n, l.g})) return *e;
  if (auto e = check_dims("rstd", rstd->dimensions(), {l.n, l.g})) return *e;
  // sigmoid(u) is kept (x's shape) or not asked for (a (N, 1, 1) placeholder, zeros)
  auto sig_dims = sigmoid->dimensions();
  const bool keep = use_silu && !(sig_dims.size() == 3 && sig_dims[0] == l.n && sig_dims[1] == 1 &&
                                  sig_dims[2] == 1 && dims[1] * dims[2] != 1);
  if (keep) {
    if (auto e = check_dims("sigmoid", sig_dims, {dims[0], dims[1], dims[2]})) return *e;
  } else if (auto e = check_dims("sigmoid", sig_dims, {l.n, 1, 1})) {
    return *e;
  }
  const ffi::DataType type = x.element_type();
  ForwardFn fn = nullptr;
  if (!with_element_type(type, [&](auto s) {
        using S = decltype(s);
        fn = !use_silu ? forward_units<S, false, false>
             : keep    ? forward_units<S, true, true>
                       : forward_units<S, true, false>;
      }))
    return type_error("x", type, EQX_SERVED);
  if (y->element_type() != type)
    return type_error("y", y->element_type(), type_name(type) + " (x's)");
  if (!keep) std::fill(sigmoid->typed_data(), sigmoid->typed_data() + l.n, 0.0f);
  if (l.n == 0 || l.group_size() == 0) {  // empty groups: NaN statistics, a mean over none
    std::fill(mean_shift->typed_data(), mean_shift->typed_data() + l.n * l.g, NAN);
    std::fill(rstd->typed_data(), rstd->typed_data() + l.n * l.g, NAN);
    return ffi::Error::Success();
  }
  ForwardArgs a{x.untyped_data(), scale.typed_data(), offset.typed_data(), y->untyped_data(),
                mean_shift->typed_data(), rstd->typed_data(), sigmoid->typed_data(), l,
                l.n / examples, epsilon, stream_outputs(2, l.n * l.example_size(), type)};
  parallel_chunks(pool, units_of(l), chunk_of(l), [&](int64_t u0, int64_t u1) { fn(a, u0, u1); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// Backward.

struct BackwardArgs {
  const void* x;
  const float* scale;   // (C,), or (E, C) as in the forward
  const float* offset;  // read only with silu: the affine's output is recomputed
  const float* mean_shift;
  const float* rstd;
  const float* sigmoid;  // with Silu: the forward's sigmoid(u), x's shape
  const void* ct;
  void* dx;
  double* sum_ct;     // (N, C): sum over s of ct
  double* sum_ct_xh;  // (N, C): sum over s of ct * xhat
  Layout l;
  int64_t per_example;
  bool want_dx;
  bool stream;  // dx by non-temporal stores (common.h's store_run)
};

// The cotangent of the affine's output u = xhat * scale + offset, from y's cotangent g.
// (Silu: from the kept sigmoid(u) s, g s (1 + u (1 - s))).
template <bool Silu>
EQX_INLINE float affine_cotangent(float g, float xhat, float scale, float offset,
                                  const float* kept, int64_t i) {
  if constexpr (Silu) {
    const float u = xhat * scale + offset, s = kept[i];
    return g * (s * (1.0f + u * (1.0f - s)));
  } else {
    return g;
  }
}

template <class S, bool Silu>
EQX_INLINE void backward_group_first(const BackwardArgs& a, int64_t u) {
  using T = typename S::T;
  const Layout& l = a.l;
  const int64_t m_size = l.group_size();
  const T* x = static_cast<const T*>(a.x) + u * m_size;
  const T* ct = static_cast<const T*>(a.ct) + u * m_size;
  const float* kept = Silu ? a.sigmoid + u * m_size : nullptr;
  const float shift = S::load(x[0]);
  const float m = a.mean_shift[u], r = a.rstd[u];
  const int64_t n = u / l.g, c0 = (u % l.g) * l.k;
  const float* scale = a.scale + (n / a.per_example) * l.c;
  const float* offset = a.offset + (n / a.per_example) * l.c;
  double sv = 0.0, svx = 0.0;
  for (int64_t k = 0; k < l.k; ++k) {
    const T* xr = x + k * l.s;
    const T* gr = ct + k * l.s;
    const float sc = scale[c0 + k], of = offset[c0 + k];
    const float* kr = Silu ? kept + k * l.s : nullptr;
    double s1, s2;
    lane_sum2(
        l.s,
        [&](int64_t i, float* a1, float* a2) {
          const float xhat = ((S::load(xr[i]) - shift) - m) * r;
          const float g = affine_cotangent<Silu>(S::load(gr[i]), xhat, sc, of, kr, i);
          *a1 += g;
          *a2 += g * xhat;
        },
        &s1, &s2);
    a.sum_ct[n * l.c + c0 + k] = s1;
    a.sum_ct_xh[n * l.c + c0 + k] = s2;
    sv += sc * s1;
    svx += sc * s2;
  }
  if (!a.want_dx) return;
  const float mean_v = l.mean(sv), mean_vx = l.mean(svx);
  T* dx = static_cast<T*>(a.dx) + u * m_size;
  for (int64_t k = 0; k < l.k; ++k) {
    const float sc = scale[c0 + k], of = offset[c0 + k];
    const T* xr = x + k * l.s;
    const T* gr = ct + k * l.s;
    const float* kr = Silu ? kept + k * l.s : nullptr;
    store_run(dx + k * l.s, l.s, a.stream, [&](int64_t i) EQX_INLINE_LAMBDA {
      float xhat = ((S::load(xr[i]) - shift) - m) * r;
      float g = affine_cotangent<Silu>(S::load(gr[i]), xhat, sc, of, kr, i);
      return S::store(r * ((g * sc - mean_v) - xhat * mean_vx));
    });
  }
}

template <class S, bool Silu>
EQX_INLINE void backward_example_last(const BackwardArgs& a, int64_t n, Scratch& sc) {
  using T = typename S::T;
  const Layout& l = a.l;
  const int64_t c = l.c;
  const T* x = static_cast<const T*>(a.x) + n * l.example_size();
  const T* ct = static_cast<const T*>(a.ct) + n * l.example_size();
  const float* kept = Silu ? a.sigmoid + n * l.example_size() : nullptr;
  float* shift = sc.shift.data();
  float* mean = sc.mean.data();
  float* rs = sc.mul.data();
  for (int64_t ch = 0; ch < c; ++ch) {
    const int64_t g = ch / l.k;
    shift[ch] = S::load(x[g * l.k]);
    mean[ch] = a.mean_shift[n * l.g + g];
    rs[ch] = a.rstd[n * l.g + g];
  }
  double* s_ct = a.sum_ct + n * c;
  double* s_ctx = a.sum_ct_xh + n * c;
  const float* scale = a.scale + (n / a.per_example) * c;
  const float* offset = a.offset + (n / a.per_example) * c;
  channel_sums(l, sc, [&](int64_t s, int64_t ch, float* g, float* g_xhat) {
    const float xhat = ((S::load(x[s * c + ch]) - shift[ch]) - mean[ch]) * rs[ch];
    *g = affine_cotangent<Silu>(S::load(ct[s * c + ch]), xhat, scale[ch], offset[ch],
                                Silu ? kept + s * c : nullptr, ch);
    *g_xhat = *g * xhat;
  });
  std::copy(sc.total.begin(), sc.total.end(), s_ct);
  std::copy(sc.total2.begin(), sc.total2.end(), s_ctx);
  if (!a.want_dx) return;
  // per channel: mean(v) and mean(v * xhat) of its group
  float* mv = sc.mv.data();
  float* mvx = sc.mvx.data();
  for (int64_t g = 0; g < l.g; ++g) {
    double sv = 0.0, svx = 0.0;
    for (int64_t k = 0; k < l.k; ++k) {
      sv += scale[g * l.k + k] * s_ct[g * l.k + k];
      svx += scale[g * l.k + k] * s_ctx[g * l.k + k];
    }
    const float fv = l.mean(sv), fvx = l.mean(svx);
    for (int64_t k = 0; k < l.k; ++k) {
      mv[g * l.k + k] = fv;
      mvx[g * l.k + k] = fvx;
    }
  }
  T* dx = static_cast<T*>(a.dx) + n * l.example_size();
  const float* pmv = mv;
  const float* pmvx = mvx;
  for (int64_t s = 0; s < l.s; ++s) {
    const T* xr = x + s * c;
    const T* gr = ct + s * c;
    const float* kr = Silu ? kept + s * c : nullptr;
    store_run(dx + s * c, c, a.stream, [&](int64_t ch) EQX_INLINE_LAMBDA {
      float xhat = ((S::load(xr[ch]) - shift[ch]) - mean[ch]) * rs[ch];
      float g = affine_cotangent<Silu>(S::load(gr[ch]), xhat, scale[ch], offset[ch], kr, ch);
      return S::store(rs[ch] * ((g * scale[ch] - pmv[ch]) - xhat * pmvx[ch]));
    });
  }
}

template <class S, bool Silu>
EQX_CLONES void backward_units(const BackwardArgs& a, int64_t u0, int64_t u1) {
  if (a.l.last) {
    Scratch sc(a.l.c, (a.l.s + kPositions - 1) / kPositions);
    for (int64_t n = u0; n < u1; ++n) backward_example_last<S, Silu>(a, n, sc);
  } else {
    for (int64_t u = u0; u < u1; ++u) backward_group_first<S, Silu>(a, u);
  }
  if (a.stream) stream_fence();
}

using BackwardFn = void (*)(const BackwardArgs&, int64_t, int64_t);

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::F32> mean_shift,
                    ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> sigmoid, ffi::AnyBuffer ct,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> dscale,
                    ffi::Result<ffi::Buffer<ffi::F32>> doffset, int64_t num_groups,
                    bool channels_last, bool use_silu, int64_t groups, bool want_dx) {
  Layout l;
  if (auto e = read_layout(x.dimensions(), num_groups, channels_last, &l)) return *e;
  auto dims = x.dimensions();
  if (groups < 1 || l.n % groups != 0)
    return ffi::Error::InvalidArgument("groups must be >= 1 and divide the number of examples");
  int64_t examples = 1, offset_examples = 1;
  if (auto e = check_affine("scale", scale.dimensions(), l.n, l.c, &examples)) return *e;
  if (auto e = check_affine("offset", offset.dimensions(), l.n, l.c, &offset_examples)) return *e;
  if (offset_examples != examples)
    return ffi::Error::InvalidArgument("offset must have scale's dimensions");
  if (auto e = check_dims("mean_shift", mean_shift.dimensions(), {l.n, l.g})) return *e;
  if (auto e = check_dims("rstd", rstd.dimensions(), {l.n, l.g})) return *e;
  if (auto e = check_dims("ct", ct.dimensions(), {dims[0], dims[1], dims[2]})) return *e;
  if (use_silu) {
    if (auto e = check_dims("sigmoid", sigmoid.dimensions(), {dims[0], dims[1], dims[2]}))
      return *e;
  } else if (auto e = check_dims("sigmoid", sigmoid.dimensions(), {l.n, 1, 1})) {
    return *e;
  }
  if (want_dx) {
    if (auto e = check_dims("dx", dx->dimensions(), {dims[0], dims[1], dims[2]})) return *e;
  } else if (dx->element_count() != 0) {
    return ffi::Error::InvalidArgument("dx must be empty when want_dx is false");
  }
  if (auto e = check_dims("dscale", dscale->dimensions(), {groups, l.c})) return *e;
  if (auto e = check_dims("doffset", doffset->dimensions(), {groups, l.c})) return *e;
  const ffi::DataType type = x.element_type();
  BackwardFn fn = nullptr;
  if (!with_element_type(type, [&](auto s) {
        fn = use_silu ? backward_units<decltype(s), true> : backward_units<decltype(s), false>;
      }))
    return type_error("x", type, EQX_SERVED);
  if (ct.element_type() != type)
    return type_error("ct", ct.element_type(), type_name(type) + " (x's)");
  if (dx->element_type() != type)
    return type_error("dx", dx->element_type(), type_name(type) + " (x's)");
  float* out_dscale = dscale->typed_data();
  float* out_doffset = doffset->typed_data();
  if (l.n == 0 || l.s == 0 || l.c == 0) {
    std::fill(out_dscale, out_dscale + groups * l.c, 0.0f);
    std::fill(out_doffset, out_doffset + groups * l.c, 0.0f);
    return ffi::Error::Success();
  }
  std::vector<double> sums(static_cast<size_t>(2 * l.n * l.c));
  BackwardArgs a{x.untyped_data(), scale.typed_data(), offset.typed_data(),
                 mean_shift.typed_data(), rstd.typed_data(), sigmoid.typed_data(),
                 ct.untyped_data(), dx->untyped_data(), sums.data(), sums.data() + l.n * l.c,
                 l, l.n / examples, want_dx,
                 stream_outputs(3, l.n * l.example_size(), type)};
  parallel_chunks(pool, units_of(l), chunk_of(l), [&](int64_t u0, int64_t u1) { fn(a, u0, u1); });
  // dscale/doffset per group of examples: the (n, c) partial sums added in n order
  add_partials(pool, groups, l.n / groups, l.c, a.sum_ct, a.sum_ct_xh, out_doffset, out_dscale);
  return ffi::Error::Success();
}

}  // namespace

EQX_EXPORT XLA_FFI_Error* EqxNormGroupsForward(XLA_FFI_CallFrame* call_frame);
EQX_EXPORT XLA_FFI_Error* EqxNormGroupsBackward(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqxNormGroupsForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x (N, S, C) or (N, C, S)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale (C,) or (E, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // offset, as scale
                                  .Ret<ffi::AnyBuffer>()         // y, x's shape
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean - first (N, G)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd (N, G)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sigmoid: x's shape, or (N, 1, 1)
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("num_groups")
                                  .Attr<bool>("channels_last")
                                  .Attr<bool>("silu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqxNormGroupsBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale (C,) or (E, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // offset, as scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean - first (N, G)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd (N, G)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sigmoid, as the forward's
                                  .Arg<ffi::AnyBuffer>()         // cotangent, x's shape
                                  .Ret<ffi::AnyBuffer>()         // dx, x's shape, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale (groups, C)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // doffset (groups, C)
                                  .Attr<int64_t>("num_groups")
                                  .Attr<bool>("channels_last")
                                  .Attr<bool>("silu")
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("want_dx"));
