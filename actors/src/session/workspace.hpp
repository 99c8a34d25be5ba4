// A session's on-disk workspace and the files API over it. Every path comes from outside and is
// validated; every access resolves beneath the workspace's directory fd (openat2
// RESOLVE_BENEATH where the kernel has it, else a component-wise O_NOFOLLOW walk), so neither
// "..", absolute paths nor symlinks (including ones swapped in between two calls) reach outside.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "triplane/actors/session_protocol.hpp"
#include "triplane/runtime/error.hpp"

namespace triplane::actors::session {

constexpr size_t max_path_bytes = 4096;
constexpr size_t max_name_bytes = 255;

/// Splits a workspace-relative path into its names after validation ("a//./b" -> {a, b}).
/// Errors (invalid_argument, naming the problem): NUL byte, absolute, "..", too long, a name
/// over 255 bytes, empty when !allow_root.
expected<std::vector<std::string>> split_path(const std::string& path, bool allow_root);

/// True when the running kernel offers openat2 (checked once per workspace_options).
bool kernel_has_openat2();

struct workspace_limits {
  uint64_t max_read_bytes = 64u << 20;   ///< largest single read reply
  uint64_t max_list_entries = 200000;    ///< largest listing
};

class workspace {
public:
  /// Opens (creating when missing, mode 0755) the directory `root` as a workspace.
  /// `use_openat2` false forces the portable walk (tests exercise both).
  static expected<std::unique_ptr<workspace>> open(const std::string& root, bool use_openat2,
                                                   workspace_limits limits = {});
  ~workspace();
  workspace(const workspace&) = delete;
  workspace& operator=(const workspace&) = delete;

  const std::string& root() const { return root_; }
  int root_fd() const { return root_fd_; }
  bool uses_openat2() const { return openat2_; }

  /// Writes a regular file. A final symlink is never followed (error); the file is replaced
  /// atomically unless `append`. Errors: invalid_argument, not_found (missing parent without
  /// create_parents), permission_denied (path through a symlink leaving the workspace), io_error.
  expected<file_entry> write(const file_write_request& req);
  expected<file_data> read(const file_read_request& req);
  expected<std::vector<file_entry>> list(const file_list_request& req);
  expected<file_entry> stat(const std::string& path);
  expected<file_entry> make_directory(const mkdir_request& req);
  /// Returns the number of entries removed.
  expected<uint64_t> remove(const remove_request& req);
  expected<file_entry> move(const move_request& req);

  /// Moves every entry of directory `from` into directory `into` (workspace paths; `into` must
  /// exist and must not lie inside `from`), merging directories present in both; a
  /// non-directory replaces a non-directory. The whole tree is checked before anything moves:
  /// an entry that would replace a directory by a non-directory or the reverse (a symlink in
  /// `into` counts as a non-directory: it is never followed), and an entry of `from` that is
  /// neither a regular file, a directory nor a symlink (a fifo, socket or device, which no sync
  /// would keep), fails with invalid_argument naming it and its type, and nothing has moved.
  /// Entries left in `from` are the caller's to remove.
  caf::error merge_into(const std::string& from, const std::string& into);

  /// Opens the directory at `names` (already split) beneath the root; -1 and *err on failure.
  int open_dir(const std::vector<std::string>& names, size_t count, bool create, caf::error* err);

private:
  workspace() = default;
  expected<file_entry> stat_at(int dirfd, const std::string& name, const std::string& path);

  std::string root_;
  int root_fd_ = -1;
  bool openat2_ = false;
  workspace_limits limits_;
  uint64_t writes_ = 0;  ///< names the temporary files of replacing writes
};

/// Removes a whole directory tree without following symlinks (best effort, returns errors).
caf::error remove_tree(const std::string& path);

} // namespace triplane::actors::session
