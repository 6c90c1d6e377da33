// Library-wide entry points: the last error's message and the device probe used by the loader.
#include <cstdio>

#include "common.cuh"

namespace tr {

// Per thread, like CUDA's own error state: a message belongs to the thread whose call failed.
static thread_local char last_error[512] = "";

int fail(cudaError_t err) {
  std::snprintf(last_error, sizeof(last_error), "%s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
  return static_cast<int>(err);
}

int fail_msg(const char* msg) {
  std::snprintf(last_error, sizeof(last_error), "%s", msg);
  return -1;
}

}  // namespace tr

// The message of this thread's last failed call ("" if none failed).
TR_EXPORT const char* tinyrecon_last_error() { return tr::last_error; }
TR_ENTRY_POINT(tinyrecon_last_error)

// Number of visible CUDA devices; fails (no driver, no device) with the CUDA message.
TR_EXPORT int tinyrecon_device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  return err == cudaSuccess ? 0 : tr::fail(err);
}
TR_ENTRY_POINT(tinyrecon_device_count)
