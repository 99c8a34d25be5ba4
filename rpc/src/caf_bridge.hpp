// Asking CAF actors from the kj event loop without blocking it: the request is handed to a
// bridge actor, whose reply handler (on a CAF worker) completes a cross-thread fulfiller.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include <caf/all.hpp>
#include <kj/async.h>

#include "wire_errors.hpp"

namespace triplane::rpc::detail {

/// One request waiting for a bridge actor to issue it.
class pending_call {
public:
  virtual ~pending_call() noexcept(false) = default;
  virtual void issue(caf::event_based_actor* self, std::shared_ptr<pending_call> keep) = 0;
};

} // namespace triplane::rpc::detail

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<std::shared_ptr<triplane::rpc::detail::pending_call>>)

namespace triplane::rpc::detail {

template <class Reply>
class typed_call final : public pending_call {
public:
  typed_call(caf::actor dest, caf::message msg, std::chrono::milliseconds timeout,
             kj::Own<kj::CrossThreadPromiseFulfiller<Reply>> fulfiller)
    : dest_(std::move(dest)), msg_(std::move(msg)), timeout_(timeout),
      fulfiller_(kj::mv(fulfiller)) {}

  void issue(caf::event_based_actor* self, std::shared_ptr<pending_call> keep) override {
    auto me = std::static_pointer_cast<typed_call>(std::move(keep));
    // The fulfiller is a no-op when the RPC call was cancelled meanwhile.
    self->request(dest_, caf::duration{timeout_}, std::move(msg_))
      .then([me](Reply& r) { me->fulfiller_->fulfill(std::move(r)); },
            [me](caf::error& e) { me->fulfiller_->reject(wire::from_caf(e)); });
  }

private:
  caf::actor dest_;
  caf::message msg_;
  std::chrono::milliseconds timeout_;
  kj::Own<kj::CrossThreadPromiseFulfiller<Reply>> fulfiller_;
};

/// Owned by the RPC thread. Spawns `n` bridge actors (hidden, so they never hold up the actor
/// system's shutdown) and shuts them down when destroyed.
class caf_bridge : private kj::TaskSet::ErrorHandler {
public:
  caf_bridge(caf::actor_system& sys, size_t n);
  ~caf_bridge();
  caf_bridge(const caf_bridge&) = delete;
  caf_bridge& operator=(const caf_bridge&) = delete;

  /// Sends `msg` to `dest` as a request; the promise resolves with its reply of type Reply, or
  /// rejects with the reply's error as a triplane exception. Call on the kj thread only.
  template <class Reply>
  kj::Promise<Reply> ask(const caf::actor& dest, caf::message msg,
                         std::chrono::milliseconds timeout) {
    auto paf = kj::newPromiseAndCrossThreadFulfiller<Reply>();
    batch_.push_back(std::make_shared<typed_call<Reply>>(dest, std::move(msg), timeout,
                                                         kj::mv(paf.fulfiller)));
    if (batch_.size() == 1) schedule_flush();
    return kj::mv(paf.promise);
  }

  caf::actor_system& system() { return sys_; }

private:
  void taskFailed(kj::Exception&& e) override;

public:

private:
  // The requests of one event-loop turn go to a bridge actor as one message: one cross-thread
  // hand-off (and worker wake-up) per batch instead of per call.
  void schedule_flush();
  void flush();
  const caf::actor& next();

  caf::actor_system& sys_;
  std::vector<caf::actor> actors_;
  size_t next_ = 0;
  std::vector<std::shared_ptr<pending_call>> batch_;
  kj::TaskSet flushes_;
};

} // namespace triplane::rpc::detail
