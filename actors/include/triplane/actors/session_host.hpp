// Sandbox sessions as virtual actors of kind "session": the node-wide host that owns what all
// sessions share (sandbox configuration, cgroup access, the chunk and manifest store) and makes
// one virtual_actor per activation. Messages: session_protocol.hpp.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "triplane/actors/session_protocol.hpp"
#include "triplane/runtime/error.hpp"
#include "triplane/runtime/virtual_actor.hpp"

namespace triplane::storage {
class database;
}

namespace triplane::actors {

struct session_host_options {
  std::string workspaces_dir;                   ///< required; one sub-directory per live session
  /// cgroup v2 directory for the commands' groups (see session::cgroup_host::detect); empty:
  /// detected. Given and unusable: create() fails rather than run commands without limits.
  std::string cgroup_parent;
  /// Node defaults under every session's settings. Out of the box: at most 1,024 tasks and
  /// 4 GiB of memory per command, 5 min wall clock; each limit set costs a cgroup join.
  session_settings defaults = [] {
    session_settings s;
    s.default_limits.max_processes = 1024;
    s.default_limits.memory_bytes = 4ull << 30;
    s.default_timeout_ms = 300000;
    return s;
  }();
  /// Sandboxes kept set up ahead of time (namespaces, mounts, cgroups of the default limits
  /// joined) for the first exec of a rehydrated session, which then costs the materialization
  /// of its files and the command itself. Each holds two idle processes. 0 = none.
  size_t prestarted_sandboxes = 2;
  size_t history_limit = 100;                   ///< commands kept per session
  uint64_t max_workspace_bytes = 256ull << 20;  ///< quota for sessions that set none
  /// Files, directories and symlinks per workspace (0 = no limit): a command that creates more
  /// is stopped and its changes discarded, as past the byte quota (empty files cost no bytes
  /// but host inodes and manifest entries).
  uint64_t max_workspace_entries = 200000;
  uint64_t max_kv_bytes = 1u << 20;
  uint64_t max_tar_bytes = 64u << 20;
  storage::durability durability = storage::durability::process_crash;
  std::chrono::milliseconds idle_timeout{30000};
  /// A live session's operations run on its own worker thread (they block: exec, disk), which
  /// is started by the first operation and stopped after this long without one, so that an
  /// idle live session holds no thread.
  std::chrono::milliseconds worker_idle_timeout{5000};
};

/// Thread-safe after create(). Must outlive every session it made.
class session_host {
public:
  /// The column families the database must be opened with (besides the runtime's own).
  static std::vector<std::string> column_families();

  /// Detects bubblewrap and cgroups and opens the store in `db` (borrowed, must outlive the
  /// host). Errors: unavailable when bwrap is missing; invalid_argument for bad options or a
  /// database opened without column_families().
  static expected<std::unique_ptr<session_host>> create(storage::database& db,
                                                        session_host_options options);
  ~session_host();

  /// The kind to register with the directory: name "session", this host's factory, the idle
  /// timeout, persistence at passivation (each operation also stores its own changes).
  runtime::kind_spec kind();

  /// One activation of session `id` (what kind().factory returns).
  std::unique_ptr<runtime::virtual_actor> make_session(const std::string& id);

  /// Spawns the session catalog: a detached actor (its own thread, since store reads block)
  /// answering list_sessions_atom and count_sessions_atom (session_protocol.hpp). It borrows
  /// this host, which must outlive it: send it an exit before destroying the host.
  caf::actor spawn_catalog(caf::actor_system& sys);

  /// How this host limits memory/processes/CPU: cgroup_v1, cgroup_v2 or rlimit.
  limit_mechanism limits_mechanism() const;

  struct impl;

private:
  explicit session_host(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

} // namespace triplane::actors
