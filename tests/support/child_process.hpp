// Test support: runs a program as a child process with its stdout and stderr captured, to
// drive the `triplane` executable end to end. Header-only; POSIX.
#pragma once

#include <chrono>
#include <csignal>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

namespace triplane::testing {

/// A running child. Kills it (SIGKILL) on destruction if it is still running.
class child_process {
public:
  /// Starts `argv[0]` with `argv`. Check running() for success.
  explicit child_process(const std::vector<std::string>& argv) {
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], 1);
      dup2(err[1], 2);
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    close(out[1]);
    close(err[1]);
    out_fd_ = out[0];
    err_fd_ = err[0];
  }

  ~child_process() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) close(out_fd_);
    if (err_fd_ >= 0) close(err_fd_);
  }

  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  bool running() const { return pid_ > 0 && !exited_; }
  pid_t pid() const { return pid_; }

  /// Reads output until stdout contains `needle` or `timeout` passes; true when found.
  bool wait_for_output(const std::string& needle, std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (stdout_.find(needle) == std::string::npos) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      if (!pump(static_cast<int>(left.count()))) return stdout_.find(needle) != std::string::npos;
    }
    return true;
  }

  /// Sends `sig`.
  void signal(int sig) {
    if (pid_ > 0 && !exited_) kill(pid_, sig);
  }

  /// Waits up to `timeout` for the child to exit, draining its output. Returns its exit code,
  /// 128+signal when killed by a signal, or -1 on timeout (the child keeps running).
  int wait(std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!exited_) {
      int status = 0;
      auto r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        exited_ = true;
        code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) return -1;
      pump(20);
    }
    while (pump(0)) {
    }
    return code_;
  }

  const std::string& out() const { return stdout_; }
  const std::string& err() const { return stderr_; }

private:
  /// Reads what is available within `timeout_ms`; false when both pipes are at EOF.
  bool pump(int timeout_ms) {
    pollfd fds[2] = {{out_fd_, POLLIN, 0}, {err_fd_, POLLIN, 0}};
    int n = poll(fds, 2, timeout_ms);
    if (n <= 0) return n == 0 && (out_fd_ >= 0 || err_fd_ >= 0);
    bool open = false;
    char buf[4096];
    for (int i = 0; i < 2; ++i) {
      if (fds[i].revents & (POLLIN | POLLHUP)) {
        auto got = read(fds[i].fd, buf, sizeof buf);
        if (got > 0) {
          (i == 0 ? stdout_ : stderr_).append(buf, static_cast<size_t>(got));
          open = true;
        }
      } else {
        open = true;
      }
    }
    return open;
  }

  pid_t pid_ = -1;
  int out_fd_ = -1, err_fd_ = -1;
  bool exited_ = false;
  int code_ = -1;
  std::string stdout_, stderr_;
};

} // namespace triplane::testing
