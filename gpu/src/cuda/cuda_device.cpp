// Device queries and the copy-bandwidth measurement behind cuda_device.hpp.
#include "triplane/gpu/cuda_device.hpp"

#include <algorithm>
#include <vector>

#include "cuda_support.hpp"

namespace triplane::gpu {

cuda_devices query_cuda_devices() {
  cuda_devices out;
  const auto probe = cuda::probe_devices();
  out.count = probe.count;
  out.why = probe.why;
  if (out.count > 0) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
      out.name = prop.name;
      out.memory_bytes = static_cast<int64_t>(prop.totalGlobalMem);
    }
    cudaGetLastError();
  }
  return out;
}

expected<double> measure_copy_bandwidth(int device, int64_t bytes, int repeats) {
  if (bytes < 1 || repeats < 1) return make_error(errc::invalid_argument, "measure_copy_bandwidth: bytes and repeats must be >= 1");
  const auto probe = cuda::probe_devices();
  if (device < 0 || device >= probe.count)
    return make_error(errc::unavailable, "measure_copy_bandwidth: no usable GPU " + std::to_string(device) +
                                             (probe.why.empty() ? std::string() : " (" + probe.why + ")"));
  if (auto err = cuda::from_cuda(cudaSetDevice(device), "cudaSetDevice")) return err;
  void* src = nullptr;
  void* dst = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  std::vector<float> ms;
  caf::error err;
  auto step = [&](cudaError_t status, const char* what) {
    if (!err) err = cuda::from_cuda(status, what);
    return !err;
  };
  if (step(cudaMalloc(&src, static_cast<size_t>(bytes)), "cudaMalloc (copy source)") &&
      step(cudaMalloc(&dst, static_cast<size_t>(bytes)), "cudaMalloc (copy destination)") &&
      step(cudaMemset(src, 0x5A, static_cast<size_t>(bytes)), "cudaMemset") &&  // not zeros: see METHOD.md
      step(cudaEventCreate(&start), "cudaEventCreate") && step(cudaEventCreate(&stop), "cudaEventCreate") &&
      step(cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice), "warm-up copy")) {
    for (int r = 0; r < repeats && !err; ++r) {
      float elapsed = 0;
      if (step(cudaEventRecord(start), "cudaEventRecord") &&
          step(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice), "copy") &&
          step(cudaEventRecord(stop), "cudaEventRecord") && step(cudaEventSynchronize(stop), "cudaEventSynchronize") &&
          step(cudaEventElapsedTime(&elapsed, start, stop), "cudaEventElapsedTime"))
        ms.push_back(elapsed);
    }
  }
  if (start != nullptr) cudaEventDestroy(start);
  if (stop != nullptr) cudaEventDestroy(stop);
  if (src != nullptr) cudaFree(src);
  if (dst != nullptr) cudaFree(dst);
  cudaGetLastError();
  if (err) return err;
  std::sort(ms.begin(), ms.end());
  const double median_s = ms[ms.size() / 2] / 1e3;
  if (!(median_s > 0)) return make_error(errc::internal, "measure_copy_bandwidth: a copy took no time");
  return 2.0 * static_cast<double>(bytes) / median_s;
}

} // namespace triplane::gpu
