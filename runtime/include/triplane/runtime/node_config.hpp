// Configuration of a Triplane node: CAF's own config machinery (an INI-style file plus command
// line flags; flags win), validated into typed options before anything starts.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <caf/actor_system_config.hpp>

#include "triplane/runtime/error.hpp"
#include "triplane/storage/state_store.hpp"

namespace triplane::runtime {

/// Validated settings of `triplane serve`.
struct node_options {
  std::string data_dir = "./data";                 ///< RocksDB and sandbox workspaces live here
  std::string listen_host = "127.0.0.1";           ///< RPC API address
  uint16_t listen_port = 7400;                     ///< 0 = any free port (printed at start)
  std::string listen_unix;                         ///< extra Unix-domain socket path; empty: none
  std::string log_level = "info";                  ///< trace|debug|info|warn|error|critical|off
  std::string log_format = "text";                 ///< text | json (one JSON object per line)
  storage::durability durability = storage::durability::process_crash;
  size_t max_live_actors = 100000;                 ///< per node; LRU passivation beyond it
  std::chrono::milliseconds idle_timeout{30000};   ///< default idle timeout of actor kinds
  std::chrono::milliseconds shutdown_timeout{10000};  ///< deadline for draining at SIGINT/SIGTERM
  std::string config_file;                         ///< the file read, empty when none
  /// Sandbox sessions' workspaces, a cache of what RocksDB holds (empty: DATA_DIR/workspaces).
  /// A tmpfs here makes the first exec after rehydration cheaper (no journal on file creation).
  std::string workspaces_dir;
  /// A cgroup v2 directory delegated to the node for its commands' groups (memory, pids and
  /// cpu enabled or enable-able, no processes in it). Empty: the node's own group (see
  /// actors::session::cgroup_host::detect), else cgroup v1, else rlimits.
  std::string cgroup_parent;
  /// API tokens (salted hashes, see `triplane token`); empty: DATA_DIR/tokens, created on first
  /// start with a fresh admin and a "default" tenant token.
  std::string tokens_file;
  /// Inference plane: a Hugging Face Llama directory to serve (empty: no inference workers).
  std::string model_dir;
  std::string inference_backend = "cpu";  ///< cpu | cuda
  int tensor_parallel = 1;                ///< ranks of the worker's tensor-parallel group
  int64_t kv_cache_mb = 256;              ///< KV-cache budget per rank
  /// RPC API limits (rpc::limits): calls in flight per tenant (beyond: overloaded), Session
  /// capabilities held per tenant (beyond: limit_exceeded), the deadline of a call other than
  /// exec/generate (timeout), and the flow-control window of a streamed exec (output held for a
  /// slow client; beyond it the command waits on its pipe).
  uint32_t rpc_max_calls = 512;
  uint32_t rpc_max_sessions = 1024;
  /// Sessions a tenant may have stored (created and not destroyed); beyond, a create or fork
  /// is limit_exceeded.
  uint32_t rpc_max_stored_sessions = 100000;
  std::chrono::milliseconds rpc_call_deadline{10000};
  uint64_t rpc_exec_output_buffer = 8u << 20;
};

/// CAF's actor_system_config extended with the node's options (group `triplane`). Also keeps
/// CAF's own keys (`scheduler.max-threads`, `middleman.*`) settable from the same file.
class node_config : public caf::actor_system_config {
public:
  node_config();

  /// Parses `serve`'s arguments (without the program and subcommand names):
  ///   --config FILE, --data-dir DIR, --listen HOST:PORT, --listen-unix PATH, --tokens FILE, --log-level L,
  ///   --log-format text|json,
  ///   and any `--group.key=value` CAF option. `--opt value` and `--opt=value` both work.
  /// Sets `help_requested` for --help/-h. Errors: invalid_argument naming the option; not_found
  /// for a missing config file; invalid_argument for a malformed config file (with CAF's
  /// position information).
  caf::error parse_serve_args(const std::vector<std::string>& args);

  /// The validated options; call after parse_serve_args succeeded.
  expected<node_options> options() const;

  bool help_requested = false;

  /// The text `triplane serve --help` prints.
  static std::string serve_help();

private:
  std::string data_dir_ = "./data";
  std::string listen_ = "127.0.0.1:7400";
  std::string listen_unix_;
  std::string log_level_ = "info";
  std::string log_format_ = "text";
  std::string durability_ = "process-crash";
  size_t max_live_ = 100000;
  caf::timespan idle_timeout_ = std::chrono::seconds{30};
  caf::timespan shutdown_timeout_ = std::chrono::seconds{10};
  std::string config_file_;
  std::string tokens_file_;
  std::string model_dir_;
  std::string workspaces_dir_;
  std::string cgroup_parent_;
  std::string inference_backend_ = "cpu";
  int tensor_parallel_ = 1;
  int64_t kv_cache_mb_ = 256;
  size_t rpc_max_calls_ = 512;
  size_t rpc_max_sessions_ = 1024;
  size_t rpc_max_stored_sessions_ = 100000;
  caf::timespan rpc_call_deadline_ = std::chrono::seconds{10};
  size_t rpc_exec_output_buffer_ = 8u << 20;
};

/// Splits "HOST:PORT" ("[::1]:7400" for IPv6). Errors: invalid_argument naming the value.
caf::error parse_host_port(const std::string& text, std::string& host, uint16_t& port);

} // namespace triplane::runtime
