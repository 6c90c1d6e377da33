// The CPU library's threads (cpu_common.h): torch's own OpenMP team where torch runs on OpenMP.
//
// Why not threads of our own there: after each parallel region torch's OpenMP workers spin-wait
// for the next one, for milliseconds. Threads started meanwhile share the cores with them: a pass
// over x at the MNIST shape measured 10.0 ms right after a torch op against 7.5 ms alone, on 2 cores.
// Run in the same runtime's team (GOMP_parallel, which GNU libgomp, LLVM libomp and Intel's
// runtime all export), the spinning workers are the ones that take the work, and no thread is started
// per call. The loader passes GOMP_parallel as torch's library resolves it (src/tinyrecon/cpu_lib.py);
// without it (no OpenMP in torch, no such symbol) pthreads are started per call, as before.
// A forked child starts its own threads too: an OpenMP team does not survive fork (GNU libgomp's
// next parallel region in the child waits forever for the parent's workers, torch's own ops included).
#include <pthread.h>

#include <algorithm>
#include <atomic>

#include "cpu_common.h"

namespace {

typedef void (*GompParallel)(void (*fn)(void*), void* data, unsigned threads, unsigned flags);
std::atomic<GompParallel> gomp_parallel{nullptr};

std::atomic<bool> forked{false};   // this process is a forked child: never on an OpenMP team

void forget_openmp_in_child() {
  forked.store(true, std::memory_order_relaxed);
  gomp_parallel.store(nullptr, std::memory_order_relaxed);
}
[[maybe_unused]] const int at_fork = pthread_atfork(nullptr, nullptr, forget_openmp_in_child);

struct Tasks {
  void (*task)(void*, int);
  void* ctx;
  int n;
  std::atomic<int> next{0};
};

// One thread's share: tasks taken from the shared counter until none is left (a nested call, which
// OpenMP runs in a team of one, takes them all).
void take(void* tasks) {
  Tasks& s = *static_cast<Tasks*>(tasks);
  for (int t; (t = s.next.fetch_add(1)) < s.n;) s.task(s.ctx, t);
}

void* take_thread(void* tasks) {
  take(tasks);
  return nullptr;
}

}  // namespace

void tr_threads::run_tasks(int n, void (*task)(void*, int), void* ctx) {
  Tasks s{task, ctx, n};
  if (n <= 1) {
    if (n == 1) task(ctx, 0);
    return;
  }
  if (const GompParallel parallel = gomp_parallel.load(std::memory_order_acquire)) {
    parallel(take, &s, unsigned(n), 0);
    return;
  }
  constexpr int MAX_STARTED = 255;
  pthread_t ids[MAX_STARTED];
  bool started[MAX_STARTED] = {};
  const int more = std::min(n - 1, MAX_STARTED);
  for (int t = 0; t < more; ++t) started[t] = pthread_create(&ids[t], nullptr, take_thread, &s) == 0;
  take(&s);
  for (int t = 0; t < more; ++t)
    if (started[t]) pthread_join(ids[t], nullptr);
}

// GOMP_parallel of the OpenMP runtime to run on, or null for threads of the library's own (always
// in a forked child: its team, if the parent had one, would never answer).
TR_EXPORT int tinyrecon_cpu_use_openmp(void* gomp_parallel_fn) {
  if (forked.load(std::memory_order_relaxed)) gomp_parallel_fn = nullptr;
  gomp_parallel.store(reinterpret_cast<GompParallel>(gomp_parallel_fn), std::memory_order_release);
  return 0;
}
TR_ENTRY_POINT(tinyrecon_cpu_use_openmp)
