// Child-process management for RPC end-to-end tests: the real `triplane serve`.
#include "serve_process.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <thread>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "triplane/rpc/tokens.hpp"

#ifndef TRIPLANE_SERVE_EXE
#error "TRIPLANE_SERVE_EXE must name the triplane executable"
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
  auto tmp = std::filesystem::temp_directory_path();
  std::string dir = (tmp / "triplane-rpc-node-XXXXXX").string();
  if (::mkdtemp(dir.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  data_dir_ = dir;
  tokens_.file = data_dir_ + ".tokens";
  {
    std::ofstream out{tokens_.file};
    out << "# test tokens\n"
        << record_line("alice", rpc::role::tenant, tokens_.alice)
        << record_line("bob", rpc::role::tenant, tokens_.bob)
        << record_line("ops", rpc::role::admin, tokens_.ops);
  }
  extra_args_ = std::move(extra_args);
  try {
    launch();
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove_all(data_dir_, ignored);
    std::remove(tokens_.file.c_str());
    throw;
  }
}

void node_process::restart() {
  stop();
  launch();
}

void node_process::launch() {
  int out_pipe[2];
  if (pipe(out_pipe) != 0) throw std::runtime_error("pipe failed");
  std::vector<std::string> args = {TRIPLANE_SERVE_EXE, "serve",     "--data-dir", data_dir_,
                                   "--listen",         "127.0.0.1:0", "--tokens",  tokens_.file};
  args.insert(args.end(), extra_args_.begin(), extra_args_.end());
  pid_ = fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    // A test that crashes must not leave a node behind.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    // Thousands of client sockets must not exhaust the node's descriptors.
    rlimit lim{};
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0) {
      lim.rlim_cur = lim.rlim_max;
      setrlimit(RLIMIT_NOFILE, &lim);
    }
    dup2(out_pipe[1], 1);
    close(out_pipe[0]);
    close(out_pipe[1]);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(out_pipe[1]);
  // Wait for "triplane: serving on HOST:PORT (data in DIR)".
  const std::string marker = "serving on ";
  std::string line;
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (line.find('\n') == std::string::npos && std::chrono::steady_clock::now() < until) {
    pollfd p{out_pipe[0], POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      continue;
    }
    char c;
    if (read(out_pipe[0], &c, 1) != 1) break;
    line += c;
  }
  close(out_pipe[0]);
  auto at = line.find(marker);
  auto colon = at == std::string::npos ? std::string::npos : line.find(':', at + marker.size());
  if (colon == std::string::npos) {
    stop();
    throw std::runtime_error("triplane serve did not start: '" + line + "'");
  }
  port_ = static_cast<uint16_t>(std::stoi(line.substr(colon + 1)));
}

int node_process::stop() {
  if (pid_ <= 0) return -1;
  kill(pid_, SIGTERM);
  int status = -1;
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
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
  std::error_code ignored;
  std::filesystem::remove_all(data_dir_, ignored);
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
