// What every csrc/*.cpp file of the CPU library shares: its C ABI exports, ISA clones and threads.
#pragma once

#include "entry_points.h"
#define TR_INLINE inline __attribute__((always_inline))
// One clone per ISA level, picked when the library loads: built once, right on any x86-64.
// (TR_NO_CLONES builds one level, the compiler's -march: the tests check each level that way.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TR_NO_CLONES)
#define TR_HAS_CLONES 1
#define TR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TR_CLONES
#endif

namespace tr_threads {
// task(ctx, t) once for each t in [0, n), on up to n threads (csrc/threads_cpu.cpp): the team of
// the OpenMP runtime torch runs on when the loader named it (tinyrecon_cpu_use_openmp), else
// threads of its own. Each t runs on one thread, so per-t buffers need no locks; a thread that
// could not start leaves its tasks to the others.
void run_tasks(int n, void (*task)(void* ctx, int t), void* ctx);
}  // namespace tr_threads
