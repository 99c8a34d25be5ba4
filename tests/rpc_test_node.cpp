// A node for RPC tests until `triplane serve` exists: CAF, the session directory TEST DOUBLE
// (tests/support/session_directory_double.hpp) and the real RPC server. Prints "PORT <n>" once
// serving; stops cleanly on SIGTERM/SIGINT or when stdin closes.
//
//   triplane_rpc_test_node --tokens FILE [--port N] [--max-calls N] [--max-sessions N]
//                          [--call-deadline-ms N] [--output-buffer BYTES]
#include <csignal>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>

#include <poll.h>
#include <sys/resource.h>
#include <unistd.h>

#include <caf/all.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "support/session_directory_double.hpp"
#include "triplane/rpc/server.hpp"

namespace {

volatile std::sig_atomic_t stop_requested = 0;
void on_signal(int) { stop_requested = 1; }

int usage(const char* why) {
  std::cerr << "triplane_rpc_test_node: " << why << "\n";
  return 2;
}

} // namespace

int main(int argc, char** argv) {
  // stdout carries only the "PORT" line.
  spdlog::set_default_logger(spdlog::stderr_color_mt("node"));
  triplane::rpc::server_options opts;
  opts.port = 0;
  std::string tokens_file;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--tokens") tokens_file = next();
    else if (a == "--port") opts.port = static_cast<uint16_t>(std::stoi(next()));
    else if (a == "--max-calls") opts.limits.max_concurrent_calls_per_tenant = std::stoul(next());
    else if (a == "--max-sessions") opts.limits.max_open_sessions_per_tenant = std::stoul(next());
    else if (a == "--call-deadline-ms")
      opts.limits.call_deadline = std::chrono::milliseconds(std::stol(next()));
    else if (a == "--output-buffer") opts.limits.max_exec_output_buffer = std::stoull(next());
    else return usage(("unknown option " + a).c_str());
  }
  if (tokens_file.empty()) return usage("--tokens FILE is required");
  auto tokens = triplane::rpc::load_tokens_file(tokens_file);
  if (!tokens) return usage(triplane::describe(tokens.error()).c_str());
  opts.tokens = std::move(*tokens);
  opts.describe_supervision = [] { return std::string("test-node\n  session_directory_double\n"); };

  // Thousands of client sockets must not exhaust our descriptors.
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) == 0) {
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
  }
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  std::signal(SIGPIPE, SIG_IGN);

  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 2);
  caf::actor_system sys{cfg};
  auto directory = triplane::test::spawn_session_directory_double(sys);
  auto server = triplane::rpc::rpc_server::start(opts, sys, directory);
  if (!server) {
    caf::anon_send_exit(directory, caf::exit_reason::user_shutdown);
    return usage(triplane::describe(server.error()).c_str());
  }
  std::cout << "PORT " << (*server)->port() << std::endl;

  while (!stop_requested) {
    pollfd p{0, POLLIN, 0};
    if (poll(&p, 1, 100) > 0) {
      char buf[256];
      if (read(0, buf, sizeof buf) <= 0) break;  // stdin closed: the test is gone
    }
  }
  auto cancelled = (*server)->stop(std::chrono::milliseconds(2000));
  spdlog::info("test node: stopped, {} calls cancelled", cancelled);
  caf::anon_send_exit(directory, caf::exit_reason::user_shutdown);
  return 0;
}
