// BatchNorm's per-channel sums for XLA:CPU through JAX's FFI: the column reductions that
// XLA:CPU runs at a quarter of the copy rate; and the forward's normalize pass, which
// streams y where XLA's elementwise pass would read each line of y before writing it. dx
// is elementwise and stays in XLA, fused with the adds of its two terms.
//
// x is viewed as 3-D: channels-last (N, S, C) or channels-first (N, C, S). Channel c's sums
// run over every position s of the N / groups consecutive examples of each group (groups >
// 1 under vmap: one batch per group); shift and mean are (groups, C).
//
// Moments:  s1[g, c] = sum (x - shift[g, c]),  s2[g, c] = sum (x - shift[g, c])^2, about a
//           shift near the mean (the binding passes each channel's first element), so that
//           the variance (s2 - s1^2 / n) / n loses nothing at a mean of 1e4 and a constant
//           channel gives exactly 0.
// Backward: s1[g, c] = sum ct,  s2[g, c] = sum ct ((x - shift[g, c]) - mean[g, c]).
//
// Sums accumulate in float32 over 64 positions (channels-last, one lane per channel) or
// 16 lanes of at most 4096 values (channels-first, a contiguous run per channel), then in
// double. Determinism: the work is cut by shape only into tasks, channels-last a block of
// rows of one group, channels-first one example's channels; each task writes its
// own double partial sums, and the partials are added in task order. So the sums are
// bitwise the same at every thread count. Inputs may be float32, bfloat16 or float16 (see
// EqxNormDtypes in layer_norm.cc); ct's type may differ from x's.
// Safety: every buffer's dimensions and element type are checked first, then every output
// is written, as in layer_norm.cc.

#include "common.h"

namespace {

using namespace eqx;  // common.h

constexpr int64_t kRun = 64;           // channels-last: positions summed in float32
constexpr int64_t kTaskValues = 1 << 16;  // values per task, about

struct Layout {
  int64_t n, s, c, groups;
  bool last;
  int64_t per_group() const { return n / groups; }
  // channels-last: a group's rows (its examples' positions, in memory order), rows per task
  // (a multiple of kRun) and tasks per group; channels-first: one task per example
  int64_t rows() const { return per_group() * s; }
  int64_t positions() const {
    const int64_t p = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(c, 1));
    return std::min(rows(), (p + kRun - 1) / kRun * kRun);
  }
  int64_t tasks_per_group() const {
    return last ? (rows() + positions() - 1) / positions() : per_group();
  }
  int64_t tasks() const { return groups * tasks_per_group(); }
};

struct Args {
  const void* x;
  const void* ct;        // the backward's cotangent; null for the moments
  const float* shift;    // (groups, C)
  const float* mean;     // (groups, C): the backward's mean - shift; null for the moments
  double* part1;         // (tasks, C)
  double* part2;
  Layout l;
};

// The value summed once and the value summed squared (moments), or ct and ct times the
// centred x (backward), for element i of a run whose channel has `shift` and `mean`.
template <class SX, class SG, bool Backward>
EQX_INLINE void terms(const Args& a, int64_t i, float shift, float mean, float* t1, float* t2) {
  const float v = SX::load(static_cast<const typename SX::T*>(a.x)[i]) - shift;
  if constexpr (Backward) {
    const float g = SG::load(static_cast<const typename SG::T*>(a.ct)[i]);
    *t1 = g;
    *t2 = g * (v - mean);
  } else {
    *t1 = v;
    *t2 = v * v;
  }
}

// Channels-last: rows [p0, p1) of group g (rows of C values in memory), every channel, into
// task t's partials.
template <class SX, class SG, bool Backward>
EQX_INLINE void task_last(const Args& a, int64_t g, int64_t p0, int64_t p1, int64_t t,
                          float* acc1, float* acc2) {
  const Layout& l = a.l;
  const int64_t c = l.c, row = g * c;
  const float* shift = a.shift + row;
  const float* mean = Backward ? a.mean + row : a.shift + row;
  double* d1 = a.part1 + t * c;
  double* d2 = a.part2 + t * c;
  for (int64_t ch = 0; ch < c; ++ch) d1[ch] = d2[ch] = 0.0;
  for (int64_t b = p0; b < p1; b += kRun) {
    const int64_t e = std::min(p1, b + kRun);
    std::fill(acc1, acc1 + c, 0.0f);
    std::fill(acc2, acc2 + c, 0.0f);
    for (int64_t p = b; p < e; ++p) {
      const int64_t base = p * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        float t1, t2;
        terms<SX, SG, Backward>(a, base + ch, shift[ch], mean[ch], &t1, &t2);
        acc1[ch] += t1;
        acc2[ch] += t2;
      }
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      d1[ch] += acc1[ch];
      d2[ch] += acc2[ch];
    }
  }
}

// Channels-first: every channel of example n (task n), each a contiguous run of S values,
// summed in 16 lanes (lane k takes the values i with i % 16 == k) over blocks of kBlock.
template <class SX, class SG, bool Backward>
EQX_INLINE void task_first(const Args& a, int64_t n) {
  const Layout& l = a.l;
  const int64_t row = n / l.per_group() * l.c;
  const auto* xs = static_cast<const typename SX::T*>(a.x);
  const auto* gs = static_cast<const typename SG::T*>(a.ct);
  for (int64_t ch = 0; ch < l.c; ++ch) {
    const float shift = a.shift[row + ch];
    const float mean = Backward ? a.mean[row + ch] : 0.0f;
    const int64_t base = (n * l.c + ch) * l.s;
    double s1 = 0.0, s2 = 0.0;
    for (int64_t b = 0; b < l.s; b += kBlock) {
      const int64_t e = std::min(l.s, b + kBlock);
      Half lo1 = {}, hi1 = {}, lo2 = {}, hi2 = {};
      int64_t i = b;
      for (; i + kLanes <= e; i += kLanes) {
        const Half lo = load_half<SX>(xs + base + i) - shift;
        const Half hi = load_half<SX>(xs + base + i + kLanes / 2) - shift;
        if constexpr (Backward) {
          const Half glo = load_half<SG>(gs + base + i);
          const Half ghi = load_half<SG>(gs + base + i + kLanes / 2);
          lo1 += glo;
          hi1 += ghi;
          lo2 += glo * (lo - mean);
          hi2 += ghi * (hi - mean);
        } else {
          lo1 += lo;
          hi1 += hi;
          lo2 += lo * lo;
          hi2 += hi * hi;
        }
      }
      float a1[kLanes], a2[kLanes];
      std::memcpy(a1, &lo1, sizeof lo1);
      std::memcpy(a1 + kLanes / 2, &hi1, sizeof hi1);
      std::memcpy(a2, &lo2, sizeof lo2);
      std::memcpy(a2 + kLanes / 2, &hi2, sizeof hi2);
      for (int64_t k = 0; i + k < e; ++k) {
        float t1, t2;
        terms<SX, SG, Backward>(a, base + i + k, shift, mean, &t1, &t2);
        a1[k] += t1;
        a2[k] += t2;
      }
      s1 += combine(a1);
      s2 += combine(a2);
    }
    a.part1[n * l.c + ch] = s1;
    a.part2[n * l.c + ch] = s2;
  }
}

template <class SX, class SG, bool Backward>
EQX_CLONES void run_tasks(const Args& a, int64_t t0, int64_t t1) {
  const Layout& l = a.l;
  if (l.last) {
    std::vector<float> acc(static_cast<size_t>(2 * l.c));
    const int64_t per = l.tasks_per_group(), positions = l.positions(), rows = l.rows();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / per, p0 = g * rows + (t % per) * positions;
      task_last<SX, SG, Backward>(a, g, p0, std::min((g + 1) * rows, p0 + positions), t,
                                  acc.data(), acc.data() + l.c);
    }
  } else {
    for (int64_t t = t0; t < t1; ++t) task_first<SX, SG, Backward>(a, t);
  }
}

using TasksFn = void (*)(const Args&, int64_t, int64_t);

// x's 3-D view, (N, S, C) or (N, C, S), into *l; an error unless x is 3-D and `groups`
// divides its examples.
std::optional<ffi::Error> read_layout(ffi::Span<const int64_t> dims, bool channels_last,
                                      int64_t groups, Layout* l) {
  if (dims.size() != 3)
    return ffi::Error::InvalidArgument("x must be 3-D: (N, S, C) or (N, C, S), got rank " +
                                       std::to_string(dims.size()));
  *l = Layout{dims[0], channels_last ? dims[1] : dims[2], channels_last ? dims[2] : dims[1],
              groups, channels_last};
  if (groups < 1 || l->n % groups != 0)
    return ffi::Error::InvalidArgument("groups must be >= 1 and divide the number of examples");
  return std::nullopt;
}

template <bool Backward>
ffi::Error Sums(ffi::ThreadPool& pool, ffi::AnyBuffer& x, const ffi::AnyBuffer* ct,
                ffi::Buffer<ffi::F32>& shift, const ffi::Buffer<ffi::F32>* mean,
                ffi::Result<ffi::Buffer<ffi::F32>>& s1, ffi::Result<ffi::Buffer<ffi::F32>>& s2,
                bool channels_last, int64_t groups) {
  auto dims = x.dimensions();
  Layout l;
  if (auto e = read_layout(dims, channels_last, groups, &l)) return *e;
  if (auto e = check_dims("shift", shift.dimensions(), {groups, l.c})) return *e;
  if (Backward) {
    if (auto e = check_dims("mean", mean->dimensions(), {groups, l.c})) return *e;
    if (auto e = check_dims("ct", ct->dimensions(), {dims[0], dims[1], dims[2]})) return *e;
  }
  if (auto e = check_dims("s1", s1->dimensions(), {groups, l.c})) return *e;
  if (auto e = check_dims("s2", s2->dimensions(), {groups, l.c})) return *e;
  TasksFn fn = nullptr;
  const ffi::DataType type = x.element_type();
  const ffi::DataType ct_type = Backward ? ct->element_type() : type;
  bool ct_served = true;
  if (!with_element_type(type, [&](auto sx) {
        ct_served = with_element_type(ct_type, [&](auto sg) {
          fn = run_tasks<decltype(sx), decltype(sg), Backward>;
        });
      }))
    return type_error("x", type, EQX_SERVED);
  if (!ct_served) return type_error("ct", ct_type, EQX_SERVED);
  float* out1 = s1->typed_data();
  float* out2 = s2->typed_data();
  if (l.n == 0 || l.s == 0 || l.c == 0) {
    std::fill(out1, out1 + groups * l.c, 0.0f);
    std::fill(out2, out2 + groups * l.c, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t tasks = l.tasks();
  std::vector<double> parts(static_cast<size_t>(2 * tasks * l.c));
  Args a{x.untyped_data(), Backward ? ct->untyped_data() : nullptr, shift.typed_data(),
         Backward ? mean->typed_data() : nullptr, parts.data(), parts.data() + tasks * l.c, l};
  const int64_t task_size = l.last ? l.positions() * l.c : l.c * l.s;
  parallel_chunks(pool, tasks, units_per_chunk(task_size, kTaskValues),
                  [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  // each group's partials added in task order
  add_partials(pool, groups, tasks / groups, l.c, a.part1, a.part2, out1, out2);
  return ffi::Error::Success();
}

ffi::Error Moments(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> shift,
                   ffi::Result<ffi::Buffer<ffi::F32>> s1, ffi::Result<ffi::Buffer<ffi::F32>> s2,
                   bool channels_last, int64_t groups) {
  return Sums<false>(pool, x, nullptr, shift, nullptr, s1, s2, channels_last, groups);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer ct,
                    ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> mean,
                    ffi::Result<ffi::Buffer<ffi::F32>> s1, ffi::Result<ffi::Buffer<ffi::F32>> s2,
                    bool channels_last, int64_t groups) {
  return Sums<true>(pool, x, &ct, shift, &mean, s1, s2, channels_last, groups);
}


// ---------------------------------------------------------------------------------------
// The normalize pass: y = ((x - shift[g, c]) - d[g, c]) * w[g, c] + u[g, c] in x's type,
// each example in its group's statistics. Elementwise, so cut into tasks of about
// kTaskValues values by shape; a large call streams y (see store_run in common.h), which
// XLA's own elementwise pass does not, so that y is one move of memory, not two.

struct Apply {
  const void* x;
  void* y;
  const float *shift, *d, *w, *u;  // (groups, C)
  Layout l;
  bool stream;
};

template <class S>
EQX_CLONES void apply_tasks(const Apply& a, int64_t r0, int64_t r1) {
  using T = typename S::T;
  const Layout& l = a.l;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  if (l.last) {  // rows of C values: row r is position r % S of example r / S
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = r / l.s / l.per_group(), row = g * l.c;
      const float *shift = a.shift + row, *d = a.d + row, *w = a.w + row, *u = a.u + row;
      const T* xr = x + r * l.c;
      store_run(y + r * l.c, l.c, a.stream, [&](int64_t ch) EQX_INLINE_LAMBDA {
        return S::store(((S::load(xr[ch]) - shift[ch]) - d[ch]) * w[ch] + u[ch]);
      });
    }
  } else {  // runs of S values: run r is channel r % C of example r / C
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r / l.c / l.per_group() * l.c + r % l.c;
      const float shift = a.shift[i], d = a.d[i], w = a.w[i], u = a.u[i];
      const T* xr = x + r * l.s;
      store_run(y + r * l.s, l.s, a.stream, [&](int64_t k) EQX_INLINE_LAMBDA {
        return S::store(((S::load(xr[k]) - shift) - d) * w + u);
      });
    }
  }
  if (a.stream) stream_fence();
}

ffi::Error Normalize(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> shift,
                     ffi::Buffer<ffi::F32> d, ffi::Buffer<ffi::F32> w,
                     ffi::Buffer<ffi::F32> u, ffi::Result<ffi::AnyBuffer> y,
                     bool channels_last, int64_t groups) {
  auto dims = x.dimensions();
  Layout l;
  if (auto e = read_layout(dims, channels_last, groups, &l)) return *e;
  for (auto [name, b] : {std::pair{"shift", &shift}, {"d", &d}, {"w", &w}, {"u", &u}})
    if (auto e = check_dims(name, b->dimensions(), {groups, l.c})) return *e;
  if (auto e = check_dims("y", y->dimensions(), {dims[0], dims[1], dims[2]})) return *e;
  const ffi::DataType type = x.element_type();
  if (y->element_type() != type) return type_error("y", y->element_type(), "x's type");
  using ApplyFn = void (*)(const Apply&, int64_t, int64_t);
  ApplyFn fn = nullptr;
  if (!with_element_type(type, [&](auto sx) { fn = apply_tasks<decltype(sx)>; }))
    return type_error("x", type, EQX_SERVED);
  const int64_t elements = l.n * l.s * l.c;
  if (elements == 0) return ffi::Error::Success();
  Apply a{x.untyped_data(), y->untyped_data(), shift.typed_data(), d.typed_data(),
          w.typed_data(), u.typed_data(), l, stream_outputs(2, elements, type)};
  const int64_t runs = l.last ? l.n * l.s : l.n * l.c, run = l.last ? l.c : l.s;
  parallel_chunks(pool, runs, units_per_chunk(run, kTaskValues),
                  [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  return ffi::Error::Success();
}

}  // namespace

EQX_EXPORT XLA_FFI_Error* EqxNormColumnsForward(XLA_FFI_CallFrame* call_frame);
EQX_EXPORT XLA_FFI_Error* EqxNormColumnsBackward(XLA_FFI_CallFrame* call_frame);
EQX_EXPORT XLA_FFI_Error* EqxNormColumnsNormalize(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqxNormColumnsForward, Moments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x (N, S, C) or (N, C, S)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift (groups, C)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum (x - shift)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum (x - shift)^2
                                  .Attr<bool>("channels_last")
                                  .Attr<int64_t>("groups"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqxNormColumnsBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::AnyBuffer>()         // cotangent, x's shape
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift (groups, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean - shift (groups, C)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum ct
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum ct (x - shift - mean)
                                  .Attr<bool>("channels_last")
                                  .Attr<int64_t>("groups"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqxNormColumnsNormalize, Normalize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x (N, S, C) or (N, C, S)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift (groups, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d: mean - shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w: rstd * scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u: offset
                                  .Ret<ffi::AnyBuffer>()         // y, x's type and shape
                                  .Attr<bool>("channels_last")
                                  .Attr<int64_t>("groups"));
