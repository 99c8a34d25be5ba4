// What a program outside gpu/src may ask about the CUDA devices without including CUDA headers:
// whether there is a usable GPU, and the device's measured copy bandwidth (the floor a decode
// step is compared with). Defined only in builds with the CUDA backend (TRIPLANE_HAVE_CUDA).
#pragma once

#include <cstdint>
#include <string>

#include "triplane/runtime/error.hpp"

namespace triplane::gpu {

struct cuda_devices {
  int count = 0;            ///< usable GPUs (compute capability >= 9.0); 0 when none
  std::string why;          ///< when count == 0: what the probe found (no driver, no device, ...)
  std::string name;         ///< device 0's name, when count > 0
  int64_t memory_bytes = 0; ///< device 0's total memory, when count > 0
};

/// Probes the CUDA runtime. Never fails: no driver or no device is count == 0 with `why` set.
cuda_devices query_cuda_devices();

/// Device-to-device cudaMemcpy bandwidth on `device`, as (bytes read + bytes written) / second:
/// the median of `repeats` timed copies of `bytes` (after one warm-up), timed with CUDA events.
/// Errors: unavailable (no such device), overloaded (the buffers do not fit), internal.
expected<double> measure_copy_bandwidth(int device, int64_t bytes, int repeats);

} // namespace triplane::gpu
