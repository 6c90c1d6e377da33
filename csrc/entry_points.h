// How both C libraries (csrc/*.cpp -> CPU, csrc/*.cu -> CUDA) declare their C ABI to Python.
//
// Each entry point is exported with TR_EXPORT and listed once with TR_ENTRY_POINT(fn) after its
// definition. The list's argument and return types are derived from fn's own C++ signature, and
// tinyrecon_entry_points() hands it to the loader (src/tinyrecon/_clib.py), which types every
// ctypes function from it: no signature is ever written a second time.
#pragma once

#include <cstring>
#include <type_traits>

#define TR_EXPORT extern "C" __attribute__((visibility("default")))

namespace tr_abi {

// i: 32-bit int, l: 64-bit int, f: float, p: pointer, s: C string (returns only).
template <class T> constexpr char code() {
  if constexpr (std::is_same_v<T, const char*>) return 's';
  else if constexpr (std::is_pointer_v<T>) return 'p';
  else if constexpr (std::is_same_v<T, float>) return 'f';
  else if constexpr (std::is_integral_v<T> && std::is_signed_v<T> && sizeof(T) == 8) return 'l';
  else if constexpr (std::is_integral_v<T> && std::is_signed_v<T> && sizeof(T) == 4) return 'i';
  else static_assert(!sizeof(T), "entry points take and return int, int64, float or pointers");
}

// "return type, argument types", e.g. "iiipl" for int f(int, int, void*, int64_t).
template <class R, class... A> struct Types {
  const char text[sizeof...(A) + 2] = {code<R>(), code<A>()..., 0};
};
template <class R, class... A> constexpr Types<R, A...> types(R (*)(A...)) { return {}; }

// "name:types;" per entry point, appended as the library loads. A plain buffer, not std::string,
// whose inline symbols would leak into the library's exports; on overflow (far beyond the ~30
// entries there are) it says "overflow", which the loader refuses to load.
inline char* table() {
  static char entries[8192];
  return entries;
}

struct Entry {
  Entry(const char* name, const char* types) {
    const size_t used = std::strlen(table()), more = std::strlen(name) + std::strlen(types) + 2;
    if (used + more >= 8192) {
      std::strcpy(table(), "overflow;");
      return;
    }
    char* end = table() + used;
    std::strcat(std::strcat(std::strcat(std::strcat(end, name), ":"), types), ";");
  }
};

}  // namespace tr_abi

#define TR_ENTRY_POINT(fn) static const tr_abi::Entry fn##_entry(#fn, tr_abi::types(fn).text);

// Weak: every source includes it, the linker keeps one.
extern "C" __attribute__((visibility("default"), weak)) const char* tinyrecon_entry_points() {
  return tr_abi::table();
}
