// Per-exec control groups: memory, process-count and CPU accounting for one sandboxed command's
// whole process tree, on cgroup v1 (this machine) or v2 (most production hosts).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "triplane/actors/session_protocol.hpp"
#include "triplane/runtime/error.hpp"

namespace triplane::actors::session {

/// Resource figures of one group, read after (or while) its processes run.
struct cgroup_usage {
  uint64_t cpu_user_ns = 0;
  uint64_t cpu_system_ns = 0;
  uint64_t peak_memory_bytes = 0;
  uint64_t oom_kills = 0;        ///< processes the kernel killed for the memory limit
  uint64_t pids_refused = 0;     ///< forks refused by the process limit
  bool has_cpu = false;
  bool has_memory = false;
};

/// One command's group. Created before the command starts; the child joins it by writing its
/// pid to every file in join_files() before it execs. Destruction kills whatever is still in
/// the group and removes it.
class exec_cgroup {
public:
  ~exec_cgroup();
  exec_cgroup(const exec_cgroup&) = delete;
  exec_cgroup& operator=(const exec_cgroup&) = delete;

  /// The cgroup.procs files the child writes its pid into.
  const std::vector<std::string>& join_files() const { return join_files_; }
  cgroup_usage usage() const;
  /// SIGKILLs every process in the group until it is empty (bounded retries). True when empty.
  bool kill_all();
  /// Host pids currently in the group.
  std::vector<int> pids() const;

  limit_mechanism memory = limit_mechanism::none;
  limit_mechanism processes = limit_mechanism::none;
  limit_mechanism cpu = limit_mechanism::none;  ///< accounting available (limit enforced by polling)

private:
  friend class cgroup_host;
  exec_cgroup() = default;
  /// One rmdir of each directory, no waiting. True when every one is gone.
  bool try_remove();
  bool v2_ = false;
  std::vector<std::string> dirs_;  ///< group directories, one per v1 controller or one for v2
  std::vector<std::string> join_files_;
  std::string memory_dir_, pids_dir_, cpu_dir_;
};

/// What the host offers, detected once per node. Never fails: a host without writable cgroups
/// yields a host whose create() returns nullptr (callers then fall back to rlimits).
class cgroup_host {
public:
  /// Finds where per-command groups can be made: under `v2_parent_dir` when given (a cgroup v2
  /// directory delegated to the node, holding no processes; unusable means no cgroups, not a
  /// fallback elsewhere), else under the node's own v2 group (when it is alone there, the node
  /// moves itself into a leaf child `triplane-node.<pid>` so that the group's controllers can
  /// be enabled for its children: cgroup v2 allows no processes in such a group), else in the
  /// v1 hierarchies. On v2, memory and pids limits need those controllers to be offered to the
  /// group; what is missing is reported per command as not enforced by cgroup.
  static std::unique_ptr<cgroup_host> detect(const std::string& v2_parent_dir = "");
  /// Waits for the groups retire() left to its thread.
  ~cgroup_host();
  limit_mechanism mechanism() const { return mechanism_; }
  /// One line for the node's log: the mechanism, where, and which controllers (or why none).
  std::string describe() const;
  /// A group named `name` (unique per node) with `limits` applied (0 = unlimited). On v1 only
  /// the controllers of requested limits are used (joining each costs the child an RCU grace
  /// period). nullptr when the host has no usable cgroups, nothing was requested (v1), or
  /// creation failed (reason in *why).
  std::unique_ptr<exec_cgroup> create(const std::string& name, const exec_limits& limits,
                                      std::string* why) const;
  /// Which controllers create() would join for `limits` (a bit mask of joins_*): a group made
  /// for limits A can take limits B (set_limits) when joins(B) is a subset of joins(A).
  unsigned joins(const exec_limits& limits) const;
  static constexpr unsigned joins_memory = 1, joins_pids = 2, joins_cpu = 4;
  /// Replaces the limits of a group made by create() (0 = unlimited), e.g. a group joined
  /// ahead of time by a pre-started sandbox. False (reason in *why) when `limits` need a
  /// controller the group did not join, or a write fails.
  bool set_limits(exec_cgroup& group, const exec_limits& limits, std::string* why) const;
  /// Removes `group` (killing whatever is left in it) without making the caller wait: a group
  /// stays busy until the kernel has reaped its last process, which can be milliseconds after
  /// the command's end (its pid namespace is still being torn down). What cannot be removed at
  /// once is removed by the host's own thread. Thread-safe.
  void retire(std::unique_ptr<exec_cgroup> group) const;

private:
  limit_mechanism mechanism_ = limit_mechanism::none;
  std::string v1_memory_, v1_pids_, v1_cpuacct_;  ///< parent dirs under which groups are made
  std::string v2_parent_;
  bool v2_memory_ = false, v2_pids_ = false, v2_cpu_ = false;  ///< enabled for v2_parent_'s children
  std::string why_;  ///< why no cgroups (mechanism_ none)
  // retire(): groups still busy, and the thread that removes them (started on first use).
  void reap() const;
  mutable std::mutex retire_mutex_;
  mutable std::condition_variable retire_cv_;
  mutable std::deque<std::unique_ptr<exec_cgroup>> retired_;
  mutable std::thread reaper_;
  mutable bool stopping_ = false;
};

} // namespace triplane::actors::session
