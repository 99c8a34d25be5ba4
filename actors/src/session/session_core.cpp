// Session behaviour: exec through the sandbox, files through the workspace, persistence through
// the session store.
#include "session/session_core.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "session/fd_guard.hpp"
#include "session/tar_members.hpp"
#include "session/workspace_sync.hpp"

namespace triplane::actors::session {
namespace {

uint64_t now_ms() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

uint64_t pick(uint64_t request, uint64_t session, uint64_t node) {
  return request ? request : session ? session : node;
}

caf::error validate_env_name(const std::string& name) {
  if (name.empty() || name.find('=') != std::string::npos || name.find('\0') != std::string::npos)
    return make_error(errc::invalid_argument, "invalid environment variable name '" + name + "'");
  return {};
}

/// What a workspace holds: bytes of regular files (a file with several names counted once, as
/// the sync counts it) and entries (stat only, symlinks not followed). Counting stops once past
/// `max_entries` (0: never): enough to know it is over.
struct workspace_use {
  uint64_t bytes = 0, entries = 0;
};
workspace_use workspace_usage(const std::string& root, uint64_t max_entries) {
  workspace_use use;
  std::set<std::pair<dev_t, ino_t>> linked;
  std::error_code ec;
  for (auto i = std::filesystem::recursive_directory_iterator(
           root, std::filesystem::directory_options::skip_permission_denied, ec);
       !ec && i != std::filesystem::recursive_directory_iterator(); i.increment(ec)) {
    if (max_entries && ++use.entries > max_entries) break;
    std::error_code fec;
    if (!i->is_regular_file(fec) || i->is_symlink(fec)) continue;
    if (i->hard_link_count(fec) > 1) {
      struct stat st {};
      if (::lstat(i->path().c_str(), &st) == 0 && !linked.insert({st.st_dev, st.st_ino}).second) continue;
    }
    use.bytes += i->file_size(fec);
  }
  return use;
}

/// The supervisor's side of the workspace quota (bytes and entries) while commands run (the
/// kernel's side is RLIMIT_FSIZE per file): a stat walk of the workspace every 100 ms to 1 s,
/// 20 times the last walk's duration, so that walking costs at most ~5% of a core however big
/// the workspace is.
class quota_watch {
public:
  using clock = std::chrono::steady_clock;
  quota_watch(std::string root, uint64_t limit, uint64_t max_entries)
      : root_(std::move(root)), limit_(limit), max_entries_(max_entries) {}

  /// Walks the workspace when a walk is due; true when that walk found it over a limit.
  bool over_if_due() {
    auto now = clock::now();
    if (now < next_) return false;
    auto use = workspace_usage(root_, max_entries_);
    bool over = use.bytes > limit_ || (max_entries_ && use.entries > max_entries_);
    auto took = std::chrono::duration_cast<std::chrono::microseconds>(clock::now() - now);
    next_ = clock::now() + std::clamp(took * 20, min_interval, max_interval);
    return over;
  }

private:
  static constexpr std::chrono::microseconds min_interval{100000}, max_interval{1000000};
  std::string root_;
  uint64_t limit_, max_entries_;
  clock::time_point next_ = clock::now() + min_interval;
};

constexpr uint64_t default_output_cap = 1u << 20;
constexpr uint64_t default_timeout_ms = 60000;
constexpr size_t max_id_bytes = 1024;
constexpr size_t max_kv_key_bytes = 1024;

} // namespace

struct session_core::background {
  uint64_t id = 0;
  std::vector<std::string> argv;
  uint64_t started_ms = 0;
  std::unique_ptr<sandbox_process> proc;
  std::thread thread;
  std::mutex mutex;
  std::condition_variable ended;
  bool done = false;
  exec_result snapshot;
  // Requests to the pumping thread, the only one that touches `proc` after start.
  std::atomic<int> pending_signal{0};
  std::atomic<bool> kill_requested{false};
};

expected<std::unique_ptr<session_core>> session_core::activate(const node_resources& node,
                                                               const std::string& id) {
  if (id.empty() || id.size() > max_id_bytes || id.find('\0') != std::string::npos)
    return make_error(errc::invalid_argument, "session id must be 1.." + std::to_string(max_id_bytes) +
                                                  " bytes without NUL");
  auto core = std::unique_ptr<session_core>(new session_core(node));
  auto stored = node.store->load(id);
  if (!stored) return stored.error();
  if (*stored) {
    core->record_ = std::move(**stored);
    core->stored_files_ = core->record_.files;
    core->stored_ = true;
  } else {
    core->record_.id = id;
    core->record_.created_unix_ms = now_ms();
    core->record_.last_used_unix_ms = core->record_.created_unix_ms;
  }
  core->workspace_dir_ = node.workspaces_dir + "/" + to_hex(sha256(id));
  core->default_workspace_dir_ = core->workspace_dir_;
  // A workspace left from an earlier activation (crash) is only a cache: RocksDB is the truth.
  if (auto err = remove_tree(core->workspace_dir_)) return err;
  return core;
}

session_core::session_core(const node_resources& node) : node_(node) {}

session_core::~session_core() {
  for (auto& [id, bg] : background_) {
    bg->kill_requested = true;
    if (bg->thread.joinable()) bg->thread.join();
  }
}

uint64_t session_core::quota() const {
  return record_.settings.workspace_quota_bytes ? record_.settings.workspace_quota_bytes
                                                : node_.max_workspace_bytes;
}

caf::error session_core::adopt_forked_record() {
  if (stored_) return {};
  auto stored = node_.store->load(record_.id);
  if (!stored) return stored.error();
  if (!*stored) return {};
  if (running_background() > 0)
    return make_error(errc::unavailable, "session '" + record_.id +
                                             "' was created by a fork while its background processes ran; "
                                             "it takes that state once they have ended");
  // What this live copy holds was never stored (every operation stores its changes): the
  // fork's record is the session now.
  warm_.reset();
  workspace_.reset();
  stats_ = {};
  if (auto err = remove_tree(workspace_dir_)) return err;
  workspace_dir_ = default_workspace_dir_;
  record_ = std::move(**stored);
  stored_files_ = record_.files;
  stored_ = true;
  dirty_ = false;
  scan_needed_ = false;
  execs_since_activation_ = 0;
  return {};
}

caf::error session_core::ensure_materialized() {
  if (auto err = adopt_forked_record()) return err;
  if (workspace_) return {};
  auto start = std::chrono::steady_clock::now();
  if (auto err = remove_tree(workspace_dir_)) return err;
  if (auto err = materialize(workspace_dir_, record_.files, *node_.store)) return err;
  auto ws = workspace::open(workspace_dir_, node_.use_openat2);
  if (!ws) return ws.error();
  workspace_ = std::move(*ws);
  stats_.materialized = true;
  stats_.materialize_us = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                                    std::chrono::steady_clock::now() - start)
                                                    .count());
  return {};
}

caf::error session_core::sync_and_save(bool* quota_exceeded, std::string* quota_message) {
  if (workspace_) {
    auto outcome = sync_manifest(workspace_dir_, record_.files, quota(), node_.max_workspace_entries);
    if (!outcome && code_of(outcome.error()) == errc::limit_exceeded) {
      // Over quota: the workspace goes back to its last stored state (what the command or
      // write added is discarded), and the caller is told.
      if (quota_exceeded) *quota_exceeded = true;
      if (quota_message) *quota_message = describe(outcome.error()) + "; changes discarded";
      // The sandbox kept ready for the next exec binds the directory being replaced: its
      // command would run in the removed one (an empty workspace, its writes lost).
      warm_.reset();
      workspace_.reset();
      record_.files = stored_files_;
      if (auto err = ensure_materialized()) return err;
    } else if (!outcome) {
      // What changed on disk is still there and not stored: the next persist (passivation
      // included) must scan again rather than take the session for stored.
      scan_needed_ = true;
      return outcome.error();
    } else {
      if (running_background() == 0) scan_needed_ = false;
      stats_.files_read = outcome->files_read;
      stats_.chunks_written = outcome->new_chunks.size();
      if (outcome->changed || dirty_) {
        record_.last_used_unix_ms = now_ms();
        if (auto err = node_.store->save(record_, stored_ ? &stored_files_ : nullptr,
                                         outcome->new_chunks)) {
          // Nothing was stored: forget this sync's view, so that the next one finds the same
          // changes again and supplies their chunks (kept, the changed files would look
          // untouched: dropped at passivation, and every later save would refer to chunks
          // that were never written).
          record_.files = stored_files_;
          scan_needed_ = true;
          return err;
        }
        stored_files_ = record_.files;
        stored_ = true;
        dirty_ = false;
      }
      return {};
    }
  }
  if (dirty_) {
    record_.last_used_unix_ms = now_ms();
    if (auto err = node_.store->save(record_, stored_ ? &stored_files_ : nullptr, {})) return err;
    stored_files_ = record_.files;
    stored_ = true;
    dirty_ = false;
  }
  return {};
}

expected<launch_spec> session_core::resolve(const exec_request& req) {
  bool has_argv = !req.argv.empty();
  bool has_shell = !req.shell.empty();
  if (!has_argv && !has_shell) return make_error(errc::invalid_argument, "empty command: give argv or shell");
  if (has_argv && has_shell) return make_error(errc::invalid_argument, "give either argv or shell, not both");
  if (has_argv && req.argv.front().empty()) return make_error(errc::invalid_argument, "empty command: argv[0] is empty");
  launch_spec spec;
  spec.argv = has_argv ? req.argv : std::vector<std::string>{"/bin/sh", "-c", req.shell};
  for (const auto& a : spec.argv)
    if (a.find('\0') != std::string::npos)
      return make_error(errc::invalid_argument, "a command argument contains a NUL byte");
  std::map<std::string, std::string> env{{"PATH", "/usr/local/bin:/usr/bin:/bin"},
                                         {"HOME", "/workspace"},
                                         {"LANG", "C.UTF-8"},
                                         {"TMPDIR", "/tmp"}};
  for (const auto& [k, v] : record_.env) env[k] = v;
  for (const auto& [k, v] : req.env) {
    if (auto err = validate_env_name(k)) return err;
    if (v.find('\0') != std::string::npos)
      return make_error(errc::invalid_argument, "environment value of '" + k + "' contains a NUL byte");
    env[k] = v;
  }
  for (const auto& k : req.env_unset) env.erase(k);
  for (const auto& [k, v] : env) spec.env.push_back(k + "=" + v);
  const std::string& cwd = req.cwd.empty() ? record_.cwd : req.cwd;
  auto names = split_path(cwd, true);
  if (!names) return names.error();
  if (!names->empty()) {
    if (workspace_) {
      auto st = workspace_->stat(cwd);
      if (!st) return st.error();
      if (st->type != file_type::directory)
        return make_error(errc::invalid_argument, "cwd '" + cwd + "' is not a directory");
    } else {  // not materialized yet: the manifest says what will be there
      std::string joined;
      for (const auto& n : *names) joined += (joined.empty() ? "" : "/") + n;
      auto entry = record_.files.find(joined);
      if (entry == record_.files.end())
        return make_error(errc::not_found, "cwd '" + cwd + "': no such directory");
      if (entry->second.type != file_type::directory)
        return make_error(errc::invalid_argument, "cwd '" + cwd + "' is not a directory");
    }
  }
  spec.cwd = "/workspace";
  for (const auto& n : *names) spec.cwd += "/" + n;
  const auto& s = record_.settings;
  const auto& d = node_.defaults;
  spec.timeout_ms = std::min(pick(req.timeout_ms, s.default_timeout_ms,
                                  d.default_timeout_ms ? d.default_timeout_ms : default_timeout_ms),
                             node_.max_timeout_ms);
  auto& l = spec.limits;
  l.memory_bytes = pick(req.limits.memory_bytes, s.default_limits.memory_bytes, d.default_limits.memory_bytes);
  l.max_processes = static_cast<uint32_t>(pick(req.limits.max_processes, s.default_limits.max_processes,
                                               d.default_limits.max_processes));
  l.cpu_time_ms = pick(req.limits.cpu_time_ms, s.default_limits.cpu_time_ms, d.default_limits.cpu_time_ms);
  // Unless a file size limit was asked for, no file may grow past what is left of the quota
  // (RLIMIT_FSIZE, enforced by the kernel on every write): a single runaway file stops at the
  // quota at once instead of at the next check. (A file larger than what is left cannot be
  // appended to then: the command gets EFBIG, as on a full disk; an explicit limit lifts this.)
  l.max_file_bytes = pick(req.limits.max_file_bytes, s.default_limits.max_file_bytes,
                          d.default_limits.max_file_bytes);
  if (!l.max_file_bytes) {
    uint64_t used = 0;
    for (const auto& [path, e] : record_.files)
      if (e.type == file_type::regular && e.hard_link_of.empty()) used += e.size;  // a linked file once
    l.max_file_bytes = used < quota() ? quota() - used : 1;  // 0 would mean "no limit"
  }
  l.stdout_cap_bytes = pick(req.limits.stdout_cap_bytes, s.default_limits.stdout_cap_bytes,
                            d.default_limits.stdout_cap_bytes ? d.default_limits.stdout_cap_bytes : default_output_cap);
  l.stderr_cap_bytes = pick(req.limits.stderr_cap_bytes, s.default_limits.stderr_cap_bytes,
                            d.default_limits.stderr_cap_bytes ? d.default_limits.stderr_cap_bytes : default_output_cap);
  spec.stdin_data = req.stdin_data;
  spec.network = s.network;
  spec.workspace = workspace_dir_;
  spec.group_name = group_name(++launches_);
  return spec;
}

void session_core::record_history(const std::vector<std::string>& argv, const exec_result& r,
                                  uint64_t started) {
  command_record c;
  c.argv = argv;
  c.exited = r.exited;
  c.exit_code = r.exit_code;
  c.term_signal = r.term_signal;
  c.timed_out = r.timed_out;
  c.duration_us = r.duration_us;
  c.started_unix_ms = started;
  record_.history.push_back(std::move(c));
  while (record_.history.size() > node_.history_limit) record_.history.pop_front();
  dirty_ = true;
}

expected<exec_result> session_core::exec(const exec_request& req, sandbox_process::output_sink sink,
                                         std::shared_ptr<output_credit> credit, uint64_t ticket) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  cancel_requested_ = false;  // before the ticket is visible: a cancel by ticket must stick
  if (ticket) {
    std::lock_guard<std::mutex> lock(ticket_mutex_);
    last_started_ticket_ = ticket;
    if (cancelled_tickets_.erase(ticket))
      return make_error(errc::cancelled, "the exec was cancelled before it started");
    running_ticket_ = ticket;
    running_credit_ = credit;
  }
  struct ticket_reset {
    session_core& core;
    ~ticket_reset() {
      std::lock_guard<std::mutex> lock(core.ticket_mutex_);
      core.running_ticket_ = 0;
      core.running_credit_ = nullptr;
    }
  } reset_ticket{*this};
  auto result = run_command(req, std::move(sink), std::move(credit), true);
  // The next exec's sandbox sets itself up now, off that exec's path: an agent runs command
  // after command in a live session. Not after a session's first exec since activation: a
  // session woken for one command would only pay a second sandbox setup for nothing.
  ++execs_since_activation_;
  if (!warm_ && workspace_ && warm_fits_ && execs_since_activation_ >= 2) {
    auto warm = node_.pool->prestart_for(workspace_dir_, group_name(++launches_));
    if (warm) warm_ = std::move(*warm);
  }
  return result;
}

void session_core::drop_warm_sandbox() {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  warm_.reset();
}

std::string session_core::group_name(uint64_t launch) const {
  return "tp-" + to_hex(sha256(record_.id)).substr(0, 16) + "-" + std::to_string(::getpid()) + "-" +
         std::to_string(launch);
}

expected<exec_result> session_core::run_command(const exec_request& req, sandbox_process::output_sink sink,
                                                std::shared_ptr<output_credit> credit, bool sync_after) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = adopt_forked_record()) return err;
  using steady = std::chrono::steady_clock;
  auto us_since = [](steady::time_point t) {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(steady::now() - t).count());
  };
  phases_ = {};
  auto phase_start = steady::now();
  // First use after activation: bwrap sets the sandbox up (namespaces, mounts: milliseconds)
  // while the workspace is materialized into the directory it binds; the command starts once
  // both are done (bwrap --block-fd).
  const bool overlap = !workspace_;
  // Without an output stream, the chunks' SHA-256 check runs while the command does (another
  // core) instead of before it: nothing the command produces leaves the sandbox (no result, no
  // stored change) until the check has passed, and a mismatch kills it and drops the workspace.
  // A stream would hand out output before the check, so then the check comes first.
  const bool verify_later = overlap && !sink;
  auto spec = resolve(req);
  if (!spec) return spec.error();
  auto argv = spec->argv;
  uint64_t started = now_ms();
  std::unique_ptr<sandbox_process> pooled;
  warm_fits_ = node_.pool && node_.pool->fits(*spec);
  std::unique_ptr<sandbox_process> warm = std::move(warm_);
  if (warm && !(warm_fits_ && !warm->assign(*spec, sink, credit)))
    warm.reset();  // ended, or cannot run this command as a fresh sandbox would: kill and reap
  if (warm) phases_.warm = true;
  if (overlap) {
    warm.reset();  // (none: the workspace directory only exists while materialized)
    if (auto err = remove_tree(workspace_dir_)) return err;
    // A pre-started sandbox, when one is ready: its setup is already done, and the workspace
    // becomes the directory it binds.
    std::string pooled_dir;
    if (node_.pool) pooled = node_.pool->take(*spec, sink, credit, &pooled_dir);
    if (pooled) {
      workspace_dir_ = pooled_dir;
      phases_.pooled = true;
    } else {
      std::error_code ec;
      std::filesystem::create_directories(workspace_dir_, ec);
      if (ec) return make_error(errc::io_error, "cannot create workspace '" + workspace_dir_ + "': " + ec.message());
      spec->hold = true;
    }
  }
  phases_.prepare_us = us_since(phase_start);
  phase_start = steady::now();
  auto proc = pooled ? expected<std::unique_ptr<sandbox_process>>(std::move(pooled))
               : warm ? expected<std::unique_ptr<sandbox_process>>(std::move(warm))
                      : sandbox_process::start(*node_.sandbox, std::move(*spec), std::move(sink),
                                               std::move(credit));
  if (!proc) return proc.error();
  if (phases_.warm) (*proc)->release();
  phases_.spawn_us = us_since(phase_start);
  phase_start = steady::now();
  if (overlap) {
    auto t = std::chrono::steady_clock::now();
    caf::error err = materialize(workspace_dir_, record_.files, *node_.store, !verify_later);
    if (!err) {
      auto ws = workspace::open(workspace_dir_, node_.use_openat2);
      if (ws) workspace_ = std::move(*ws);
      else err = ws.error();
    }
    if (err) {
      (*proc)->kill_tree();  // before release: the command never runs on a partial workspace
      if (phases_.pooled) node_.pool->replenish();
      workspace_.reset();
      (void)remove_tree(workspace_dir_);
      workspace_dir_ = default_workspace_dir_;
      return err;
    }
    stats_.materialized = true;
    stats_.materialize_us = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                                      std::chrono::steady_clock::now() - t)
                                                      .count());
    phases_.materialize_us = stats_.materialize_us;
    (*proc)->release();
    phase_start = steady::now();
    if (verify_later) {
      if (auto err = verify_chunks(record_.files, *node_.store)) {
        proc->reset();  // kills and reaps the whole tree
        if (phases_.pooled) node_.pool->replenish();
        workspace_.reset();
        stats_.materialized = false;
        (void)remove_tree(workspace_dir_);
        workspace_dir_ = default_workspace_dir_;
        return err;
      }
      phases_.verify_us = us_since(phase_start);
    }
  }
  // Pump, and watch the workspace's size: a command that writes many files is stopped near the
  // quota instead of filling the host's disk first.
  quota_watch watch{workspace_dir_, quota(), node_.max_workspace_entries};
  bool over_quota = false;
  bool cancelled = false;
  exec_running_ = true;
  while (!(*proc)->pump(50)) {
    if (cancel_requested_.exchange(false)) {  // again after the first: see kill_tree
      cancelled = true;
      (*proc)->kill_tree();
    }
    if (!over_quota && watch.over_if_due()) {
      over_quota = true;
      (*proc)->kill_tree();
    }
  }
  exec_running_ = false;
  exec_result result = (*proc)->result();
  proc->reset();
  if (phases_.pooled) node_.pool->replenish();
  phases_.run_us = us_since(phase_start);
  phase_start = steady::now();
  if (cancelled) result.message += std::string(result.message.empty() ? "" : "; ") + "cancelled";
  if (over_quota) {
    result.quota_exceeded = true;
    result.message += std::string(result.message.empty() ? "" : "; ") +
                      "killed: workspace grew past its quota (bytes or entries) while running";
  }
  result.enforced.workspace_quota = limit_mechanism::supervisor;
  record_history(argv, result, started);
  if (!sync_after) return result;
  bool over = false;
  std::string why;
  if (auto err = sync_and_save(&over, &why)) return err;
  if (over) {
    result.quota_exceeded = true;
    result.message += (result.message.empty() ? "" : "; ") + why;
    if (auto err = sync_and_save(nullptr, nullptr)) return err;  // store the history entry
  }
  phases_.sync_us = us_since(phase_start);
  return result;
}

bool session_core::cancel_exec() {
  if (!exec_running_) return false;
  cancel_requested_ = true;
  return true;
}

bool session_core::cancel_exec(uint64_t ticket) {
  if (ticket == 0) return false;
  std::lock_guard<std::mutex> lock(ticket_mutex_);
  if (ticket == running_ticket_) {
    cancel_requested_ = true;
    return true;
  }
  if (ticket <= last_started_ticket_) return false;  // ended (tickets start in order)
  cancelled_tickets_.insert(ticket);
  return true;
}

bool session_core::grant_exec_credit(uint64_t ticket, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(ticket_mutex_);
  if (ticket == 0 || ticket != running_ticket_ || !running_credit_) return false;
  running_credit_->grant(bytes);
  return true;
}

bg_status session_core::status_of(background& bg) {
  std::lock_guard<std::mutex> lock(bg.mutex);
  bg_status s;
  s.bg_id = bg.id;
  s.argv = bg.argv;
  s.running = !bg.done;
  s.result = bg.snapshot;
  s.started_unix_ms = bg.started_ms;
  return s;
}

expected<bg_status> session_core::bg_start(const exec_request& req, std::function<void(uint64_t)> on_end) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  auto spec = resolve(req);
  if (!spec) return spec.error();
  auto bg = std::make_unique<background>();
  bg->id = record_.next_bg_id++;
  dirty_ = true;
  scan_needed_ = true;
  bg->argv = spec->argv;
  bg->started_ms = now_ms();
  // The process's thread watches the quota as exec does, through a descriptor of the directory
  // the sandbox binds: it measures what the process writes to, whatever path that has later.
  auto dir = std::make_shared<fd_guard>(
    ::open(workspace_dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir->fd < 0)
    return make_error(errc::io_error, "cannot open the workspace " + workspace_dir_ + ": " +
                                          std::strerror(errno));
  auto proc = sandbox_process::start(*node_.sandbox, std::move(*spec), nullptr);
  if (!proc) return proc.error();
  bg->proc = std::move(*proc);
  auto* raw = bg.get();
  raw->thread = std::thread([raw, on_end = std::move(on_end), limit = quota(),
                             max_entries = node_.max_workspace_entries, dir] {
    quota_watch watch{"/proc/self/fd/" + std::to_string(dir->fd), limit, max_entries};
    bool over_quota = false;
    for (;;) {
      if (raw->kill_requested) raw->proc->kill_tree();
      if (int sig = raw->pending_signal.exchange(0)) raw->proc->signal(sig);
      bool finished = raw->proc->pump(20);
      if (!finished && !over_quota && watch.over_if_due()) {
        over_quota = true;
        raw->proc->kill_tree();
      }
      std::unique_lock<std::mutex> lock(raw->mutex);
      raw->snapshot = raw->proc->result();
      raw->snapshot.enforced.workspace_quota = limit_mechanism::supervisor;
      if (over_quota) {
        raw->snapshot.quota_exceeded = true;
        raw->snapshot.message += std::string(raw->snapshot.message.empty() ? "" : "; ") +
                                 "killed: workspace grew past its quota (bytes or entries) while running";
      }
      if (finished) {
        // on_end first: whoever sees `done` may rely on the end having been announced.
        lock.unlock();
        if (on_end) on_end(raw->id);
        lock.lock();
        raw->done = true;
        lock.unlock();
        raw->ended.notify_all();
        return;
      }
    }
  });
  auto id = raw->id;
  background_.emplace(id, std::move(bg));
  return status_of(*raw);
}

expected<bg_status> session_core::bg_poll(uint64_t bg_id) {
  auto i = background_.find(bg_id);
  if (i == background_.end())
    return make_error(errc::not_found, "no background process " + std::to_string(bg_id));
  return status_of(*i->second);
}

expected<bg_status> session_core::bg_wait(uint64_t bg_id, uint64_t timeout_ms) {
  auto i = background_.find(bg_id);
  if (i == background_.end())
    return make_error(errc::not_found, "no background process " + std::to_string(bg_id));
  auto& bg = *i->second;
  {
    std::unique_lock<std::mutex> lock(bg.mutex);
    bg.ended.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return bg.done; });
  }
  return status_of(bg);
}

expected<bg_status> session_core::bg_signal(uint64_t bg_id, int32_t signo) {
  if (signo <= 0 || signo >= NSIG)
    return make_error(errc::invalid_argument, "signal " + std::to_string(signo) + " is out of range");
  auto i = background_.find(bg_id);
  if (i == background_.end())
    return make_error(errc::not_found, "no background process " + std::to_string(bg_id));
  i->second->pending_signal = signo;
  return status_of(*i->second);
}

std::vector<bg_status> session_core::bg_list() {
  std::vector<bg_status> out;
  for (auto& [id, bg] : background_) out.push_back(status_of(*bg));
  return out;
}

size_t session_core::running_background() const {
  size_t n = 0;
  for (const auto& [id, bg] : background_) {
    std::lock_guard<std::mutex> lock(bg->mutex);
    if (!bg->done) ++n;
  }
  return n;
}

expected<file_entry> session_core::write_file(const file_write_request& req) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  if (req.data.size() > quota())
    return make_error(errc::limit_exceeded, "write of " + std::to_string(req.data.size()) +
                                                " bytes exceeds the workspace quota of " + std::to_string(quota()));
  auto e = workspace_->write(req);
  if (!e) return e;
  bool over = false;
  std::string why;
  if (auto err = sync_and_save(&over, &why)) return err;
  if (over) return make_error(errc::limit_exceeded, why);
  return e;
}

expected<file_data> session_core::read_file(const file_read_request& req) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  return workspace_->read(req);
}

expected<std::vector<file_entry>> session_core::list_files(const file_list_request& req) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  return workspace_->list(req);
}

expected<file_entry> session_core::stat_file(const std::string& path) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  return workspace_->stat(path);
}

expected<file_entry> session_core::make_directory(const mkdir_request& req) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  auto e = workspace_->make_directory(req);
  if (!e) return e;
  bool over = false;
  std::string why;
  if (auto err = sync_and_save(&over, &why)) return err;
  if (over) return make_error(errc::limit_exceeded, why);
  return e;
}

expected<uint64_t> session_core::remove_file(const remove_request& req) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  auto n = workspace_->remove(req);
  if (!n) return n;
  if (auto err = sync_and_save(nullptr, nullptr)) return err;
  return n;
}

expected<file_entry> session_core::move_file(const move_request& req) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  auto e = workspace_->move(req);
  if (!e) return e;
  if (auto err = sync_and_save(nullptr, nullptr)) return err;
  return e;
}

expected<std::string> session_core::tar_out(const std::string& dir) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  auto st = workspace_->stat(dir);
  if (!st) return st.error();
  if (st->type != file_type::directory)
    return make_error(errc::invalid_argument, "'" + dir + "' is not a directory");
  uint64_t cap = record_.settings.max_tar_bytes ? record_.settings.max_tar_bytes : node_.max_tar_bytes;
  // tar runs inside the sandbox: whatever the tree holds, it can only read the workspace.
  exec_request req;
  req.argv = {"tar", "-cf", "-", "-C", "/workspace/" + st->path, "."};
  req.limits.stdout_cap_bytes = cap;
  auto r = exec(req);
  if (!r) return r.error();
  if (r->stdout_truncated)
    return make_error(errc::limit_exceeded, "archive exceeds the maximum of " + std::to_string(cap) + " bytes");
  if (!r->exited || r->exit_code != 0)
    return make_error(errc::io_error, "tar failed: " + r->stderr_data);
  return std::move(r->stdout_data);
}

expected<uint64_t> session_core::tar_in(const tar_in_request& req) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  auto names = split_path(req.dir, true);
  if (!names) return names.error();
  if (!names->empty()) {
    auto st = workspace_->stat(req.dir);
    if (st && st->type != file_type::directory)
      return make_error(errc::invalid_argument, "'" + req.dir + "' is not a directory");
  }
  // A workspace keeps regular files, directories and symlinks: a device or fifo member would be
  // lost at the next sync (or make tar fail with a message that does not say why), so such an
  // archive is refused up front, naming the member. Headers this reader cannot follow are
  // tar's to refuse; whatever tar still makes that a workspace cannot keep, merge_into refuses.
  if (auto members = read_tar_members(req.archive))
    if (auto err = check_tar_members(*members)) return err;
  // All or nothing: GNU tar (inside the sandbox: it strips leading '/', skips members with
  // '..' (exit 2), cannot create devices, can only write the workspace) extracts into a fresh
  // staging directory, which is merged into place only when tar succeeded and the merge can
  // succeed in full. Nothing is stored until then; any failure removes the staging directory.
  // Hard-link members stay hard links (tar links them within the staging directory, merging
  // moves both names, and the manifest keeps link groups).
  std::string staging = ".triplane-tar-in-" + to_hex(sha256(record_.id + std::to_string(now_ms()) +
                                                             std::to_string(++launches_)))
                                                   .substr(0, 16);
  auto made = workspace_->make_directory({staging, false, 0700});
  if (!made) return made.error();
  auto discard = [&](caf::error why) -> caf::error {
    (void)workspace_->remove({staging, true});
    if (auto err = sync_and_save(nullptr, nullptr)) return err;  // the history entry
    return why;
  };
  exec_request x;
  x.argv = {"tar", "-xvf", "-", "-C", "/workspace/" + staging, "--no-same-owner", "--no-overwrite-dir"};
  x.stdin_data = req.archive;
  auto r = run_command(x, nullptr, nullptr, false);
  if (!r) return discard(r.error());
  if (r->quota_exceeded) return discard(make_error(errc::limit_exceeded, r->message));
  // A member larger than what is left of the quota hits the file size limit (resolve()).
  if (r->term_signal == SIGXFSZ || r->stderr_data.find("File too large") != std::string::npos)
    return discard(make_error(errc::limit_exceeded, "the archive does not fit in what is left of the workspace quota: " +
                                                        r->stderr_data));
  if (!r->exited || r->exit_code != 0)
    return discard(make_error(errc::invalid_argument, "tar refused the archive: " + r->stderr_data));
  if (!names->empty()) {
    auto d = workspace_->make_directory({req.dir, true, 0755});
    if (!d) return discard(d.error());
  }
  if (auto err = workspace_->merge_into(staging, req.dir)) return discard(std::move(err));
  (void)workspace_->remove({staging, true});
  // Over the quota, the workspace goes back to its stored state: nothing of the archive stays.
  bool over = false;
  std::string why;
  if (auto err = sync_and_save(&over, &why)) return err;
  if (over) {
    if (auto err = sync_and_save(nullptr, nullptr)) return err;  // the history entry
    return make_error(errc::limit_exceeded, why);
  }
  return static_cast<uint64_t>(std::count(r->stdout_data.begin(), r->stdout_data.end(), '\n'));
}

kv_value session_core::kv_get(const std::string& key) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  (void)adopt_forked_record();  // (on a storage error: what this copy holds)
  auto i = record_.kv.find(key);
  if (i == record_.kv.end()) return {};
  return {true, i->second};
}

std::optional<kv_value> session_core::try_kv_get(const std::string& key) {
  std::unique_lock<std::recursive_mutex> guard(op_mutex_, std::try_to_lock);
  if (!guard.owns_lock() || !stored_) return std::nullopt;  // (unstored: a fork may have made it)
  return kv_get(key);
}

std::optional<std::vector<kv_entry>> session_core::try_kv_list(const std::string& prefix) {
  std::unique_lock<std::recursive_mutex> guard(op_mutex_, std::try_to_lock);
  if (!guard.owns_lock() || !stored_) return std::nullopt;  // (unstored: a fork may have made it)
  return kv_list(prefix);
}

expected<bool> session_core::kv_put(const std::string& key, std::string value) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = adopt_forked_record()) return err;
  if (key.empty() || key.size() > max_kv_key_bytes)
    return make_error(errc::invalid_argument, "kv key must be 1.." + std::to_string(max_kv_key_bytes) + " bytes");
  // The record stores keys as Text, which ends at a NUL: "a\0x" would come back as "a".
  if (key.find('\0') != std::string::npos)
    return make_error(errc::invalid_argument, "kv key contains a NUL byte");
  uint64_t limit = record_.settings.max_kv_bytes ? record_.settings.max_kv_bytes : node_.max_kv_bytes;
  uint64_t total = 0;
  for (const auto& [k, v] : record_.kv)
    if (k != key) total += k.size() + v.size();
  if (total + key.size() + value.size() > limit)
    return make_error(errc::limit_exceeded, "kv memory would exceed its limit of " + std::to_string(limit) + " bytes");
  bool fresh = record_.kv.find(key) == record_.kv.end();
  record_.kv[key] = std::move(value);
  dirty_ = true;
  return fresh;
}

bool session_core::kv_delete(const std::string& key) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  (void)adopt_forked_record();  // (on a storage error, the persist that follows reports one)
  bool existed = record_.kv.erase(key) > 0;
  if (existed) dirty_ = true;
  return existed;
}

std::vector<kv_entry> session_core::kv_list(const std::string& prefix) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  (void)adopt_forked_record();  // (on a storage error: what this copy holds)
  std::vector<kv_entry> out;
  for (auto i = record_.kv.lower_bound(prefix); i != record_.kv.end(); ++i) {
    if (i->first.compare(0, prefix.size(), prefix) != 0) break;
    out.push_back({i->first, i->second});
  }
  return out;
}

expected<session_info> session_core::set_env(const std::map<std::string, std::string>& set,
                                             const std::vector<std::string>& unset) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = adopt_forked_record()) return err;
  for (const auto& [k, v] : set) {
    if (auto err = validate_env_name(k)) return err;
    if (v.find('\0') != std::string::npos)
      return make_error(errc::invalid_argument, "environment value of '" + k + "' contains a NUL byte");
  }
  for (const auto& k : unset) record_.env.erase(k);
  for (const auto& [k, v] : set) record_.env[k] = v;
  dirty_ = true;
  return info();
}

expected<session_info> session_core::set_cwd(const std::string& dir) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = ensure_materialized()) return err;
  auto names = split_path(dir, true);
  if (!names) return names.error();
  if (!names->empty()) {
    auto st = workspace_->stat(dir);
    if (!st) return st.error();
    if (st->type != file_type::directory)
      return make_error(errc::invalid_argument, "'" + dir + "' is not a directory");
  }
  std::string cwd;
  for (const auto& n : *names) cwd += (cwd.empty() ? "" : "/") + n;
  record_.cwd = cwd;
  dirty_ = true;
  return info();
}

expected<session_info> session_core::configure(const session_settings& settings) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = adopt_forked_record()) return err;
  if (settings.network != network_policy::none && settings.network != network_policy::loopback)
    return make_error(errc::invalid_argument, "unknown network policy");
  record_.settings = settings;
  dirty_ = true;
  return info();
}

session_info session_core::info() {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  (void)adopt_forked_record();  // (on a storage error: what this copy holds)
  session_info i;
  i.id = record_.id;
  i.created_unix_ms = record_.created_unix_ms;
  i.last_used_unix_ms = record_.last_used_unix_ms;
  i.settings = record_.settings;
  i.env = record_.env;
  i.cwd = record_.cwd;
  for (const auto& [path, e] : record_.files)
    if (e.type == file_type::regular) {
      ++i.file_count;
      if (e.hard_link_of.empty()) i.workspace_bytes += e.size;  // a hard-linked file once
    }
  i.running_background = running_background();
  i.history.assign(record_.history.begin(), record_.history.end());
  i.forked_from = record_.forked_from;
  i.stored = stored_;
  return i;
}

caf::error session_core::persist() {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (auto err = adopt_forked_record()) return err;
  // Every exec and file operation already synced and stored its changes; only background
  // processes (and kv/env/settings changes) leave something to do here.
  if (stored_ && !dirty_ && !scan_needed_) return {};
  return sync_and_save(nullptr, nullptr);
}

caf::error session_core::passivate() {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (running_background() > 0)
    return make_error(errc::unavailable, "session '" + record_.id +
                                             "' has running background processes and stays live");
  if (auto err = persist()) return err;
  warm_.reset();
  execs_since_activation_ = 0;
  workspace_.reset();
  stats_.materialized = false;
  auto err = remove_tree(workspace_dir_);
  workspace_dir_ = default_workspace_dir_;
  return err;
}

expected<session_info> session_core::fork(const std::string& new_id) {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (new_id.empty() || new_id.size() > max_id_bytes || new_id.find('\0') != std::string::npos)
    return make_error(errc::invalid_argument, "new session id must be 1.." + std::to_string(max_id_bytes) +
                                                  " bytes without NUL");
  if (new_id == record_.id) return make_error(errc::already_exists, "cannot fork a session onto itself");
  if (auto err = persist()) return err;
  auto now = now_ms();
  if (auto err = node_.store->fork(record_, new_id, now)) return err;
  session_info i = info();
  i.id = new_id;
  i.forked_from = record_.id;
  i.created_unix_ms = i.last_used_unix_ms = now;
  i.history.clear();
  i.running_background = 0;
  return i;
}

caf::error session_core::destroy() {
  std::lock_guard<std::recursive_mutex> guard(op_mutex_);
  if (!stored_ && running_background() == 0)  // a fork's record under this id is destroyed too
    if (auto err = adopt_forked_record()) return err;
  for (auto& [id, bg] : background_) {
    bg->kill_requested = true;
    if (bg->thread.joinable()) bg->thread.join();
  }
  background_.clear();
  warm_.reset();
  workspace_.reset();
  if (auto err = remove_tree(workspace_dir_)) return err;
  workspace_dir_ = default_workspace_dir_;
  bool was_stored = stored_;
  // From here on the object is a fresh, empty session with the same id (the id is free to be
  // used again); nothing is stored for it until something changes.
  session_record fresh;
  fresh.id = record_.id;
  fresh.created_unix_ms = fresh.last_used_unix_ms = now_ms();
  record_ = std::move(fresh);
  stored_files_.clear();
  stored_ = false;
  dirty_ = false;
  scan_needed_ = false;
  stats_ = {};
  if (was_stored) return node_.store->destroy(record_.id);
  return {};
}

} // namespace triplane::actors::session
