// Starts the real node, `triplane serve` (runtime directory, sandbox sessions, RPC server), as a
// child process for end-to-end tests: a fresh data directory and a tokens file with three tokens
// (tenants "alice" and "bob", admin "ops"). Listens on 127.0.0.1 at a free port.
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
  /// Starts `triplane serve` with `extra_args` appended (e.g. "--triplane.rpc-max-calls=4",
  /// "--model", DIR) and waits up to 60 s for its "serving on HOST:PORT" line (throws
  /// std::runtime_error on failure). The child gets SIGKILL if the test process dies.
  explicit node_process(std::vector<std::string> extra_args = {});
  /// stop(), then removes the data directory and the tokens file.
  ~node_process();
  node_process(const node_process&) = delete;
  node_process& operator=(const node_process&) = delete;

  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }
  uint16_t port() const { return port_; }
  pid_t pid() const { return pid_; }
  const test_tokens& tokens() const { return tokens_; }
  const std::string& data_dir() const { return data_dir_; }
  /// Resident set size of the node, KiB (from /proc).
  long rss_kib() const;
  /// stop(), then starts the node again on the same data directory, tokens and arguments
  /// (a new port: use endpoint() again); throws std::runtime_error when it does not start.
  void restart();
  /// Whether the process is still running.
  bool alive() const;
  /// Stops the node with SIGTERM, waits up to 20 s (then SIGKILL) and returns its exit status
  /// as from waitpid, or -1 when it had to be killed or was not running.
  int stop();

private:
  void launch();

  test_tokens tokens_;
  std::vector<std::string> extra_args_;
  std::string data_dir_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
};

} // namespace triplane::test
