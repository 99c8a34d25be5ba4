// The communication a tensor-parallel group needs: one `collective` object per rank. Two
// implementations: in-process CPU ranks (threads, here) and NCCL (one rank per GPU, in the CUDA
// backend). Kept minimal on purpose: Megatron-style TP needs only these two operations.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "triplane/runtime/error.hpp"

namespace triplane::gpu {

/// One rank's handle on its group. Every rank of the group must call the same operations in the
/// same order with the same counts (a collective call blocks until all ranks have joined it).
/// A handle is used by one thread at a time: the thread that runs its rank.
/// Buffers are host memory for the CPU implementation and device memory for NCCL.
/// An error means the group is unusable (a rank that fails leaves the others waiting unless the
/// implementation aborts the whole group, as ncclCommAbort does); the backend then fails the step.
class collective {
public:
  virtual ~collective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// data[0..count) := sum over ranks of their data[0..count). Every rank ends with identical
  /// values (the CPU implementation sums in rank order 0, 1, ..., so results are reproducible).
  virtual caf::error all_reduce_sum(float* data, size_t count) = 0;
  /// recv[r * count .. (r + 1) * count) := rank r's send[0..count), on every rank.
  /// `recv` holds size() * count floats and must not overlap `send`.
  virtual caf::error all_gather(const float* send, size_t count, float* recv) = 0;
};

/// `ranks` connected handles (index = rank) whose operations complete in-process, each rank being
/// run by its own thread. ranks >= 1. The handles share state: destroy them together, after all
/// threads have finished.
std::vector<std::unique_ptr<collective>> make_cpu_collective_group(int ranks);

} // namespace triplane::gpu
