// cgroup v1/v2 groups for sandboxed commands. Only plain file I/O on cgroupfs: no library.
#include "session/cgroup_limits.hpp"

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace triplane::actors::session {
namespace {

bool write_file(const std::string& path, const std::string& value) {
  std::ofstream out(path);
  if (!out) return false;
  out << value;
  out.flush();
  return static_cast<bool>(out);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

uint64_t read_u64(const std::string& path) {
  auto text = read_file(path);
  return text.empty() ? 0 : std::strtoull(text.c_str(), nullptr, 10);
}

/// Value of `key` in a "key value\n" file (memory.oom_control, cpu.stat, memory.events).
uint64_t read_keyed(const std::string& path, const std::string& key) {
  std::istringstream in(read_file(path));
  std::string k;
  uint64_t v = 0;
  while (in >> k >> v)
    if (k == key) return v;
  return 0;
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

/// Our own group path for a v1 controller ("memory") or v2 ("") from /proc/self/cgroup.
std::string own_group(const std::string& controller) {
  std::istringstream in(read_file("/proc/self/cgroup"));
  std::string line;
  while (std::getline(in, line)) {
    auto a = line.find(':');
    auto b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    std::string list = line.substr(a + 1, b - a - 1);
    std::string path = line.substr(b + 1);
    if (controller.empty()) {
      if (list.empty() && line.compare(0, 2, "0:") == 0) return path;
      continue;
    }
    std::istringstream names(list);
    std::string name;
    while (std::getline(names, name, ','))
      if (name == controller) return path;
  }
  return {};
}

/// A writable parent directory for v1 controller `controller`, or "".
std::string v1_parent(const std::string& controller) {
  std::string mount = "/sys/fs/cgroup/" + controller;
  if (!is_dir(mount) || !is_dir(mount + "/") || ::access((mount + "/cgroup.procs").c_str(), F_OK) != 0)
    return {};
  std::string dir = mount + own_group(controller);
  if (!dir.empty() && dir.back() == '/') dir.pop_back();
  // Probe: can we make (and remove) a child group here?
  std::string probe = dir + "/tp-probe-" + std::to_string(::getpid());
  if (::mkdir(probe.c_str(), 0755) != 0 && errno != EEXIST) return {};
  ::rmdir(probe.c_str());
  return dir;
}

bool has_word(const std::string& list, const char* word) {
  std::istringstream in(list);
  std::string w;
  while (in >> w)
    if (w == word) return true;
  return false;
}

/// What a v2 directory can give the groups made under it.
struct v2_place {
  std::string dir;
  bool memory = false, pids = false, cpu = false;
};

/// Enables memory, pids and cpu (each where the parent offers it) for the children of `dir`,
/// which must hold no processes: enabling a threaded controller (pids, cpu) in a group that
/// holds processes would turn it into a threaded domain, whose children can hold no process.
void enable_controllers(const std::string& dir, int* error) {
  auto offered = read_file(dir + "/cgroup.controllers");
  for (const char* c : {"memory", "pids", "cpu"}) {
    if (!has_word(offered, c) || has_word(read_file(dir + "/cgroup.subtree_control"), c)) continue;
    int fd = ::open((dir + "/cgroup.subtree_control").c_str(), O_WRONLY | O_CLOEXEC);
    std::string op = std::string("+") + c;
    bool ok = fd >= 0 && ::write(fd, op.data(), op.size()) == static_cast<ssize_t>(op.size());
    if (!ok && error) *error = errno;
    if (fd >= 0) ::close(fd);
  }
}

/// The process ids in `dir` (its cgroup.procs).
std::vector<std::string> processes_in(const std::string& dir) {
  std::istringstream in(read_file(dir + "/cgroup.procs"));
  std::vector<std::string> out;
  std::string pid;
  while (in >> pid) out.push_back(pid);
  return out;
}

/// The controllers enabled for `dir`'s children, and a probe that a child can be made there.
std::optional<v2_place> usable_v2_place(const std::string& dir) {
  // A threaded domain's children cannot hold processes (the root group has no cgroup.type).
  if (read_file(dir + "/cgroup.type").find("threaded") != std::string::npos) return std::nullopt;
  auto enabled = read_file(dir + "/cgroup.subtree_control");
  v2_place p{dir, has_word(enabled, "memory"), has_word(enabled, "pids"), has_word(enabled, "cpu")};
  if (!p.memory && !p.pids) return std::nullopt;
  std::string probe = dir + "/tp-probe-" + std::to_string(::getpid());
  if (::mkdir(probe.c_str(), 0755) != 0 && errno != EEXIST) return std::nullopt;
  ::rmdir(probe.c_str());
  return p;
}

/// A cgroup v2 directory whose children this node can make and limit: `configured` when given
/// (a directory delegated to the node: it must exist and hold no processes), else the node's
/// own group. A process may not sit in a group whose controllers are enabled for children, so
/// when the node's own group holds the node (a service started with its own group, as systemd's
/// Delegate=yes does), the node moves itself into a leaf child, `triplane-node.<pid>`, and
/// enables the controllers in its former group: the usual way for a delegated service. When
/// other processes share the group (a node started from a shell), nothing is changed and v2 is
/// not used. `why` says what stood in the way, for the log.
std::optional<v2_place> v2_parent(const std::string& configured, std::string& why) {
  if (!configured.empty()) {
    if (::access((configured + "/cgroup.controllers").c_str(), F_OK) != 0) {
      why = "cgroup-parent '" + configured + "' is not a cgroup v2 directory";
      return std::nullopt;
    }
    if (configured != "/sys/fs/cgroup" && !processes_in(configured).empty()) {
      why = "cgroup-parent '" + configured + "' holds processes: give the node an empty group";
      return std::nullopt;
    }
    int error = 0;
    enable_controllers(configured, &error);
    auto p = usable_v2_place(configured);
    if (!p) why = "cgroup-parent '" + configured + "': cannot enable memory or pids for its children" +
                  (error ? std::string(" (") + std::strerror(error) + ")" : std::string());
    return p;
  }
  for (std::string mount : {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"}) {
    if (::access((mount + "/cgroup.controllers").c_str(), F_OK) != 0) continue;
    std::string dir = mount + own_group("");
    if (!dir.empty() && dir.back() == '/') dir.pop_back();
    // Detected before in this process: we are in our own leaf; its parent is the place.
    const std::string own_leaf = "/triplane-node." + std::to_string(::getpid());
    if (dir.size() > own_leaf.size() && dir.compare(dir.size() - own_leaf.size(), own_leaf.size(), own_leaf) == 0)
      dir.resize(dir.size() - own_leaf.size());
    auto offered = read_file(dir + "/cgroup.controllers");
    if (!has_word(offered, "memory") && !has_word(offered, "pids")) {
      why = "the node's cgroup " + dir + " is given neither the memory nor the pids controller";
      continue;
    }
    if (dir != mount) {  // the root group may hold processes and enable controllers at once
      auto procs = processes_in(dir);
      if (procs.size() > 1 || (procs.size() == 1 && procs.front() != std::to_string(::getpid()))) {
        why = "the node's cgroup " + dir + " holds other processes: cannot enable controllers for "
              "per-command groups (start the node in a cgroup of its own, or give cgroup-parent)";
        continue;
      }
      if (procs.size() == 1) {
        // Only us: step into a leaf of our own, so that the group can enable controllers.
        std::string leaf = dir + own_leaf;
        if ((::mkdir(leaf.c_str(), 0755) != 0 && errno != EEXIST) ||
            !write_file(leaf + "/cgroup.procs", std::to_string(::getpid()))) {
          ::rmdir(leaf.c_str());
          why = "cannot move the node into " + leaf + ": " + std::strerror(errno);
          continue;
        }
      }
    }
    int error = 0;
    enable_controllers(dir, &error);
    if (auto p = usable_v2_place(dir)) return p;
    why = "cannot make limited child groups in the node's cgroup " + dir +
          (error ? std::string(" (") + std::strerror(error) + ")" : std::string());
  }
  return std::nullopt;
}

} // namespace

std::unique_ptr<cgroup_host> cgroup_host::detect(const std::string& v2_parent_dir) {
  auto host = std::unique_ptr<cgroup_host>(new cgroup_host);
  if (auto place = v2_parent(v2_parent_dir, host->why_)) {
    host->v2_parent_ = place->dir;
    host->v2_memory_ = place->memory;
    host->v2_pids_ = place->pids;
    host->v2_cpu_ = place->cpu;
    host->mechanism_ = limit_mechanism::cgroup_v2;
    host->why_.clear();
    return host;
  }
  if (!v2_parent_dir.empty()) return host;  // configured and unusable: no silent fallback to v1
  host->v1_memory_ = v1_parent("memory");
  host->v1_pids_ = v1_parent("pids");
  host->v1_cpuacct_ = v1_parent("cpuacct");
  if (!host->v1_memory_.empty() || !host->v1_pids_.empty() || !host->v1_cpuacct_.empty()) {
    host->mechanism_ = limit_mechanism::cgroup_v1;
    host->why_.clear();
  } else if (host->why_.empty()) {
    host->why_ = "no writable cgroup hierarchy";
  }
  return host;
}

std::string cgroup_host::describe() const {
  switch (mechanism_) {
    case limit_mechanism::cgroup_v2:
      return "cgroup v2 under " + v2_parent_ + " (memory " + (v2_memory_ ? "yes" : "no") + ", pids " +
             (v2_pids_ ? "yes" : "no") + ", cpu " + (v2_cpu_ ? "yes" : "no") + ")";
    case limit_mechanism::cgroup_v1:
      return "cgroup v1 (memory " + (v1_memory_.empty() ? std::string("no") : v1_memory_) + ", pids " +
             (v1_pids_.empty() ? std::string("no") : v1_pids_) + ", cpuacct " +
             (v1_cpuacct_.empty() ? std::string("no") : v1_cpuacct_) + ")";
    default:
      return "no cgroups (" + why_ + "): memory and CPU by rlimit per process, no process limit";
  }
}

std::unique_ptr<exec_cgroup> cgroup_host::create(const std::string& name,
                                                 const exec_limits& limits,
                                                 std::string* why) const {
  if (mechanism_ == limit_mechanism::none) {
    if (why) *why = "no writable cgroup hierarchy";
    return nullptr;
  }
  auto group = std::unique_ptr<exec_cgroup>(new exec_cgroup);
  auto make = [&](const std::string& parent) -> std::string {
    std::string dir = parent + "/" + name;
    if (::mkdir(dir.c_str(), 0755) != 0) {
      if (why) *why = "mkdir " + dir + ": " + std::strerror(errno);
      return {};
    }
    group->dirs_.push_back(dir);
    group->join_files_.push_back(dir + "/cgroup.procs");
    return dir;
  };
  if (mechanism_ == limit_mechanism::cgroup_v2) {
    group->v2_ = true;
    auto dir = make(v2_parent_);
    if (dir.empty()) return nullptr;
    // cpu.stat (the accounting) is in every v2 group; memory.* and pids.* only where the
    // controller is enabled for the parent's children.
    group->cpu_dir_ = dir;
    if (v2_memory_) group->memory_dir_ = dir;
    if (v2_pids_) group->pids_dir_ = dir;
    if (limits.memory_bytes && v2_memory_) {
      if (!write_file(dir + "/memory.max", std::to_string(limits.memory_bytes))) {
        if (why) *why = "cannot set memory.max";
        return nullptr;
      }
      write_file(dir + "/memory.swap.max", "0");
      group->memory = limit_mechanism::cgroup_v2;
    }
    if (limits.max_processes && v2_pids_) {
      if (!write_file(dir + "/pids.max", std::to_string(limits.max_processes))) {
        if (why) *why = "cannot set pids.max";
        return nullptr;
      }
      group->processes = limit_mechanism::cgroup_v2;
    }
    group->cpu = limit_mechanism::cgroup_v2;
    return group;
  }
  // v1: one migration per hierarchy joined, each costing the kernel an RCU grace period (a few
  // ms), so only the hierarchies whose limits are requested are joined.
  if (!v1_memory_.empty() && limits.memory_bytes) {
    auto dir = make(v1_memory_);
    if (dir.empty()) return nullptr;
    group->memory_dir_ = dir;
    if (limits.memory_bytes) {
      if (!write_file(dir + "/memory.limit_in_bytes", std::to_string(limits.memory_bytes))) {
        if (why) *why = "cannot set memory.limit_in_bytes";
        return nullptr;
      }
      // Without swap accounting the limit could be dodged by swapping; set it where present.
      write_file(dir + "/memory.memsw.limit_in_bytes", std::to_string(limits.memory_bytes));
      group->memory = limit_mechanism::cgroup_v1;
    }
  }
  if (!v1_pids_.empty() && limits.max_processes) {
    auto dir = make(v1_pids_);
    if (dir.empty()) return nullptr;
    group->pids_dir_ = dir;
    if (limits.max_processes) {
      if (!write_file(dir + "/pids.max", std::to_string(limits.max_processes))) {
        if (why) *why = "cannot set pids.max";
        return nullptr;
      }
      group->processes = limit_mechanism::cgroup_v1;
    }
  }
  if (!v1_cpuacct_.empty() && limits.cpu_time_ms) {
    auto dir = make(v1_cpuacct_);
    if (dir.empty()) return nullptr;
    group->cpu_dir_ = dir;
    group->cpu = limit_mechanism::cgroup_v1;
  }
  if (group->dirs_.empty()) {
    if (why) *why = "no limit requested";
    return nullptr;
  }
  return group;
}

unsigned cgroup_host::joins(const exec_limits& limits) const {
  if (mechanism_ == limit_mechanism::cgroup_v2)
    return (v2_memory_ ? joins_memory : 0u) | (v2_pids_ ? joins_pids : 0u) | joins_cpu;
  unsigned mask = 0;
  if (mechanism_ != limit_mechanism::cgroup_v1) return mask;
  if (!v1_memory_.empty() && limits.memory_bytes) mask |= joins_memory;
  if (!v1_pids_.empty() && limits.max_processes) mask |= joins_pids;
  if (!v1_cpuacct_.empty() && limits.cpu_time_ms) mask |= joins_cpu;
  return mask;
}

bool cgroup_host::set_limits(exec_cgroup& group, const exec_limits& limits, std::string* why) const {
  auto fail = [&](const std::string& reason) {
    if (why) *why = reason;
    return false;
  };
  if (limits.memory_bytes && group.memory_dir_.empty() && (joins(limits) & joins_memory))
    return fail("the group has no memory controller");
  if (limits.max_processes && group.pids_dir_.empty() && (joins(limits) & joins_pids))
    return fail("the group has no pids controller");
  if (limits.cpu_time_ms && group.cpu_dir_.empty() && (joins(limits) & joins_cpu))
    return fail("the group has no cpuacct controller");
  const auto& dir = group.memory_dir_;
  group.memory = limit_mechanism::none;
  if (!dir.empty()) {
    std::string value = limits.memory_bytes ? std::to_string(limits.memory_bytes) : (group.v2_ ? "max" : "-1");
    if (group.v2_) {
      if (!write_file(dir + "/memory.max", value)) return fail("cannot set memory.max");
    } else {
      // memsw must stay >= the memory limit: lift it first, then set both.
      write_file(dir + "/memory.memsw.limit_in_bytes", "-1");
      if (!write_file(dir + "/memory.limit_in_bytes", value)) return fail("cannot set memory.limit_in_bytes");
      write_file(dir + "/memory.memsw.limit_in_bytes", value);
    }
    if (limits.memory_bytes) group.memory = mechanism_;
  }
  group.processes = limit_mechanism::none;
  if (!group.pids_dir_.empty()) {
    std::string value = limits.max_processes ? std::to_string(limits.max_processes) : "max";
    if (!write_file(group.pids_dir_ + "/pids.max", value)) return fail("cannot set pids.max");
    if (limits.max_processes) group.processes = mechanism_;
  }
  group.cpu = group.cpu_dir_.empty() ? limit_mechanism::none : mechanism_;
  return true;
}

cgroup_usage exec_cgroup::usage() const {
  cgroup_usage u;
  if (v2_) {
    u.cpu_user_ns = read_keyed(cpu_dir_ + "/cpu.stat", "user_usec") * 1000;
    u.cpu_system_ns = read_keyed(cpu_dir_ + "/cpu.stat", "system_usec") * 1000;
    u.has_cpu = true;
    if (!memory_dir_.empty()) {
      u.peak_memory_bytes = read_u64(memory_dir_ + "/memory.peak");
      u.has_memory = u.peak_memory_bytes > 0;
      u.oom_kills = read_keyed(memory_dir_ + "/memory.events", "oom_kill");
    }
    if (!pids_dir_.empty()) u.pids_refused = read_keyed(pids_dir_ + "/pids.events", "max");
    return u;
  }
  if (!cpu_dir_.empty()) {
    u.cpu_user_ns = read_u64(cpu_dir_ + "/cpuacct.usage_user");
    u.cpu_system_ns = read_u64(cpu_dir_ + "/cpuacct.usage_sys");
    u.has_cpu = true;
  }
  if (!memory_dir_.empty()) {
    u.peak_memory_bytes = read_u64(memory_dir_ + "/memory.max_usage_in_bytes");
    u.has_memory = true;
    u.oom_kills = read_keyed(memory_dir_ + "/memory.oom_control", "oom_kill");
  }
  if (!pids_dir_.empty()) u.pids_refused = read_keyed(pids_dir_ + "/pids.events", "max");
  return u;
}

std::vector<int> exec_cgroup::pids() const {
  std::vector<int> out;
  for (const auto& file : join_files_) {
    std::istringstream in(read_file(file));
    int pid = 0;
    while (in >> pid) out.push_back(pid);
    if (!out.empty()) break;  // v1: every controller holds the same processes
  }
  return out;
}

bool exec_cgroup::kill_all() {
  if (v2_ && !dirs_.empty() && write_file(dirs_.front() + "/cgroup.kill", "1")) {
    for (int i = 0; i < 200 && !pids().empty(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return pids().empty();
  }
  // v1 has no cgroup.kill: a process may fork between our read and our kill, so repeat until
  // the group stays empty (pids.max bounds how many can appear).
  for (int round = 0; round < 500; ++round) {
    auto list = pids();
    if (list.empty()) return true;
    for (int pid : list) ::kill(pid, SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return pids().empty();
}

bool exec_cgroup::try_remove() {
  bool all = true;
  for (auto i = dirs_.rbegin(); i != dirs_.rend(); ++i)
    if (::rmdir(i->c_str()) != 0 && errno != ENOENT) all = false;
  return all;
}

void cgroup_host::retire(std::unique_ptr<exec_cgroup> group) const {
  if (!group || group->try_remove()) return;
  std::lock_guard<std::mutex> lock(retire_mutex_);
  retired_.push_back(std::move(group));
  if (!reaper_.joinable()) reaper_ = std::thread([this] { reap(); });
  retire_cv_.notify_one();
}

void cgroup_host::reap() const {
  std::unique_lock<std::mutex> lock(retire_mutex_);
  for (;;) {
    retire_cv_.wait(lock, [this] { return stopping_ || !retired_.empty(); });
    if (retired_.empty()) return;  // stopping, nothing left
    auto group = std::move(retired_.front());
    retired_.pop_front();
    lock.unlock();
    group.reset();  // kills what is left, retries rmdir until the kernel let the last one go
    lock.lock();
  }
}

cgroup_host::~cgroup_host() {
  {
    std::lock_guard<std::mutex> lock(retire_mutex_);
    stopping_ = true;
  }
  retire_cv_.notify_all();
  if (reaper_.joinable()) reaper_.join();
}

exec_cgroup::~exec_cgroup() {
  kill_all();
  for (auto i = dirs_.rbegin(); i != dirs_.rend(); ++i) {
    // rmdir fails with EBUSY until the last killed process is reaped by the kernel.
    for (int attempt = 0; attempt < 100; ++attempt) {
      if (::rmdir(i->c_str()) == 0 || errno == ENOENT) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
}

} // namespace triplane::actors::session
