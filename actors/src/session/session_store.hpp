// Persistence of sandbox sessions: content-addressed, reference-counted chunks shared by every
// session of a node, and one record per session (settings, env, kv, history, manifest) in the
// node's RocksDB (storage::database). Every change of a record and of the reference counts it
// implies is one atomic write batch.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "triplane/actors/session_protocol.hpp"
#include "triplane/runtime/error.hpp"
#include "triplane/storage/database.hpp"

namespace triplane::actors::session {

constexpr size_t chunk_bytes = 1u << 20;  ///< files are cut into chunks of this size
constexpr size_t hash_bytes = 32;         ///< SHA-256

/// SHA-256 of `data` (32 raw bytes).
std::string sha256(std::string_view data);
/// Lower-case hex of raw bytes (for messages).
std::string to_hex(std::string_view raw);

/// One entry of a workspace manifest.
struct manifest_entry {
  file_type type = file_type::regular;
  uint32_t mode = 0;
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  std::vector<std::string> chunks;  ///< raw SHA-256 names, in file order
  std::string link_target;
  /// Regular files only: the path of the entry this one is a hard link of, empty when the file
  /// has one name in the workspace. A hard-link group's primary is its first path in manifest
  /// order and alone lists the chunks (so they are counted once); the others have no chunks and
  /// carry the primary's mode, size and mtime.
  std::string hard_link_of;
  // Local stat cache, not persisted: a file whose (size, mtime, inode, ctime) still match was
  // not touched and is not read again. Rehydration and every sync refresh it.
  uint64_t ino = 0;
  int64_t ctime_ns = 0;
  /// Local, not persisted: set when the file's mtime was within a timestamp tick of the moment
  /// its stat was recorded, so a rewrite of the same size in that tick would leave the stat as
  /// it is: the next sync reads such a file instead of trusting its stat.
  bool stat_unproven = false;
};
/// path -> entry, sorted (parents before children).
using manifest = std::map<std::string, manifest_entry>;

/// Everything a session persists.
struct session_record {
  std::string id;
  uint64_t created_unix_ms = 0;
  uint64_t last_used_unix_ms = 0;
  std::string forked_from;
  std::string cwd;
  std::map<std::string, std::string> env;
  std::map<std::string, std::string> kv;
  std::deque<command_record> history;
  session_settings settings;
  manifest files;
  uint64_t next_bg_id = 1;
};

/// Format 1, or 2 when the manifest holds a hard link (older builds refuse those records).
std::string encode_record(const session_record& record);
/// Reads formats 1 and 2. corrupted naming the id when undecodable, newer, or when a hard link
/// entry is not a chunkless regular file naming a primary entry (a regular file that is no hard
/// link itself).
expected<session_record> decode_record(std::string_view bytes, const std::string& id);

/// The first entry of `m` whose path is not a relative path of plain names (no "", ".", "..",
/// NUL, names over 255 bytes) whose parent is a directory entry of `m`: such a path could lead
/// outside the workspace or through a symlink. nullptr when every path is fine.
const std::string* bad_path(const manifest& m);

/// The first entry of `m` whose hard_link_of does not name a primary (see decode_record);
/// nullptr when every one does.
const std::string* bad_hard_link(const manifest& m);

struct store_stats {
  uint64_t chunks = 0;        ///< distinct chunks stored
  uint64_t chunk_bytes = 0;   ///< their total size
  uint64_t sessions = 0;
};

/// Node-wide, thread-safe. Chunk reference changes are serialised by one mutex so that a chunk
/// reclaimed at refcount 0 can never be one another session is adding a reference to.
class session_store {
public:
  /// Opens the store's column families in `db` (which must have been opened with
  /// column_families() listed, and must outlive the store).
  static expected<std::unique_ptr<session_store>> open(storage::database& db,
                                                       storage::durability level);
  /// The column families this store needs; list them when opening the database.
  static std::vector<std::string> column_families();

  /// The stored record of `id`, std::nullopt when none. corrupted naming the id when undecodable.
  expected<std::optional<session_record>> load(const std::string& id);
  expected<bool> exists(const std::string& id);

  /// Stores `record`, whose previous stored version had manifest `previous` (nullptr: none).
  /// `new_chunks` holds the bytes of chunks the record references that may not be stored yet
  /// (hash -> bytes); chunks already stored are not rewritten. One atomic batch; chunks whose
  /// count dropped to 0 are reclaimed afterwards. With previous == nullptr, already_exists when
  /// `record.id` has a record (its references would never be released).
  caf::error save(const session_record& record, const manifest* previous,
                  const std::map<std::string, std::string>& new_chunks);
  /// Stores a copy of `source` under `new_id` (one more reference to each of its chunks, no
  /// content copied). already_exists when new_id has a record.
  caf::error fork(const session_record& source, const std::string& new_id, uint64_t now_ms);
  /// Removes the record of `id` and its references; reclaims chunks at 0. Missing: not_found.
  caf::error destroy(const std::string& id);
  /// Up to `limit` ids of stored sessions that begin with `prefix` and sort after `after` (empty:
  /// from the first), in byte order. Reads the records' column only: nothing is activated.
  expected<std::vector<std::string>> list_ids(std::string_view prefix, std::string_view after,
                                              size_t limit) const;
  /// Number of stored sessions whose id begins with `prefix`: a scan of them, O(their number).
  expected<uint64_t> count_ids(std::string_view prefix) const;
  /// The bytes of chunk `hash`; corrupted when missing or when the bytes do not hash to it.
  expected<std::string> chunk(std::string_view hash) const;
  /// Calls `use(bytes)` with chunk `hash` pinned in RocksDB's cache (no copy), after checking
  /// that the bytes hash to it (unless !verify: then only RocksDB's own block checksums were
  /// checked, and the caller must verify before it relies on the bytes). corrupted when missing
  /// or mismatching.
  caf::error with_chunk(std::string_view hash, const std::function<void(std::string_view)>& use,
                        bool verify = true) const;
  /// Current reference count of `hash` (0 when none).
  expected<uint64_t> refcount(std::string_view hash) const;
  expected<store_stats> stats() const;
  storage::database& database() { return db_; }

private:
  session_store(storage::database& db, storage::durability level) : db_(db), level_(level) {}
  caf::error reclaim(const std::vector<std::string>& candidates);

  storage::database& db_;
  storage::durability level_;
  storage::column_family chunks_{}, refs_{}, sessions_{};
  std::mutex refs_mutex_;
};

} // namespace triplane::actors::session
