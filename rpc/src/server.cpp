// rpc_server: the RPC thread, its listener and its connections.
#include "triplane/rpc/server.hpp"

#include <future>
#include <mutex>
#include <thread>

#include <arpa/inet.h>
#include <pthread.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <spdlog/spdlog.h>

#include "coalescing_stream.hpp"
#include "connection_guard.hpp"
#include "server_core.hpp"

namespace triplane::rpc {
namespace {

using detail::connection_state;
using detail::server_core;

bool is_unix(kj::AsyncIoStream& s) {
  sockaddr_storage addr{};
  uint len = sizeof addr;
  try {
    s.getsockname(reinterpret_cast<sockaddr*>(&addr), &len);
  } catch (...) {
    return false;
  }
  return addr.ss_family == AF_UNIX;
}

/// Makes `path` bindable: removes a socket file left by an earlier run. Anything else at the
/// path is not ours to delete.
caf::error clear_stale_socket(const std::string& path) {
  if (path.size() > sizeof(sockaddr_un{}.sun_path) - 1)
    return make_error(errc::invalid_argument, "rpc server: unix socket path '" + path
                                                + "' is longer than 107 bytes");
  struct stat st{};
  if (lstat(path.c_str(), &st) != 0) return caf::none;
  if (!S_ISSOCK(st.st_mode))
    return make_error(errc::invalid_argument, "rpc server: '" + path
                                                + "' exists and is not a socket; not replacing it");
  if (unlink(path.c_str()) != 0)
    return make_error(errc::io_error, "rpc server: cannot remove stale socket '" + path + "'");
  return caf::none;
}

std::string peer_name(kj::AsyncIoStream& s) {
  if (is_unix(s)) return "unix socket";
  sockaddr_storage addr{};
  uint len = sizeof addr;
  try {
    s.getpeername(reinterpret_cast<sockaddr*>(&addr), &len);
  } catch (...) {
    return "unknown peer";
  }
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (addr.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    port = ntohs(a->sin6_port);
  }
  return std::string(host) + ":" + std::to_string(port);
}

capnp::ReaderOptions reader_options(const reader_limits& r) {
  capnp::ReaderOptions o;
  o.traversalLimitInWords = r.traversal_limit_words;
  o.nestingLimit = r.nesting_limit;
  return o;
}

/// One client: its socket, the two-party network over it and the RPC system serving it.
/// TwoPartyServer is not used because it accepts no ReaderOptions and shares one bootstrap
/// capability among all connections; we need both per connection.
class connection {
public:
  connection(server_core& core, kj::Own<kj::AsyncIoStream> stream,
             std::shared_ptr<connection_state> state)
    : core_(core),
      stream_(kj::heap<detail::connection_guard>(kj::mv(stream), core.timer, state,
                                                 core.opts.limits.max_unsent_bytes,
                                                 core.opts.limits.max_unauthenticated_bytes,
                                                 core.opts.limits.max_unfinished_questions)),
      network_(*stream_, capnp::rpc::twoparty::Side::SERVER, reader_options(core.opts.reader)),
      rpc_(capnp::makeRpcServer(network_, core.make_bootstrap(state))), state_(std::move(state)) {
    // Cap'n Proto queues outgoing messages without limit: stop taking calls from a client
    // that does not read the answers (see connection_guard.hpp).
    stream_->watch([this]() { return network_.getCurrentQueueSize(); });
    ++core_.metrics.open_connections;
    ++core_.metrics.connections_total;
  }
  ~connection() { --core_.metrics.open_connections; }

  kj::Promise<void> on_disconnect() { return network_.onDisconnect(); }
  detail::connection_guard& guard() { return *stream_; }

private:
  server_core& core_;
  kj::Own<detail::connection_guard> stream_;
  capnp::TwoPartyVatNetwork network_;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpc_;
  std::shared_ptr<connection_state> state_;
};

class log_task_errors final : public kj::TaskSet::ErrorHandler {
public:
  void taskFailed(kj::Exception&& e) override {
    spdlog::debug("rpc: connection ended: {}", e.getDescription().cStr());
  }
};

class server_impl final : public rpc_server {
public:
  server_impl(server_options opts, caf::actor_system& sys, caf::actor directory)
    : opts_(std::move(opts)), sys_(sys), directory_(std::move(directory)) {}

  ~server_impl() override { stop(std::chrono::milliseconds(0)); }

  expected<uint16_t> launch() {
    std::promise<expected<uint16_t>> started;
    auto fut = started.get_future();
    thread_ = std::thread([this, p = std::move(started)]() mutable {
      pthread_setname_np(pthread_self(), "triplane-rpc");  // for top -H, perf, the benchmark
      run(std::move(p));
    });
    auto result = fut.get();
    if (!result) {
      thread_.join();
      return result;
    }
    port_ = *result;
    return result;
  }

  uint16_t port() const override { return port_; }

  size_t stop(std::chrono::milliseconds deadline) override {
    std::lock_guard<std::mutex> lock{stop_mu_};
    if (!thread_.joinable()) return cancelled_;
    stop_->fulfiller->fulfill(static_cast<uint64_t>(deadline.count()));
    thread_.join();
    return cancelled_;
  }

private:
  kj::Promise<void> accept_loop(server_core& core, kj::ConnectionReceiver& listener,
                                kj::TaskSet& connections) {
    return listener.accept()
      .then(
        [this, &core, &connections](kj::Own<kj::AsyncIoStream>&& s) -> kj::Promise<void> {
          on_accept(core, kj::mv(s), connections);
          return kj::READY_NOW;
        },
        [&core](kj::Exception&& e) -> kj::Promise<void> {
          // E.g. EMFILE: keep serving the connections we have and try again shortly.
          spdlog::error("rpc: accept failed: {}", e.getDescription().cStr());
          return core.timer.afterDelay(100 * kj::MILLISECONDS);
        })
      .then([this, &core, &listener, &connections]() {
        return accept_loop(core, listener, connections);
      });
  }

  void on_accept(server_core& core, kj::Own<kj::AsyncIoStream> stream, kj::TaskSet& connections) {
    if (core.metrics.open_connections >= core.opts.limits.max_connections) {
      spdlog::warn("rpc: refusing a connection: {} open (limit)", core.metrics.open_connections);
      return;  // dropping the stream closes it
    }
    try {
      int buf = core.opts.socket_send_buffer;
      stream->setsockopt(SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
      int one = 1;
      if (!is_unix(*stream)) stream->setsockopt(IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    } catch (kj::Exception& e) {
      spdlog::debug("rpc: setsockopt: {}", e.getDescription().cStr());
    }
    auto state = std::make_shared<connection_state>();
    state->peer = peer_name(*stream);
    auto closed = kj::newPromiseAndFulfiller<void>();
    state->close = kj::mv(closed.fulfiller);
    // Many calls in flight on one connection: batch their messages into few syscalls.
    auto coalescing = kj::heap<detail::coalescing_stream>(kj::mv(stream));
    auto& socket_reads = *coalescing;
    auto conn = kj::heap<connection>(core, kj::mv(coalescing), state);
    // The guard looks at what the client sends as it comes off the socket (see on_bytes).
    socket_reads.observe_reads(
      [guard = &conn->guard()](const kj::byte* bytes, size_t n) { guard->on_bytes(bytes, n); });
    auto idle_ms = static_cast<int64_t>(core.opts.limits.unauthenticated_idle.count());
    auto unauthenticated = core.timer.afterDelay(idle_ms * kj::MILLISECONDS)
                             .then([state]() -> kj::Promise<void> {
                               if (state->authenticated) return kj::NEVER_DONE;
                               spdlog::info("rpc: closing {}: not authenticated in time",
                                            state->peer);
                               return kj::READY_NOW;
                             });
    connections.add(conn->on_disconnect()
                      .exclusiveJoin(kj::mv(closed.promise))
                      .exclusiveJoin(kj::mv(unauthenticated))
                      .attach(kj::mv(conn)));
  }

  void run(std::promise<expected<uint16_t>> started) {
    bool reported = false;
    try {
      auto io = kj::setupAsyncIo();
      server_core core(opts_, sys_, directory_, io.provider->getTimer());
      auto addr = io.provider->getNetwork()
                    .parseAddress(opts_.host.c_str(), opts_.port)
                    .wait(io.waitScope);
      auto listener = addr->listen();
      kj::Own<kj::ConnectionReceiver> unix_listener;
      if (!opts_.unix_path.empty()) {
        unix_listener = io.provider->getNetwork()
                          .parseAddress(("unix:" + opts_.unix_path).c_str())
                          .wait(io.waitScope)
                          ->listen();
      }
      auto stop = kj::newPromiseAndCrossThreadFulfiller<uint64_t>();
      stop_ = std::make_unique<stop_signal>(stop_signal{kj::mv(stop.fulfiller)});
      log_task_errors on_error;
      {
        kj::TaskSet connections(on_error);
        kj::Promise<void> accepting = accept_loop(core, *listener, connections);
        kj::Promise<void> accepting_unix = kj::READY_NOW;
        if (unix_listener) {
          accepting_unix = accept_loop(core, *unix_listener, connections);
          spdlog::info("rpc: listening on unix:{}", opts_.unix_path);
        }
        spdlog::info("rpc: listening on {}:{}", opts_.host, listener->getPort());
        started.set_value(static_cast<uint16_t>(listener->getPort()));
        reported = true;

        auto deadline_ms = stop.promise.wait(io.waitScope);
        accepting = nullptr;
        accepting_unix = nullptr;
        listener = nullptr;
        if (unix_listener) {
          unix_listener = nullptr;
          unlink(opts_.unix_path.c_str());
        }
        cancelled_ = core.drain(std::chrono::milliseconds(deadline_ms)).wait(io.waitScope);
        const auto& b = core.bridge.stats();
        spdlog::debug("rpc: bridge: {} requests in {} hand-offs, {} replies in {} kj wake-ups, "
                      "{} timed out",
                      b.requests, b.request_batches, b.replies, b.wakeups, b.timeouts);
        // Give the cancellation answers a moment to reach the clients, then hang up.
        core.timer.afterDelay(20 * kj::MILLISECONDS).wait(io.waitScope);
      }
      spdlog::info("rpc: stopped ({} calls cancelled)", cancelled_);
    } catch (kj::Exception& e) {
      auto msg = std::string("rpc server: ") + e.getDescription().cStr();
      spdlog::error("{}", msg);
      if (!reported) started.set_value(make_error(errc::io_error, msg));
    }
  }

  server_options opts_;
  caf::actor_system& sys_;
  caf::actor directory_;
  std::thread thread_;
  uint16_t port_ = 0;
  // Held through unique_ptr: kj::Own's destructor may throw, ours must not.
  struct stop_signal {
    kj::Own<kj::CrossThreadPromiseFulfiller<uint64_t>> fulfiller;
  };
  std::unique_ptr<stop_signal> stop_;
  std::mutex stop_mu_;
  size_t cancelled_ = 0;
};

} // namespace

expected<std::unique_ptr<rpc_server>> rpc_server::start(server_options opts,
                                                        caf::actor_system& sys,
                                                        caf::actor directory) {
  if (!directory) return make_error(errc::invalid_argument, "rpc server: no directory actor");
  for (const auto& t : opts.tokens)
    if (auto err = validate(t)) return err;
  if (opts.reader.traversal_limit_words == 0 || opts.reader.nesting_limit <= 0)
    return make_error(errc::invalid_argument, "rpc server: reader limits must be positive");
  if (!opts.unix_path.empty())
    if (auto err = clear_stale_socket(opts.unix_path)) return err;
  auto server = std::make_unique<server_impl>(std::move(opts), sys, std::move(directory));
  auto port = server->launch();
  if (!port) return port.error();
  return std::unique_ptr<rpc_server>{std::move(server)};
}

} // namespace triplane::rpc
