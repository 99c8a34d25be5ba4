// caf_bridge: requests enqueued from the kj thread, replies batched back to it.
#include "caf_bridge.hpp"

#include <algorithm>

#include <caf/actor_companion.hpp>
#include <kj/debug.h>

namespace triplane::rpc::detail {
namespace {

caf::behavior forwarder_actor(caf::event_based_actor* self) {
  return {
    [self](request_batch& batch) {
      for (auto& [dest, element] : *batch.items)
        dest->enqueue(std::move(element), self->context());
    },
  };
}

} // namespace

caf_bridge::caf_bridge(caf::actor_system& sys, kj::Timer& timer)
  : sys_(sys), timer_(timer), inbox_(std::make_shared<inbox>()), tasks_(*this) {
  // Hidden: the companion never holds up the actor system's shutdown.
  companion_ = sys.spawn<caf::actor_companion, caf::hidden>();
  auto* self = static_cast<caf::actor_companion*>(caf::actor_cast<caf::abstract_actor*>(companion_));
  // Runs on the thread of whoever replies (a CAF worker, or a thread bouncing a request to a
  // dead actor): only the first reply of a batch wakes the kj thread.
  self->on_enqueue([box = inbox_](caf::mailbox_element_ptr ptr) {
    if (!ptr || !ptr->mid.is_response()) return;  // nothing but replies is expected here
    auto key = ptr->mid.request_id().integer_value();
    std::lock_guard<std::mutex> lock{box->mu};
    box->replies.emplace_back(key, ptr->move_content_to_message());
    if (box->wake) {
      box->wake->fulfill();
      box->wake = nullptr;
    }
  });
  forwarder_ = sys.spawn<caf::hidden>(forwarder_actor);
  tasks_.add(receive_replies());
}

caf_bridge::~caf_bridge() noexcept(false) {
  // Once the handler is replaced (under the companion's lock, which waits for a call in
  // progress) no reply reaches the inbox any more: the cross-thread fulfiller is only touched
  // here, on its own thread. The companion then drops whatever it gets, and goes away with
  // its last reference (requests still queued somewhere hold it as their sender).
  auto* self = static_cast<caf::actor_companion*>(caf::actor_cast<caf::abstract_actor*>(companion_));
  self->on_enqueue(nullptr);
  companion_ = nullptr;
  caf::anon_send_exit(forwarder_, caf::exit_reason::user_shutdown);
  std::lock_guard<std::mutex> lock{inbox_->mu};
  inbox_->wake = nullptr;
}

kj::Promise<caf::message> caf_bridge::send_request(const caf::actor& dest, caf::message msg,
                                                   std::chrono::milliseconds timeout) {
  auto* self = static_cast<caf::actor_companion*>(caf::actor_cast<caf::abstract_actor*>(companion_));
  auto mid = self->new_request_id(caf::message_priority::normal);
  auto key = mid.request_id().integer_value();  // the reply carries other flag bits
  auto promise = kj::newAdaptedPromise<caf::message, reply_adapter>(*this, key);
  ++stats_.requests;

  auto ms = static_cast<int64_t>(timeout.count());
  auto deadline = timer_.now() + ms * kj::MILLISECONDS;
  auto& lane = lanes_[ms];
  // Forget the answered requests at the front: the lane stays about as long as the number of
  // calls in flight. (Behind a request that never answers, answered ones wait for its deadline:
  // bounded by call rate x timeout, 16 bytes each.)
  while (!lane.queue.empty() && pending_.count(lane.queue.front().second) == 0)
    lane.queue.pop_front();
  lane.queue.emplace_back(deadline, key);
  bool earlier = true;
  KJ_IF_MAYBE(armed, timer_armed_for_) { earlier = deadline < *armed; }
  if (earlier) {
    timer_armed_for_ = deadline;
    tasks_.add(timer_.atTime(deadline).then([this, deadline]() { watch_deadlines(deadline); }));
  }

  if (!outbox_) {
    outbox_ = std::make_shared<std::vector<std::pair<caf::actor, caf::mailbox_element_ptr>>>();
    outbox_->reserve(16);
    // After every event already queued: the calls that the current burst of incoming messages
    // starts all join this batch.
    tasks_.add(kj::evalLast([this]() { flush_requests(); }));
  }
  outbox_->emplace_back(dest, caf::make_mailbox_element(self->ctrl(), mid, {}, std::move(msg)));
  return promise;
}

caf_bridge::reply_adapter::reply_adapter(kj::PromiseFulfiller<caf::message>& f,
                                         caf_bridge& bridge, uint64_t key)
  : bridge_(bridge), key_(key) {
  bridge_.pending_.emplace(key, pending_request{&f, bridge_.drainable_});
}

caf_bridge::reply_adapter::~reply_adapter() { bridge_.pending_.erase(key_); }

void caf_bridge::flush_requests() {
  auto batch = std::move(outbox_);
  outbox_ = nullptr;
  if (!batch || batch->empty()) return;
  ++stats_.request_batches;
  if (batch->size() == 1) {
    // A null execution unit: the destination is scheduled as from any non-CAF thread.
    auto& [dest, element] = batch->front();
    dest->enqueue(std::move(element), nullptr);
    return;
  }
  caf::anon_send(forwarder_, request_batch{std::move(batch)});
}

kj::Exception caf_bridge::error_of_reply(const caf::message& reply) {
  if (reply.match_elements<caf::error>()) return wire::from_caf(reply.get_as<caf::error>(0));
  return wire::make_exception(errc::internal,
                              "unexpected reply from the node: " + caf::to_string(reply));
}

kj::Promise<void> caf_bridge::receive_replies() {
  auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
  {
    std::lock_guard<std::mutex> lock{inbox_->mu};
    if (inbox_->replies.empty())
      inbox_->wake = kj::mv(paf.fulfiller);
    else
      paf.fulfiller->fulfill();
  }
  return paf.promise.then([this]() {
    ++stats_.wakeups;
    deliver();
    return receive_replies();
  });
}

void caf_bridge::deliver() {
  {
    std::lock_guard<std::mutex> lock{inbox_->mu};
    delivering_.swap(inbox_->replies);
  }
  for (auto& [key, msg] : delivering_) {
    ++stats_.replies;
    auto i = pending_.find(key);
    if (i == pending_.end()) continue;  // given up on (deadline, cancelled): dropped
    auto* fulfiller = i->second.fulfiller;
    pending_.erase(i);  // answered: the lane forgets it; its adapter's erase finds nothing
    fulfiller->fulfill(std::move(msg));
  }
  delivering_.clear();
}

void caf_bridge::watch_deadlines(kj::TimePoint fired_for) {
  // Only the earliest armed timer acts; one superseded by an earlier arming does nothing.
  KJ_IF_MAYBE(armed, timer_armed_for_) {
    if (*armed != fired_for) return;
  } else {
    return;
  }
  timer_armed_for_ = nullptr;
  expire_due();
  bool any = false;
  kj::TimePoint next = timer_.now();
  for (auto& [ms, lane] : lanes_) {
    if (lane.queue.empty()) continue;
    auto head = lane.queue.front().first;
    if (!any || head < next) next = head;
    any = true;
  }
  if (any) {
    timer_armed_for_ = next;
    tasks_.add(timer_.atTime(next).then([this, next]() { watch_deadlines(next); }));
  }
}

void caf_bridge::expire_due() {
  auto now = timer_.now();
  for (auto& [ms, lane] : lanes_) {
    while (!lane.queue.empty()) {
      auto [deadline, key] = lane.queue.front();
      auto i = pending_.find(key);
      if (i != pending_.end() && deadline > now) break;
      lane.queue.pop_front();
      if (i == pending_.end()) continue;
      ++stats_.timeouts;
      auto* fulfiller = i->second.fulfiller;
      pending_.erase(i);
      fulfiller->reject(wire::make_exception(
        errc::timeout, "the node did not answer within " + std::to_string(ms) + " ms"));
    }
  }
}

void caf_bridge::fail_drainable(const kj::Exception& e) {
  std::vector<kj::PromiseFulfiller<caf::message>*> doomed;
  for (auto i = pending_.begin(); i != pending_.end();) {
    if (!i->second.drainable) {
      ++i;
      continue;
    }
    doomed.push_back(i->second.fulfiller);
    i = pending_.erase(i);  // forgotten: a late reply is dropped, the adapter's erase is a no-op
  }
  for (auto* f : doomed) f->reject(kj::cp(e));
}

void caf_bridge::taskFailed(kj::Exception&& e) {
  // The reply loop and the deadline timers do not throw; keep the contract visible if that
  // ever changes.
  KJ_LOG(ERROR, "rpc bridge task failed", e);
}

} // namespace triplane::rpc::detail
