// Pre-started sandboxes: bwrap's setup (namespaces, mounts, cgroup joins: most of an exec's
// cost) done before a command needs it, so that the first exec of a rehydrated session costs
// the materialization of its files and the command itself.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "session/sandbox_process.hpp"

namespace triplane::actors::session {

class sandbox_pool {
public:
  /// Keeps `size` sandboxes pre-started (network none; the cgroup controllers that `profile`'s
  /// limits need joined), each bound to its own empty directory under `dir`, which is removed
  /// and recreated (it must be on the workspaces' filesystem and hold nothing else). A thread
  /// of the pool starts them: a sandbox dies with the thread that started it (bwrap
  /// --die-with-parent). `config` is borrowed and must outlive the pool. Errors: unavailable
  /// when config.exec_shim is empty; io_error when `dir` cannot be made.
  static expected<std::unique_ptr<sandbox_pool>> create(const sandbox_config& config, std::string dir,
                                                        exec_limits profile, size_t size);
  /// Stops the thread, kills the idle sandboxes, removes their directories. Sandboxes already
  /// taken are their takers' (but die with the pool's thread).
  ~sandbox_pool();
  sandbox_pool(const sandbox_pool&) = delete;
  sandbox_pool& operator=(const sandbox_pool&) = delete;

  /// A pre-started sandbox with `spec`, `sink` and `credit` assigned (sandbox_process::assign; a
  /// copy of `sink` is kept only on success), when one is ready and
  /// can enforce spec's limits as a fresh start would; nullptr otherwise (spec untouched). On
  /// success spec is moved from and *workspace_dir names the sandbox's /workspace on the host:
  /// an empty directory the caller now owns (fill it, then release() the process; remove it
  /// when done). Thread-safe.
  std::unique_ptr<sandbox_process> take(launch_spec& spec, sandbox_process::output_sink sink,
                                        std::shared_ptr<output_credit> credit, std::string* workspace_dir);

  /// Whether a sandbox pre-started with this pool's profile runs `spec` as a fresh start would:
  /// network none, and the cgroup controllers spec's limits need were joined ahead.
  bool fits(const launch_spec& spec) const;

  /// A sandbox pre-started like the pool's but bound to `workspace` (an existing directory the
  /// caller owns) and not kept by the pool: for a caller that knows where its next command will
  /// run (a live session's next exec). It dies with the calling thread (bwrap
  /// --die-with-parent). Use it through assign() and release(), after checking fits().
  expected<std::unique_ptr<sandbox_process>> prestart_for(const std::string& workspace,
                                                          const std::string& group_name) const;

  /// Starts replacements for the sandboxes taken. Takers call it once their command has ended:
  /// a sandbox's setup costs CPU (namespaces, mounts) that would otherwise compete with the
  /// command it was taken for. (take() itself only asks for one when the pool ran empty.)
  void replenish();

  /// Sandboxes ready now (tests, benchmarks).
  size_t ready() const;
  /// Waits until `n` sandboxes are ready or `timeout_ms` passed; true when they are.
  bool wait_ready(size_t n, uint64_t timeout_ms) const;

private:
  struct entry {
    std::unique_ptr<sandbox_process> proc;
    std::string dir;
  };
  sandbox_pool(const sandbox_config& config, std::string dir, exec_limits profile, size_t size);
  void run();

  const sandbox_config& config_;
  const std::string dir_;
  const exec_limits profile_;
  const size_t size_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  std::deque<entry> ready_;
  bool stopping_ = false;
  uint64_t started_ = 0;
  std::thread thread_;
};

} // namespace triplane::actors::session
