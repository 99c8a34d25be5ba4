// One command running under bubblewrap: namespaces, read-only system, the workspace as the only
// writable path, limits through cgroups or rlimits, output capped, a wall-clock deadline that
// kills the whole process tree. Blocking calls (pump) belong on a thread that is not a CAF
// scheduler thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "session/cgroup_limits.hpp"
#include "session/output_credit.hpp"
#include "triplane/actors/session_protocol.hpp"
#include "triplane/runtime/error.hpp"

struct rusage;

namespace triplane::actors::session {

/// Node-wide sandbox settings. Built once (sandbox_config::detect) and shared read-only.
struct sandbox_config {
  std::string bwrap_path;                  ///< absolute path of bwrap
  uint32_t uid = 1000, gid = 1000;         ///< identity inside the sandbox (holds no capabilities)
  std::vector<std::string> ro_binds;       ///< host paths bound read-only at the same place
  std::vector<std::pair<std::string, std::string>> symlinks;  ///< (target, link) e.g. usr/bin,/bin
  std::string etc_dir;                     ///< staged copy bound read-only as /etc ("" = none)
  uint64_t tmp_bytes = 64u << 20;          ///< size of the private /tmp tmpfs
  const cgroup_host* cgroups = nullptr;    ///< borrowed; nullptr = rlimits only
  /// Host path of triplane-sandbox-exec, the first program of a pre-started sandbox
  /// (sandbox_process::prestart); "" = none found, no sandboxes are pre-started.
  std::string exec_shim;

  /// Finds bwrap, triplane-sandbox-exec (beside the running program, else at its build path)
  /// and the system paths to expose. Errors: unavailable when bwrap is missing.
  /// With a non-empty `staging_dir`, the needed /etc files are copied there once (symlinks as
  /// symlinks) and bound as /etc with a single mount instead of one mount pair per file: bwrap
  /// spends most of its time in mount(2), so this roughly halves the cost of an exec.
  static expected<sandbox_config> detect(const cgroup_host* cgroups,
                                         const std::string& staging_dir = {});
};

/// Everything one launch needs, fully resolved (no defaults left).
struct launch_spec {
  std::string workspace;                ///< host directory bound at /workspace
  std::vector<std::string> argv;        ///< non-empty
  std::vector<std::string> env;         ///< "NAME=value", the complete environment
  std::string cwd = "/workspace";       ///< inside the sandbox
  std::string stdin_data;
  uint64_t timeout_ms = 0;              ///< 0 = none
  exec_limits limits;                   ///< 0 = unlimited; caps 0 = nothing kept
  network_policy network = network_policy::none;
  std::string group_name;               ///< unique cgroup name for this launch
  bool hold = false;                    ///< set up the sandbox but run the command only after
                                        ///< release() (the workspace may be filled meanwhile)
};

class sandbox_process {
public:
  /// Called from pump() with each piece of kept (capped) output.
  using output_sink = std::function<void(output_stream, std::string_view)>;

  /// Starts the command. Errors: invalid_argument (empty argv), io_error (pipes/fork failed).
  /// A command that cannot be executed inside the sandbox (missing, not executable) still
  /// starts and ends with exit code 126/127 and bwrap's message on stderr.
  ///
  /// With `credit` (flow control; needs a sink) output below the caps is read from the pipes
  /// only while credit lasts, each byte handed to the sink consuming one byte of credit, so a
  /// command writing faster than the sink drains blocks on its full pipe. The output then goes
  /// to the sink only: result()'s stdout_data/stderr_data stay empty (the truncated flags still
  /// say where the caps cut). After the command has ended its pipes are drained under the
  /// same credit, until the wall-clock deadline (then the rest is dropped and the result says
  /// so); a tree ended by kill_tree() (cancel, timeout, limits) has the rest dropped at once.
  static expected<std::unique_ptr<sandbox_process>> start(
    const sandbox_config& config, launch_spec spec, output_sink sink,
    std::shared_ptr<output_credit> credit = nullptr);
  /// Starts a sandbox before its command is known (sandbox_pool): network none, `workspace`
  /// bound at /workspace, the cgroup made for `cgroup_limits` already joined (the cost of
  /// joining is paid now, not by the command). It sets itself up and waits for assign() and
  /// release(). Errors: unavailable without config.exec_shim; otherwise as start(). `config`
  /// must outlive the process.
  static expected<std::unique_ptr<sandbox_process>> prestart(const sandbox_config& config,
                                                             const std::string& workspace,
                                                             const exec_limits& cgroup_limits,
                                                             const std::string& group_name);
  /// Gives a pre-started sandbox its command: argv, env, cwd, stdin, timeout and limits of
  /// `spec` (its workspace, network and group_name are the sandbox's own), with `credit` as in
  /// start(). Limits are enforced as start() would enforce them; the clock starts now; the
  /// command runs after release(). Errors: invalid_argument (empty argv, credit without a
  /// sink); unavailable when the sandbox has ended or its cgroup cannot take spec's limits
  /// (start a fresh one instead); internal when not pre-started or already assigned. `spec` is
  /// moved from only on success.
  caf::error assign(launch_spec& spec, output_sink sink, std::shared_ptr<output_credit> credit = nullptr);
  ~sandbox_process();  ///< kills the tree if still running and reaps it

  /// Moves output, feeds stdin, enforces the deadline and CPU limit, for at most `wait_ms`.
  /// Returns true once the whole tree has ended and result() is final.
  bool pump(int wait_ms);
  /// Runs pump() until the end.
  const exec_result& wait();
  /// Sends `signo` to the command's process group inside the sandbox (SIGKILL: the whole tree).
  void signal(int signo);
  /// Kills every process of the tree now (result gets term_signal 9). Once the tree has ended
  /// and only its output is still being drained (flow control), drops that output instead.
  void kill_tree();
  /// Lets a held command (launch_spec::hold) run. No-op otherwise. A held process that is
  /// destroyed or killed before release() never runs the command.
  void release();
  bool finished() const { return finished_; }
  /// Output so far; exit fields, usage and enforced limits once finished().
  const exec_result& result() const { return result_; }
  int host_pid() const { return bwrap_pid_; }

  sandbox_process(const sandbox_process&) = delete;
  sandbox_process& operator=(const sandbox_process&) = delete;

private:
  sandbox_process() = default;
  static expected<std::unique_ptr<sandbox_process>> launch(const sandbox_config& config,
                                                           launch_spec spec, output_sink sink,
                                                           bool deferred);
  void note_enforced(bool memory_by_cgroup);
  void read_stream(int& fd, output_stream which);
  /// Whether pump() should poll the stream's pipe now (open, and credit or past its cap).
  bool wants_read(int fd, output_stream which) const;
  /// One step of draining the pipes of an ended tree under flow control; true once finished.
  bool drain_step(std::chrono::steady_clock::time_point until);
  void feed_stdin();
  void read_status();
  void finish(int wait_status, const ::rusage& usage);
  void close_fds();

  launch_spec spec_;
  output_sink sink_;
  std::shared_ptr<output_credit> credit_;  ///< null: no flow control
  uint64_t out_bytes_ = 0, err_bytes_ = 0;  ///< bytes given to the sink or kept, per stream
  bool reaped_ = false;        ///< bwrap reaped; pipes still being drained (flow control)
  bool output_dropped_ = false;///< output was left in the pipes (killed, or the deadline)
  bool killed_ = false;        ///< kill_tree() was called
  int reaped_status_ = 0;
  std::unique_ptr<::rusage> reaped_usage_;
  std::chrono::steady_clock::time_point last_output_;
  std::unique_ptr<exec_cgroup> cgroup_;
  int bwrap_pid_ = -1;
  int pidfd_ = -1;
  int out_fd_ = -1, err_fd_ = -1, in_fd_ = -1, status_fd_ = -1, block_fd_ = -1;
  size_t stdin_written_ = 0;
  int child_pid_ = -1;            ///< the command's host pid (from bwrap's status fd)
  std::string status_buf_;
  bool finished_ = false;
  bool deferred_ = false;          ///< pre-started: the command comes with assign()
  bool assigned_ = false;
  const cgroup_host* cgroups_ = nullptr;
  bool killed_for_timeout_ = false, killed_for_cpu_ = false;
  std::chrono::steady_clock::time_point started_, deadline_;
  exec_result result_;
};

/// Kills the bubblewrap processes (outer bwrap and the pid namespace's init, whose death takes
/// the sandboxed commands with it) that bind a path under `workspaces_dir`: what an earlier run
/// of a node on that directory left behind. A node that dies while a sandbox is being set up
/// can orphan bwrap's child before it has set its parent-death signal; it then waits forever
/// for a uid map nobody writes. Call only while holding the directory's lock (no live node owns
/// such a process then). Answers how many processes were killed.
size_t kill_orphaned_sandboxes(const std::string& workspaces_dir);

} // namespace triplane::actors::session
