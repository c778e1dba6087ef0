// The CUDA execution model on the host, for tests: with MK_CUDA_EMULATION defined, the .cu files of
// this folder compile as plain C++ (g++) against this header instead of the CUDA toolkit, and their
// launch_* entry points run the kernels on the CPU (tests/test_cuda_emulated.py compares them with
// the CPU kernels). Nothing in the installed package includes it.
//
// What the kernels see: threadIdx / blockIdx / blockDim / gridDim, static and dynamic shared memory
// (per block, poisoned at every block start; dynamic memory is also guarded at its end),
// __syncthreads as a real barrier, warp shuffles with warp-synchronous semantics, the atomics and
// intrinsics the kernels use, fp16/bf16 conversions bit-identical to CUDA's, and stubs of the
// runtime API with a settable multiprocessor count. How launches, blocks and threads run is
// csrc/emulation/runtime.h.
#pragma once

#if !defined(MK_CUDA_EMULATION)
#error "csrc/cuda/emulation.h is for the emulated build only (define MK_CUDA_EMULATION)"
#endif

#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../emulation/runtime.h"

// ---- Qualifiers and built-in variables -------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function-local static is exactly one block's copy. The runtime finds
// them in the library's symbol table and poisons them at every block start, as it does dynamic shared
// memory (a section attribute would be simpler, but g++ ignores it on statics of function templates).
#define __shared__ static
#define threadIdx (::mk::emu::thread_index())
#define blockIdx (::mk::emu::block_index())
#define blockDim (::mk::emu::block_dim())
#define gridDim (::mk::emu::grid_dim())
constexpr int warpSize = 32;

// ---- Launch and dynamic shared memory (the forms the .cu files use for both builds) ----------
// MK_LAUNCH(grid, block, smem, stream, kernel)(args...) is kernel<<<grid, block, smem, stream>>>(args...).
#define MK_LAUNCH(grid, block, smem, stream, ...) ::mk::emu::launcher(__VA_ARGS__, grid, block, smem, stream)
#define MK_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::mk::emu::dynamic_shared())

namespace mk::emu {

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // Converted once, as the kernel's parameters; every thread gets its own copy of them.
    std::tuple<P...> params{static_cast<P>(std::forward<A>(args))...};
    Closure closure{kernel, &params};
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, &Launcher::thread_main, &closure);
  }

 private:
  struct Closure {
    void (*kernel)(P...);
    std::tuple<P...>* params;
  };
  static void thread_main(void* p) {
    const auto* c = static_cast<const Closure*>(p);
    std::apply(c->kernel, *c->params);
  }
};

template <typename... P>
Launcher<P...> launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/) {
  return Launcher<P...>{kernel, grid, block, smem};
}

}  // namespace mk::emu

// ---- Barriers and warp shuffles ----------------------------------------------------------------
inline void __syncthreads() { ::mk::emu::sync_threads(); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { ::mk::emu::sync_warp(mask); }

namespace mk::emu {
template <typename T>
T shuffle(unsigned int mask, T value, int src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(mask, bits, src_lane);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}
// Lane index within its width-sized segment of the warp, and the segment's first lane.
inline int segment_lane(int width) { return lane_id() % width; }
}  // namespace mk::emu

template <typename T>
T __shfl_sync(unsigned int mask, T value, int src, int width = warpSize) {
  const int lane = ::mk::emu::lane_id(), first = lane - ::mk::emu::segment_lane(width);
  return ::mk::emu::shuffle(mask, value, first + ((src % width) + width) % width);
}
template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  const int lane = ::mk::emu::lane_id(), in_segment = ::mk::emu::segment_lane(width);
  const int src = in_segment + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return ::mk::emu::shuffle(mask, value, src);
}
template <typename T>
T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  const int lane = ::mk::emu::lane_id(), in_segment = ::mk::emu::segment_lane(width);
  const int src = in_segment >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return ::mk::emu::shuffle(mask, value, src);
}
template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = warpSize) {
  const int lane = ::mk::emu::lane_id(), first = lane - ::mk::emu::segment_lane(width);
  const int src = lane ^ lane_mask;
  return ::mk::emu::shuffle(mask, value, src < first + width ? src : lane);
}

// ---- Atomics: one OS thread runs the whole grid, so a plain read-modify-write is atomic. --------
inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old + value;
  return old;
}
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = static_cast<int>(static_cast<unsigned int>(old) + static_cast<unsigned int>(value));
  return old;
}
inline unsigned int atomicMax(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old > value ? old : value;
  return old;
}
inline unsigned long long atomicMax(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old > value ? old : value;
  return old;
}

// ---- Device functions and intrinsics ----------------------------------------------------------
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }

inline unsigned int __float_as_uint(float x) {
  unsigned int u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
// Correctly rounded single operations (the build passes -ffp-contract=off, so no FMA forms).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

// ---- Half and bfloat16 storage types ------------------------------------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
inline float __half2float(__half h) { return ::mk::emu::half_to_float(h.bits); }
inline __half __float2half_rn(float x) { return __half{::mk::emu::half_from_float(x)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return ::mk::emu::bfloat16_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16{::mk::emu::bfloat16_from_float(x)}; }

// ---- Runtime API stubs -------------------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = ::mk::emu::settings().multiprocessors;
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = ::mk::emu::kMaxThreadsPerBlock;
      return cudaSuccess;
    case cudaDevAttrMaxGridDimY:
      *value = static_cast<int>(::mk::emu::settings().max_grid_y);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(::mk::emu::settings().max_shared_optin);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::mk::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value) ? cudaSuccess
                                                                                          : cudaErrorInvalidValue;
}
