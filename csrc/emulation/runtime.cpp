// The CUDA emulation runtime: blocks run one at a time, the threads of a block are fibers that
// switch at every barrier and warp shuffle (see runtime.h for the guarantees).
#include "runtime.h"

#include <dlfcn.h>
#include <elf.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <string>
#include <mutex>
#include <numeric>
#include <sstream>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace mk::emu {
namespace {

constexpr size_t kStackBytes = 128 * 1024;  // per fiber; kernel frames need a few KiB

// ---- Context switch ------------------------------------------------------------------------------
// x86-64: saves the callee-saved registers and the x87/SSE control words on the current stack,
// stores the stack pointer and loads the other one (no signal-mask syscall, unlike swapcontext).
// Elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void mk_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.p2align 4
.type mk_emu_switch,@function
mk_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr 8(%rsp)
    fldcw (%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size mk_emu_switch,.-mk_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
void prepare_context(Context& ctx, char* stack_top, size_t /*stack_bytes*/, void (*entry)()) {
  // Layout read by mk_emu_switch: [control words (16 B)][r15 r14 r13 r12 rbx rbp][return address]
  // with the return address 16-byte aligned, so `entry` starts with the ABI's stack alignment.
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t{15});
  uint64_t* ret = top - 2;
  ret[0] = reinterpret_cast<uint64_t>(entry);
  ret[1] = 0;
  uint64_t* sp = ret - 8;
  std::memset(sp, 0, 8 * sizeof(uint64_t));
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(reinterpret_cast<char*>(sp), &fpucw, sizeof(fpucw));
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, sizeof(mxcsr));
  ctx.sp = sp;
}
void switch_context(Context& from, Context& to) { mk_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void prepare_context(Context& ctx, char* stack_top, size_t stack_bytes, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack_top - stack_bytes;
  ctx.uc.uc_stack.ss_size = stack_bytes;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- Fiber stacks -----------------------------------------------------------------------------------

// One mapping of stacks, each above a PROT_NONE guard page (a stack overflow faults instead of
// corrupting the neighbouring stack); grown on demand and kept across launches.
class StackPool {
 public:
  char* top(int i) { return base_ + static_cast<size_t>(i + 1) * slot_; }
  void reserve(int count) {
    if (count <= count_) return;
    release();
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    slot_ = kStackBytes + page_;
    const size_t bytes = slot_ * static_cast<size_t>(count);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<char*>(p);
    for (int i = 0; i < count; ++i) mprotect(base_ + static_cast<size_t>(i) * slot_, page_, PROT_NONE);
    count_ = count;
  }
  ~StackPool() { release(); }

 private:
  void release() {
    if (base_) munmap(base_, slot_ * static_cast<size_t>(count_));
    base_ = nullptr;
    count_ = 0;
  }
  char* base_ = nullptr;
  size_t page_ = 0, slot_ = 0;
  int count_ = 0;
};

// ---- Launch state ---------------------------------------------------------------------------------
enum class State : uint8_t { kReady, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  Context ctx;
  uint3 index;
  int linear = 0;
  State state = State::kReady;
};

struct Warp {
  int arrived = 0;
  unsigned int generation = 0;
  unsigned int mask[2] = {0, 0};
  uint64_t value[2][32] = {};
};

constexpr unsigned char kSharedPoison = 0xFF;  // NaN as float / double, huge as an integer
constexpr unsigned char kGuardByte = 0xA5;
constexpr size_t kSharedGuard = 256;

// The static __shared__ variables of the emulated kernels: the function-local statics of functions
// named *_kernel in namespace mk, read once from this library's ELF symbol table (g++ would ignore a
// section attribute on the statics of function templates, so a linker section cannot collect them).
struct SharedRange {
  unsigned char* begin;
  size_t size;
};

std::vector<SharedRange> find_static_shared() {
  std::vector<SharedRange> out;
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&find_static_shared), &info) || !info.dli_fname) return out;
  std::ifstream file(info.dli_fname, std::ios::binary);
  const std::vector<char> data((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const auto fits = [&](uint64_t offset, uint64_t bytes) { return offset <= data.size() && bytes <= data.size() - offset; };
  if (!fits(0, sizeof(Elf64_Ehdr))) return out;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(data.data());
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
      !fits(eh->e_shoff, uint64_t{eh->e_shnum} * sizeof(Elf64_Shdr)))
    return out;
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(data.data() + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; ++i) {
    const Elf64_Shdr& table = sections[i];
    if (table.sh_type != SHT_SYMTAB || table.sh_link >= eh->e_shnum || !fits(table.sh_offset, table.sh_size)) continue;
    const Elf64_Shdr& strings = sections[table.sh_link];
    if (!fits(strings.sh_offset, strings.sh_size)) continue;
    const auto* symbols = reinterpret_cast<const Elf64_Sym*>(data.data() + table.sh_offset);
    for (size_t k = 0; k < table.sh_size / sizeof(Elf64_Sym); ++k) {
      const Elf64_Sym& sym = symbols[k];
      if (ELF64_ST_TYPE(sym.st_info) != STT_OBJECT || sym.st_size == 0 || sym.st_name >= strings.sh_size) continue;
      const std::string name(data.data() + strings.sh_offset + sym.st_name);
      // _ZZ<function>E<variable>: a function-local static; the function's name ends in _kernel.
      if (name.rfind("_ZZN2mk", 0) != 0 || name.find("_kernel") == std::string::npos) continue;
      out.push_back({static_cast<unsigned char*>(info.dli_fbase) + sym.st_value, sym.st_size});
    }
  }
  return out;
}

const std::vector<SharedRange>& static_shared() {
  static const std::vector<SharedRange> ranges = find_static_shared();
  return ranges;
}

void poison_static_shared() {
  for (const SharedRange& r : static_shared()) std::memset(r.begin, kSharedPoison, r.size);
}

// Bytes of static shared memory the block just run wrote (no longer the poison): a lower bound on
// its kernel's static shared memory, which the launch limit counts with the dynamic part.
size_t static_shared_written() {
  size_t written = 0;
  for (const SharedRange& r : static_shared())
    for (size_t b = 0; b < r.size; ++b) written += r.begin[b] != kSharedPoison;
  return written;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class Grid {
 public:
  Grid(dim3 grid, dim3 block, size_t smem, size_t shared_limit, void (*thread_main)(void*), void* closure,
       uint64_t seed)
      : grid_(grid),
        block_(block),
        smem_bytes_(smem),
        shared_limit_(shared_limit),
        thread_main_(thread_main),
        closure_(closure),
        rng_(seed) {}

  // Runs every block; returns the first error ("" if none).
  std::string run();

  const uint3& thread_index() const { return current_->index; }
  const uint3& block_index() const { return block_index_; }
  const dim3& block_dim() const { return block_; }
  const dim3& grid_dim() const { return grid_; }
  int lane() const { return current_->linear & 31; }
  void* dynamic_shared() const { return smem_.data() + kSharedGuard; }
  void sync_threads();
  uint64_t exchange(unsigned int mask, uint64_t bits, int src_lane, bool read);

  static void fiber_entry();

 private:
  void run_block(uint3 index);
  void yield() { switch_context(current_->ctx, scheduler_); }
  void fail(const std::string& message);
  void thread_exit();
  void release_block_barrier();
  std::vector<int> order(int n);
  std::string where() const;
  std::string describe_deadlock() const;

  dim3 grid_, block_;
  size_t smem_bytes_;
  size_t shared_limit_;  // static + dynamic bytes a block may use
  void (*thread_main_)(void*);
  void* closure_;
  uint64_t rng_;
  uint3 block_index_{0, 0, 0};
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  Fiber* current_ = nullptr;
  Context scheduler_;
  int live_ = 0, arrived_ = 0;
  mutable std::vector<unsigned char> smem_;
  std::string error_;
};

thread_local Grid* g_grid = nullptr;
StackPool g_stacks;
std::mutex g_launch_mutex;  // one launch at a time: static __shared__ variables are process-wide
std::string g_last_error;
std::unordered_map<const void*, int> g_max_dynamic_shared;
Settings g_settings;
Counters g_counters;

Grid& grid() {
  if (!g_grid) {
    // A device function called outside a launch: a programming error in the emulated build.
    std::fputs("mergekernels CUDA emulation: device function called outside a kernel launch\n", stderr);
    std::terminate();
  }
  return *g_grid;
}

std::vector<int> Grid::order(int n) {
  std::vector<int> o(static_cast<size_t>(n));
  std::iota(o.begin(), o.end(), 0);
  switch (g_settings.schedule) {
    case Schedule::kForward:
      break;
    case Schedule::kReverse:
      std::reverse(o.begin(), o.end());
      break;
    case Schedule::kRandom:
      for (int i = n - 1; i > 0; --i) std::swap(o[i], o[splitmix64(rng_) % static_cast<uint64_t>(i + 1)]);
      break;
  }
  return o;
}

std::string Grid::where() const {
  std::ostringstream s;
  s << "block (" << block_index_.x << "," << block_index_.y << "," << block_index_.z << ")";
  if (current_)
    s << " thread (" << current_->index.x << "," << current_->index.y << "," << current_->index.z << ")";
  return s.str();
}

void Grid::fail(const std::string& message) {
  if (error_.empty()) error_ = message + " [" + where() + "]";
}

void Grid::fiber_entry() {
  Grid& g = grid();
  try {
    g.thread_main_(g.closure_);
  } catch (const std::exception& e) {
    g.fail(std::string("exception in a kernel thread: ") + e.what());
  } catch (...) {
    g.fail("unknown exception in a kernel thread");
  }
  g.thread_exit();
  g.yield();  // never resumed
  std::terminate();
}

void Grid::thread_exit() {
  Fiber& f = *current_;
  f.state = State::kDone;
  --live_;
  const Warp& w = warps_[static_cast<size_t>(f.linear >> 5)];
  if (w.arrived > 0 && (w.mask[w.generation & 1] >> (f.linear & 31) & 1u))
    fail("a thread exited while its warp waits for it in a shuffle or __syncwarp");
  if (live_ > 0 && arrived_ == live_) release_block_barrier();
}

void Grid::release_block_barrier() {
  for (Fiber& f : fibers_)
    if (f.state == State::kBlockBarrier) f.state = State::kReady;
  arrived_ = 0;
}

void Grid::sync_threads() {
  ++g_counters.barriers;
  current_->state = State::kBlockBarrier;
  if (++arrived_ == live_) release_block_barrier();
  yield();
}

uint64_t Grid::exchange(unsigned int mask, uint64_t bits, int src_lane, bool read) {
  ++g_counters.shuffles;
  Fiber& f = *current_;
  const int lane = f.linear & 31, warp = f.linear >> 5;
  const int threads = static_cast<int>(fibers_.size());
  const int lanes = std::min(32, threads - warp * 32);
  const unsigned int existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (!(mask >> lane & 1u)) fail("a warp shuffle or __syncwarp whose mask does not include the calling lane");
  if (mask & ~existing) fail("a warp shuffle or __syncwarp mask names lanes the block does not have");
  if (read && (src_lane < 0 || src_lane >= 32 || !(mask >> src_lane & 1u)))
    fail("a warp shuffle reads a lane outside its mask");
  Warp& w = warps_[static_cast<size_t>(warp)];
  const unsigned int slot = w.generation & 1;
  if (w.arrived == 0) {
    w.mask[slot] = mask;
  } else if (w.mask[slot] != mask) {
    fail("lanes of one warp disagree on the mask of a shuffle or __syncwarp");
  }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && (l < lanes) && fibers_[static_cast<size_t>(warp * 32 + l)].state == State::kDone)
      fail("a warp shuffle or __syncwarp waits for a lane that has exited");
  w.value[slot][lane] = bits;
  f.state = State::kWarpBarrier;
  if (++w.arrived == __builtin_popcount(mask & existing)) {
    for (int l = 0; l < lanes; ++l) {
      Fiber& other = fibers_[static_cast<size_t>(warp * 32 + l)];
      if ((mask >> l & 1u) && other.state == State::kWarpBarrier) other.state = State::kReady;
    }
    w.arrived = 0;
    ++w.generation;
  }
  yield();
  // Double-buffered by generation: the next shuffle writes the other slot, and the one after can
  // only start once every lane has finished reading this one.
  return read && src_lane >= 0 && src_lane < 32 ? w.value[slot][src_lane] : 0;
}

std::string Grid::describe_deadlock() const {
  int at_barrier = 0, at_warp = 0, done = 0;
  for (const Fiber& f : fibers_) {
    at_barrier += f.state == State::kBlockBarrier;
    at_warp += f.state == State::kWarpBarrier;
    done += f.state == State::kDone;
  }
  std::ostringstream s;
  s << "deadlock: " << at_barrier << " threads wait in __syncthreads, " << at_warp
    << " in a warp shuffle or __syncwarp, " << done << " have exited";
  return s.str();
}

void Grid::run_block(uint3 index) {
  block_index_ = index;
  const int threads = static_cast<int>(block_.x * block_.y * block_.z);
  fibers_.assign(static_cast<size_t>(threads), Fiber{});
  warps_.assign(static_cast<size_t>((threads + 31) / 32), Warp{});
  g_stacks.reserve(threads);
  for (int i = 0; i < threads; ++i) {
    Fiber& f = fibers_[static_cast<size_t>(i)];
    f.linear = i;
    const unsigned int u = static_cast<unsigned int>(i);
    f.index = uint3{u % block_.x, (u / block_.x) % block_.y, u / (block_.x * block_.y)};
    prepare_context(f.ctx, g_stacks.top(i), kStackBytes, &Grid::fiber_entry);
  }
  live_ = threads;
  arrived_ = 0;
  std::fill(smem_.begin(), smem_.end(), kGuardByte);
  std::memset(smem_.data() + kSharedGuard, kSharedPoison, smem_bytes_);
  poison_static_shared();
  ++g_counters.blocks;
  g_counters.threads += threads;

  while (live_ > 0 && error_.empty()) {
    bool ran = false;
    for (const int i : order(threads)) {
      Fiber& f = fibers_[static_cast<size_t>(i)];
      if (f.state != State::kReady) continue;
      current_ = &f;
      switch_context(scheduler_, f.ctx);
      current_ = nullptr;
      ran = true;
      if (!error_.empty()) break;
    }
    if (!ran) fail(describe_deadlock());
  }
  for (size_t b = 0; b < kSharedGuard; ++b)
    if (smem_[b] != kGuardByte || smem_[kSharedGuard + smem_bytes_ + b] != kGuardByte) {
      fail("dynamic shared memory written outside its " + std::to_string(smem_bytes_) + " bytes");
      break;
    }
  const size_t static_bytes = static_shared_written();
  if (static_bytes + smem_bytes_ > shared_limit_)
    fail("too much shared memory: at least " + std::to_string(static_bytes) + " bytes static + " +
         std::to_string(smem_bytes_) + " dynamic, over the kernel's limit of " + std::to_string(shared_limit_) +
         " (static and dynamic together; opt in with cudaFuncAttributeMaxDynamicSharedMemorySize)");
}

std::string Grid::run() {
  smem_.assign(smem_bytes_ + 2 * kSharedGuard, kGuardByte);
  const int64_t blocks = static_cast<int64_t>(grid_.x) * grid_.y * grid_.z;
  std::vector<int> ids = order(static_cast<int>(blocks));
  for (const int id : ids) {
    const unsigned int u = static_cast<unsigned int>(id);
    run_block(uint3{u % grid_.x, (u / grid_.x) % grid_.y, u / (grid_.x * grid_.y)});
    if (!error_.empty()) break;
  }
  return error_;
}

std::string check_configuration(const void* kernel, dim3 grid, dim3 block, size_t smem, size_t* shared_limit) {
  std::ostringstream s;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > static_cast<uint64_t>(kMaxThreadsPerBlock) || block.z > 64)
    s << "invalid block (" << block.x << "," << block.y << "," << block.z << ")";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > g_settings.max_grid_y ||
           grid.z > g_settings.max_grid_y)
    s << "invalid grid (" << grid.x << "," << grid.y << "," << grid.z << ")";
  else if (static_cast<uint64_t>(grid.x) * grid.y * grid.z > (uint64_t{1} << 31))
    s << "the emulation runs at most 2^31 blocks per launch";
  if (!s.str().empty()) return "invalid launch configuration: " + s.str();
  // Without an opt-in a block has 48 KiB, static and dynamic together; with one, its dynamic part may
  // reach the attribute and the whole the device's opt-in limit.
  const auto it = g_max_dynamic_shared.find(kernel);
  const bool opted_in = it != g_max_dynamic_shared.end();
  const size_t limit = opted_in ? static_cast<size_t>(it->second) : kDefaultDynamicShared;
  *shared_limit = opted_in ? static_cast<size_t>(g_settings.max_shared_optin) : kDefaultDynamicShared;
  if (smem > limit)
    return "too much dynamic shared memory: " + std::to_string(smem) + " bytes requested, the kernel's limit is " +
           std::to_string(limit) + " (cudaFuncAttributeMaxDynamicSharedMemorySize)";
  return "";
}

}  // namespace

Settings& settings() { return g_settings; }
Counters& counters() { return g_counters; }

std::string take_last_error() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::string e;
  e.swap(g_last_error);
  return e;
}

bool set_max_dynamic_shared(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  if (bytes < 0 || bytes > g_settings.max_shared_optin) return false;
  g_max_dynamic_shared[kernel] = bytes;
  return true;
}

const uint3& thread_index() { return grid().thread_index(); }
const uint3& block_index() { return grid().block_index(); }
const dim3& block_dim() { return grid().block_dim(); }
const dim3& grid_dim() { return grid().grid_dim(); }
int lane_id() { return grid().lane(); }
void* dynamic_shared() { return grid().dynamic_shared(); }
void sync_threads() { grid().sync_threads(); }
uint64_t warp_exchange(unsigned int mask, uint64_t bits, int src_lane) {
  return grid().exchange(mask, bits, src_lane, true);
}
void sync_warp(unsigned int mask) { grid().exchange(mask, 0, -1, false); }

void run_grid(const void* kernel, dim3 grid_dim, dim3 block_dim, size_t smem, void (*thread_main)(void*),
              void* closure) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  ++g_counters.launches;
  size_t shared_limit = 0;
  std::string error = check_configuration(kernel, grid_dim, block_dim, smem, &shared_limit);
  if (error.empty()) {
    Grid g(grid_dim, block_dim, smem, shared_limit, thread_main, closure,
           g_settings.seed ^ (0x5DEECE66Dull * static_cast<uint64_t>(g_counters.launches)));
    g_grid = &g;
    error = g.run();
    g_grid = nullptr;
  }
  if (!error.empty() && g_last_error.empty()) g_last_error = error;
}

// ---- binary16 / bfloat16 -----------------------------------------------------------------------------
namespace {
uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
// value >> shift rounded to nearest, ties to even (shift >= 1).
uint32_t shift_round_even(uint32_t value, int shift) {
  const uint32_t kept = value >> shift, rest = value & ((1u << shift) - 1u), half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}
}  // namespace

uint16_t half_from_float(float x) {
  const uint32_t u = bits_of(x), sign = (u >> 16) & 0x8000u, mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return 0x7fff;                      // NaN: canonical
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (or Inf): Inf
  const int exponent = static_cast<int>(mag >> 23);          // biased by 127
  if (exponent >= 113) {                                     // normal half: |x| >= 2^-14
    // Rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10; a carry out of the
    // mantissa correctly bumps the exponent.
    return static_cast<uint16_t>(sign | shift_round_even(mag - (112u << 23), 13));
  }
  if (exponent < 102) return static_cast<uint16_t>(sign);    // |x| < 2^-25: rounds to zero
  // Subnormal half: units of 2^-24. |x| = m * 2^(exponent - 150), m with its implicit bit.
  const uint32_t m = (mag & 0x7fffffu) | 0x800000u;
  return static_cast<uint16_t>(sign | shift_round_even(m, 126 - exponent));
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1f) {  // Inf, or NaN with its payload kept and quieted (IEEE widening)
    return float_of(sign | 0x7f800000u | (mantissa ? 0x400000u | (mantissa << 13) : 0u));
  }
  if (exponent != 0) return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in float.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
  return float_of(sign | bits_of(magnitude));
}

uint16_t bfloat16_from_float(float x) {
  const uint32_t u = bits_of(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN: canonical
  // Round the low 16 bits to nearest even; overflow carries into Inf as it should.
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float bfloat16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

}  // namespace mk::emu
