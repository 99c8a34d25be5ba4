// triplane::client: a synchronous C++ client for a Triplane node's RPC API (schemas/api.capnp).
// Every call blocks the calling thread until the answer arrives and returns a
// triplane::expected: on failure the caf::error carries the server's triplane::errc code
// (not_found, permission_denied, limit_exceeded, overloaded, timeout, ...) and its message;
// a lost connection is `unavailable`.
//
// Threading: a connection runs on the Cap'n Proto event loop of the thread that created it
// (connections made on one thread share that thread's loop); use it and its session handles
// only on that thread. A session handle does not keep its connection open: once the
// connection is destroyed, the handle's calls fail with `unavailable`. Do not fork() a
// process that holds a connection and use the client library in the child.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "triplane/runtime/error.hpp"

namespace triplane::client {

enum class output_stream { out, err };

/// Receives exec output as it is produced (called on the connection's thread).
using output_callback = std::function<void(output_stream, std::string_view)>;

struct exec_options {
  std::vector<std::string> argv;  ///< program and arguments; or
  std::string shell;              ///< a shell command line (when argv is empty)
  std::string stdin_data;
  std::vector<std::pair<std::string, std::string>> env;
  std::string cwd;
  uint32_t timeout_ms = 0;  ///< 0 = the server's default
  uint64_t output_cap_bytes = 0;  ///< bytes kept per stream; 0 = the node's default (1 MiB)
};

struct exec_result {
  int32_t exit_code = 0;   ///< -1 when killed by a signal
  int32_t signal = 0;
  bool truncated = false;
  uint64_t duration_us = 0, cpu_us = 0, peak_memory_bytes = 0;
  std::string stdout_data, stderr_data;  ///< filled only when exec ran without a callback
};

struct file_entry {
  std::string path;
  uint64_t size = 0;
  uint32_t mode = 0;
};

/// One page of a listing (session::list_files_page).
struct file_page {
  std::vector<file_entry> entries;  ///< sorted by path
  bool more = false;                ///< entries follow the last one
};

/// One page of a tenant's stored sessions (connection::list_sessions).
struct session_page {
  std::vector<std::string> ids;  ///< as the tenant named them, in byte order
  bool more = false;             ///< further ids follow: list again with `after` = ids.back()
};

struct session_info {
  std::string id;
  uint64_t created_unix_ms = 0, last_used_unix_ms = 0;
  uint64_t file_count = 0, kv_count = 0, exec_count = 0;
};

/// One generation. The node has no tokenizer: the prompt is token ids.
struct generate_options {
  std::string model;                    ///< empty = the node's model; else must match (not_found)
  std::vector<uint32_t> prompt_tokens;  ///< not empty; each id < the model's vocabulary size
  uint32_t max_tokens = 16;             ///< new tokens, >= 1 (0 = 16)
  float temperature = 0;                ///< <= 0: greedy
  float top_p = 1;                      ///< 1: off
  uint32_t top_k = 0;                   ///< 0: off
  uint64_t seed = 0;
  std::vector<uint32_t> stop_tokens;    ///< generation ends after one of these (<= 1024)
};

struct generate_result {
  std::vector<uint32_t> tokens;  ///< the generated ids, filled only without a callback
  uint32_t prompt_tokens = 0, generated_tokens = 0;
  std::string finish_reason;     ///< "length", "stop", "cancelled"
  uint64_t duration_us = 0;
  int64_t time_to_first_token_us = -1;
};

struct model_info {
  std::string name, backend;
  uint64_t parameters = 0;
  uint32_t context_length = 0, vocab_size = 0;
};

struct method_metrics {
  std::string method;
  uint64_t calls = 0, errors = 0, p50_us = 0, p90_us = 0, p99_us = 0, max_us = 0;
};

struct node_stats {
  uint64_t live_actors = 0, passivated_total = 0, activations_total = 0, failures_total = 0;
  uint64_t open_connections = 0;
  bool draining = false;
};

/// The node's inference worker (Admin.inferenceStats): load as of its last engine step and
/// counters since it (re)started.
struct inference_worker_stats {
  int64_t running = 0, queued = 0, kv_blocks_free = 0, kv_blocks_total = 0;
  uint64_t tokens_generated = 0, prompt_tokens_processed = 0, steps = 0;
  uint64_t requests_accepted = 0, requests_rejected = 0, requests_completed = 0;
  uint64_t requests_cancelled = 0, requests_failed = 0, preemptions = 0;
};

struct rpc_metrics {
  std::vector<method_metrics> methods;
  std::vector<std::pair<std::string, uint64_t>> errors;  ///< (code, count)
  uint64_t open_connections = 0, connections_total = 0, auth_failures = 0;
};

class connection;

/// A handle on one session of the connection's tenant. Cheap to copy.
class session {
public:
  const std::string& id() const { return id_; }

  /// Runs a command. With `on_output`, output is delivered to it live and the result carries
  /// none; without, stdout/stderr come in the result. Waits for the command's timeout_ms (0: up
  /// to 10 minutes, the longest a node allows by default) plus the per-call timeout.
  expected<exec_result> exec(const exec_options& opts, output_callback on_output = {});
  expected<std::string> read_file(const std::string& path, uint64_t offset = 0,
                                  uint64_t length = 0);
  /// limit_exceeded (not sent) when the data does not fit in one call (64 MiB with the path);
  /// so do exec and kv_put for their requests.
  expected<void> write_file(const std::string& path, std::string_view data,
                            bool make_parents = false, bool executable = false);
  /// The whole listing, sorted by path, fetched in pages (so any size works; a workspace that
  /// changes meanwhile is seen page by page, each entry once).
  expected<std::vector<file_entry>> list_files(const std::string& path, bool recursive = false);
  /// The entries after `after` (empty: from the first), at most `limit` of them (0: all, or
  /// limit_exceeded when they do not fit in one answer).
  expected<file_page> list_files_page(const std::string& path, bool recursive,
                                      const std::string& after, uint32_t limit);
  expected<void> remove_file(const std::string& path, bool recursive = false);
  /// std::nullopt when the key is absent.
  expected<std::optional<std::string>> kv_get(const std::string& key);
  expected<void> kv_put(const std::string& key, std::string_view value);
  /// Whether the key existed.
  expected<bool> kv_delete(const std::string& key);
  expected<std::vector<std::string>> kv_list(const std::string& prefix);
  /// A copy of this session under `new_id` (same tenant).
  expected<session> fork(const std::string& new_id);
  expected<void> destroy();
  expected<session_info> info();

  struct state;  // implementation detail

private:
  friend class connection;
  session(std::shared_ptr<state> s, std::string id) : state_(std::move(s)), id_(std::move(id)) {}
  std::shared_ptr<state> state_;
  std::string id_;
};

class connection {
public:
  /// Connects to `endpoint` ("host:port", or "unix:/path" for a node's Unix-domain listener on
  /// this host) and authenticates with `token`. Errors:
  /// unavailable (cannot connect), permission_denied (bad token), timeout.
  static expected<std::unique_ptr<connection>> connect(
    const std::string& endpoint, const std::string& token,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(10000));

  ~connection();
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

  const std::string& tenant() const;
  bool is_admin() const;

  /// Opens a session; `create` makes it when absent (else not_found). Creating one beyond the
  /// node's limit of stored sessions per tenant is limit_exceeded.
  expected<session> open_session(const std::string& id, bool create);

  /// One page of this tenant's stored sessions: the ids that begin with `prefix` and sort after
  /// `after` (empty: from the first), in byte order, at most `limit` (0: the node's page size,
  /// 1000; it cuts larger values to that). Lists from storage without opening any session.
  /// invalid_argument for a prefix or `after` that no id could have (over 200 bytes, not
  /// printable ASCII).
  expected<session_page> list_sessions(const std::string& prefix = {},
                                       const std::string& after = {}, uint32_t limit = 0);

  /// Generates tokens; with `on_tokens` they are passed to it as they come (in order, possibly
  /// several per call) and the result's `tokens` stays empty. unavailable when the node serves
  /// no model. Waits up to 10 minutes (a node's default generate deadline) plus the per-call
  /// timeout.
  expected<generate_result> generate(
    const generate_options& opts,
    std::function<void(const std::vector<uint32_t>&)> on_tokens = {});
  expected<std::vector<model_info>> list_models();

  // Admin tokens only (else permission_denied).
  expected<node_stats> stats();
  expected<rpc_metrics> metrics();
  /// unavailable when the node serves no model.
  expected<inference_worker_stats> inference_stats();
  expected<std::string> supervision_tree();
  /// Number of calls the node cancelled at the deadline.
  expected<uint32_t> drain(std::chrono::milliseconds deadline);

  /// Per-call timeout on the client side (exec and generate add their own bound to it).
  void set_call_timeout(std::chrono::milliseconds t);

  struct impl;  // implementation detail

private:
  explicit connection(std::unique_ptr<impl> i);
  std::shared_ptr<impl> impl_;  ///< shared with nobody; sessions watch it (weak_ptr)
};

} // namespace triplane::client
