// The Cap'n Proto RPC front door of a node: accepts client connections, authenticates tenants and
// forwards their calls to CAF actors (the virtual-actor directory). Owns one thread running the
// kj event loop; nothing on that thread blocks.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include "triplane/rpc/tokens.hpp"
#include "triplane/runtime/error.hpp"

namespace triplane::rpc {

struct limits {
  uint32_t max_concurrent_calls_per_tenant = 512;  ///< beyond: `overloaded`
  uint32_t max_open_sessions_per_tenant = 1024;    ///< Session capabilities held: `limit_exceeded`
  /// Sessions a tenant has stored (created and not destroyed, across connections and restarts);
  /// a create or fork beyond: `limit_exceeded`. Enforced only with a session_catalog.
  uint32_t max_stored_sessions_per_tenant = 100000;
  uint32_t max_connections = 4096;                 ///< beyond: new connections are closed at once
  std::chrono::milliseconds call_deadline{10000};  ///< per call, except exec and generate
  std::chrono::milliseconds generate_deadline{600000};  ///< one Inference.generate call
  std::chrono::milliseconds exec_default_timeout{60000};  ///< exec without a timeout
  std::chrono::milliseconds exec_max_timeout{600000};     ///< a longer request is clamped
  uint64_t max_exec_output_buffer = 8u << 20;  ///< flow-control window of a streamed exec:
                                               ///< the most output the node holds for a client
                                               ///< that reads slower than the command writes
                                               ///< (the command then waits, see api_impl.cpp)
  uint64_t max_exec_output_cap = 64u << 20;    ///< largest ExecRequest.outputCapBytes accepted
  uint64_t max_unstreamed_output = 16u << 20;  ///< output returned in the result (no sink)
  /// Per connection: bytes of the node's messages to the client (answers, stream writes) that
  /// may wait unwritten; beyond, the connection's further calls are not read until the client
  /// reads (so a client that never reads cannot grow the node's memory without bound).
  uint64_t max_unsent_bytes = 16u << 20;
  /// Per connection: bytes a client may send before it is authenticated (a Bootstrap and an
  /// authenticate call take about a kilobyte); beyond, the connection is closed.
  uint64_t max_unauthenticated_bytes = 64u << 10;
  /// Per connection: questions (calls, bootstraps) the client has open at once, answered or
  /// not, until it sends their Finish (which clients do when they drop an answer); beyond, the
  /// connection is closed. Cap'n Proto keeps each answer until then.
  uint64_t max_unfinished_questions = 4096;
  uint32_t auth_failures_before_close = 5;     ///< per connection
  std::chrono::milliseconds auth_failure_delay{200};  ///< doubled per failure on a connection
  std::chrono::milliseconds unauthenticated_idle{30000};  ///< close if not authenticated by then
};

struct reader_limits {
  uint64_t traversal_limit_words = 8u << 20;  ///< 64 MiB per message
  int nesting_limit = 32;
};

struct server_options {
  std::string host = "127.0.0.1";
  uint16_t port = 7400;  ///< 0 = any free port (see rpc_server::port())
  /// Also listen on this Unix-domain socket path (empty: TCP only). For clients on the same
  /// host: it skips the TCP/IP stack (see bench/rpc_RESULTS.md). A stale socket file at the
  /// path is replaced; any other file there makes start() fail. Removed again by stop().
  std::string unix_path;
  std::vector<token_record> tokens;
  struct limits limits;
  reader_limits reader;
  int socket_send_buffer = 1 << 20;  ///< SO_SNDBUF of accepted sockets = the stream window
  /// The supervision tree as text for Admin.supervisionTree; called on the RPC thread, must not
  /// block. Unset: that call answers `unavailable`.
  std::function<std::string()> describe_supervision;
  /// Where Inference calls go when the node serves a model: the messages of
  /// actors/inference_protocol.hpp (generate_request, inf_cancel, inf_info). With
  /// `inference_route` empty they go to `inference` itself (a worker); else `inference` is a
  /// supervisor (runtime/supervisor.hpp) and each message travels as
  /// `(sup_route, route[0], (sup_route, route[1], ... message))`, which reaches the current
  /// incarnation of a restarted worker. Unset (invalid): Inference calls answer `unavailable`.
  caf::actor inference;
  std::vector<std::string> inference_route;
  /// Answers the session catalog's messages (list_sessions_atom, count_sessions_atom of
  /// actors/session_protocol.hpp) from the store the node's sessions live in; used by
  /// Tenant.listSessions and to count each tenant's stored sessions. Unset (invalid):
  /// listSessions answers `unavailable` and max_stored_sessions_per_tenant is not enforced.
  caf::actor session_catalog;
};

/// Not copyable or movable; destroying a running server calls stop() with a zero deadline.
class rpc_server {
public:
  /// Binds host:port (and unix_path when set) and starts serving on a new thread. `directory` answers
  /// `(call_atom, kind, id, caf::message)` (runtime/directory.hpp); the server never spawns the
  /// node's actors itself. Errors: invalid_argument (bad options/tokens, a unix_path longer than
  /// 107 bytes or naming a file that is not a socket), io_error (bind failed).
  static expected<std::unique_ptr<rpc_server>> start(server_options opts, caf::actor_system& sys,
                                                     caf::actor directory);

  virtual ~rpc_server() = default;

  /// The bound TCP port.
  virtual uint16_t port() const = 0;

  /// Stops accepting connections and new calls, lets in-flight calls finish until `deadline`,
  /// cancels the rest (running execs are killed), closes every connection and joins the thread.
  /// Idempotent; returns the number of calls cancelled.
  virtual size_t stop(std::chrono::milliseconds deadline) = 0;
};

} // namespace triplane::rpc
