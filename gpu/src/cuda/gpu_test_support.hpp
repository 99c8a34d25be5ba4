// Helpers of the GPU-labelled tests: the "skip without a GPU" guard and small device buffers.
#pragma once

#include <catch2/catch.hpp>

#include <cstring>
#include <string>
#include <vector>

#include "cuda_support.hpp"

namespace triplane::gpu::testing {

/// True (after a WARN naming the reason) when fewer than `needed` usable GPUs are present: the
/// test then returns early and passes, so `ctest -L gpu` is green on machines without GPUs.
inline bool skip_without_gpus(int needed = 1) {
  const auto probe = cuda::probe_devices();
  if (probe.count >= needed) return false;
  WARN("SKIPPED: needs " << needed << " GPU(s), " << probe.count << " usable"
                         << (probe.why.empty() ? std::string() : " (" + probe.why + ")"));
  return true;
}

/// A device buffer of T, filled with 0xFF bytes (NaN for floats, bf16 and f16) so that anything a
/// kernel fails to write shows up in the comparison.
template <typename T>
class device_vector {
public:
  explicit device_vector(size_t n) : n_(n) {
    REQUIRE(cudaMalloc(&ptr_, std::max<size_t>(1, n * sizeof(T))) == cudaSuccess);
    REQUIRE(cudaMemset(ptr_, 0xFF, n * sizeof(T)) == cudaSuccess);
  }
  explicit device_vector(const std::vector<T>& host) : device_vector(host.size()) {
    REQUIRE(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  ~device_vector() { cudaFree(ptr_); }
  device_vector(const device_vector&) = delete;
  device_vector& operator=(const device_vector&) = delete;

  T* get() const { return static_cast<T*>(ptr_); }
  std::vector<T> to_host() const {
    std::vector<T> out(n_);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(out.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return out;
  }

private:
  void* ptr_ = nullptr;
  size_t n_;
};

} // namespace triplane::gpu::testing
