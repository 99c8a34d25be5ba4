// reply_backlog_gate: reads wait while the connection's unwritten output is above its limit.
#include "reply_backlog_gate.hpp"

namespace triplane::rpc::detail {

namespace {
/// How often a held read looks at the backlog again. Cap'n Proto has no "queue drained"
/// signal; a held read is rare (a client not reading its replies), so polling costs nothing on
/// the common path.
constexpr auto recheck_interval = 5 * kj::MILLISECONDS;
} // namespace

reply_backlog_gate::reply_backlog_gate(kj::Own<kj::AsyncIoStream> inner, kj::Timer& timer,
                                       size_t max_backlog)
  : inner_(kj::mv(inner)), timer_(timer), max_backlog_(max_backlog) {}

kj::Promise<size_t> reply_backlog_gate::tryRead(void* buffer, size_t min_bytes,
                                                size_t max_bytes) {
  if (!backlog_ || backlog_() <= max_backlog_) return inner_->tryRead(buffer, min_bytes, max_bytes);
  ++held_reads_;
  return timer_.afterDelay(recheck_interval).then([this, buffer, min_bytes, max_bytes]() {
    return tryRead(buffer, min_bytes, max_bytes);
  });
}

kj::Promise<void> reply_backlog_gate::write(const void* buffer, size_t size) {
  return inner_->write(buffer, size);
}

kj::Promise<void> reply_backlog_gate::write(
  kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  return inner_->write(pieces);
}

kj::Promise<void> reply_backlog_gate::whenWriteDisconnected() {
  return inner_->whenWriteDisconnected();
}

void reply_backlog_gate::shutdownWrite() { inner_->shutdownWrite(); }
void reply_backlog_gate::abortRead() { inner_->abortRead(); }

void reply_backlog_gate::getsockopt(int level, int option, void* value, kj::uint* length) {
  inner_->getsockopt(level, option, value, length);
}
void reply_backlog_gate::setsockopt(int level, int option, const void* value, kj::uint length) {
  inner_->setsockopt(level, option, value, length);
}
void reply_backlog_gate::getsockname(struct sockaddr* addr, kj::uint* length) {
  inner_->getsockname(addr, length);
}
void reply_backlog_gate::getpeername(struct sockaddr* addr, kj::uint* length) {
  inner_->getpeername(addr, length);
}

} // namespace triplane::rpc::detail
