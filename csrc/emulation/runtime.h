// The host runtime of the CUDA emulation (test-only; see csrc/cuda/emulation.h for the device-side
// face the kernels see). Plain C++: no macros, so the emulated bindings can include it next to the
// torch headers.
//
// A launch runs its blocks one after another, in a forward, reverse or seeded random order. The
// threads of a block are fibers on one OS thread that switch at every __syncthreads and every warp
// shuffle, in the same choice of orders, so a missing barrier or a read of another lane's value
// before it was written changes the result. Barriers and shuffles are real: a block barrier waits
// for every live thread of the block, a shuffle for every lane named in its mask. Errors that would
// be undefined behaviour or a launch failure on a GPU (a deadlocked barrier, a shuffle naming an
// exited lane, a launch configuration over the device limits, shared memory over the kernel's
// limit (the dynamic size plus the static bytes the block wrote) or dynamic shared memory written
// past its end) fail the launch; take_last_error() reports them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

// CUDA's vector types for launch geometry (global names, as in cuda_runtime.h).
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
typedef struct CUstream_st* cudaStream_t;

namespace mk::emu {

enum class Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Settings {
  // What cudaDevAttrMultiProcessorCount reports, so host-side grid sizing is exercised (H100/H200: 132).
  int multiprocessors = 132;
  // Order of blocks in a grid and of runnable threads at every switch.
  Schedule schedule = Schedule::kRandom;
  uint64_t seed = 0;
  // > 0: mk::cuda::grid_for returns this many blocks, so grid-stride kernels also run with one block
  // or with more blocks than there is work.
  int64_t grid_override = 0;
  // Device limits (sm_90's): the largest gridDim.y / z, and the dynamic shared memory a kernel may opt
  // in to. Tests lower them to reach the limits with small inputs.
  int64_t max_grid_y = 65535;
  int64_t max_shared_optin = 227 * 1024;
};
Settings& settings();

// What the launches since the last reset did (per thread: barriers and shuffles count every call).
struct Counters {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0, shuffles = 0;
};
Counters& counters();

// The error of the launches since the last call ("" if none), cleared by the call: cudaGetLastError.
std::string take_last_error();

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes); false when bytes
// is over the device's opt-in limit (the attribute is then left as it was).
bool set_max_dynamic_shared(const void* kernel, int bytes);

constexpr int kMaxThreadsPerBlock = 1024;
// Shared memory a block may use without opting in, static and dynamic together (the emulation
// counts the dynamic size and the static bytes the block writes).
constexpr size_t kDefaultDynamicShared = 48 * 1024;

// --- Device side: valid only inside a thread of a running launch. ---
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
void sync_threads();
// Every lane named in mask contributes `bits` and reads the contribution of lane src_lane.
uint64_t warp_exchange(unsigned int mask, uint64_t bits, int src_lane);
void sync_warp(unsigned int mask);
int lane_id();
void* dynamic_shared();

// Runs thread_main(closure) once in every thread of every block of the grid.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, void (*thread_main)(void*),
              void* closure);

// binary16 / bfloat16 conversions with the semantics of CUDA's __float2half_rn / __float2bfloat16_rn
// (round to nearest even, overflow to infinity, every NaN to the canonical 0x7fff), and the exact
// widening of __half2float / __bfloat162float (a NaN stays a NaN: half quiets it as IEEE widening
// does, bfloat16 keeps its bits; the kernels' results never depend on a NaN's payload).
uint16_t half_from_float(float x);
float half_to_float(uint16_t h);
uint16_t bfloat16_from_float(float x);
float bfloat16_to_float(uint16_t b);

}  // namespace mk::emu
