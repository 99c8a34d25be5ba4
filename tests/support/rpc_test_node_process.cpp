// Child-process management for RPC end-to-end tests.
#include "rpc_test_node_process.hpp"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <thread>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "triplane/rpc/tokens.hpp"

#ifndef TRIPLANE_RPC_TEST_NODE
#error "TRIPLANE_RPC_TEST_NODE must name the test node executable"
#endif

namespace triplane::test {
namespace {

std::string record_line(const std::string& tenant, rpc::role who, const std::string& token) {
  auto rec = rpc::make_token_record(tenant, who, token);
  if (!rec) throw std::runtime_error("make_token_record failed");
  return rpc::format_token_line(*rec) + "\n";
}

} // namespace

node_process::node_process(std::vector<std::string> extra_args) {
  tokens_.alice = rpc::generate_token();
  tokens_.bob = rpc::generate_token();
  tokens_.ops = rpc::generate_token();
  char path[] = "/tmp/triplane-rpc-tokens-XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) throw std::runtime_error("mkstemp failed");
  close(fd);
  tokens_.file = path;
  {
    std::ofstream out{tokens_.file};
    out << "# test tokens\n"
        << record_line("alice", rpc::role::tenant, tokens_.alice)
        << record_line("bob", rpc::role::tenant, tokens_.bob)
        << record_line("ops", rpc::role::admin, tokens_.ops);
  }
  int in_pipe[2], out_pipe[2];
  if (pipe(in_pipe) != 0 || pipe(out_pipe) != 0) throw std::runtime_error("pipe failed");
  std::vector<std::string> args = {TRIPLANE_RPC_TEST_NODE, "--tokens", tokens_.file};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  pid_ = fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    dup2(in_pipe[0], 0);
    dup2(out_pipe[1], 1);
    close(in_pipe[1]);
    close(out_pipe[0]);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(in_pipe[0]);
  close(out_pipe[1]);
  stdin_fd_ = in_pipe[1];
  fcntl(stdin_fd_, F_SETFD, FD_CLOEXEC);
  // Read "PORT <n>\n".
  std::string line;
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (line.find('\n') == std::string::npos && std::chrono::steady_clock::now() < until) {
    pollfd p{out_pipe[0], POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    char c;
    if (read(out_pipe[0], &c, 1) != 1) break;
    line += c;
  }
  close(out_pipe[0]);
  if (line.rfind("PORT ", 0) != 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    throw std::runtime_error("test node did not start: '" + line + "'");
  }
  port_ = static_cast<uint16_t>(std::stoi(line.substr(5)));
}

int node_process::stop() {
  if (pid_ <= 0) return -1;
  if (stdin_fd_ >= 0) close(stdin_fd_);
  stdin_fd_ = -1;
  int status = -1;
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < until) {
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(pid_, SIGKILL);
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return -1;
}

node_process::~node_process() {
  stop();
  std::remove(tokens_.file.c_str());
}

bool node_process::alive() const {
  return pid_ > 0 && kill(pid_, 0) == 0 && waitpid(pid_, nullptr, WNOHANG) == 0;
}

long node_process::rss_kib() const {
  std::ifstream in{"/proc/" + std::to_string(pid_) + "/status"};
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      long v = 0;
      in >> v;
      return v;
    }
    std::string rest;
    std::getline(in, rest);
  }
  return -1;
}

} // namespace triplane::test
