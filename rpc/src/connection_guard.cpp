// connection_guard: reads wait while the connection's unwritten output is above its limit, and
// an unauthenticated connection that sends too much is closed.
#include "connection_guard.hpp"

#include <spdlog/spdlog.h>

#include "server_core.hpp"

namespace triplane::rpc::detail {

namespace {
/// How often a held read looks at the backlog again. Cap'n Proto has no "queue drained"
/// signal; a held read is rare (a client not reading its answers), so polling costs nothing on
/// the common path.
constexpr auto recheck_interval = 5 * kj::MILLISECONDS;
} // namespace

connection_guard::connection_guard(kj::Own<kj::AsyncIoStream> inner, kj::Timer& timer,
                                   std::shared_ptr<connection_state> state, size_t max_backlog,
                                   size_t unauthenticated_budget, uint64_t max_unfinished)
  : forwarding_stream(kj::mv(inner)), timer_(timer), state_(std::move(state)),
    max_backlog_(max_backlog), unauthenticated_budget_(unauthenticated_budget),
    max_unfinished_(max_unfinished) {}

kj::Promise<size_t> connection_guard::tryRead(void* buffer, size_t min_bytes, size_t max_bytes) {
  if (!backlog_ || backlog_() <= max_backlog_) return inner_->tryRead(buffer, min_bytes, max_bytes);
  return timer_.afterDelay(recheck_interval).then([this, buffer, min_bytes, max_bytes]() {
    return tryRead(buffer, min_bytes, max_bytes);
  });
}

void connection_guard::on_bytes(const void* data, size_t size) {
  questions_.feed(data, size);
  if (questions_.unfinished() > max_unfinished_)
    close("questions left unfinished", questions_.unfinished(), max_unfinished_);
  if (!state_->authenticated) {
    unauthenticated_bytes_ += size;
    if (unauthenticated_bytes_ > unauthenticated_budget_)
      close("bytes sent without authenticating", unauthenticated_bytes_, unauthenticated_budget_);
  }
}

void connection_guard::close(const char* why, uint64_t amount, uint64_t limit) {
  if (!state_->close) return;  // closing already
  spdlog::warn("rpc: closing connection from {}: {} {} (limit {})", state_->peer, amount, why, limit);
  state_->close->fulfill();
  state_->close = nullptr;
}

} // namespace triplane::rpc::detail
