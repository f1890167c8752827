// Runs CUDA kernels written with warp shuffles as host code, for tests on machines without a GPU.
//
// Each warp's 32 lanes are fibers (ucontext) of one thread, resumed in turn: a lane runs until it
// reaches a shuffle, where it yields, so that all lanes of a warp stand at the same shuffle before
// any of them reads its partner's value (a shuffle takes two rounds: every lane writes, then
// every lane reads). Warps and blocks run one after another, which is one of the schedules a GPU
// may choose; kernels that need more (shared memory, block barriers, atomics) do not compile
// here, as none of those is defined.
//
// What CUDA leaves undefined is reported instead of hidden: a shuffle whose mask is not all 32
// lanes (the only mask the kernels use), one that a lane of the warp which has not exited does
// not join (it is at another shuffle), and one that reads a lane which has exited. Lanes may exit
// before a shuffle, as on the GPU, as long as no lane reads from them. run_grid throws
// std::runtime_error naming the first fault once the grid has finished.
//
// Include after every other header: threadIdx, blockIdx, blockDim and gridDim are macros here.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::isfinite;

namespace dmil_emu {

struct Dim3 {
  unsigned int x = 0;
  unsigned int y = 0;
  unsigned int z = 0;
};

constexpr int kLanes = 32;
constexpr std::size_t kStackBytes = 256 * 1024;

struct Lane {
  ucontext_t context;
  Dim3 thread_idx;
  bool done = false;
  int64_t steps = 0;      // shuffle rounds taken
  int offset = -1;        // the shuffle's lane mask (xor offset) in the current round
  unsigned char value[8];  // the value this lane offers in the current shuffle
  std::unique_ptr<char[]> stack;
};

struct State {
  std::mutex busy;  // one grid at a time
  Lane lanes[kLanes];
  Lane* current = nullptr;
  ucontext_t scheduler;
  Dim3 block_idx;
  Dim3 block_dim;
  Dim3 grid_dim;
  const std::function<void()>* body = nullptr;
  std::string error;  // the first fault found in this grid
};

inline State& state() {
  static State s;
  return s;
}

inline void fault(const std::string& what) {
  State& s = state();
  if (s.error.empty()) {
    std::ostringstream msg;
    msg << "warp emulation: block " << s.block_idx.x << ", thread " << s.current->thread_idx.x
        << ": " << what;
    s.error = msg.str();
  }
}

inline void yield_to_scheduler() {
  State& s = state();
  Lane* me = s.current;
  swapcontext(&me->context, &s.scheduler);
}

inline void lane_entry() {
  State& s = state();
  (*s.body)();
  s.current->done = true;  // returning resumes the scheduler (uc_link)
}

// One warp of the current block: warp `warp` (threads 32 * warp ... 32 * warp + 31).
inline void run_warp(unsigned int warp) {
  State& s = state();
  for (int lane = 0; lane < kLanes; ++lane) {
    Lane& l = s.lanes[lane];
    if (!l.stack) {
      l.stack.reset(new char[kStackBytes]);
    }
    l.thread_idx = Dim3{warp * kLanes + lane, 0, 0};
    l.done = false;
    l.steps = 0;
    l.offset = -1;
    getcontext(&l.context);
    l.context.uc_stack.ss_sp = l.stack.get();
    l.context.uc_stack.ss_size = kStackBytes;
    l.context.uc_link = &s.scheduler;
    makecontext(&l.context, &lane_entry, 0);
  }
  for (;;) {
    bool any = false;
    for (int lane = 0; lane < kLanes; ++lane) {
      Lane& l = s.lanes[lane];
      if (l.done) {
        continue;
      }
      any = true;
      s.current = &l;
      swapcontext(&s.scheduler, &l.context);
    }
    if (!any) {
      return;
    }
  }
}

// Runs `body` (a kernel call) on grid_x blocks of block_x threads, block_x a multiple of 32.
inline void run_grid(unsigned int grid_x, unsigned int block_x, const std::function<void()>& body) {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.busy);
  if (block_x == 0 || block_x % kLanes != 0) {
    throw std::invalid_argument("warp emulation: the block size must be a positive multiple of 32");
  }
  s.body = &body;
  s.error.clear();
  s.block_dim = Dim3{block_x, 1, 1};
  s.grid_dim = Dim3{grid_x, 1, 1};
  for (unsigned int b = 0; b < grid_x; ++b) {
    s.block_idx = Dim3{b, 0, 0};
    for (unsigned int w = 0; w < block_x / kLanes; ++w) {
      run_warp(w);
    }
  }
  s.body = nullptr;
  s.current = nullptr;
  if (!s.error.empty()) {
    throw std::runtime_error(s.error);
  }
}

// __shfl_xor_sync: the value of lane (lane ^ offset) of this warp, every lane taking part.
template <typename T>
T shfl_xor(unsigned int mask, T value, int offset) {
  static_assert(sizeof(T) <= sizeof(Lane::value), "shuffled values are at most 8 bytes");
  State& s = state();
  Lane* me = s.current;
  if (mask != 0xffffffffu) {
    fault("a shuffle with a mask other than all 32 lanes");
  }
  me->offset = offset;
  std::memcpy(me->value, &value, sizeof(T));
  ++me->steps;
  yield_to_scheduler();  // every lane has written its value when this returns
  const int lane = static_cast<int>(me->thread_idx.x % kLanes);
  const Lane& partner = s.lanes[(lane ^ offset) % kLanes];
  for (const Lane& other : s.lanes) {
    if (!other.done && (other.steps != me->steps || other.offset != offset)) {
      fault("a lane of the warp that has not exited is at another shuffle");
      break;
    }
  }
  if (offset < 0 || offset >= kLanes) {
    fault("a shuffle offset outside [0, 32)");
  } else if (partner.done) {
    fault("a shuffle reads a lane that has exited (its value is undefined)");
  }
  T out;
  std::memcpy(&out, partner.value, sizeof(T));
  yield_to_scheduler();  // every lane has read before any writes again
  return out;
}

}  // namespace dmil_emu

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T value, int offset) {
  return dmil_emu::shfl_xor(mask, value, offset);
}

#define threadIdx (::dmil_emu::state().current->thread_idx)
#define blockIdx (::dmil_emu::state().block_idx)
#define blockDim (::dmil_emu::state().block_dim)
#define gridDim (::dmil_emu::state().grid_dim)
