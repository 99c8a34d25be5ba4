// One RocksDB instance with named column families, shared by the subsystems of a node (actor state,
// sandbox chunks and manifests, ...). RocksDB itself stays private to storage/src.
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

/// Names a column family of one open database. Cheap to copy; obtained from database::column()
/// and valid only with the database that returned it, while it is open.
struct column_family {
  uint32_t index = 0;  ///< position in the database's column family list; 0 is "default"
};

struct database_options {
  std::string path;  ///< directory; created if missing (when create_if_missing)
  /// Column families to open besides "default"; each is created when missing. Names are
  /// non-empty. Column families that exist on disk but are not listed are opened too, so a
  /// build that stops using one can still open an older database.
  std::vector<std::string> column_families;
  size_t block_cache_bytes = 64u << 20;  ///< shared LRU block cache for all column families
  bool create_if_missing = true;
};

class database;

/// Changes to any column families of one database, applied all or nothing by database::write().
/// Borrows the database it was made for, which must outlive it. Not thread-safe.
class write_batch {
public:
  explicit write_batch(const database& db);
  ~write_batch();
  write_batch(write_batch&&) noexcept;
  write_batch& operator=(write_batch&&) noexcept;
  write_batch(const write_batch&) = delete;
  write_batch& operator=(const write_batch&) = delete;

  void put(column_family cf, std::string_view key, std::string_view value);
  void erase(column_family cf, std::string_view key);
  /// Adds `delta` (two's complement, so negative deltas subtract) to the 8-byte little-endian
  /// counter at `key`; a missing key counts as 0. See database::add_refcount().
  void add_refcount(column_family cf, std::string_view key, int64_t delta);

  /// Number of operations added.
  uint32_t count() const;
  /// Bytes of the batch's serialized form (keys, values and framing).
  size_t byte_size() const;
  void clear();

private:
  friend class database;
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// Thread-safe: every const and non-const member may be called concurrently, except the
/// destructor, which closes the database and must run after every other call has returned.
/// Errors from RocksDB are io_error (or corrupted when RocksDB reports corruption), with
/// RocksDB's message and what was being done.
class database {
public:
  /// Opens (or creates) the database at options.path with the listed column families.
  /// Errors: invalid_argument for an empty path or column family name; io_error.
  static expected<std::unique_ptr<database>> open(const database_options& options);

  ~database();
  database(const database&) = delete;
  database& operator=(const database&) = delete;

  const std::string& path() const;

  /// The handle of column family `name`; not_found when it was not opened.
  expected<column_family> column(std::string_view name) const;

  /// A copy of the value at `key`, or std::nullopt when there is none.
  expected<std::optional<std::string>> get(column_family cf, std::string_view key) const;

  /// Calls `visit(value)` with the value pinned in RocksDB's block cache or memtable (no copy);
  /// the view is valid only during the call. Returns false (without calling) when absent.
  expected<bool> get(column_family cf, std::string_view key,
                     const std::function<void(std::string_view value)>& visit) const;

  /// The floor for benchmarks: a bare RocksDB Get into a PinnableSlice, no copy, no decoding.
  /// Returns the value's size, or std::nullopt when absent.
  expected<std::optional<size_t>> get_raw(column_family cf, std::string_view key) const;

  caf::error put(column_family cf, std::string_view key, std::string_view value,
                 durability level);
  /// Removing a missing key is not an error.
  caf::error erase(column_family cf, std::string_view key, durability level);
  /// RocksDB merge: adds `delta` to the uint64 counter at `key` without reading it (reference
  /// counts of content-addressed chunks). The sum wraps modulo 2^64; read it back with get()
  /// and decode_refcount(). A stored value that is not 8 bytes makes later reads of the key
  /// fail with corrupted.
  caf::error add_refcount(column_family cf, std::string_view key, int64_t delta,
                          durability level);

  /// Applies every change in `batch` atomically: after a crash, all of it or none is visible.
  /// An empty batch is a no-op. The batch is left unchanged.
  caf::error write(const write_batch& batch, durability level);

  /// Calls `visit(key, value)` for every key starting with `prefix` (all keys when empty), in
  /// byte order, on a consistent snapshot, until it returns false. Views are valid only during
  /// the call.
  caf::error for_each(column_family cf, std::string_view prefix,
                      const std::function<bool(std::string_view key, std::string_view value)>&
                        visit) const;
  /// The same, starting at the first key not less than `start` (pages of a long range: pass
  /// the last key seen with a '\0' appended to continue after it). A `start` below `prefix`
  /// starts at `prefix`.
  caf::error for_each(column_family cf, std::string_view prefix, std::string_view start,
                      const std::function<bool(std::string_view key, std::string_view value)>&
                        visit) const;

  /// Writes every column family's memtable to SST files and syncs the WAL.
  caf::error flush();

  /// RocksDB integer property of a column family, e.g. "rocksdb.estimate-num-keys",
  /// "rocksdb.live-sst-files-size", "rocksdb.cur-size-all-mem-tables". not_found when RocksDB
  /// does not know it.
  expected<uint64_t> property(column_family cf, std::string_view name) const;
  /// Shorthands for the properties above.
  expected<uint64_t> estimate_num_keys(column_family cf) const;
  expected<uint64_t> live_sst_bytes(column_family cf) const;

  struct impl;  ///< private; defined in storage/src

private:
  explicit database(std::unique_ptr<impl> state);
  friend struct database_access;
  std::unique_ptr<impl> impl_;
};

/// Decodes a counter written by add_refcount(); corrupted when `value` is not 8 bytes.
expected<uint64_t> decode_refcount(std::string_view value);

} // namespace triplane::storage
