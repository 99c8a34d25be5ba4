// Pre-started sandboxes, refilled by the pool's own thread.
#include "session/sandbox_pool.hpp"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include <sys/stat.h>
#include <unistd.h>

#include "session/workspace.hpp"

namespace triplane::actors::session {

expected<std::unique_ptr<sandbox_pool>> sandbox_pool::create(const sandbox_config& config, std::string dir,
                                                             exec_limits profile, size_t size) {
  if (config.exec_shim.empty())
    return make_error(errc::unavailable, "triplane-sandbox-exec was not found: no pre-started sandboxes");
  // Whatever an earlier run left here (a crash) belongs to nobody now.
  if (auto err = remove_tree(dir)) return err;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return make_error(errc::io_error, "cannot create sandbox pool directory '" + dir + "': " + ec.message());
  auto pool = std::unique_ptr<sandbox_pool>(new sandbox_pool(config, std::move(dir), profile, size));
  auto* raw = pool.get();
  pool->thread_ = std::thread([raw] { raw->run(); });
  return pool;
}

sandbox_pool::sandbox_pool(const sandbox_config& config, std::string dir, exec_limits profile, size_t size)
    : config_(config), dir_(std::move(dir)), profile_(profile), size_(size) {}

sandbox_pool::~sandbox_pool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (thread_.joinable()) thread_.join();
  ready_.clear();  // kills and reaps the idle sandboxes
  (void)remove_tree(dir_);
}

void sandbox_pool::run() {
  const std::string group_prefix = "tp-pool-" + std::to_string(::getpid()) + "-" +
                                   std::to_string(reinterpret_cast<uintptr_t>(this)) + "-";
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    if (ready_.size() >= size_) {
      changed_.wait(lock);
      continue;
    }
    uint64_t n = started_++;
    lock.unlock();
    entry e;
    e.dir = dir_ + "/" + std::to_string(n);
    caf::error err;
    if (::mkdir(e.dir.c_str(), 0755) != 0) {
      err = make_error(errc::io_error, "mkdir " + e.dir + ": " + std::strerror(errno));
    } else {
      auto proc = sandbox_process::prestart(config_, e.dir, profile_, group_prefix + std::to_string(n));
      if (proc) e.proc = std::move(*proc);
      else err = proc.error();
    }
    lock.lock();
    if (!err) {
      ready_.push_back(std::move(e));
      changed_.notify_all();
      continue;
    }
    // The host cannot start one now: try again later, not in a tight loop.
    lock.unlock();
    (void)remove_tree(e.dir);
    lock.lock();
    changed_.wait_for(lock, std::chrono::seconds(1), [this] { return stopping_; });
  }
}

bool sandbox_pool::fits(const launch_spec& spec) const {
  if (spec.network != network_policy::none) return false;
  // Only where the pre-joined cgroup enforces what a fresh start would.
  return !config_.cgroups || (config_.cgroups->joins(spec.limits) & ~config_.cgroups->joins(profile_)) == 0;
}

expected<std::unique_ptr<sandbox_process>> sandbox_pool::prestart_for(const std::string& workspace,
                                                                      const std::string& group_name) const {
  return sandbox_process::prestart(config_, workspace, profile_, group_name);
}

std::unique_ptr<sandbox_process> sandbox_pool::take(launch_spec& spec, sandbox_process::output_sink sink,
                                                    std::shared_ptr<output_credit> credit,
                                                    std::string* workspace_dir) {
  if (!fits(spec)) return nullptr;
  std::unique_lock<std::mutex> lock(mutex_);
  while (!ready_.empty()) {
    entry e = std::move(ready_.front());
    ready_.pop_front();
    if (ready_.empty()) changed_.notify_all();  // else the taker's replenish() asks, later
    lock.unlock();
    auto err = e.proc->assign(spec, sink, credit);
    if (!err) {
      *workspace_dir = e.dir;
      return std::move(e.proc);
    }
    e.proc.reset();  // ended or unusable: kill and reap it, try the next
    (void)remove_tree(e.dir);
    if (code_of(err) == errc::invalid_argument) return nullptr;
    lock.lock();
  }
  return nullptr;
}

void sandbox_pool::replenish() {
  changed_.notify_all();
}

size_t sandbox_pool::ready() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ready_.size();
}

bool sandbox_pool::wait_ready(size_t n, uint64_t timeout_ms) const {
  std::unique_lock<std::mutex> lock(mutex_);
  return changed_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return ready_.size() >= n; });
}

} // namespace triplane::actors::session
