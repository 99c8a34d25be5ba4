// One sandbox session's behaviour as a plain C++ object: exec, files, kv, env, history,
// persistence (sync, passivate, rehydrate), fork and destroy. Operations on the state serialise
// on an internal mutex; bg_poll/bg_wait/bg_signal/bg_list are for the worker thread only;
// cancel_exec() and running_background() may be called from anywhere. Calls may block (exec,
// disk): never call it on a CAF scheduler thread except at passivation, or through the try_
// functions, which never wait.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "session/sandbox_pool.hpp"
#include "session/sandbox_process.hpp"
#include "session/session_store.hpp"
#include "session/workspace.hpp"
#include "triplane/actors/session_protocol.hpp"

namespace triplane::actors::session {

/// What every session of a node shares. All pointers borrowed; they outlive every session.
struct node_resources {
  session_store* store = nullptr;
  const sandbox_config* sandbox = nullptr;
  /// Pre-started sandboxes for first execs (nullptr = each exec starts its own).
  sandbox_pool* pool = nullptr;
  std::string workspaces_dir;         ///< each session's workspace is workspaces_dir/<hex id>
  session_settings defaults;          ///< where a session's own settings leave 0
  size_t history_limit = 100;         ///< commands kept in the history
  bool use_openat2 = true;
  uint64_t max_workspace_bytes = 256ull << 20;  ///< quota when the session sets none
  /// Files, directories and symlinks a workspace may hold (0 = no limit). Empty files cost no
  /// bytes of quota, but each costs a host inode and a manifest entry stored at every save.
  uint64_t max_workspace_entries = 200000;
  uint64_t max_kv_bytes = 1u << 20;
  uint64_t max_tar_bytes = 64u << 20;
  uint64_t max_timeout_ms = 3600000;
};

/// Statistics of the last rehydration / sync, for tests and benchmarks.
struct persistence_stats {
  uint64_t materialize_us = 0;   ///< last workspace materialization
  uint64_t files_read = 0;       ///< files hashed by the last sync
  uint64_t chunks_written = 0;   ///< chunks supplied to the store by the last sync
  bool materialized = false;
};

/// Where the last exec's wall time went, in microseconds (benchmarks read it).
struct exec_phases {
  uint64_t prepare_us = 0;      ///< resolving the request, preparing the workspace directory
  uint64_t spawn_us = 0;        ///< sandbox_process::start (clone + exec of bwrap)
  uint64_t materialize_us = 0;  ///< filling the workspace while bwrap sets up (first exec only)
  uint64_t run_us = 0;          ///< release (or start) until bwrap and its tree have ended
  uint64_t verify_us = 0;       ///< of run_us: the chunks' SHA-256 check beside the command
  uint64_t sync_us = 0;         ///< change detection and storing the record afterwards
  bool pooled = false;          ///< ran in a pre-started sandbox (sandbox_pool)
  bool warm = false;            ///< ran in the sandbox pre-started after the previous exec
};

class session_core {
public:
  /// Loads the session's record (or starts a fresh one). Cheap: the workspace is only
  /// materialized on first use (lazy). corrupted when the stored record is unreadable.
  static expected<std::unique_ptr<session_core>> activate(const node_resources& node,
                                                          const std::string& id);
  ~session_core();  ///< kills background processes; leaves the workspace (see passivate)

  const std::string& id() const { return record_.id; }

  /// Runs one command. `credit` (with a sink) puts its output under flow control, see
  /// sandbox_process::start. A non-zero `ticket` names the exec for cancel_exec(ticket) and
  /// grant_exec_credit; tickets must reach exec() in increasing order (the session actor
  /// numbers execs in the order it hands them to the worker). An exec whose ticket was
  /// cancelled before it started does not run: errc::cancelled.
  expected<exec_result> exec(const exec_request& req, sandbox_process::output_sink sink = nullptr,
                             std::shared_ptr<output_credit> credit = nullptr, uint64_t ticket = 0);
  /// Kills the exec running now, if any. Thread-safe: may be called while exec() blocks.
  bool cancel_exec();
  /// Cancels the exec with `ticket`: kills it when it runs now, or marks it so that it never
  /// runs when it has not started yet. false when it already ended. Thread-safe.
  bool cancel_exec(uint64_t ticket);
  /// Adds `bytes` of credit to the exec with `ticket` if it runs now under flow control;
  /// false otherwise (credit for an ended exec is dropped). Thread-safe.
  bool grant_exec_credit(uint64_t ticket, uint64_t bytes);

  /// Background processes. `on_end(bg_id)` runs on the process's own thread when it ends.
  expected<bg_status> bg_start(const exec_request& req, std::function<void(uint64_t)> on_end);
  expected<bg_status> bg_poll(uint64_t bg_id);
  expected<bg_status> bg_wait(uint64_t bg_id, uint64_t timeout_ms);
  expected<bg_status> bg_signal(uint64_t bg_id, int32_t signo);
  std::vector<bg_status> bg_list();
  /// Background processes still running (thread-safe).
  size_t running_background() const;

  expected<file_entry> write_file(const file_write_request& req);
  expected<file_data> read_file(const file_read_request& req);
  expected<std::vector<file_entry>> list_files(const file_list_request& req);
  expected<file_entry> stat_file(const std::string& path);
  expected<file_entry> make_directory(const mkdir_request& req);
  expected<uint64_t> remove_file(const remove_request& req);
  expected<file_entry> move_file(const move_request& req);
  expected<std::string> tar_out(const std::string& dir);
  expected<uint64_t> tar_in(const tar_in_request& req);

  kv_value kv_get(const std::string& key);
  expected<bool> kv_put(const std::string& key, std::string value);
  bool kv_delete(const std::string& key);
  std::vector<kv_entry> kv_list(const std::string& prefix);
  /// kv_get and kv_list that never wait: nullopt when another operation holds the state (an
  /// exec, a file operation), or when the session was never stored (then a fork may have
  /// stored it meanwhile, and finding out takes a read of the store). Safe on a CAF scheduler
  /// thread.
  std::optional<kv_value> try_kv_get(const std::string& key);
  std::optional<std::vector<kv_entry>> try_kv_list(const std::string& prefix);

  expected<session_info> set_env(const std::map<std::string, std::string>& set,
                                 const std::vector<std::string>& unset);
  expected<session_info> set_cwd(const std::string& dir);
  expected<session_info> configure(const session_settings& settings);
  session_info info();

  /// Writes what changed (files since the last sync, settings, kv, ...) in one atomic batch.
  caf::error persist();
  /// persist(), then removes the workspace. Refused (unavailable) while background processes run.
  caf::error passivate();
  /// Stores a copy under new_id sharing all chunks. Persists this session first.
  expected<session_info> fork(const std::string& new_id);
  /// Kills processes, removes the workspace and the stored record; chunks only this session
  /// referenced are reclaimed. Afterwards the object is a fresh, empty session with the same id,
  /// stored only once something changes.
  caf::error destroy();

  const persistence_stats& stats() const { return stats_; }
  const exec_phases& last_exec_phases() const { return phases_; }
  /// The workspace directory on the host (materialized or not). A first exec through a
  /// pre-started sandbox moves it to the directory that sandbox binds.
  const std::string& workspace_dir() const { return workspace_dir_; }

  /// Kills and reaps the sandbox pre-started for the next exec, if any. exec() keeps one ready
  /// on the live workspace (when the node has a sandbox pool) and it dies with the thread that
  /// ran that exec: the session's worker calls this as it stops.
  void drop_warm_sandbox();

private:
  struct background;
  explicit session_core(const node_resources& node);
  /// A session never stored by this copy may have been created meanwhile by a fork onto its id
  /// (the store only refuses a fork onto an id with a record, and this copy may be live: looked
  /// at, or destroyed and kept as a fresh one): then it takes the fork's record. Every
  /// operation calls it first; a no-op once stored.
  caf::error adopt_forked_record();
  caf::error ensure_materialized();
  /// exec(); with !sync_after the workspace's changes are left for the caller to store (or
  /// discard) and the result's quota check is the caller's too.
  expected<exec_result> run_command(const exec_request& req, sandbox_process::output_sink sink,
                                    std::shared_ptr<output_credit> credit, bool sync_after);
  expected<launch_spec> resolve(const exec_request& req);
  /// The cgroup name of this session's `launch`-th sandbox (unique per node).
  std::string group_name(uint64_t launch) const;
  caf::error sync_and_save(bool* quota_exceeded, std::string* quota_message);
  void record_history(const std::vector<std::string>& argv, const exec_result& r, uint64_t started);
  bg_status status_of(background& bg);
  uint64_t quota() const;

  const node_resources& node_;
  session_record record_;
  manifest stored_files_;        ///< the manifest as last stored (for refcount deltas)
  bool stored_ = false;          ///< a record exists in the store
  bool dirty_ = false;           ///< non-file state changed since the last save
  std::string workspace_dir_;
  std::string default_workspace_dir_;  ///< workspaces_dir/<hex of sha256(id)>
  std::unique_ptr<workspace> workspace_;
  /// Pre-started on workspace_dir_ after an exec, so that the next one costs only its command
  /// (sandbox_pool::prestart_for). Gone whenever the workspace directory goes or changes.
  std::unique_ptr<sandbox_process> warm_;
  bool warm_fits_ = false;  ///< the last command could have run in one (else none is kept)
  uint64_t execs_since_activation_ = 0;
  persistence_stats stats_;
  exec_phases phases_;
  uint64_t launches_ = 0;
  std::map<uint64_t, std::unique_ptr<background>> background_;
  bool scan_needed_ = false;
  std::atomic<bool> exec_running_{false};
  /// Guards the ticket fields below (not op_mutex_: that one is held by the running exec).
  std::mutex ticket_mutex_;
  uint64_t running_ticket_ = 0;                  ///< 0: none (or an exec without a ticket)
  uint64_t last_started_ticket_ = 0;
  std::shared_ptr<output_credit> running_credit_;
  std::set<uint64_t> cancelled_tickets_;         ///< cancelled before they started
  /// Held by every operation on the session's state, so the runtime's thread (snapshot and
  /// on_passivate at shutdown) never overlaps the worker's. Recursive: operations nest.
  mutable std::recursive_mutex op_mutex_;
  std::atomic<bool> cancel_requested_{false};    ///< a background process may have changed files since the last scan
};

} // namespace triplane::actors::session
