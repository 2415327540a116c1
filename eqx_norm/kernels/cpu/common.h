// Pieces shared by the eqx_norm CPU kernels: element types, fixed-order lane combination,
// work sharing on XLA's intra-op pool and buffer checks. (The same as in layer_norm.cc,
// which keeps its own copy for now.) Everything is in an internal namespace of each
// translation unit: the library exports only its handlers.

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
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define EQX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EQX_CLONES
#endif
#define EQX_INLINE inline __attribute__((always_inline))

namespace eqx {
namespace {

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
    bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
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
#endif

// Fixed-order sums: lane l takes the elements i with i % kLanes == l, lanes combine as a tree.
constexpr int64_t kLanes = 16;

EQX_INLINE float combine(float* acc) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

// Fixed-order sums of contiguous runs: 16 float lanes within blocks of 4096, blocks in double.

constexpr int64_t kBlock = 4096;

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

// rsqrt(variance + epsilon); NaN for an infinite or NaN variance (not rsqrt(inf) = 0, which
// would silently return `offset`); 0 where variance + epsilon is 0 (a constant group at
// epsilon 0 gives exactly `offset`).
EQX_INLINE float rsqrt_or_zero(float variance, float epsilon) {
  if (!(variance < INFINITY)) return NAN;
  float v = variance + epsilon;
  return v > 0.0f ? 1.0f / std::sqrt(v) : 0.0f;
}

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

// Buffer checks: an error naming the buffer, its dimensions and the expected ones.
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

}  // namespace
}  // namespace eqx

#endif  // EQX_NORM_KERNELS_CPU_COMMON_H_
