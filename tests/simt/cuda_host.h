// SIMT emulation of the CUDA device features csrc/kernels.cu uses, for compiling the real
// kernels as host C++ in tests (tests/test_cuda.py builds it; see simt.cpp for the runtime).
//
// Every CUDA thread of a block runs as its own fiber with its own stack and registers, so
// per-thread state, shared memory, barriers and warp shuffles behave as on a GPU: fibers run
// until they reach a barrier, and a barrier releases only when every thread of its group (the
// block for __syncthreads, the warp for a shuffle) has reached it. A barrier that some thread
// of the group can never reach (divergence, an early exit) fails the launch instead of hanging.
// Blocks run one after another, so __shared__ is per-thread-of-the-host storage and atomicAdd
// is a plain add; what this cannot show is a race between blocks or lanes, or timing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

// Host compilers see no launch bounds; shared memory is one copy per host thread (blocks of a
// launch run in turn on the launching thread).
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static thread_local

namespace simt {

struct Thread {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  int rank;  // linear index in the block: lane = rank % 32, warp = rank / 32
};
extern thread_local const Thread* current;

// The launch configuration of `kernel<<<grid, block, shared_bytes, stream>>>`.
struct Config {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), shared_bytes(s), stream(st) {}
};

// Runs body once per thread of every block; failures are reported by the next cudaGetLastError().
void run(const Config& config, const char* label, const std::function<void()>& body);
void sync_block();
void sync_warp();
unsigned char* lane_slot(int lane);  // 8 bytes per lane of the current warp, for shuffles
void fail(const char* what);          // fails the current launch (reported by cudaGetLastError)

template <typename... P, typename... A>
void launch(const Config& config, const char* label, void (*kernel)(P...), A&&... args) {
  const std::tuple<P...> params(std::forward<A>(args)...);
  run(config, label, [&] { std::apply(kernel, params); });  // each thread gets its own copies
}

}  // namespace simt

#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define threadIdx (::simt::current->thread_idx)
#define blockIdx (::simt::current->block_idx)
#define blockDim (::simt::current->block_dim)
#define gridDim (::simt::current->grid_dim)

inline void __syncthreads() { ::simt::sync_block(); }

template <typename T> T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  if (mask != 0xffffffffu || width != 32) ::simt::fail("only full-warp shuffles are emulated");
  const int lane = ::simt::current->rank % 32;
  std::memcpy(::simt::lane_slot(lane), &value, sizeof(T));
  ::simt::sync_warp();  // every lane has written its value
  T out = value;
  if (lane + delta < 32) std::memcpy(&out, ::simt::lane_slot(lane + delta), sizeof(T));
  ::simt::sync_warp();  // every lane has read before any writes again
  return out;
}

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}
