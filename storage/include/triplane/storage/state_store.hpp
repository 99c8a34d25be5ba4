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
#include "triplane/storage/database.hpp"  // durability, database

namespace triplane::storage {

/// Addresses one virtual actor. `kind` and `id` are opaque bytes, neither may be empty;
/// kind is at most 255 bytes, id at most 4096.
struct actor_key {
  std::string kind;
  std::string id;
};
inline constexpr size_t max_kind_bytes = 255;
inline constexpr size_t max_id_bytes = 4096;

/// One actor's persisted state as it was last written.
struct stored_state {
  uint64_t version = 0;         ///< 1 for the first write, +1 for each later one
  uint64_t epoch = 0;           ///< activation epoch of the writer
  uint32_t schema_version = 0;  ///< the kind's payload schema version at write time
  std::string payload;          ///< the kind's bytes (a Cap'n Proto message, see schemas/)
};

struct store_options {
  std::string path;                                   ///< directory; created if missing
  /// Level of begin_activation()'s and erase()'s writes (save() takes its level per call).
  durability default_durability = durability::process_crash;
  size_t block_cache_bytes = 64u << 20;
  bool create_if_missing = true;
};

/// Column family holding the state records (Cap'n Proto StateRecord, schemas/state.capnp).
inline constexpr std::string_view state_column_family = "triplane.state";
/// Column family holding each key's current activation epoch (8 bytes, little-endian).
inline constexpr std::string_view epoch_column_family = "triplane.epoch";
/// Largest payload save() accepts.
inline constexpr size_t max_payload_bytes = size_t{256} << 20;

/// The key under which `key` is stored in both column families: one byte holding kind's
/// length, kind, then id. Length-prefixing makes (kind, id) pairs unambiguous and keeps each
/// kind's ids contiguous and in byte order. Precondition: `key` is valid (see actor_key).
std::string encode_record_key(const actor_key& key);

/// Thread-safe: every member may be called concurrently from any thread.
///
/// Epoch fencing: each activation of an actor first calls begin_activation(), which durably
/// raises the key's epoch and returns it. save() and erase() with an epoch lower than the key's
/// current epoch fail with errc::stale_epoch and change nothing, so a zombie activation (an older
/// one that did not notice it was replaced) can never overwrite a newer one's state.
class state_store {
public:
  virtual ~state_store() = default;

  /// Opens (or creates) the store at options.path in a database of its own.
  /// Errors: io_error with RocksDB's message, invalid_argument for a bad path.
  static expected<std::unique_ptr<state_store>> open(const store_options& options);

  /// Opens the store inside `db`, borrowed (it must outlive the store), so that a node keeps
  /// one RocksDB instance for all subsystems. `db` must have been opened with
  /// state_column_family and epoch_column_family, else not_found.
  static expected<std::unique_ptr<state_store>> open(database& db,
                                                    durability default_durability);

  /// The database holding the records (for tools and benchmarks: raw reads of the same values).
  virtual database& db() = 0;

  /// Durably claims a new activation epoch for `key`, strictly greater than any returned before
  /// (the first is 1), written at the store's default durability.
  /// Errors: invalid_argument; corrupted when the epoch record is unreadable; io_error.
  virtual expected<uint64_t> begin_activation(const actor_key& key) = 0;

  /// The key's state, or std::nullopt when it was never written (or erased).
  /// Errors: corrupted (naming kind and id) when the record fails validation (undecodable,
  /// truncated, checksum mismatch, unknown format version); only that key is affected.
  /// invalid_argument; io_error.
  virtual expected<std::optional<stored_state>> load(const actor_key& key) = 0;

  /// Atomically replaces the key's state (one WriteBatch) and returns the new version.
  /// An epoch at or above the key's current epoch is accepted (the fence only refuses older
  /// ones); the record stores the writer's epoch. Errors: stale_epoch when `epoch` < the key's
  /// current epoch; invalid_argument; limit_exceeded for a payload over max_payload_bytes;
  /// corrupted when the existing record cannot be read (erase it first); io_error.
  virtual expected<uint64_t> save(const actor_key& key, uint64_t epoch, uint32_t schema_version,
                                  std::string_view payload, durability level) = 0;

  /// Removes the key's state. Same fencing as save(). The epoch record stays, so epochs keep
  /// growing after an erase and a zombie of an activation before the erase stays fenced.
  /// Erasing a key without state is not an error; a corrupted record can be erased. Written at
  /// the store's default durability.
  virtual caf::error erase(const actor_key& key, uint64_t epoch) = 0;

  /// Calls `visit(id)` for every id of `kind` that has stored state, in byte order, until it
  /// returns false. The view is valid only during the call. Errors: invalid_argument for an
  /// empty or oversize kind; io_error.
  virtual caf::error for_each_id(std::string_view kind,
                                 const std::function<bool(std::string_view id)>& visit) = 0;

  /// Number of keys with stored state (an estimate from RocksDB when `exact` is false).
  virtual expected<uint64_t> count(bool exact) = 0;

  /// Flushes memtables and the WAL to disk.
  virtual caf::error flush() = 0;
};

} // namespace triplane::storage
