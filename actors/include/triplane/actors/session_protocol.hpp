// The session protocol: every message a sandbox session (virtual actor kind "session") answers,
// as CAF 0.17 inspectable types. The RPC layer maps its Cap'n Proto API onto exactly these types,
// so field order and meaning are stable: only append fields, never renumber or repurpose.
//
// Every request is `(<op>_atom, <request struct>)` or `(<op>_atom, <scalar>)` as documented per
// atom; every reply is the named result type, or a caf::error carrying a triplane::errc
// (invalid_argument for malformed paths/commands, not_found, limit_exceeded, ...), whose message
// names what was wrong. Sent through the directory as `(call_atom, "session", id, message)`.
//
// Register the types on every node with add_session_message_types(cfg) (session_types.hpp).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>

namespace triplane::actors {

// ---------------------------------------------------------------------------------------------
// Atoms (CAF 0.17: at most 10 characters). Prefix "ss_" keeps them apart from other layers.

/// `(exec_atom, exec_request)` -> exec_result. Runs a command to completion in the sandbox.
using exec_atom = caf::atom_constant<caf::atom("ss_exec")>;
/// `(exec_stream_atom, exec_request, caf::actor sink)` -> exec_result. Like exec, and while the
/// command runs sends `(exec_chunk_atom, exec_chunk)` messages to `sink` as output arrives; the
/// reply (the final exec_result) comes after the last chunk was sent. No flow control: the
/// session sends as fast as the command writes (bounded only by the output caps), and the
/// result carries the output as well. For sinks that keep up (local consumers, tests).
///
/// `(exec_stream_atom, exec_request, caf::actor sink, uint64_t window)` -> exec_result. The
/// same with end-to-end flow control by credit in bytes; `window` (> 0, else invalid_argument)
/// is the sink's initial credit:
///  - every chunk's data consumes its size in credit; the session never has more than the
///    credit outstanding: bytes sent minus bytes granted back is at most `window`;
///  - the sink grants more by sending `(exec_credit_atom, uint64_t bytes)` to the sender of the
///    chunks (the session; chunks are sent with it as sender) as it has consumed them,
///    typically each chunk's size once that chunk has been passed on. Credit from any actor
///    but `sink`, or for an exec that has ended, is ignored;
///  - while the session has no credit it stops reading the command's stdout/stderr pipes, so a
///    command that writes faster than the sink drains blocks in write() (its wall clock goes
///    on: exec_request.timeout_ms still kills it). Output after the caps is read and dropped
///    without credit;
///  - the final exec_result's stdout_data/stderr_data are empty (every byte went to the sink;
///    the truncated flags still say whether the caps cut output). A sink that grants nothing
///    more holds the command until its timeout or until it is cancelled (exec_cancel_atom);
///    output still in the pipes when the command ends is delivered under the same credit until
///    the timeout, then dropped (the result's message says so).
using exec_stream_atom = caf::atom_constant<caf::atom("ss_execs")>;
/// Tag of the chunk messages a streaming exec sends to its sink: `(exec_chunk_atom, exec_chunk)`,
/// sent with the session as sender. Without a window (see exec_stream_atom) chunks are plain
/// sends (no flow control): what one exec can send is bounded by its output caps
/// (exec_limits::stdout_cap_bytes / stderr_cap_bytes).
using exec_chunk_atom = caf::atom_constant<caf::atom("ss_chunk")>;
/// `(exec_credit_atom, uint64_t bytes)`, no reply: a flow-controlled streaming exec's sink grants
/// `bytes` more credit. Sent straight to the chunks' sender (not through the directory).
using exec_credit_atom = caf::atom_constant<caf::atom("ss_credit")>;

/// `(exec_cancel_atom)` -> bool: kills the process tree of the exec or streaming exec running
/// now (its reply then says term_signal 9 and "cancelled"); false when none was running.
/// Answered at once, also while that exec runs.
///
/// `(exec_cancel_atom, caf::actor_addr owner)` -> bool: cancels only the execs whose request
/// came from `owner` (the sender of the exec/exec_stream request as the session saw it: the
/// directory forwards the caller's own address) or that stream to the sink `owner`. One that
/// runs is killed as above; one still queued behind other operations of the session is removed:
/// it never runs and its requester gets errc::cancelled. false when no such exec was queued or
/// running. Send it after the exec request, from the same actor and along the same path (e.g.
/// both through the directory): then it cannot overtake the request.
using exec_cancel_atom = caf::atom_constant<caf::atom("ss_cancel")>;

/// `(bg_start_atom, exec_request)` -> bg_status. Starts a background process; the session stays
/// live (is not passivated) while any background process runs. exec_request.timeout_ms applies.
using bg_start_atom = caf::atom_constant<caf::atom("ss_bgstart")>;
/// `(bg_poll_atom, uint64_t bg_id)` -> bg_status, without waiting. not_found for unknown ids.
using bg_poll_atom = caf::atom_constant<caf::atom("ss_bgpoll")>;
/// `(bg_wait_atom, uint64_t bg_id, uint64_t timeout_ms)` -> bg_status: replies when the process
/// has ended or after timeout_ms (then `running` is still true). Output read so far is included.
using bg_wait_atom = caf::atom_constant<caf::atom("ss_bgwait")>;
/// `(bg_signal_atom, uint64_t bg_id, int32_t signal)` -> bg_status. Delivers `signal` to the
/// process group of the background process. invalid_argument for a signal number out of range.
using bg_signal_atom = caf::atom_constant<caf::atom("ss_bgsig")>;
/// `(bg_list_atom)` -> std::vector<bg_status> (every background process still known).
using bg_list_atom = caf::atom_constant<caf::atom("ss_bglist")>;

/// `(file_write_atom, file_write_request)` -> file_entry (the written file's stat).
using file_write_atom = caf::atom_constant<caf::atom("ss_fwrite")>;
/// `(file_read_atom, file_read_request)` -> file_data.
using file_read_atom = caf::atom_constant<caf::atom("ss_fread")>;
/// `(file_list_atom, file_list_request)` -> std::vector<file_entry>, sorted by path.
using file_list_atom = caf::atom_constant<caf::atom("ss_flist")>;
/// `(file_stat_atom, std::string path)` -> file_entry. Does not follow a final symlink.
using file_stat_atom = caf::atom_constant<caf::atom("ss_fstat")>;
/// `(mkdir_atom, mkdir_request)` -> file_entry of the directory.
using mkdir_atom = caf::atom_constant<caf::atom("ss_mkdir")>;
/// `(remove_atom, remove_request)` -> uint64_t: number of entries removed.
using remove_atom = caf::atom_constant<caf::atom("ss_remove")>;
/// `(move_atom, move_request)` -> file_entry of the destination.
using move_atom = caf::atom_constant<caf::atom("ss_move")>;
/// `(tar_out_atom, std::string dir)` -> std::string: a POSIX ustar archive of `dir` ("" or "."
/// = the whole workspace); limit_exceeded when it would exceed session_settings.max_tar_bytes.
using tar_out_atom = caf::atom_constant<caf::atom("ss_tarout")>;
/// `(tar_in_atom, tar_in_request)` -> uint64_t: number of entries extracted. GNU tar runs
/// inside the sandbox (so it can only write the workspace); it strips leading '/', skips members
/// with '..' and cannot create devices. All or nothing: a tar failure is invalid_argument with
/// tar's message, a device or fifo member (a workspace holds regular files, directories,
/// symlinks and hard links only) is invalid_argument naming it and its type, a member that
/// would replace a directory by a non-directory (or the reverse) is invalid_argument naming it,
/// a workspace over its quota is limit_exceeded; in each case nothing of the archive is
/// extracted. Hard-link members stay hard links, also once the session was stored.
using tar_in_atom = caf::atom_constant<caf::atom("ss_tarin")>;

/// `(kv_get_atom, std::string key)` -> kv_value (found = false when absent). (Not a
/// caf::optional: CAF 0.17 unwraps optionals in replies, which breaks typed forwarding.)
using kv_get_atom = caf::atom_constant<caf::atom("ss_kvget")>;
/// `(kv_put_atom, std::string key, std::string value)` -> bool (true when the key was new).
/// limit_exceeded beyond session_settings.max_kv_bytes in total; invalid_argument for a key
/// that is empty, over 1,024 bytes or holds a NUL byte (values are any bytes).
using kv_put_atom = caf::atom_constant<caf::atom("ss_kvput")>;
/// `(kv_delete_atom, std::string key)` -> bool (true when the key existed).
using kv_delete_atom = caf::atom_constant<caf::atom("ss_kvdel")>;
/// `(kv_list_atom, std::string prefix)` -> std::vector<kv_entry>, sorted by key.
using kv_list_atom = caf::atom_constant<caf::atom("ss_kvlist")>;

/// `(env_set_atom, std::map<string,string> set, std::vector<string> unset)` -> session_info.
/// Changes the session's persistent environment (applied to every later exec).
using env_set_atom = caf::atom_constant<caf::atom("ss_envset")>;
/// `(cwd_set_atom, std::string dir)` -> session_info. Sets the persistent working directory
/// (workspace-relative; must exist and be a directory).
using cwd_set_atom = caf::atom_constant<caf::atom("ss_cwdset")>;
/// `(configure_atom, session_settings)` -> session_info. Replaces the session's settings.
using configure_atom = caf::atom_constant<caf::atom("ss_config")>;

/// `(fork_atom, std::string new_id)` -> session_info of the new session. The new session holds a
/// copy of this one's files (sharing stored chunks, no content copy), env, cwd, kv, settings;
/// not its background processes or history. already_exists when new_id is taken.
using fork_atom = caf::atom_constant<caf::atom("ss_fork")>;
/// `(destroy_atom)` -> bool (true). Removes the session's workspace, manifest, state and every
/// stored chunk only it referenced; kills its processes. The id may be reused afterwards.
using destroy_atom = caf::atom_constant<caf::atom("ss_destroy")>;
/// `(info_atom)` -> session_info.
using info_atom = caf::atom_constant<caf::atom("ss_info")>;

// The session catalog (session_host::spawn_catalog): which sessions are stored, read straight
// from the store without activating any. Sent to the catalog actor, not through the directory.

/// Most ids one list_sessions_atom request may ask for.
constexpr uint32_t max_listed_sessions = 10000;
/// `(list_sessions_atom, std::string prefix, std::string after, uint32_t limit)` ->
/// std::vector<std::string>: up to `limit` (1..max_listed_sessions, else invalid_argument) ids
/// of stored sessions that begin with `prefix` and sort after `after` (empty: from the first),
/// in byte order.
using list_sessions_atom = caf::atom_constant<caf::atom("ss_list")>;
/// `(count_sessions_atom, std::string prefix)` -> uint64_t: the number of stored sessions whose
/// id begins with `prefix` (a scan of them).
using count_sessions_atom = caf::atom_constant<caf::atom("ss_count")>;

// ---------------------------------------------------------------------------------------------
// Limits and settings

/// How a limit was enforced for one exec.
enum class limit_mechanism : uint8_t {
  none = 0,       ///< not enforced (unrequested, or the host offers no way)
  cgroup_v2 = 1,  ///< a per-exec cgroup v2 group
  cgroup_v1 = 2,  ///< a per-exec group in the cgroup v1 controller hierarchy
  rlimit = 3,     ///< setrlimit() on the sandbox's process (per process, not per tree)
  supervisor = 4, ///< enforced by the session itself (wall clock, output caps, quota check)
};

/// Per-exec resource limits. 0 in any field means "the session's default" (session_settings);
/// a default of 0 means unlimited.
struct exec_limits {
  uint64_t memory_bytes = 0;     ///< resident memory of the whole process tree
  uint32_t max_processes = 0;    ///< tasks (processes + threads) alive at once in the tree
  uint64_t cpu_time_ms = 0;      ///< CPU time of the tree; exceeded -> killed
  uint64_t max_file_bytes = 0;   ///< largest single file a process may write (RLIMIT_FSIZE)
  uint64_t stdout_cap_bytes = 0; ///< bytes of stdout kept; the rest is read and dropped
  uint64_t stderr_cap_bytes = 0; ///< bytes of stderr kept
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, exec_limits& x) {
  return f(caf::meta::type_name("tp_exec_limits"), x.memory_bytes, x.max_processes,
           x.cpu_time_ms, x.max_file_bytes, x.stdout_cap_bytes, x.stderr_cap_bytes);
}

/// Which network a session's commands see.
enum class network_policy : uint8_t {
  none = 0,      ///< a private network namespace with no interfaces up (default)
  loopback = 1,  ///< a private network namespace with only `lo` up
};

/// Persistent per-session settings (part of the session's state; copied by fork).
struct session_settings {
  exec_limits default_limits;        ///< used where an exec_request's limits field is 0
  uint64_t default_timeout_ms = 0;   ///< wall clock per exec when the request gives 0
  uint64_t workspace_quota_bytes = 0;///< sum of file sizes in the workspace; 0 = node default
  uint64_t max_kv_bytes = 0;         ///< sum of kv key+value sizes; 0 = node default
  uint64_t max_tar_bytes = 0;        ///< largest tar_out archive; 0 = node default
  network_policy network = network_policy::none;
  std::string owner;                 ///< opaque owner tag (set by the caller, reported in info)
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, session_settings& x) {
  return f(caf::meta::type_name("tp_session_settings"), x.default_limits, x.default_timeout_ms,
           x.workspace_quota_bytes, x.max_kv_bytes, x.max_tar_bytes, x.network, x.owner);
}

// ---------------------------------------------------------------------------------------------
// exec

/// One command. Exactly one of `argv` (non-empty, argv[0] looked up in PATH inside the sandbox)
/// or `shell` (run as `/bin/sh -c shell`) must be given; both or neither is invalid_argument.
struct exec_request {
  std::vector<std::string> argv;
  std::string shell;
  std::string stdin_data;                 ///< written to the command's stdin, then EOF
  std::map<std::string, std::string> env; ///< overrides on top of the session's environment
  std::vector<std::string> env_unset;     ///< names removed from the environment
  std::string cwd;                        ///< workspace-relative; "" = the session's cwd
  uint64_t timeout_ms = 0;                ///< wall clock; 0 = session default (node default)
  exec_limits limits;                     ///< 0 fields = session defaults
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, exec_request& x) {
  return f(caf::meta::type_name("tp_exec_request"), x.argv, x.shell, x.stdin_data, x.env,
           x.env_unset, x.cwd, x.timeout_ms, x.limits);
}

/// Which mechanism enforced each limit of one exec, so callers know what they can rely on.
struct enforced_limits {
  limit_mechanism memory = limit_mechanism::none;
  limit_mechanism processes = limit_mechanism::none;
  limit_mechanism cpu_time = limit_mechanism::none;
  limit_mechanism file_size = limit_mechanism::none;
  limit_mechanism wall_clock = limit_mechanism::none;
  limit_mechanism workspace_quota = limit_mechanism::none;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, enforced_limits& x) {
  return f(caf::meta::type_name("tp_enforced_limits"), x.memory, x.processes, x.cpu_time,
           x.file_size, x.wall_clock, x.workspace_quota);
}

/// The outcome of one command. A command that ran is a result, whatever its exit status;
/// errors (caf::error) are reserved for requests that could not run (bad input, no sandbox).
struct exec_result {
  bool exited = false;        ///< true: ended by exit(), see exit_code
  int32_t exit_code = -1;     ///< exit status when `exited`; else -1
  int32_t term_signal = 0;    ///< the signal that ended it when !exited (e.g. 9 after a timeout)
  std::string stdout_data;    ///< at most the stdout cap bytes
  std::string stderr_data;    ///< at most the stderr cap bytes
  bool stdout_truncated = false;
  bool stderr_truncated = false;
  bool timed_out = false;           ///< the wall-clock timeout killed the process tree
  bool memory_exceeded = false;     ///< the memory limit was hit (cgroup OOM kill observed)
  bool cpu_time_exceeded = false;   ///< the CPU time limit killed it
  bool quota_exceeded = false;      ///< the workspace went over its quota (the command was killed
                                    ///< for it, or it was over afterwards); what the command
                                    ///< changed was not kept (see message)
  std::string message;              ///< human-readable note on the above, empty when clean
  uint64_t duration_us = 0;         ///< wall clock from start to the tree's end
  uint64_t cpu_user_us = 0;         ///< CPU time of the tree (cgroup, else the direct child's)
  uint64_t cpu_system_us = 0;
  uint64_t peak_memory_bytes = 0;   ///< cgroup max usage; else max RSS of the biggest process
  enforced_limits enforced;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, exec_result& x) {
  return f(caf::meta::type_name("tp_exec_result"), x.exited, x.exit_code, x.term_signal,
           x.stdout_data, x.stderr_data, x.stdout_truncated, x.stderr_truncated, x.timed_out,
           x.memory_exceeded, x.cpu_time_exceeded, x.quota_exceeded, x.message, x.duration_us,
           x.cpu_user_us, x.cpu_system_us, x.peak_memory_bytes, x.enforced);
}

/// Which stream a chunk came from.
enum class output_stream : uint8_t { out = 1, err = 2 };

/// A piece of a streaming exec's output, in order per stream. `seq` counts chunks of one exec
/// from 0 so a sink can detect loss. Chunks stop at the caps; the final exec_result then says
/// truncated (without flow control its stdout_data/stderr_data hold the same capped bytes; with
/// it they are empty).
struct exec_chunk {
  uint64_t seq = 0;
  output_stream stream = output_stream::out;
  std::string data;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, exec_chunk& x) {
  return f(caf::meta::type_name("tp_exec_chunk"), x.seq, x.stream, x.data);
}

/// A background process as last observed.
struct bg_status {
  uint64_t bg_id = 0;        ///< session-local id, never reused within an activation
  std::vector<std::string> argv; ///< what was started (shell commands as sh -c ...)
  bool running = true;
  exec_result result;        ///< output so far; exit fields valid when !running
  uint64_t started_unix_ms = 0;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, bg_status& x) {
  return f(caf::meta::type_name("tp_bg_status"), x.bg_id, x.argv, x.running, x.result,
           x.started_unix_ms);
}

// ---------------------------------------------------------------------------------------------
// files. All paths are workspace-relative: no leading '/', no "..", no NUL, each name at most
// 255 bytes, the whole path at most 4096 bytes; "" and "." denote the workspace root where a
// directory is meant. No operation follows a symlink out of the workspace.

enum class file_type : uint8_t { regular = 0, directory = 1, symlink = 2, other = 3 };

/// stat() of one entry (not following a final symlink).
struct file_entry {
  std::string path;        ///< workspace-relative
  file_type type = file_type::regular;
  uint32_t mode = 0;       ///< permission bits (07777)
  uint64_t size = 0;       ///< bytes (regular files, symlink target length)
  int64_t mtime_ns = 0;    ///< modification time, ns since the epoch
  std::string link_target; ///< symlinks only
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, file_entry& x) {
  return f(caf::meta::type_name("tp_file_entry"), x.path, x.type, x.mode, x.size, x.mtime_ns,
           x.link_target);
}

struct file_write_request {
  std::string path;
  std::string data;
  uint32_t mode = 0644;        ///< permission bits for a new file (and applied to an old one)
  bool create_parents = false; ///< create missing parent directories (mode 0755)
  bool append = false;         ///< append instead of replacing
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, file_write_request& x) {
  return f(caf::meta::type_name("tp_file_write_request"), x.path, x.data, x.mode,
           x.create_parents, x.append);
}

struct file_read_request {
  std::string path;
  uint64_t offset = 0;
  uint64_t length = 0;   ///< 0 = to the end (bounded by the node's max read size)
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, file_read_request& x) {
  return f(caf::meta::type_name("tp_file_read_request"), x.path, x.offset, x.length);
}

struct file_data {
  std::string data;
  uint64_t total_size = 0; ///< the file's size
  bool eof = false;        ///< the range reached the end of the file
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, file_data& x) {
  return f(caf::meta::type_name("tp_file_data"), x.data, x.total_size, x.eof);
}

struct file_list_request {
  std::string path;        ///< directory to list ("" = root)
  bool recursive = false;  ///< descend into subdirectories (never through symlinks)
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, file_list_request& x) {
  return f(caf::meta::type_name("tp_file_list_request"), x.path, x.recursive);
}

struct mkdir_request {
  std::string path;
  bool parents = false;   ///< create missing parents; an existing directory is then not an error
  uint32_t mode = 0755;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, mkdir_request& x) {
  return f(caf::meta::type_name("tp_mkdir_request"), x.path, x.parents, x.mode);
}

struct remove_request {
  std::string path;        ///< may not be the root
  bool recursive = false;  ///< required for a non-empty directory
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, remove_request& x) {
  return f(caf::meta::type_name("tp_remove_request"), x.path, x.recursive);
}

struct move_request {
  std::string from;
  std::string to;
  bool overwrite = false;  ///< replace an existing destination (never a non-empty directory)
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, move_request& x) {
  return f(caf::meta::type_name("tp_move_request"), x.from, x.to, x.overwrite);
}

struct tar_in_request {
  std::string dir;     ///< destination directory (created if missing); "" = root
  std::string archive; ///< ustar/GNU tar bytes (uncompressed)
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, tar_in_request& x) {
  return f(caf::meta::type_name("tp_tar_in_request"), x.dir, x.archive);
}

// ---------------------------------------------------------------------------------------------
// kv, history, info

/// The reply to kv_get.
struct kv_value {
  bool found = false;
  std::string value;  ///< empty when !found
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_value& x) {
  return f(caf::meta::type_name("tp_kv_value"), x.found, x.value);
}

struct kv_entry {
  std::string key;
  std::string value;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_entry& x) {
  return f(caf::meta::type_name("tp_kv_entry"), x.key, x.value);
}

/// One entry of the bounded command history (the newest N are kept).
struct command_record {
  std::vector<std::string> argv;  ///< shell commands as {"/bin/sh", "-c", shell}
  bool exited = false;
  int32_t exit_code = -1;
  int32_t term_signal = 0;
  bool timed_out = false;
  uint64_t duration_us = 0;
  uint64_t started_unix_ms = 0;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, command_record& x) {
  return f(caf::meta::type_name("tp_command_record"), x.argv, x.exited, x.exit_code,
           x.term_signal, x.timed_out, x.duration_us, x.started_unix_ms);
}

struct session_info {
  std::string id;
  uint64_t created_unix_ms = 0;
  uint64_t last_used_unix_ms = 0;
  session_settings settings;
  std::map<std::string, std::string> env; ///< the persistent environment
  std::string cwd;                        ///< workspace-relative
  uint64_t file_count = 0;                ///< regular files in the manifest
  uint64_t workspace_bytes = 0;           ///< sum of their sizes
  uint64_t running_background = 0;        ///< while > 0 the session is not passivated
  std::vector<command_record> history;    ///< oldest first
  std::string forked_from;                ///< parent session id, "" when created fresh
  bool stored = false;                    ///< the session has stored state; false for an id
                                          ///< never used (or destroyed) and not changed since
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, session_info& x) {
  return f(caf::meta::type_name("tp_session_info"), x.id, x.created_unix_ms,
           x.last_used_unix_ms, x.settings, x.env, x.cwd, x.file_count, x.workspace_bytes,
           x.running_background, x.history, x.forked_from, x.stored);
}

} // namespace triplane::actors
