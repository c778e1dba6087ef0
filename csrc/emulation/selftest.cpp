// Small CUDA-style kernels that check the emulation itself: that a race on shared memory shows, that
// shared memory starts poisoned in every block, that barriers and every shuffle form behave as on a
// GPU, and that misuse (a shuffle waiting for an exited lane, a deadlock, shared memory written past
// its end, a launch over the limits) fails the launch. torch.ops.mergekernels_emu.selftest(name) runs one and returns its int32 output.
#include <torch/library.h>

#include <ATen/ops/full.h>

#include "../cuda/emulation.h"

namespace mk::emu {
namespace {

constexpr int kBlock = 128;

// Each thread stores its index in shared memory and reads its right neighbour's, with or without
// the barrier in between.
template <bool kBarrier>
__global__ void neighbour_kernel(int* out) {
  MK_DYNAMIC_SHARED(int, s);
  s[threadIdx.x] = static_cast<int>(threadIdx.x);
  if (kBarrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Per warp: a down-shuffle sum (in lane 0), an xor butterfly sum (every lane), a broadcast of lane
// 5 and an inclusive up-shuffle prefix sum, packed into four outputs per thread.
__global__ void shuffle_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x) & 31, v = static_cast<int>(threadIdx.x) + 1;
  int down = v, butterfly = v, prefix = v;
  for (int d = 16; d > 0; d >>= 1) down += __shfl_down_sync(0xffffffffu, down, d);
  for (int d = 16; d > 0; d >>= 1) butterfly += __shfl_xor_sync(0xffffffffu, butterfly, d);
  const int broadcast = __shfl_sync(0xffffffffu, v, 5);
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, prefix, d);
    if (lane >= d) prefix += up;
  }
  int* o = out + 4 * threadIdx.x;
  o[0] = lane == 0 ? down : 0;
  o[1] = butterfly;
  o[2] = broadcast;
  o[3] = prefix;
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
}

__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 16) __syncwarp();
  else __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void overrun_kernel(int* out, int words) {
  MK_DYNAMIC_SHARED(int, s);
  s[threadIdx.x] = 1;  // threadIdx.x == words is one past the end
  out[threadIdx.x] = words;
}

// Reads static shared memory before any thread wrote it, then writes it: the next block must see the
// poison again, not this block's values.
__global__ void static_shared_kernel(int* out) {
  __shared__ int s[kBlock];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
  s[threadIdx.x] = static_cast<int>(threadIdx.x);
}

// 1 KiB of static shared memory next to the dynamic memory it is launched with.
__global__ void static_and_dynamic_kernel(int* out) {
  __shared__ int s[256];
  MK_DYNAMIC_SHARED(int, d);
  s[threadIdx.x] = 0x01010101;  // no byte equal to the poison, so every byte counts as written
  d[threadIdx.x] = s[threadIdx.x] - 0x01010101 + static_cast<int>(threadIdx.x);
  out[threadIdx.x] = d[threadIdx.x];
}

// Writes its block index; kTag only makes distinct kernels (attributes are per kernel and persist).
template <int kTag>
__global__ void fill_kernel(int* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = static_cast<int>(blockIdx.x);
}

at::Tensor run_selftest(c10::string_view name) {
  at::Tensor out = at::full({4 * kBlock}, -1, at::TensorOptions().dtype(at::kInt));
  int* o = out.data_ptr<int>();
  const size_t words = sizeof(int) * kBlock;
  if (name == "neighbour_barrier") {
    MK_LAUNCH(2, kBlock, words, nullptr, neighbour_kernel<true>)(o);
  } else if (name == "neighbour_race") {
    MK_LAUNCH(2, kBlock, words, nullptr, neighbour_kernel<false>)(o);
  } else if (name == "shuffles") {
    MK_LAUNCH(1, kBlock, 0, nullptr, shuffle_kernel)(o);
  } else if (name == "static_shared") {
    MK_LAUNCH(3, kBlock, 0, nullptr, static_shared_kernel)(o);
  } else if (name == "static_plus_dynamic_over_48k") {
    MK_LAUNCH(1, 256, 48 * 1024 - 512, nullptr, static_and_dynamic_kernel)(o);
  } else if (name == "static_plus_dynamic_under_48k") {
    MK_LAUNCH(1, 256, 47 * 1024, nullptr, static_and_dynamic_kernel)(o);
  } else if (name == "exited_lane") {
    MK_LAUNCH(1, 32, 0, nullptr, exited_lane_kernel)(o);
  } else if (name == "deadlock") {
    MK_LAUNCH(1, 64, 0, nullptr, deadlock_kernel)(o);
  } else if (name == "overrun") {
    MK_LAUNCH(1, kBlock + 1, words, nullptr, overrun_kernel)(o, kBlock);
  } else if (name == "too_much_shared") {
    MK_LAUNCH(1, kBlock, 64 * 1024, nullptr, fill_kernel<0>)(o);
  } else if (name == "opted_in_shared") {
    cudaFuncSetAttribute(fill_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    MK_LAUNCH(1, kBlock, 64 * 1024, nullptr, fill_kernel<1>)(o);
  } else if (name == "block_too_large") {
    MK_LAUNCH(1, 2048, 0, nullptr, fill_kernel<0>)(o);
  } else if (name == "grid_y_too_large") {
    MK_LAUNCH(dim3(1, 70000), 32, 0, nullptr, fill_kernel<0>)(o);
  } else {
    TORCH_CHECK(false, "unknown emulation self-test ", name);
  }
  const std::string error = take_last_error();
  TORCH_CHECK(error.empty(), "emulated CUDA launch failed: ", error);
  return out;
}

}  // namespace
}  // namespace mk::emu

TORCH_LIBRARY_FRAGMENT(mergekernels_emu, m) { m.def("selftest(str name) -> Tensor", &mk::emu::run_selftest); }
