// bubblewrap launch and supervision of one sandboxed command.
#include "session/sandbox_process.hpp"

#include "session/fd_guard.hpp"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>

#include <dirent.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace triplane::actors::session {
namespace {

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

bool is_symlink(const std::string& path, std::string* target) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) return false;
  char buf[4096];
  auto n = ::readlink(path.c_str(), buf, sizeof buf - 1);
  if (n < 0) return false;
  target->assign(buf, static_cast<size_t>(n));
  return true;
}

/// A seccomp program that refuses every socket family but AF_UNIX: with network_policy::none
/// even the sandbox's own loopback is unreachable. Other architectures' syscall ABIs (i386,
/// x32) are refused entirely so they cannot bypass the check.
std::vector<sock_filter> no_network_filter() {
  constexpr uint32_t deny = SECCOMP_RET_ERRNO | (EACCES & SECCOMP_RET_DATA);
  return {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1),  // x32 ABI bit
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_socket, 0, 4),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args[0])),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_UNIX, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    BPF_STMT(BPF_RET | BPF_K, deny),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
}

int set_nonblock_cloexec(int fd) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  return fd;
}

uint64_t now_unix_ms() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

/// What the child needs between clone and execve, prepared by the parent: the child may only
/// make async-signal-safe calls (it shares the parent's memory until it execs).
struct child_setup {
  int c_in, c_out, c_err, c_status, c_seccomp, c_block, c_shim;
  const char* const* join;
  size_t join_count;
  uint64_t fsize, cpu_s, as_bytes;
  char* const* argv;
  char* const* envp;
};

int child_main(void* arg) {
  const auto& s = *static_cast<const child_setup*>(arg);
  // Handlers first (signals are still blocked), then unblock.
  for (int sig = 1; sig < NSIG; ++sig)
    if (sig != SIGKILL && sig != SIGSTOP) ::signal(sig, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  // Its own process group: terminal signals aimed at the node's group do not reach it. (Not
  // setsid(): bwrap's --new-session gives the command its own session anyway, and a session
  // leader bwrap measured slower.)
  ::setpgid(0, 0);
  ::dup2(s.c_in, 0);
  ::dup2(s.c_out, 1);
  ::dup2(s.c_err, 2);
  ::dup2(s.c_status, 3);
  if (s.c_seccomp >= 0) ::dup2(s.c_seccomp, 4);
  else ::close(4);
  if (s.c_block >= 0) ::dup2(s.c_block, 5);
  else ::close(5);
  if (s.c_shim >= 0) ::dup2(s.c_shim, 6);
  else ::close(6);
  ::close_range(7, ~0u, 0);
  char pidbuf[24];
  int len = 0;
  {
    char rev[24];
    int n = 0;
    for (pid_t p = ::getpid(); p > 0; p /= 10) rev[n++] = static_cast<char>('0' + p % 10);
    while (n > 0) pidbuf[len++] = rev[--n];
  }
  for (size_t i = 0; i < s.join_count; ++i) {
    int fd = ::open(s.join[i], O_WRONLY | O_CLOEXEC);
    if (fd < 0 || ::write(fd, pidbuf, static_cast<size_t>(len)) != len) {
      static const char msg[] = "triplane: cannot join the command's cgroup\n";
      (void)!::write(2, msg, sizeof msg - 1);
      ::_exit(125);
    }
    ::close(fd);
  }
  if (s.fsize) {
    rlimit rl{s.fsize, s.fsize};
    ::setrlimit(RLIMIT_FSIZE, &rl);
  }
  if (s.cpu_s) {
    rlimit rl{s.cpu_s, s.cpu_s + 1};
    ::setrlimit(RLIMIT_CPU, &rl);
  }
  if (s.as_bytes) {
    rlimit rl{s.as_bytes, s.as_bytes};
    ::setrlimit(RLIMIT_AS, &rl);
  }
  rlimit core{0, 0};
  ::setrlimit(RLIMIT_CORE, &core);
  ::execve(s.argv[0], s.argv, s.envp);
  static const char msg[] = "triplane: cannot execute bwrap\n";
  (void)!::write(2, msg, sizeof msg - 1);
  ::_exit(127);
}

} // namespace

expected<sandbox_config> sandbox_config::detect(const cgroup_host* cgroups,
                                               const std::string& staging_dir) {
  sandbox_config cfg;
  for (const char* candidate : {"/usr/bin/bwrap", "/usr/local/bin/bwrap", "/bin/bwrap"})
    if (::access(candidate, X_OK) == 0) {
      cfg.bwrap_path = candidate;
      break;
    }
  if (cfg.bwrap_path.empty())
    return make_error(errc::unavailable, "bubblewrap (bwrap) is not installed");
  cfg.cgroups = cgroups;
  {
    char self[4096];
    auto n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    std::string beside;
    if (n > 0)
      beside = (std::filesystem::path(std::string(self, static_cast<size_t>(n))).parent_path() /
                "triplane-sandbox-exec")
                   .string();
#ifdef TRIPLANE_SANDBOX_EXEC_PATH
    std::string built = TRIPLANE_SANDBOX_EXEC_PATH;
#else
    std::string built;
#endif
    for (const auto& candidate : {beside, built})
      if (!candidate.empty() && ::access(candidate.c_str(), X_OK) == 0) {
        cfg.exec_shim = candidate;
        break;
      }
  }
  cfg.ro_binds.push_back("/usr");
  for (const char* top : {"/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"}) {
    std::string target;
    if (is_symlink(top, &target))
      cfg.symlinks.emplace_back(target, top);
    else if (exists(top))
      cfg.ro_binds.push_back(top);
  }
  // The parts of /etc programs need to run: the loader's cache, alternatives (cc, python3),
  // name-service files without secrets, timezone, python's site config. Never shadow/gshadow,
  // ssl private keys, or anything under /root, /home, /var, /work.
  std::vector<std::string> etc;
  for (const char* name :
       {"ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "timezone",
        "nsswitch.conf", "hosts", "passwd", "group", "protocols", "services", "os-release",
        "debian_version", "python3", "python3.11", "python3.12", "mime.types", "bash.bashrc",
        "profile", "inputrc"}) {
    std::string path = std::string("/etc/") + name;
    if (exists(path)) etc.push_back(name);
  }
  if (!staging_dir.empty()) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::path staged = fs::path(staging_dir) / "etc";
    fs::remove_all(staged, ec);
    fs::create_directories(staged, ec);
    for (const auto& name : etc) {
      if (ec) break;
      fs::copy(fs::path("/etc") / name, staged / name,
               fs::copy_options::recursive | fs::copy_options::copy_symlinks, ec);
    }
    if (ec)
      return make_error(errc::io_error, "cannot stage /etc for the sandbox in '" +
                                            staged.string() + "': " + ec.message());
    cfg.etc_dir = staged.string();
  } else {
    for (const auto& name : etc) cfg.ro_binds.push_back("/etc/" + name);
  }
  return cfg;
}

expected<std::unique_ptr<sandbox_process>> sandbox_process::start(const sandbox_config& config,
                                                                  launch_spec spec,
                                                                  output_sink sink,
                                                                  std::shared_ptr<output_credit> credit) {
  if (spec.argv.empty() || spec.argv.front().empty())
    return make_error(errc::invalid_argument, "empty command");
  if (credit && !sink) return make_error(errc::invalid_argument, "flow control without a sink");
  auto proc = launch(config, std::move(spec), std::move(sink), false);
  if (proc) (*proc)->credit_ = std::move(credit);
  return proc;
}

expected<std::unique_ptr<sandbox_process>> sandbox_process::prestart(const sandbox_config& config,
                                                                     const std::string& workspace,
                                                                     const exec_limits& cgroup_limits,
                                                                     const std::string& group_name) {
  if (config.exec_shim.empty())
    return make_error(errc::unavailable, "triplane-sandbox-exec was not found: no pre-started sandboxes");
  launch_spec spec;
  spec.workspace = workspace;
  spec.argv = {"/run/triplane-exec"};
  spec.env = {"PATH=/usr/bin:/bin"};
  spec.limits.memory_bytes = cgroup_limits.memory_bytes;
  spec.limits.max_processes = cgroup_limits.max_processes;
  spec.limits.cpu_time_ms = cgroup_limits.cpu_time_ms;
  spec.network = network_policy::none;
  spec.group_name = group_name;
  spec.hold = true;
  return launch(config, std::move(spec), nullptr, true);
}

void sandbox_process::note_enforced(bool memory_by_cgroup) {
  const auto& lim = spec_.limits;
  auto& e = result_.enforced;
  e = {};
  if (lim.memory_bytes) e.memory = memory_by_cgroup ? cgroup_->memory : limit_mechanism::rlimit;
  if (lim.max_processes && cgroup_ && cgroup_->processes != limit_mechanism::none)
    e.processes = cgroup_->processes;
  if (lim.cpu_time_ms)
    e.cpu_time = (cgroup_ && cgroup_->cpu != limit_mechanism::none) ? cgroup_->cpu : limit_mechanism::rlimit;
  if (lim.max_file_bytes) e.file_size = limit_mechanism::rlimit;
  if (spec_.timeout_ms) e.wall_clock = limit_mechanism::supervisor;
}

caf::error sandbox_process::assign(launch_spec& spec_in, output_sink sink,
                                   std::shared_ptr<output_credit> credit) {
  if (!deferred_ || assigned_)
    return make_error(errc::internal, "assign() needs a pre-started sandbox without a command");
  if (spec_in.argv.empty() || spec_in.argv.front().empty())
    return make_error(errc::invalid_argument, "empty command");
  if (credit && !sink) return make_error(errc::invalid_argument, "flow control without a sink");
  if (pump(0)) return make_error(errc::unavailable, "the pre-started sandbox has ended");
  const exec_limits lim = spec_in.limits;
  if (cgroup_) {
    std::string why;
    if (!cgroups_->set_limits(*cgroup_, lim, &why))
      return make_error(errc::unavailable, "pre-started sandbox: " + why);
  } else if (cgroups_ && cgroups_->joins(lim) != 0) {
    return make_error(errc::unavailable, "pre-started sandbox: the limits need a cgroup it did not join");
  }
  launch_spec spec = std::move(spec_in);
  bool memory_by_cgroup = cgroup_ && cgroup_->memory != limit_mechanism::none;
  const uint64_t cpu_s = lim.cpu_time_ms ? (lim.cpu_time_ms + 999) / 1000 + 1 : 0;
  const uint64_t as_bytes = (!memory_by_cgroup && lim.memory_bytes) ? lim.memory_bytes : 0;
  // The header triplane-sandbox-exec reads from stdin before the command's own input.
  std::string fields;
  auto field = [&](const std::string& f) {
    fields += f;
    fields.push_back('\0');
  };
  field(spec.cwd);
  field(std::to_string(lim.max_file_bytes));
  field(std::to_string(cpu_s));
  field(std::to_string(as_bytes));
  field(std::to_string(spec.argv.size()));
  for (const auto& a : spec.argv) field(a);
  // As bwrap does for the command it runs: PWD names the working directory.
  size_t envc = 1;
  for (const auto& e : spec.env)
    if (e.compare(0, 4, "PWD=") != 0) ++envc;
  field(std::to_string(envc));
  for (const auto& e : spec.env)
    if (e.compare(0, 4, "PWD=") != 0) field(e);
  field("PWD=" + spec.cwd);
  std::string header(8, '\0');
  uint64_t len = fields.size();
  for (int i = 0; i < 8; ++i) header[static_cast<size_t>(i)] = static_cast<char>((len >> (8 * i)) & 0xff);
  spec.stdin_data.insert(0, header + fields);
  spec.workspace = spec_.workspace;
  spec.network = spec_.network;
  spec.group_name = spec_.group_name;
  spec.hold = true;
  spec_ = std::move(spec);
  sink_ = std::move(sink);
  credit_ = std::move(credit);
  note_enforced(memory_by_cgroup);
  started_ = std::chrono::steady_clock::now();
  if (spec_.timeout_ms) deadline_ = started_ + std::chrono::milliseconds(spec_.timeout_ms);
  assigned_ = true;
  return {};
}

expected<std::unique_ptr<sandbox_process>> sandbox_process::launch(const sandbox_config& config,
                                                                   launch_spec spec,
                                                                   output_sink sink,
                                                                   bool deferred) {
  auto proc = std::unique_ptr<sandbox_process>(new sandbox_process);
  proc->deferred_ = deferred;
  proc->cgroups_ = config.cgroups;

  // Limits: cgroups where the host has them, rlimits otherwise (per process only).
  std::string cgroup_why;
  if (config.cgroups)
    proc->cgroup_ = config.cgroups->create(spec.group_name, spec.limits, &cgroup_why);
  const auto& lim = spec.limits;
  bool memory_by_cgroup = proc->cgroup_ && proc->cgroup_->memory != limit_mechanism::none;

  // Arguments, built before fork: the child may only make async-signal-safe calls.
  std::vector<std::string> args{config.bwrap_path,
                                "--unshare-user", "--unshare-pid", "--unshare-ipc",
                                "--unshare-uts", "--unshare-cgroup", "--unshare-net",
                                "--uid", std::to_string(config.uid),
                                "--gid", std::to_string(config.gid),
                                "--hostname", "sandbox",
                                "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                                "--json-status-fd", "3"};
  for (const auto& path : config.ro_binds) {
    args.insert(args.end(), {"--ro-bind", path, path});
  }
  if (!config.etc_dir.empty()) args.insert(args.end(), {"--ro-bind", config.etc_dir, "/etc"});
  // The first program of a pre-started sandbox is a copy on the sandbox's own tmpfs (read from
  // fd 6), not a bind of the host's file: it removes itself before it runs the command, so
  // nothing of the host's plumbing stays visible in there.
  fd_guard shim;
  if (deferred) {
    shim.fd = ::open(config.exec_shim.c_str(), O_RDONLY | O_CLOEXEC);
    if (shim.fd < 0)
      return make_error(errc::unavailable, "cannot open " + config.exec_shim + ": " + std::strerror(errno));
    args.insert(args.end(), {"--perms", "0555", "--file", "6", spec.argv.front()});
  }
  for (const auto& [target, link] : config.symlinks) args.insert(args.end(), {"--symlink", target, link});
  args.insert(args.end(), {"--proc", "/proc", "--dev", "/dev", "--size",
                           std::to_string(config.tmp_bytes), "--tmpfs", "/tmp",
                           "--bind", spec.workspace, "/workspace", "--chdir", spec.cwd});
  int seccomp_fd = -1;
  if (spec.network == network_policy::none) {
    auto filter = no_network_filter();
    seccomp_fd = static_cast<int>(::memfd_create("tp-seccomp", MFD_CLOEXEC));
    if (seccomp_fd < 0) {
      return make_error(errc::io_error, "memfd_create for seccomp failed");
    }
    auto bytes = filter.size() * sizeof(sock_filter);
    if (::write(seccomp_fd, filter.data(), bytes) != static_cast<ssize_t>(bytes) ||
        ::lseek(seccomp_fd, 0, SEEK_SET) != 0) {
      ::close(seccomp_fd);
      return make_error(errc::io_error, "writing the seccomp program failed");
    }
    args.insert(args.end(), {"--seccomp", "4"});
  }
  // Held: bwrap sets the sandbox up, then waits on fd 5 before it runs the command, so the
  // caller can fill the workspace meanwhile (see release()).
  int block_pipe[2] = {-1, -1};
  if (spec.hold) {
    if (::pipe2(block_pipe, O_CLOEXEC) != 0)
      return make_error(errc::io_error, std::string("pipe2: ") + std::strerror(errno));
    args.insert(args.end(), {"--block-fd", "5"});
  }
  args.push_back("--");
  args.insert(args.end(), spec.argv.begin(), spec.argv.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (auto& e : spec.env) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<const char*> join;
  if (proc->cgroup_)
    for (const auto& f : proc->cgroup_->join_files()) join.push_back(f.c_str());

  int in_pair[2], out_pipe[2], err_pipe[2], status_pipe[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, in_pair) != 0)
    return make_error(errc::io_error, std::string("socketpair: ") + std::strerror(errno));
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0 ||
      ::pipe2(status_pipe, O_CLOEXEC) != 0)
    return make_error(errc::io_error, std::string("pipe2: ") + std::strerror(errno));
  // The child's ends are moved above every fd number we dup2 onto (0..4), so the dup2 calls
  // cannot clobber each other.
  int c_in = ::fcntl(in_pair[1], F_DUPFD_CLOEXEC, 100);
  int c_out = ::fcntl(out_pipe[1], F_DUPFD_CLOEXEC, 100);
  int c_err = ::fcntl(err_pipe[1], F_DUPFD_CLOEXEC, 100);
  int c_status = ::fcntl(status_pipe[1], F_DUPFD_CLOEXEC, 100);
  int c_seccomp = seccomp_fd >= 0 ? ::fcntl(seccomp_fd, F_DUPFD_CLOEXEC, 100) : -1;
  int c_block = block_pipe[0] >= 0 ? ::fcntl(block_pipe[0], F_DUPFD_CLOEXEC, 100) : -1;
  int c_shim = shim.fd >= 0 ? ::fcntl(shim.fd, F_DUPFD_CLOEXEC, 100) : -1;
  if (block_pipe[0] >= 0) ::close(block_pipe[0]);
  ::close(in_pair[1]);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  ::close(status_pipe[1]);
  if (seccomp_fd >= 0) ::close(seccomp_fd);

  // A pre-started sandbox's rlimits are set by triplane-sandbox-exec once the command is known.
  const uint64_t fsize = deferred ? 0 : lim.max_file_bytes;
  const uint64_t cpu_s = !deferred && lim.cpu_time_ms ? (lim.cpu_time_ms + 999) / 1000 + 1 : 0;
  const uint64_t as_bytes = (!deferred && !memory_by_cgroup && lim.memory_bytes) ? lim.memory_bytes : 0;

  proc->started_ = std::chrono::steady_clock::now();
  child_setup setup;
  setup.c_in = c_in;
  setup.c_out = c_out;
  setup.c_err = c_err;
  setup.c_status = c_status;
  setup.c_seccomp = c_seccomp;
  setup.c_block = c_block;
  setup.c_shim = c_shim;
  setup.join = join.data();
  setup.join_count = join.size();
  setup.fsize = fsize;
  setup.cpu_s = cpu_s;
  setup.as_bytes = as_bytes;
  setup.argv = argv.data();
  setup.envp = envp.data();
  // clone(CLONE_VM | CLONE_VFORK) like posix_spawn: no copy of the node's page tables and no
  // copy-on-write faults in the node afterwards (fork() would charge both to every exec). We
  // are suspended until the child execs. All signals stay blocked across the clone so that no
  // handler of ours can run on the shared memory in the child before it resets them.
  constexpr size_t stack_bytes = 64 * 1024;
  void* stack = ::mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  pid_t pid = -1;
  int clone_errno = ENOMEM;
  if (stack != MAP_FAILED) {
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_BLOCK, &all, &old);
    pid = ::clone(child_main, static_cast<char*>(stack) + stack_bytes, CLONE_VM | CLONE_VFORK | SIGCHLD,
                  &setup);
    clone_errno = errno;
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    ::munmap(stack, stack_bytes);
  }
  if (pid < 0) {
    for (int fd : {c_in, c_out, c_err, c_status, c_seccomp, c_block, c_shim, block_pipe[1], in_pair[0],
                   out_pipe[0], err_pipe[0], status_pipe[0]})
      if (fd >= 0) ::close(fd);
    return make_error(errc::io_error, std::string("clone: ") + std::strerror(clone_errno));
  }
  for (int fd : {c_in, c_out, c_err, c_status, c_seccomp, c_block, c_shim})
    if (fd >= 0) ::close(fd);
  proc->bwrap_pid_ = pid;
  proc->block_fd_ = block_pipe[1];
  proc->pidfd_ = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));  // glibc 2.36 lacks extern "C" on pidfd_open
  proc->in_fd_ = set_nonblock_cloexec(in_pair[0]);
  proc->out_fd_ = set_nonblock_cloexec(out_pipe[0]);
  proc->err_fd_ = set_nonblock_cloexec(err_pipe[0]);
  proc->status_fd_ = set_nonblock_cloexec(status_pipe[0]);
  if (spec.stdin_data.empty() && !deferred) {  // a pre-started one gets its command on stdin
    ::close(proc->in_fd_);
    proc->in_fd_ = -1;
  }
  if (spec.timeout_ms) proc->deadline_ = proc->started_ + std::chrono::milliseconds(spec.timeout_ms);
  proc->spec_ = std::move(spec);
  proc->sink_ = std::move(sink);
  proc->note_enforced(memory_by_cgroup);
  (void)now_unix_ms;
  return proc;
}

void sandbox_process::read_stream(int& fd, output_stream which) {
  char buf[65536];
  bool is_out = which == output_stream::out;
  std::string& kept = is_out ? result_.stdout_data : result_.stderr_data;
  bool& truncated = is_out ? result_.stdout_truncated : result_.stderr_truncated;
  uint64_t& seen = is_out ? out_bytes_ : err_bytes_;
  uint64_t cap = is_out ? spec_.limits.stdout_cap_bytes : spec_.limits.stderr_cap_bytes;
  for (int round = 0; round < 16; ++round) {  // bounded: a flood cannot starve the deadline
    size_t want = sizeof buf;
    if (credit_ && seen < cap) {
      // Never read more than the sink may take (past the cap, output is read and dropped).
      want = static_cast<size_t>(std::min<uint64_t>({want, credit_->available(), cap - seen}));
      if (want == 0) return;
    }
    auto n = ::read(fd, buf, want);
    if (n > 0) {
      last_output_ = std::chrono::steady_clock::now();
      size_t room = seen < cap ? static_cast<size_t>(cap - seen) : 0;
      size_t take = std::min(room, static_cast<size_t>(n));
      if (take < static_cast<size_t>(n)) truncated = true;
      if (take) {
        seen += take;
        if (credit_) credit_->consume(take);
        else kept.append(buf, take);
        if (sink_) sink_(which, std::string_view(buf, take));
      }
      continue;
    }
    if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
      ::close(fd);
      fd = -1;
    }
    return;
  }
}

bool sandbox_process::wants_read(int fd, output_stream which) const {
  if (fd < 0) return false;
  if (!credit_) return true;
  uint64_t seen = which == output_stream::out ? out_bytes_ : err_bytes_;
  uint64_t cap = which == output_stream::out ? spec_.limits.stdout_cap_bytes : spec_.limits.stderr_cap_bytes;
  return seen >= cap || credit_->available() > 0;
}

bool sandbox_process::drain_step(std::chrono::steady_clock::time_point until) {
  using namespace std::chrono;
  auto now = steady_clock::now();
  bool past_deadline = spec_.timeout_ms && now >= deadline_;
  // Credit available but nothing arrives for 2 s: something outside the sandbox holds the
  // pipe open (it cannot be the tree, which has ended). Waiting for credit has no such bound:
  // the deadline and kill_tree() end it.
  bool stalled = (wants_read(out_fd_, output_stream::out) || wants_read(err_fd_, output_stream::err))
                 && now - last_output_ > seconds(2);
  // A tree we killed (cancel, timeout, CPU or quota) does not wait for credit: what its pipes
  // still hold is dropped.
  if (killed_ || output_dropped_ || past_deadline || stalled || (out_fd_ < 0 && err_fd_ < 0)) {
    // Only output that was there counts as dropped (an open pipe may just not have shown EOF).
    auto holds_data = [](int fd) {
      int n = 0;
      return fd >= 0 && (::ioctl(fd, FIONREAD, &n) != 0 || n > 0);
    };
    if (holds_data(out_fd_)) result_.stdout_truncated = output_dropped_ = true;
    if (holds_data(err_fd_)) result_.stderr_truncated = output_dropped_ = true;
    finish(reaped_status_, *reaped_usage_);
    return true;
  }
  pollfd fds[3];
  int n = 0;
  int idx_out = -1, idx_err = -1;
  if (wants_read(out_fd_, output_stream::out)) { idx_out = n; fds[n++] = {out_fd_, POLLIN, 0}; }
  if (wants_read(err_fd_, output_stream::err)) { idx_err = n; fds[n++] = {err_fd_, POLLIN, 0}; }
  int idx_wake = n;
  fds[n++] = {credit_->wake_fd(), POLLIN, 0};
  auto limit = std::min(until, now + milliseconds(100));
  if (spec_.timeout_ms) limit = std::min(limit, deadline_);
  int timeout = static_cast<int>(std::max<int64_t>(0, duration_cast<milliseconds>(limit - now).count()));
  if (::poll(fds, static_cast<nfds_t>(n), timeout) > 0) {
    if (fds[idx_wake].revents) credit_->clear_wakeup();
    if (idx_out >= 0 && fds[idx_out].revents) read_stream(out_fd_, output_stream::out);
    if (idx_err >= 0 && fds[idx_err].revents) read_stream(err_fd_, output_stream::err);
  }
  return false;
}

void sandbox_process::feed_stdin() {
  const auto& data = spec_.stdin_data;
  while (stdin_written_ < data.size()) {
    auto n = ::send(in_fd_, data.data() + stdin_written_, data.size() - stdin_written_,
                    MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      stdin_written_ += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    break;  // reader gone (EPIPE): the rest of stdin is dropped
  }
  ::close(in_fd_);
  in_fd_ = -1;
}

void sandbox_process::read_status() {
  char buf[1024];
  for (;;) {
    auto n = ::read(status_fd_, buf, sizeof buf);
    if (n > 0) {
      status_buf_.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
      ::close(status_fd_);
      status_fd_ = -1;
    }
    break;
  }
  if (child_pid_ < 0) {
    auto pos = status_buf_.find("\"child-pid\"");
    if (pos != std::string::npos) {
      auto colon = status_buf_.find(':', pos);
      if (colon != std::string::npos) {
        auto end = status_buf_.find_first_of(",}", colon);
        if (end != std::string::npos)
          child_pid_ = std::atoi(status_buf_.substr(colon + 1, end - colon - 1).c_str());
      }
    }
  }
}

bool sandbox_process::pump(int wait_ms) {
  if (finished_) return true;
  using namespace std::chrono;
  auto until = steady_clock::now() + milliseconds(wait_ms);
  bool exited = false;
  for (;;) {
    if (reaped_) {
      if (drain_step(until)) return true;
      if (steady_clock::now() >= until) return false;
      continue;
    }
    auto now = steady_clock::now();
    if (spec_.timeout_ms && now >= deadline_ && !killed_for_timeout_) {
      killed_for_timeout_ = true;
      kill_tree();
    }
    if (spec_.limits.cpu_time_ms && cgroup_ && !killed_for_cpu_) {
      auto u = cgroup_->usage();
      if (u.has_cpu && (u.cpu_user_ns + u.cpu_system_ns) / 1000000 > spec_.limits.cpu_time_ms) {
        killed_for_cpu_ = true;
        kill_tree();
      }
    }
    pollfd fds[6];
    int n = 0;
    int idx_out = -1, idx_err = -1, idx_in = -1, idx_status = -1, idx_pid = -1, idx_wake = -1;
    // Out of credit: the pipe is left alone and fills, which blocks the command's writes.
    if (wants_read(out_fd_, output_stream::out)) { idx_out = n; fds[n++] = {out_fd_, POLLIN, 0}; }
    if (wants_read(err_fd_, output_stream::err)) { idx_err = n; fds[n++] = {err_fd_, POLLIN, 0}; }
    if (credit_) { idx_wake = n; fds[n++] = {credit_->wake_fd(), POLLIN, 0}; }
    // A pre-started sandbox gets its stdin (command header first) only once assigned.
    if (in_fd_ >= 0 && (!deferred_ || assigned_)) { idx_in = n; fds[n++] = {in_fd_, POLLOUT, 0}; }
    if (status_fd_ >= 0) { idx_status = n; fds[n++] = {status_fd_, POLLIN, 0}; }
    if (pidfd_ >= 0 && !exited) { idx_pid = n; fds[n++] = {pidfd_, POLLIN, 0}; }
    auto limit = until;
    if (spec_.timeout_ms && !killed_for_timeout_) limit = std::min(limit, deadline_);
    int timeout = static_cast<int>(
        std::max<int64_t>(0, duration_cast<milliseconds>(limit - steady_clock::now()).count()));
    if (spec_.limits.cpu_time_ms && cgroup_) timeout = std::min(timeout, 50);
    if (pidfd_ < 0 && !exited) timeout = std::min(timeout, 10);  // no pidfd: poll waitpid
    int ready = n ? ::poll(fds, static_cast<nfds_t>(n), timeout) : 0;
    if (n == 0 && timeout > 0) ::usleep(static_cast<useconds_t>(timeout) * 1000);
    if (ready > 0) {
      if (idx_wake >= 0 && fds[idx_wake].revents) credit_->clear_wakeup();
      if (idx_out >= 0 && fds[idx_out].revents) read_stream(out_fd_, output_stream::out);
      if (idx_err >= 0 && fds[idx_err].revents) read_stream(err_fd_, output_stream::err);
      if (idx_in >= 0 && fds[idx_in].revents) feed_stdin();
      if (idx_status >= 0 && fds[idx_status].revents) read_status();
      if (idx_pid >= 0 && fds[idx_pid].revents) exited = true;
    }
    if (pidfd_ < 0) exited = true;  // fall through to a non-blocking waitpid below
    if (exited) {
      int status = 0;
      ::rusage usage {};
      pid_t w = ::wait4(bwrap_pid_, &status, WNOHANG, &usage);
      if (w == bwrap_pid_ && credit_) {
        // Under flow control the pipes are drained as credit comes (drain_step).
        reaped_ = true;
        reaped_status_ = status;
        reaped_usage_ = std::make_unique<::rusage>(usage);
        last_output_ = steady_clock::now();
        continue;
      }
      if (w == bwrap_pid_) {
        // bwrap has gone, and with its pid-1 child the whole pid namespace. Drain what the
        // pipes still hold (their writers are dead, so this ends), then finish.
        // Bounded: should anything outside bwrap still hold a pipe, give up after 2 s
        // rather than spin.
        auto drain_until = steady_clock::now() + seconds(2);
        while ((out_fd_ >= 0 || err_fd_ >= 0) && steady_clock::now() < drain_until) {
          pollfd rest[2];
          int m = 0;
          if (out_fd_ >= 0) rest[m++] = {out_fd_, POLLIN, 0};
          if (err_fd_ >= 0) rest[m++] = {err_fd_, POLLIN, 0};
          if (::poll(rest, static_cast<nfds_t>(m), 100) <= 0) continue;
          if (out_fd_ >= 0) read_stream(out_fd_, output_stream::out);
          if (err_fd_ >= 0) read_stream(err_fd_, output_stream::err);
        }
        if (status_fd_ >= 0) read_status();
        finish(status, usage);
        return true;
      }
      if (pidfd_ >= 0) exited = false;  // spurious
    }
    if (steady_clock::now() >= until) return false;
  }
}

void sandbox_process::finish(int wait_status, const ::rusage& usage) {
  finished_ = true;
  auto& r = result_;
  r.duration_us = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                            std::chrono::steady_clock::now() - started_)
                                            .count());
  // bwrap reports the command's death by signal N as exit status 128+N (like a shell); a
  // command that itself exits with 128+N reads the same.
  if (WIFEXITED(wait_status)) {
    int code = WEXITSTATUS(wait_status);
    if (code > 128 && code < 128 + 65) {
      r.exited = false;
      r.term_signal = code - 128;
      r.exit_code = code;
    } else {
      r.exited = true;
      r.exit_code = code;
    }
  } else if (WIFSIGNALED(wait_status)) {
    r.exited = false;
    r.term_signal = WTERMSIG(wait_status);
    r.exit_code = 128 + r.term_signal;
  }
  r.timed_out = killed_for_timeout_;
  r.cpu_time_exceeded = killed_for_cpu_;
  if (killed_for_timeout_ || killed_for_cpu_) {
    r.exited = false;
    r.term_signal = SIGKILL;
  }
  if (cgroup_) {
    cgroup_->kill_all();  // anything that escaped the namespace teardown (should be nothing)
    auto u = cgroup_->usage();
    if (u.has_cpu) {
      r.cpu_user_us = u.cpu_user_ns / 1000;
      r.cpu_system_us = u.cpu_system_ns / 1000;
    }
    if (u.has_memory) r.peak_memory_bytes = u.peak_memory_bytes;
    if (u.oom_kills > 0) r.memory_exceeded = true;
  }
  if (!cgroup_ || r.cpu_user_us + r.cpu_system_us == 0) {
    r.cpu_user_us = static_cast<uint64_t>(usage.ru_utime.tv_sec) * 1000000 + usage.ru_utime.tv_usec;
    r.cpu_system_us = static_cast<uint64_t>(usage.ru_stime.tv_sec) * 1000000 + usage.ru_stime.tv_usec;
  }
  if (r.peak_memory_bytes == 0) r.peak_memory_bytes = static_cast<uint64_t>(usage.ru_maxrss) * 1024;
  if (r.cpu_time_exceeded || (r.term_signal == SIGXCPU)) r.cpu_time_exceeded = true;
  std::string note;
  if (r.timed_out) note += "killed: wall-clock timeout of " + std::to_string(spec_.timeout_ms) + " ms; ";
  if (r.cpu_time_exceeded) note += "killed: CPU time limit; ";
  if (r.memory_exceeded) note += "memory limit hit (OOM kill); ";
  if (r.term_signal == SIGXFSZ) note += "file size limit hit; ";
  if (r.stdout_truncated) note += "stdout truncated; ";
  if (r.stderr_truncated) note += "stderr truncated; ";
  if (output_dropped_)
    note += "output still in the pipes when the command ended was dropped (it was killed, or "
            "the sink took no more before the deadline); ";
  if (!note.empty()) note.resize(note.size() - 2);
  r.message = note;
  if (cgroups_) cgroups_->retire(std::move(cgroup_));  // without waiting for the kernel's reaping
  cgroup_.reset();
  close_fds();
}

const exec_result& sandbox_process::wait() {
  while (!pump(1000)) {
  }
  return result_;
}

void sandbox_process::signal(int signo) {
  if (finished_) return;
  if (signo == SIGKILL) {
    kill_tree();
    return;
  }
  if (child_pid_ < 0 && status_fd_ >= 0) read_status();
  if (child_pid_ > 0)
    ::kill(-child_pid_, signo);  // bwrap made the command a session (and group) leader
  else
    ::kill(bwrap_pid_, signo);
}

void sandbox_process::release() {
  if (block_fd_ < 0) return;
  char go = 1;
  (void)!::write(block_fd_, &go, 1);
  ::close(block_fd_);
  block_fd_ = -1;
}

namespace {

/// The processes whose parent is `parent` (from /proc/*/stat: no CONFIG_PROC_CHILDREN needed).
std::vector<int> children_of(pid_t parent) {
  std::vector<int> out;
  DIR* d = ::opendir("/proc");
  if (!d) return out;
  while (auto* e = ::readdir(d)) {
    int pid = std::atoi(e->d_name);
    if (pid <= 0) continue;
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    char buf[512];
    auto n = ::read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n <= 0) continue;
    buf[n] = '\0';
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
    const char* close = std::strrchr(buf, ')');
    char state = 0;
    int ppid = 0;
    if (close && std::sscanf(close + 1, " %c %d", &state, &ppid) == 2 && ppid == parent) out.push_back(pid);
  }
  ::closedir(d);
  return out;
}

} // namespace

size_t kill_orphaned_sandboxes(const std::string& workspaces_dir) {
  if (workspaces_dir.empty()) return 0;
  // bwrap gets the paths as the node configured them; match the absolute form too.
  std::vector<std::string> prefixes{workspaces_dir + "/"};
  std::error_code ec;
  auto absolute = std::filesystem::weakly_canonical(workspaces_dir, ec).string();
  if (!ec && !absolute.empty() && absolute + "/" != prefixes.front())
    prefixes.push_back(absolute + "/");
  auto read_file = [](const std::string& path, size_t max) {
    std::string out;
    fd_guard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
    if (fd.fd < 0) return out;
    char buf[4096];
    ssize_t n;
    while (out.size() < max && (n = ::read(fd.fd, buf, sizeof buf)) > 0)
      out.append(buf, static_cast<size_t>(n));
    return out;
  };
  size_t killed = 0;
  DIR* d = ::opendir("/proc");
  if (!d) return 0;
  const pid_t self = ::getpid();
  while (auto* e = ::readdir(d)) {
    int pid = std::atoi(e->d_name);
    if (pid <= 0 || pid == self) continue;
    auto base = std::string("/proc/") + e->d_name;
    if (read_file(base + "/comm", 64) != "bwrap\n") continue;
    auto cmdline = read_file(base + "/cmdline", 1 << 20);
    bool ours = false;
    for (size_t at = 0; at < cmdline.size() && !ours;) {
      auto end = cmdline.find('\0', at);
      if (end == std::string::npos) end = cmdline.size();
      std::string_view arg(cmdline.data() + at, end - at);
      for (const auto& p : prefixes)
        if (arg.substr(0, p.size()) == p) ours = true;
      at = end + 1;
    }
    if (ours && ::kill(pid, SIGKILL) == 0) ++killed;
  }
  ::closedir(d);
  return killed;
}

void sandbox_process::kill_tree() {
  if (finished_) return;
  killed_ = true;
  if (reaped_) return;  // the tree has ended (its pid may be reused): only its output is left
  // bwrap's pid-1 child holds PR_SET_PDEATHSIG(SIGKILL) (--die-with-parent): killing bwrap
  // kills it, and the kernel then kills every process of the pid namespace. Below: the window
  // in which the namespace is still being set up (and the cgroup sweep, where there is one).
  // And the namespace's pid 1 itself (from bwrap's status fd): its death takes every process
  // of the pid namespace with it, even where PDEATHSIG did not (yet) apply, e.g. while it
  // waits on --block-fd.
  if (child_pid_ < 0 && status_fd_ >= 0) read_status();
  if (child_pid_ <= 0) {
    // Not reported yet: bwrap may have cloned it and still be writing its uid map, the child
    // waiting for that before it sets PDEATHSIG. Killing bwrap now would leave the child
    // waiting forever. Stop bwrap (no clone can follow), then kill whatever it has cloned.
    ::kill(bwrap_pid_, SIGSTOP);
    siginfo_t info{};
    while (::waitid(P_PID, static_cast<id_t>(bwrap_pid_), &info, WSTOPPED | WEXITED | WNOWAIT) != 0 &&
           errno == EINTR) {}
    for (int pid : children_of(bwrap_pid_)) ::kill(pid, SIGKILL);
  }
  ::kill(bwrap_pid_, SIGKILL);
  if (child_pid_ > 0) ::kill(child_pid_, SIGKILL);
  if (cgroup_) cgroup_->kill_all();
}

void sandbox_process::close_fds() {
  for (int* fd : {&out_fd_, &err_fd_, &in_fd_, &status_fd_, &pidfd_, &block_fd_})
    if (*fd >= 0) {
      ::close(*fd);
      *fd = -1;
    }
}

sandbox_process::~sandbox_process() {
  if (!finished_ && bwrap_pid_ > 0 && !reaped_) {
    kill_tree();  // before the block fd closes: EOF on it would let a held command run
    if (block_fd_ >= 0) ::close(block_fd_);
    block_fd_ = -1;
    int status = 0;
    ::waitpid(bwrap_pid_, &status, 0);
  }
  close_fds();
}

} // namespace triplane::actors::session
