// The runtime of the SIMT emulation (cuda_host.h): fibers, barriers, and the few CUDA runtime
// calls the library makes, as on a machine with one device.
//
// A fiber per thread of a block lives through the whole launch, running the kernel once per block.
// It starts with makecontext; every later switch is _setjmp/_longjmp, which, unlike swapcontext,
// makes no system call (built without _FORTIFY_SOURCE, whose longjmp check forbids other stacks).
#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_host.h"

namespace simt {

thread_local const Thread* current = nullptr;

namespace {

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  bool started = false;
  Thread thread;
  State state;
};

struct Block {
  jmp_buf scheduler;
  std::vector<Fiber> fibers;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  unsigned char slots[1024 / 32][32][8];
};

constexpr size_t kStackBytes = 64 << 10;
constexpr unsigned kMaxThreads = 1024;

thread_local Block* block = nullptr;
thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string failure;  // why the current launch failed ("" while it has not)

std::mutex log_mutex;
std::map<std::string, long> launches;  // label -> launch count, for tests of coverage

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield(Fiber* self) {
  if (_setjmp(self->resume) == 0) _longjmp(block->scheduler, 1);
}

void entry() {
  Fiber* self = block->running;
  for (;;) {  // once per block of the launch
    (*block->body)();
    self->state = State::kDone;
    yield(self);
  }
}

void resume(Block& b, Fiber& f) {
  b.running = &f;
  current = &f.thread;
  if (_setjmp(b.scheduler) != 0) return;  // the fiber yielded
  if (f.started) _longjmp(f.resume, 1);
  f.started = true;
  setcontext(&f.start);
}

void wait(State at) {
  if (block == nullptr) {
    std::fprintf(stderr, "simt: barrier outside a kernel\n");
    std::abort();
  }
  block->running->state = at;
  yield(block->running);
}

// Releases the barriers every member of whose group has reached; false when none could be.
bool release(std::vector<Fiber>& fibers) {
  size_t at_block = 0;
  for (const Fiber& f : fibers) at_block += f.state == State::kAtBlockBarrier;
  if (at_block == fibers.size()) {
    for (Fiber& f : fibers) f.state = State::kReady;
    return true;
  }
  bool released = false;
  for (size_t w = 0; w < fibers.size(); w += 32) {
    const size_t end = w + 32 < fibers.size() ? w + 32 : fibers.size();
    size_t at_warp = 0;
    for (size_t i = w; i < end; ++i) at_warp += fibers[i].state == State::kAtWarpBarrier;
    if (at_warp == 32) {
      for (size_t i = w; i < end; ++i) fibers[i].state = State::kReady;
      released = true;
    }
  }
  return released;
}

// Runs one block to completion; false (with `failure` set) when a barrier cannot complete.
bool run_block(Block& b) {
  for (;;) {
    bool all_done = true;
    for (Fiber& f : b.fibers) {
      if (f.state == State::kReady) {
        resume(b, f);
        if (!failure.empty()) return false;
      }
      all_done = all_done && f.state == State::kDone;
    }
    if (all_done) return true;
    if (!release(b.fibers)) {
      failure = "a barrier (__syncthreads or a full-warp shuffle) that some threads of the group never reach";
      return false;
    }
  }
}

}  // namespace

void sync_block() { wait(State::kAtBlockBarrier); }
void sync_warp() { wait(State::kAtWarpBarrier); }
unsigned char* lane_slot(int lane) { return block->slots[block->running->thread.rank / 32][lane]; }

void fail(const char* what) {
  failure = what;
  if (block != nullptr) yield(block->running);  // never resumed: the launch stops
}

void run(const Config& config, const char* label, const std::function<void()>& body) {
  {
    std::lock_guard<std::mutex> lock(log_mutex);
    ++launches[label];
  }
  const dim3 g = config.grid, t = config.block;
  const unsigned long threads = static_cast<unsigned long>(t.x) * t.y * t.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0 || threads > kMaxThreads || t.z > 64 || g.y > 65535 ||
      g.z > 65535 || g.x > 0x7fffffffu) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  static thread_local std::unique_ptr<char[]> stacks(new char[kMaxThreads * kStackBytes]);
  auto b = std::make_unique<Block>();
  b->body = &body;
  b->fibers.resize(threads);
  for (unsigned long r = 0; r < threads; ++r) {
    ucontext_t& start = b->fibers[r].start;
    getcontext(&start);
    start.uc_stack.ss_sp = stacks.get() + r * kStackBytes;
    start.uc_stack.ss_size = kStackBytes;
    start.uc_link = nullptr;
    makecontext(&start, entry, 0);
  }
  block = b.get();
  failure.clear();
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        for (unsigned long r = 0; r < threads; ++r) {
          Fiber& f = b->fibers[r];
          f.state = State::kReady;
          f.thread = Thread{uint3{unsigned(r % t.x), unsigned(r / t.x % t.y), unsigned(r / (t.x * t.y))},
                            uint3{bx, by, bz}, t, g, static_cast<int>(r)};
        }
        if (!run_block(*b)) {
          std::fprintf(stderr, "simt: %s failed in block (%u, %u, %u): %s\n", label, bx, by, bz, failure.c_str());
          last_error = cudaErrorLaunchFailure;
          block = nullptr;
          current = nullptr;
          return;
        }
      }
  block = nullptr;
  current = nullptr;
}

}  // namespace simt

// How many launches have had a label containing `part` (labels name the launching function
// with its template arguments); tests check with it which kernels and tiles ran.
extern "C" long simt_launch_count(const char* part) {
  std::lock_guard<std::mutex> lock(simt::log_mutex);
  long count = 0;
  for (const auto& [label, n] : simt::launches)
    if (label.find(part) != std::string::npos) count += n;
  return count;
}

// The CUDA runtime calls of the library, as on a machine with one device.
cudaError_t CUDARTAPI cudaSetDevice(int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetLastError() {
  const cudaError_t err = simt::last_error;
  simt::last_error = cudaSuccess;
  return err;
}
cudaError_t CUDARTAPI cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
const char* CUDARTAPI cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}
const char* CUDARTAPI cudaGetErrorString(cudaError_t err) {
  return err == cudaErrorLaunchFailure ? "kernel failed in the SIMT emulation (see stderr)" : "(SIMT emulation)";
}
