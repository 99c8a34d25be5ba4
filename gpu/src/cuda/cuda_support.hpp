// The host-side parts of the CUDA backend that need no GPU, kept apart so they run in CPU tests:
// device probing, the mapping of CUDA / cuBLAS / NCCL statuses to triplane errors, option checks,
// the per-rank weight layout and packing, the block tables of one step, and the NCCL group.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <cublas_api.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "kernels.hpp"
#include "triplane/gpu/backend.hpp"
#include "triplane/gpu/collective.hpp"
#include "triplane/gpu/safetensors.hpp"

namespace triplane::gpu {
class checkpoint;
class thread_pool;
} // namespace triplane::gpu

namespace triplane::gpu::cuda {

/// How many usable CUDA devices this process sees; 0 with `why` saying what failed (no driver,
/// no device, a compute capability below the 9.0 this build targets). Never aborts; clears the
/// runtime's last-error state it may leave behind.
struct device_probe {
  int count = 0;
  std::string why;
};
device_probe probe_devices();

/// Status -> error. none for success. Out-of-memory statuses map to errc::overloaded (the caller
/// may retry with less work), "no driver / no device" to unavailable, everything else to
/// internal; the message is "<what>: <status name>: <description>".
caf::error from_cuda(cudaError_t status, const std::string& what);
caf::error from_cublas(cublasStatus_t status, const std::string& what);
caf::error from_nccl(ncclResult_t status, const std::string& what);

/// The option and model checks that need no device: check_tensor_parallel, kv_block_size in
/// [1, 4096], head_dim <= max_head_dim, a KV budget of at least one block, matrix sizes that fit
/// cuBLAS's int dimensions. Errors: invalid_argument.
caf::error check_cuda_options(const model_config& config, const backend_options& options);
/// tp GPUs are needed, one per rank (NCCL refuses two ranks on one GPU). Errors: invalid_argument.
caf::error check_device_count(int tensor_parallel, int device_count);

/// The 16-bit type weights live in on the device: f16 for F16 checkpoints, bf16 otherwise (F32
/// checkpoints are rounded to bf16 on upload: the tensor cores' input type, half the bytes).
elem_type device_elem_type(dtype checkpoint_dtype);

/// Offsets (in 16-bit elements, each a multiple of 128 = 256 bytes) of one rank's weights in its
/// device arena. Per layer qkv is [q rows | k rows | v rows] x hidden and gate_up [gate | up] x
/// hidden, like the CPU backend. With tied embeddings lm_head points at rank's vocab rows inside
/// the embedding (not stored twice).
struct layer_offsets {
  int64_t input_norm = 0, post_norm = 0, qkv = 0, o = 0, gate_up = 0, down = 0;
};
struct weight_layout {
  int64_t embed = 0, final_norm = 0, lm_head = 0;
  std::vector<layer_offsets> layers;
  int64_t total = 0;  ///< elements in the arena
};
weight_layout plan_weights(const model_config& config, const tp_shard& shard);

/// Converts rows [row_begin, +rows) x columns [col_begin, +cols) of a 2-D (or 1-D: one row)
/// float tensor to `elem` into out[0 .. rows * cols). Tensors already of that type are copied
/// bit for bit. Precondition: the block lies inside the tensor (shapes were checked at open).
void pack_block(const tensor_view& t, int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols,
                elem_type elem, uint16_t* out);

/// Packs every weight of rank `shard` per `layout`, handing each packed tensor to
/// sink(offset, values) (a device upload in the backend, a host arena in tests). Stops at and
/// returns the sink's first error.
caf::error pack_weights(const checkpoint& weights, const tp_shard& shard, const weight_layout& layout,
                        elem_type elem,
                        const std::function<caf::error(int64_t offset, const std::vector<uint16_t>& values)>& sink);

/// What the kernels need of a prepared step (backend.hpp's prepare_step) beyond its token
/// arrays: the block tables of its items as one [items, max_blocks] matrix (unused entries 0;
/// item_of_token indexes its rows) and the output token indices as int32.
struct step_tables {
  std::vector<int32_t> block_tables;
  int64_t max_blocks = 0;
  std::vector<int32_t> output_rows;
};
step_tables build_step_tables(const prepared_step& step);

/// NCCL collectives over device buffers, one per rank, rank r on GPU devices[r], operations
/// enqueued on streams[r] (asynchronous: a result is ready for later work on that stream; the
/// host synchronises the stream before reading it). Bootstrapped with ncclGetUniqueId and one
/// ncclCommInitRank per rank, each on its own thread of `rank_threads` (size() == ranks). A
/// handle destroys its communicator (ncclCommDestroy, which may wait for the other ranks):
/// destroy all of a group's handles side by side, each on its rank's thread. Errors: internal
/// (the communicators made so far are aborted).
expected<std::vector<std::unique_ptr<collective>>> make_nccl_group(const std::vector<int>& devices,
                                                                   const std::vector<cudaStream_t>& streams,
                                                                   thread_pool& rank_threads);

} // namespace triplane::gpu::cuda
