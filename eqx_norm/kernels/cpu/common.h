// What the eqx_norm CPU kernels (layer_norm.cc, group_norm.cc) share: element types and
// their dispatch, fixed-order sums, the statistics of a contiguous run, work sharing on
// XLA's intra-op pool and buffer checks. Everything but `pool_threads_seen` is internal to
// each translation unit: the library exports only what EQX_EXPORT marks.

#ifndef EQX_NORM_KERNELS_CPU_COMMON_H_
#define EQX_NORM_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Hot loops are cloned for x86-64-v3/v4 and picked at load time (GCC, Linux x86-64).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define EQX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EQX_CLONES
#endif
#define EQX_INLINE inline __attribute__((always_inline))
// A lambda inlined into its (cloned) caller, so that the caller's loop can vectorize it.
#define EQX_INLINE_LAMBDA __attribute__((always_inline))
// The library is built with hidden visibility: only these symbols are exported.
#define EQX_EXPORT extern "C" __attribute__((visibility("default")))

namespace eqx {

// The size of XLA's intra-op pool as the last kernel call saw it (0 before any call);
// one variable for the whole library, read by EqxNormPoolThreads.
inline std::atomic<int64_t> pool_threads_seen{0};

namespace {

// ---------------------------------------------------------------------------------------
// Element types: load to float32, store from float32 (round to nearest even).

struct F32 {
  using T = float;
  static EQX_INLINE float load(T v) { return v; }
  static EQX_INLINE T store(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  static EQX_INLINE float load(T v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static EQX_INLINE T store(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (bits >> 16) | 0x40u;
    // NaN by a float compare (one vector instruction, and no mask constant to keep in a
    // register: the bfloat16 loops run out of them), the same test as |bits| > inf's bits
    bool nan = f != f;
    return static_cast<T>(nan ? quiet_nan : rounded);
  }
};

#ifdef __FLT16_MAX__
struct F16 {
  using T = uint16_t;
  static EQX_INLINE float load(T v) {
    _Float16 h;
    std::memcpy(&h, &v, 2);
    return static_cast<float>(h);
  }
  static EQX_INLINE T store(float f) {
    _Float16 h = static_cast<_Float16>(f);
    T v;
    std::memcpy(&v, &h, 2);
    return v;
  }
};
#define EQX_SERVED "float32, bfloat16 or float16"
#else
#define EQX_SERVED "float32 or bfloat16"
#endif

// The dtype dispatch: f(S{}) with S the element type of `type` (F32, BF16, F16 where the
// compiler has _Float16); false, calling nothing, for any other type.
template <class F>
bool with_element_type(ffi::DataType type, F f) {
  switch (type) {
    case ffi::F32: f(F32{}); return true;
    case ffi::BF16: f(BF16{}); return true;
#ifdef __FLT16_MAX__
    case ffi::F16: f(F16{}); return true;
#endif
    default: return false;
  }
}

// ---------------------------------------------------------------------------------------
// Fixed-order sums: lane l takes the elements i with i % kLanes == l, lanes combine as a
// tree; contiguous runs are summed in blocks of kBlock, blocks added in double, so that the
// rounding error grows with 4096 / 16 = 256 terms per lane, not n / 16.

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 4096;

EQX_INLINE float combine(float* acc) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

// 8 floats (GCC's vector extension: one ymm register on x86-64-v3 and v4): two make the 16
// lanes, for the loops whose 16-float array accumulators GCC would spill to the stack. The
// vectors never cross a call (everything using them is inlined), so GCC's note that passing
// them changes the ABI (-Wpsabi) does not apply: CMakeLists.txt silences it.
typedef float Half __attribute__((vector_size(4 * kLanes / 2)));

// Elements p[0..8) as float32.
template <class S>
EQX_INLINE Half load_half(const typename S::T* p) {
  float f[kLanes / 2];
  for (int64_t k = 0; k < kLanes / 2; ++k) f[k] = S::load(p[k]);
  Half v;
  std::memcpy(&v, f, sizeof v);
  return v;
}

template <class F>
EQX_INLINE double lane_sum(int64_t n, F f) {
  double total = 0.0;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t end = std::min(n, begin + kBlock);
    float acc[kLanes] = {};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += f(i + l);
    for (int64_t l = 0; i + l < end; ++l) acc[l] += f(i + l);
    total += combine(acc);
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// Output runs. y[i] = value(i) for i in [0, n). With `stream`, the 16-byte-aligned middle
// is written by non-temporal stores (SSE2's movnt, in every x86-64 clone), which skip
// reading each cache line before writing it: an output that will not stay in cache is then
// one move of memory, not two. The values are the same either way (fp-contract is off, so
// the scalar head and tail round as the vector middle does). A task that streams ends with
// stream_fence() before it is counted done.

// Whether a call that moves `arrays` arrays (inputs and outputs together) of `elements`
// elements of `type` should stream its outputs: more than kStreamBytes, a typical
// last-level cache of one core complex (glibc's sysconf reports the whole socket's), so that
// what a regular store would keep in cache is evicted before the call ends anyway. By size
// only.
constexpr int64_t kStreamBytes = int64_t{32} << 20;

inline bool stream_outputs(int64_t arrays, int64_t elements, ffi::DataType type) {
#if defined(__SSE2__)
  return arrays * elements * static_cast<int64_t>(ffi::ByteWidth(type)) > kStreamBytes;
#else
  (void)arrays, (void)elements, (void)type;
  return false;
#endif
}

EQX_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <class T, class F>
EQX_INLINE void store_run(T* y, int64_t n, bool stream, F value) {
  int64_t i = 0;
#if defined(__SSE2__)
  if (stream) {
    constexpr int64_t chunk = 64 / sizeof(T);  // one cache line
    for (; i < n && (reinterpret_cast<uintptr_t>(y + i) & 15) != 0; ++i) y[i] = value(i);
    for (; i + chunk <= n; i += chunk) {
      T t[chunk];
#pragma omp simd
      for (int64_t k = 0; k < chunk; ++k) t[k] = value(i + k);
      for (int64_t b = 0; b < 64; b += 16) {
        __m128i v;
        std::memcpy(&v, reinterpret_cast<const char*>(t) + b, 16);
        _mm_stream_si128(reinterpret_cast<__m128i*>(reinterpret_cast<char*>(y + i) + b), v);
      }
    }
  }
#else
  (void)stream;
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) y[j] = value(j);
}

// ---------------------------------------------------------------------------------------
// Statistics. `mean(sum)` turns a sum of n values into their float32 mean: each kernel
// passes its own (the rows kernel multiplies by 1 / D, the groups kernel divides by M).

// rsqrt(variance + epsilon); NaN for an infinite or NaN variance (not rsqrt(inf) = 0, which
// would silently return `offset`); 0 where variance + epsilon is 0 (a constant run at
// epsilon 0 gives exactly `offset`).
EQX_INLINE float rsqrt_or_zero(float variance, float epsilon) {
  if (!(variance < INFINITY)) return NAN;
  float v = variance + epsilon;
  return v > 0.0f ? 1.0f / std::sqrt(v) : 0.0f;
}

// The rstd of the n deviations c(i), whose mean square is `variance`. At epsilon 0 a
// variance of 0 or inf is recomputed as rsqrt(mean((c(i) / s)^2)) / s with s = max |c(i)|,
// so that squares that under- or overflowed float32 are right: 0 for a constant run, NaN
// where the answer is not a normal float32. Only such runs pay for it (the XLA path
// computes the same for every run at epsilon 0).
template <class Mean, class C>
EQX_INLINE float rstd_of(float variance, float epsilon, int64_t n, Mean mean, C c) {
  if (epsilon != 0.0f || (variance != 0.0f && variance != INFINITY))
    return rsqrt_or_zero(variance, epsilon);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s = std::max(s, std::fabs(c(i)));
  if (!(s > 0.0f)) return 0.0f;
  float var = mean(lane_sum(n, [&](int64_t i) {
    float v = c(i) / s;
    return v * v;
  }));
  float r = 1.0f / std::sqrt(var) / s;
  return r > 0.0f ? r : NAN;
}

// Two-pass statistics of the n values v(i) of a contiguous run, shifted by the first:
// shift = v(0), m = mean(v - shift), rstd of (v - shift) - m. The shift keeps a large mean
// (1e4 and above) from cancelling the variance.
struct Stats {
  float shift, mean, rstd;
};

template <class Mean, class V>
EQX_INLINE Stats shifted_stats(int64_t n, float epsilon, Mean mean, V v) {
  const float shift = v(0);
  const float m = mean(lane_sum(n, [&](int64_t i) { return v(i) - shift; }));
  auto c = [&](int64_t i) { return (v(i) - shift) - m; };
  const float var = mean(lane_sum(n, [&](int64_t i) {
    float d = c(i);
    return d * d;
  }));
  return Stats{shift, m, rstd_of(var, epsilon, n, mean, c)};
}

// ---------------------------------------------------------------------------------------
// Work sharing on XLA's pool: run body(i) for i in [0, n), the caller taking indices too,
// so a busy pool only slows the call down, it cannot deadlock it.

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  std::mutex mutex;
  std::condition_variable finished;
};

template <class Body>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  pool_threads_seen.store(pool.num_threads(), std::memory_order_relaxed);
  if (n <= 0) return;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  auto shared = std::make_shared<Shared>();
  shared->n = n;
  const Body* body_ptr = &body;
  // A helper that starts after all indices are taken touches only `shared` (kept alive by
  // its own reference), never `body`, which lives until every taken index is done.
  auto work = [shared, body_ptr]() {
    for (;;) {
      int64_t i = shared->next.fetch_add(1);
      if (i >= shared->n) return;
      (*body_ptr)(i);
      if (shared->done.fetch_add(1) + 1 == shared->n) {
        std::lock_guard<std::mutex> lock(shared->mutex);
        shared->finished.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done.load() == shared->n; });
}

// Units (rows, examples or groups) per task: about `elements` elements, at least one unit.
// By shape only, never by thread count, so results do not depend on the thread count.
int64_t units_per_chunk(int64_t unit_size, int64_t elements) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(unit_size, 1));
}

// body(u0, u1) over [0, units) cut into chunks of `chunk` units, shared on the pool.
template <class Body>
void parallel_chunks(ffi::ThreadPool& pool, int64_t units, int64_t chunk, const Body& body) {
  parallel_for(pool, (units + chunk - 1) / chunk,
               [&](int64_t t) { body(t * chunk, std::min(units, (t + 1) * chunk)); });
}

// out1[g, ch], out2[g, ch]: the sums over rows [g per, (g + 1) per) of the (rows, c) double
// partial sums part1, part2, added in row order (so the same bits at every thread count),
// blocks of channels shared on the pool.
inline void add_partials(ffi::ThreadPool& pool, int64_t groups, int64_t per, int64_t c,
                         const double* part1, const double* part2, float* out1, float* out2) {
  const int64_t cols = 1024, col_tasks = (c + cols - 1) / cols;
  parallel_for(pool, groups * col_tasks, [&](int64_t t) {
    const int64_t g = t / col_tasks, c0 = (t % col_tasks) * cols;
    const int64_t c1 = std::min(c, c0 + cols);
    for (int64_t ch = c0; ch < c1; ++ch) {
      double t1 = 0.0, t2 = 0.0;
      for (int64_t r = g * per; r < (g + 1) * per; ++r) {
        t1 += part1[r * c + ch];
        t2 += part2[r * c + ch];
      }
      out1[g * c + ch] = static_cast<float>(t1);
      out2[g * c + ch] = static_cast<float>(t2);
    }
  });
}

// ---------------------------------------------------------------------------------------
// The SiLU's sigmoid for the vectorizer: no libm call, so that `#pragma omp simd` loops
// stay vector.

// exp(x): 2^n p(r) with n = round(x / ln 2) (by the 1.5 * 2^23 rounding trick), r = x - n ln
// 2 in two parts, and a degree-6 polynomial by Horner's rule (Cephes' expf coefficients): a relative error
// of about 2e-7 over [-87, 88], to which x is clamped.
EQX_INLINE float vector_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  int32_t t_bits, magic_bits;
  std::memcpy(&t_bits, &t, sizeof t);
  std::memcpy(&magic_bits, &magic, sizeof magic);
  const int32_t exponent = (t_bits - magic_bits + 127) << 23;
  float power;
  std::memcpy(&power, &exponent, sizeof power);
  // Explicit fused multiply-adds: one rounding each, so every clone gives the same bits
  // (the x86-64-v3/v4 clones' instruction, the default clone's libm fmaf), and about twice
  // the speed of separate products and sums where the CPU has FMA.
  const float r = __builtin_fmaf(n, 2.12194440e-4f, __builtin_fmaf(n, -0.693359375f, x));
  float p = 1.9875691500e-4f;
  p = __builtin_fmaf(p, r, 1.3981999507e-3f);
  p = __builtin_fmaf(p, r, 8.3334519073e-3f);
  p = __builtin_fmaf(p, r, 4.1665795894e-2f);
  p = __builtin_fmaf(p, r, 1.6666665459e-1f);
  p = __builtin_fmaf(p, r, 5.0000001201e-1f);
  return __builtin_fmaf(p * r, r, r + 1.0f) * power;
}

EQX_INLINE float sigmoid(float u) { return 1.0f / (1.0f + vector_exp(-u)); }

// ---------------------------------------------------------------------------------------
// Buffer checks: an error naming the buffer, what it has and what was expected.

std::optional<ffi::Error> check_dims(const char* name, ffi::Span<const int64_t> dims,
                                     std::initializer_list<int64_t> expected) {
  bool same = dims.size() == expected.size() &&
              std::equal(expected.begin(), expected.end(), dims.begin());
  if (same) return std::nullopt;
  std::string message = std::string(name) + " has dimensions (";
  for (size_t i = 0; i < dims.size(); ++i) message += (i ? ", " : "") + std::to_string(dims[i]);
  message += "), expected (";
  size_t i = 0;
  for (int64_t e : expected) message += (i++ ? ", " : "") + std::to_string(e);
  return ffi::Error::InvalidArgument(message + ")");
}

// An affine operand (scale, offset): (d,), shared by all `units`, or (E, d) with E >= 1
// dividing `units`, one per example of units / E consecutive units. Sets *examples to E.
std::optional<ffi::Error> check_affine(const char* name, ffi::Span<const int64_t> dims,
                                       int64_t units, int64_t d, int64_t* examples) {
  if (dims.size() == 1 && dims[0] == d) {
    *examples = 1;
    return std::nullopt;
  }
  if (dims.size() == 2 && dims[1] == d && dims[0] >= 1 && units % dims[0] == 0) {
    *examples = dims[0];
    return std::nullopt;
  }
  std::string message = std::string(name) + " has dimensions (";
  for (size_t i = 0; i < dims.size(); ++i) message += (i ? ", " : "") + std::to_string(dims[i]);
  return ffi::Error::InvalidArgument(message + "), expected (" + std::to_string(d) +
                                     ") or (E, " + std::to_string(d) + ") with E dividing " +
                                     std::to_string(units));
}

std::string type_name(ffi::DataType type) {
  switch (type) {
    case ffi::PRED: return "bool";
    case ffi::S8: return "int8";
    case ffi::S16: return "int16";
    case ffi::S32: return "int32";
    case ffi::S64: return "int64";
    case ffi::U8: return "uint8";
    case ffi::U16: return "uint16";
    case ffi::U32: return "uint32";
    case ffi::U64: return "uint64";
    case ffi::F16: return "float16";
    case ffi::BF16: return "bfloat16";
    case ffi::F32: return "float32";
    case ffi::F64: return "float64";
    default: return "XLA type " + std::to_string(static_cast<int>(type));
  }
}

// `name` has element type `type`, expected `expected` (e.g. "float32" or "x's, float32").
ffi::Error type_error(const char* name, ffi::DataType type, const std::string& expected) {
  return ffi::Error::InvalidArgument(std::string(name) + " has element type " +
                                     type_name(type) + ", expected " + expected);
}

}  // namespace
}  // namespace eqx

#endif  // EQX_NORM_KERNELS_CPU_COMMON_H_
