// Paged KV-cache bookkeeping shared by every backend: a pool of fixed-size blocks and, per
// sequence, a block table mapping token positions to cache slots. The storage itself (host or
// device memory) belongs to the backend; this class only decides which slot each token uses.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "triplane/runtime/error.hpp"

namespace triplane::gpu {

using sequence_id = uint64_t;

/// Size of one block of cache for one rank: `block_size` token slots, each holding K and V for
/// `num_kv_heads` heads of `head_dim` elements, in every one of `num_layers` layers.
struct kv_cache_geometry {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;  ///< heads held by this rank
  int64_t head_dim = 0;
  int64_t block_size = 16;   ///< token slots per block

  int64_t bytes_per_block(int64_t element_bytes) const {
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_bytes;
  }
};

/// What one engine step does for one sequence, resolved to cache slots (see kv_block_manager::plan).
/// Slot s of the pool is block s / block_size, offset s % block_size.
struct planned_sequence {
  sequence_id id = 0;
  int64_t start_position = 0;         ///< tokens already cached before this step
  int64_t num_tokens = 0;             ///< new tokens this step (positions start .. start+num-1)
  std::vector<int64_t> slots;         ///< cache slot of each new token
  const std::vector<int32_t>* block_table = nullptr;  ///< blocks covering positions [0, start+num)
};

/// Block pool plus per-sequence block tables. Not thread-safe: one engine step at a time.
/// Allocation is all-or-nothing: plan() either reserves blocks for every sequence of a step or
/// changes nothing and answers errc::overloaded.
class kv_block_manager {
public:
  kv_block_manager(int64_t num_blocks, int64_t block_size);

  int64_t num_blocks() const { return static_cast<int64_t>(num_blocks_); }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t block_size() const { return block_size_; }

  /// Registers an empty sequence. Errors: already_exists.
  caf::error add_sequence(sequence_id id);
  /// Releases the sequence's blocks. Unknown ids are ignored (freeing twice is harmless).
  void free_sequence(sequence_id id);
  bool contains(sequence_id id) const { return sequences_.count(id) != 0; }
  /// Cached tokens of `id`; -1 when unknown.
  int64_t length(sequence_id id) const;
  size_t num_sequences() const { return sequences_.size(); }

  /// Reserves slots for `counts[i]` new tokens of `ids[i]` (ids distinct and known, counts >= 1) and
  /// returns the slot plan. Lengths are not advanced until commit(), so a step that fails after
  /// planning calls rollback() and the cache is as before. Errors: not_found, invalid_argument,
  /// overloaded (pool exhausted; nothing allocated).
  expected<std::vector<planned_sequence>> plan(const std::vector<sequence_id>& ids,
                                                const std::vector<int64_t>& counts);
  /// Advances each planned sequence's length by its token count.
  void commit(const std::vector<planned_sequence>& plan);
  /// Returns blocks that plan() added for these sequences beyond their committed lengths.
  void rollback(const std::vector<planned_sequence>& plan);

private:
  struct sequence_state {
    std::vector<int32_t> blocks;
    int64_t length = 0;
  };
  void trim(sequence_state& s);

  size_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> free_;  ///< LIFO free list
  std::unordered_map<sequence_id, sequence_state> sequences_;
};

} // namespace triplane::gpu
