// A byte stream wrapper that batches the small reads and writes of Cap'n Proto RPC into few
// syscalls. Cap'n Proto 0.9.2 reads each message with two reads (segment table, then body) and
// writes each message (Call, Return, Finish) with its own writev: with many calls in flight on
// one connection that is ~9 syscalls per call. Here a read takes everything the socket has into
// a buffer (4 KiB, growing to 64 KiB while reads fill it), and the writes of one event-loop
// turn leave as one write when the loop has nothing else to run, or as soon as `eager_bytes`
// have gathered and no write is in progress (so a long turn does not hold back the replies it
// already made: the peer works on them meanwhile).
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

#include "forwarding_stream.hpp"

namespace triplane::rpc::detail {

class coalescing_stream final : public forwarding_stream, private kj::TaskSet::ErrorHandler {
public:
  /// Wraps `inner` (owned). `high_water`: bytes buffered for writing beyond which write()
  /// answers only once they reached the socket (the caller's flow control keeps working: Cap'n
  /// Proto's stream window is the socket's send buffer plus at most this much).
  explicit coalescing_stream(kj::Own<kj::AsyncIoStream> inner, size_t high_water = 64 * 1024,
                             size_t eager_bytes = 4 * 1024);
  ~coalescing_stream() noexcept(false);

  kj::Promise<size_t> tryRead(void* buffer, size_t min_bytes, size_t max_bytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  /// Shuts the write side down once the buffered bytes have been written.
  void shutdownWrite() override;

  /// Calls `observer` with the bytes of each read from the socket, in the order they arrive
  /// and before the caller gets them: a look at everything the peer sends at the cost of a call
  /// per syscall (a wrapper above this stream would pay a continuation per message read).
  void observe_reads(std::function<void(const kj::byte*, size_t)> observer) {
    observer_ = std::move(observer);
  }

  /// Syscall-level counters, for tests and benchmarks.
  struct counters {
    uint64_t reads = 0, writes = 0, bytes_read = 0, bytes_written = 0;
  };
  const counters& stats() const { return stats_; }

private:
  kj::Promise<size_t> fill_then_read(kj::byte* out, size_t min_bytes, size_t max_bytes,
                                     size_t done);
  kj::Promise<void> accepted();
  void grow_read_buffer();
  void schedule_flush();
  void start_write();
  void written_out();
  void taskFailed(kj::Exception&& e) override;

  const size_t high_water_;
  const size_t eager_bytes_;

  kj::Array<kj::byte> rbuf_;
  size_t rbegin_ = 0, rend_ = 0;

  std::vector<kj::byte> pending_;  // written by the caller, not yet handed to the socket
  std::vector<kj::byte> sending_;  // being written to the socket now
  bool flush_scheduled_ = false;   // an end-of-turn flush is queued
  bool writing_ = false;           // sending_ is being written to the socket
  bool shutdown_requested_ = false;
  kj::Maybe<kj::Exception> failed_;
  std::vector<kj::Own<kj::PromiseFulfiller<void>>> blocked_writers_;
  counters stats_;
  std::function<void(const kj::byte*, size_t)> observer_;
  kj::TaskSet tasks_;
};

} // namespace triplane::rpc::detail
