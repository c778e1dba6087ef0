// Device helpers shared by the CUDA kernel families.
#pragma once

#include "launch.h"

#if defined(MK_CUDA_EMULATION)
// The same sources as host C++ for the tests: csrc/cuda/emulation.h.
#include "emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The two forms the emulated build replaces: a kernel launch,
// MK_LAUNCH(grid, block, smem, stream, kernel)(args...), and a dynamic shared memory array.
#define MK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define MK_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace mk::cuda {

constexpr int kThreads = 256;
// Shared memory a block may use without opting in (static and dynamic together).
constexpr size_t kDefaultSharedBytes = 48 * 1024;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
// NaN becomes the CPU's canonical 0x7E00 / 0x7FC0 (CUDA's conversions would write 0x7FFF).
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return x != x ? __ushort_as_half(0x7E00) : __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return x != x ? __ushort_as_bfloat16(0x7FC0) : __float2bfloat16_rn(x);
}

// Grid for a grid-stride loop over `work` items: enough blocks to fill the current device, no more.
// The attribute is asked each time (the runtime caches it): devices of one process may differ.
inline int grid_for(int64_t work, int blocks_per_sm = 8) {
#if defined(MK_CUDA_EMULATION)
  if (const int64_t forced = ::mk::emu::settings().grid_override; forced > 0) return static_cast<int>(forced);
#endif
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (sms < 1) sms = 1;
  const int64_t needed = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * blocks_per_sm;
  return static_cast<int>(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

// Calls fn(T{}) with T the device type of the storage dtype.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat16:
      fn(__half{});
      break;
    case kBFloat16:
      fn(__nv_bfloat16{});
      break;
    default:
      fn(float{});
      break;
  }
}

// Sum over the block of a per-thread double; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < (blockDim.x >> 5); ++w) v += scratch[w];
  return v;
}

}  // namespace mk::cuda
