// Durable state of virtual actors: one versioned, epoch-fenced record per (kind, id), stored in
// RocksDB. The runtime's directory is the only writer in normal operation; tests and tools read.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "triplane/runtime/error.hpp"

namespace triplane::storage {

/// How far an acknowledged write survives.
enum class durability : uint8_t {
  process_crash = 0,  ///< written to the WAL, not fsynced: survives a killed process
  power_loss = 1,     ///< WAL fsynced before the write returns: survives losing the page cache
};

/// Addresses one virtual actor. `kind` and `id` are opaque bytes, neither may be empty;
/// kind is at most 255 bytes, id at most 4096.
struct actor_key {
  std::string kind;
  std::string id;
};

/// One actor's persisted state as it was last written.
struct stored_state {
  uint64_t version = 0;         ///< 1 for the first write, +1 for each later one
  uint64_t epoch = 0;           ///< activation epoch of the writer
  uint32_t schema_version = 0;  ///< the kind's payload schema version at write time
  std::string payload;          ///< the kind's bytes (a Cap'n Proto message, see schemas/)
};

struct store_options {
  std::string path;                                   ///< directory; created if missing
  durability default_durability = durability::process_crash;
  size_t block_cache_bytes = 64u << 20;
  bool create_if_missing = true;
};

/// Thread-safe: every member may be called concurrently from any thread.
///
/// Epoch fencing: each activation of an actor first calls begin_activation(), which durably
/// raises the key's epoch and returns it. save() and erase() with an epoch lower than the key's
/// current epoch fail with errc::stale_epoch and change nothing, so a zombie activation (an older
/// one that did not notice it was replaced) can never overwrite a newer one's state.
class state_store {
public:
  virtual ~state_store() = default;

  /// Opens (or creates) the store at options.path. Errors: io_error with RocksDB's message,
  /// invalid_argument for a bad path.
  static expected<std::unique_ptr<state_store>> open(const store_options& options);

  /// Durably claims a new activation epoch for `key`, strictly greater than any returned before.
  virtual expected<uint64_t> begin_activation(const actor_key& key) = 0;

  /// The key's state, or std::nullopt when it was never written (or erased).
  /// Errors: corrupted (naming kind and id) when the record fails validation; io_error.
  virtual expected<std::optional<stored_state>> load(const actor_key& key) = 0;

  /// Atomically replaces the key's state (one WriteBatch) and returns the new version.
  /// Errors: stale_epoch when `epoch` < the key's current epoch; invalid_argument; io_error.
  virtual expected<uint64_t> save(const actor_key& key, uint64_t epoch, uint32_t schema_version,
                                  std::string_view payload, durability level) = 0;

  /// Removes the key's state and epoch record. Same fencing as save().
  virtual caf::error erase(const actor_key& key, uint64_t epoch) = 0;

  /// Calls `visit(id)` for every id of `kind` that has stored state, in byte order, until it
  /// returns false.
  virtual caf::error for_each_id(std::string_view kind,
                                 const std::function<bool(std::string_view id)>& visit) = 0;

  /// Number of keys with stored state (an estimate from RocksDB when `exact` is false).
  virtual expected<uint64_t> count(bool exact) = 0;

  /// Flushes memtables and the WAL to disk.
  virtual caf::error flush() = 0;
};

} // namespace triplane::storage
