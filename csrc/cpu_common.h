// What every csrc/*.cpp file of the CPU library shares: its C ABI exports and ISA clones.
#pragma once

#include "entry_points.h"
#define TR_INLINE inline __attribute__((always_inline))
// One clone per ISA level, picked when the library loads: built once, right on any x86-64.
// (TR_NO_CLONES builds one level, the compiler's -march: the tests check each level that way.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TR_NO_CLONES)
#define TR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TR_CLONES
#endif
