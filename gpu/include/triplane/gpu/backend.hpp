// The inference backend interface: one model, its (paged) KV cache, and one batched forward step
// for continuous batching. Implemented by the CPU reference backend (cpu_backend.cpp) and by the
// CUDA backend. A serving loop calls, between steps, add_sequence / free_sequence, and per step
// forward() with some sequences prefilling a chunk of their prompt and others decoding one token.
//
// For a backend implementer (CUDA):
//  - Construction: make_backend() reads the weights from a `checkpoint` (borrowed only during the
//    call: copy/upload what you need) and the options; TP ranks, their collectives and their KV
//    caches are owned by the backend. kv_cache_bytes is a per-rank budget: num_blocks =
//    kv_cache_bytes / kv_cache_geometry::bytes_per_block(element size); fewer than one block is an
//    invalid_argument error at construction.
//  - Use kv_block_manager (kv_cache.hpp) for the block tables so both backends share one
//    allocation policy: forward() calls plan(), runs the model writing K/V at the planned slots
//    and attending over each sequence's block table, then commit(); on any failure rollback().
//  - Tensor parallelism (Megatron; see shard_for_rank): column-parallel q/k/v and gate/up (rank r
//    holds the weight rows of query heads [r*H/tp, (r+1)*H/tp), of the KV heads those query heads
//    use, and of intermediate features [r*I/tp, (r+1)*I/tp)); row-parallel o_proj and down_proj
//    (the matching input columns); an all_reduce_sum after o_proj and after down_proj. Embedding
//    and norms are replicated. The lm_head is split by vocab rows and all_gathered when
//    vocab % tp == 0, else rank 0 computes it whole. Requirements:
//    heads % tp == 0, intermediate % tp == 0, and kv_heads % tp == 0 (KV heads split) or
//    tp % kv_heads == 0 (each KV head replicated on tp / kv_heads ranks).
//  - Numerics: logits are float32. The reference is transformers in float32.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "triplane/gpu/kv_cache.hpp"
#include "triplane/gpu/model_config.hpp"
#include "triplane/runtime/error.hpp"

namespace triplane::gpu {

class checkpoint;

enum class backend_kind { cpu, cuda };
const char* to_string(backend_kind kind);

struct backend_options {
  backend_kind kind = backend_kind::cpu;
  int tensor_parallel = 1;                  ///< ranks (CPU: threads; CUDA: GPUs 0..tp-1)
  int64_t kv_cache_bytes = int64_t{256} << 20;  ///< per rank
  int64_t kv_block_size = 16;               ///< token slots per KV block
  int threads = 0;                          ///< CPU worker threads in total; 0: hardware_concurrency
};

/// One sequence's work in a step: append `tokens` (one or more) at its next positions.
struct step_item {
  sequence_id sequence = 0;
  std::vector<int32_t> tokens;
  bool all_logits = false;  ///< logits for every token of the chunk, not only the last
};

/// Logits of one step_item: `rows` x vocab_size floats, row-major (rows = 1, or tokens.size()
/// with all_logits).
struct step_logits {
  int64_t rows = 0;
  std::vector<float> values;
};

struct kv_cache_stats {
  int64_t num_blocks = 0;
  int64_t free_blocks = 0;
  int64_t block_size = 0;
};

/// Not thread-safe: one thread drives a backend (a worker actor, a CLI), and calls never overlap.
/// Any thread may be that thread (backends own their internal threads).
class backend {
public:
  virtual ~backend() = default;

  virtual backend_kind kind() const = 0;
  virtual const model_config& config() const = 0;
  virtual int tensor_parallel() const = 0;

  /// Registers an empty sequence (no KV blocks yet). Errors: already_exists.
  virtual caf::error add_sequence(sequence_id id) = 0;
  /// Releases the sequence and its KV blocks; unknown ids are ignored.
  virtual void free_sequence(sequence_id id) = 0;
  /// Tokens cached for `id`, or -1 when unknown.
  virtual int64_t sequence_length(sequence_id id) const = 0;
  virtual kv_cache_stats kv_stats() const = 0;

  /// Runs one step over `items` (distinct registered sequences, each with >= 1 token in
  /// [0, vocab_size), final length <= max_position_embeddings) and returns their logits in item
  /// order. All-or-nothing: on error no sequence's cache or length changed. Errors:
  /// invalid_argument / not_found (bad items), overloaded (KV pool exhausted: retry after freeing
  /// sequences), internal (device failure).
  virtual expected<std::vector<step_logits>> forward(const std::vector<step_item>& items) = 0;
};

/// Makes a backend for the checkpoint's model. Errors: invalid_argument (bad options, TP shape not
/// supported by the model, KV budget below one block), unavailable (CUDA asked for but not built in
/// or no GPU), and whatever the backend's set-up reports.
expected<std::unique_ptr<backend>> make_backend(const checkpoint& weights, const backend_options& options);

/// The CPU reference backend (float32; weights converted from F16/BF16). make_backend dispatches
/// here for backend_kind::cpu.
expected<std::unique_ptr<backend>> make_cpu_backend(const checkpoint& weights, const backend_options& options);

/// The CUDA backend (gpu/src/*.cu). Defined only in builds with CUDA sources, where CMake sets
/// TRIPLANE_GPU_WITH_CUDA and make_backend dispatches here for backend_kind::cuda. It must answer
/// errc::unavailable (not crash) on a machine without a usable GPU.
expected<std::unique_ptr<backend>> make_cuda_backend(const checkpoint& weights, const backend_options& options);

/// Validates a tensor-parallel degree for a model (the rules above). Errors: invalid_argument.
caf::error check_tensor_parallel(const model_config& config, int tp);

/// What rank `rank` of `tp` holds. Global query head g uses global KV head g / (heads / kv_heads);
/// on a rank that is local KV head g / (heads / kv_heads) - kv_head_begin.
struct tp_shard {
  int64_t q_head_begin = 0, q_heads = 0;   ///< global query heads of this rank
  int64_t kv_head_begin = 0, kv_heads = 0; ///< global KV heads this rank holds
  int64_t mlp_begin = 0, mlp_size = 0;     ///< intermediate columns
  int64_t vocab_begin = 0, vocab_size = 0; ///< lm_head rows (the whole vocab when not split)
  bool vocab_split = false;
};
/// Precondition: check_tensor_parallel(config, tp) succeeded, 0 <= rank < tp.
tp_shard shard_for_rank(const model_config& config, int tp, int rank);

/// A step flattened for a backend's kernels: every new token of every item, in item order, with
/// its position and KV slot. Shared so that all backends validate and lay out steps alike.
struct prepared_step {
  std::vector<planned_sequence> plan;  ///< one per item, from kv_block_manager::plan
  std::vector<int32_t> token_ids;      ///< [tokens]
  std::vector<int64_t> positions;      ///< [tokens] position of each token in its sequence
  std::vector<int64_t> slots;          ///< [tokens] KV slot to write (block * block_size + offset)
  std::vector<int32_t> item_of_token;  ///< [tokens] index into plan / items
  std::vector<int64_t> output_tokens;  ///< token indices whose logits are returned, in order
};

/// Validates `items` (see backend::forward) against the model and the cache, plans their KV
/// slots, and flattens them. On success the caller must commit() or rollback() `plan` on
/// `blocks`. Errors: invalid_argument (no tokens, token id out of range), not_found (unknown
/// sequence), limit_exceeded (beyond max_position_embeddings), overloaded (pool exhausted).
expected<prepared_step> prepare_step(const model_config& config, kv_block_manager& blocks,
                                     const std::vector<step_item>& items);

/// Splits the logits of `step.output_tokens` ([outputs, vocab] row-major) into per-item results.
std::vector<step_logits> split_logits(const std::vector<step_item>& items, const std::vector<float>& logits,
                                      int64_t vocab);

} // namespace triplane::gpu
