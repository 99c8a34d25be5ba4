// A byte stream wrapper for one server connection that stops reading the client's calls while
// too many bytes of the server's own messages to that client wait to be written. Cap'n Proto
// 0.9.2 queues every outgoing message (each Return) in memory without limit: a client that
// pipelines calls and never reads their replies would grow the node's memory until it dies.
// Held reads leave the client's further calls in the socket, so TCP pushes back on the client.
#pragma once

#include <cstddef>
#include <functional>

#include <kj/async-io.h>
#include <kj/timer.h>

namespace triplane::rpc::detail {

class reply_backlog_gate final : public kj::AsyncIoStream {
public:
  /// Wraps `inner` (owned). `backlog` (set by watch()) answers the bytes queued for writing;
  /// while it exceeds `max_backlog`, a read waits, re-checking every few milliseconds on
  /// `timer` (which must outlive this stream). Only reads are held: writes, and so the queue
  /// draining, go on.
  reply_backlog_gate(kj::Own<kj::AsyncIoStream> inner, kj::Timer& timer, size_t max_backlog);

  /// Sets the backlog to watch (the connection's network, made after its stream).
  void watch(std::function<size_t()> backlog) { backlog_ = std::move(backlog); }

  kj::Promise<size_t> tryRead(void* buffer, size_t min_bytes, size_t max_bytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> whenWriteDisconnected() override;
  void shutdownWrite() override;
  void abortRead() override;
  void getsockopt(int level, int option, void* value, kj::uint* length) override;
  void setsockopt(int level, int option, const void* value, kj::uint length) override;
  void getsockname(struct sockaddr* addr, kj::uint* length) override;
  void getpeername(struct sockaddr* addr, kj::uint* length) override;

  /// Reads that had to wait for the backlog, for tests and logs.
  size_t held_reads() const { return held_reads_; }

private:
  kj::Own<kj::AsyncIoStream> inner_;
  kj::Timer& timer_;
  const size_t max_backlog_;
  std::function<size_t()> backlog_;
  size_t held_reads_ = 0;
};

} // namespace triplane::rpc::detail
