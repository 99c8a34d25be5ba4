// The byte stream of one server connection, wrapped to keep one client from growing the node's
// memory or starving the other clients:
// - reads wait while too many bytes of the server's own messages to that client wait to be
//   written: Cap'n Proto 0.9.2 queues every outgoing message (each Return) in memory without
//   limit, so a client that pipelines calls and never reads their answers would grow the node
//   until it dies. Held reads leave its further calls in the socket (TCP pushes back);
// - a connection that sends more than a small budget before it is authenticated is closed:
//   every message (a Bootstrap, a call on the bootstrap capability) keeps an answer on the node
//   until the client finishes it, and a flood of them on one connection starved every other
//   client. A client needs about a kilobyte to authenticate;
// - an authenticated connection that leaves too many questions unfinished (Call or Bootstrap
//   messages without their Finish) is closed: Cap'n Proto 0.9.2 keeps every answer until its
//   Finish comes, without limit, so a client sending cheap calls and never finishing them grew
//   the node by 180 MB in 3 s. Clients finish a question when they drop its answer.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

#include <kj/timer.h>

#include "forwarding_stream.hpp"
#include "question_counter.hpp"

namespace triplane::rpc::detail {

struct connection_state;

class connection_guard final : public forwarding_stream {
public:
  /// Wraps `inner` (owned) for the connection `state` (its `authenticated` flag, its `close`
  /// fulfiller). `backlog` (set by watch()) answers the bytes queued for writing; while it
  /// exceeds `max_backlog`, a read waits, re-checking every few milliseconds on `timer` (which
  /// must outlive this stream). Bytes read while `state` is not authenticated beyond
  /// `unauthenticated_budget` close the connection.
  /// More than `max_unfinished` questions open at once close the connection.
  connection_guard(kj::Own<kj::AsyncIoStream> inner, kj::Timer& timer,
                   std::shared_ptr<connection_state> state, size_t max_backlog,
                   size_t unauthenticated_budget, uint64_t max_unfinished);

  /// Sets the backlog to watch (the connection's network, made after its stream).
  void watch(std::function<size_t()> backlog) { backlog_ = std::move(backlog); }

  /// Every byte the client sends, in order, for the budget and question checks. The server
  /// feeds it from the socket reads beneath (coalescing_stream::observe_reads), where it costs
  /// a call per syscall rather than a continuation per message read here.
  void on_bytes(const void* data, size_t size);

  kj::Promise<size_t> tryRead(void* buffer, size_t min_bytes, size_t max_bytes) override;

private:
  void close(const char* why, uint64_t amount, uint64_t limit);

  kj::Timer& timer_;
  std::shared_ptr<connection_state> state_;
  const size_t max_backlog_;
  const size_t unauthenticated_budget_;
  size_t unauthenticated_bytes_ = 0;
  const uint64_t max_unfinished_;
  question_counter questions_;
  std::function<size_t()> backlog_;
};

} // namespace triplane::rpc::detail
