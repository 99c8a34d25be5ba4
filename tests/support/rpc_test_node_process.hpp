// Starts triplane_rpc_test_node (CAF + session directory TEST DOUBLE + real RPC server) as a
// child process for end-to-end tests, with three tokens: tenants "alice" and "bob", admin "ops".
#pragma once

#include <string>
#include <vector>

#include <sys/types.h>

namespace triplane::test {

struct test_tokens {
  std::string alice, bob, ops;  ///< clear tokens
  std::string file;             ///< the tokens file the node reads (salted hashes)
};

class node_process {
public:
  /// Starts the node and waits for its "PORT" line (throws std::runtime_error on failure).
  explicit node_process(std::vector<std::string> extra_args = {});
  /// Closes its stdin (clean stop), waits up to 10 s, then SIGKILL.
  ~node_process();
  node_process(const node_process&) = delete;
  node_process& operator=(const node_process&) = delete;

  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }
  uint16_t port() const { return port_; }
  pid_t pid() const { return pid_; }
  const test_tokens& tokens() const { return tokens_; }
  /// Resident set size of the node, KiB (from /proc).
  long rss_kib() const;
  /// Whether the process is still running.
  bool alive() const;
  /// Stops the node (stdin closed) and returns its exit status as from waitpid, or -1.
  int stop();

private:
  test_tokens tokens_;
  pid_t pid_ = -1;
  int stdin_fd_ = -1;
  uint16_t port_ = 0;
};

} // namespace triplane::test
