// Between a workspace directory and its manifest: sync (what changed on disk since the manifest,
// without re-reading untouched files) and materialize (recreate the directory from the manifest).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "session/session_store.hpp"

namespace triplane::actors::session {

struct sync_outcome {
  bool changed = false;
  uint64_t total_bytes = 0;       ///< sum of regular file sizes after the sync (a hard-linked file once)
  uint64_t files = 0;             ///< regular files
  uint64_t files_read = 0;        ///< files whose contents were read and hashed (changed ones)
  std::map<std::string, std::string> new_chunks;  ///< hash -> bytes of chunks of changed files
};

/// Brings `m` up to date with the directory `root` (symlinks recorded, never followed; sockets,
/// fifos and devices skipped). Regular files of `root` sharing an inode become a hard-link
/// group (manifest_entry::hard_link_of): only the primary is read, the other names are not. A
/// regular file whose size, mtime, inode and ctime match its entry keeps its chunk list unread,
/// unless it had been written within a timestamp tick of the sync that recorded that entry
/// (manifest_entry::stat_unproven). Fails with limit_exceeded, leaving `m` unchanged, when the
/// files add up to more than `quota_bytes` (a hard-linked file once; 0 = no quota), or the
/// workspace holds more than `max_entries` files, directories and symlinks (0 = no limit); both
/// checks use stat only, before any file is read.
expected<sync_outcome> sync_manifest(const std::string& root, manifest& m, uint64_t quota_bytes,
                                     uint64_t max_entries = 0);

/// Creates `root` (which must not hold anything else) with every entry of `m`, contents from
/// `store`, modes and mtimes as recorded, hard-link groups as links (made beneath `root`
/// without following symlinks, to the file just written: corrupted when `m` names anything
/// else), and refreshes the entries' stat caches. Contents are
/// checked against their SHA-256 names unless !verify; then verify_chunks() must pass before
/// anything derived from the files is used or stored.
caf::error materialize(const std::string& root, manifest& m, const session_store& store,
                       bool verify = true);

/// Checks every chunk `m` references against its SHA-256 name (corrupted naming the first that
/// does not match or is missing).
caf::error verify_chunks(const manifest& m, const session_store& store);

} // namespace triplane::actors::session
