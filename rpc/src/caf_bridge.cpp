// Bridge actors: issue requests on behalf of the kj thread.
#include "caf_bridge.hpp"

#include <kj/debug.h>

namespace triplane::rpc::detail {
namespace {

caf::behavior bridge_actor(caf::event_based_actor* self) {
  return {
    [self](std::vector<std::shared_ptr<pending_call>>& calls) {
      for (auto& call : calls) {
        auto keep = call;
        call->issue(self, std::move(keep));
      }
    },
  };
}

} // namespace

caf_bridge::caf_bridge(caf::actor_system& sys, size_t n) : sys_(sys), flushes_(*this) {
  for (size_t i = 0; i < std::max<size_t>(n, 1); ++i)
    actors_.push_back(sys.spawn<caf::hidden>(bridge_actor));
}

caf_bridge::~caf_bridge() {
  for (auto& a : actors_) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

void caf_bridge::schedule_flush() {
  flushes_.add(kj::evalLater([this] { flush(); }));
}

void caf_bridge::flush() {
  if (batch_.empty()) return;
  caf::anon_send(next(), std::move(batch_));
  batch_.clear();
}

void caf_bridge::taskFailed(kj::Exception&& e) {
  // flush() does not throw; keep the contract visible if that ever changes.
  KJ_LOG(ERROR, "rpc bridge flush failed", e);
}

const caf::actor& caf_bridge::next() {
  const auto& a = actors_[next_];
  next_ = (next_ + 1) % actors_.size();
  return a;
}

} // namespace triplane::rpc::detail
