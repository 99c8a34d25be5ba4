// Asking CAF actors from the kj event loop without blocking it. Each request is a mailbox element
// whose sender is an actor_companion; the requests of one event-loop turn reach CAF in one
// hand-off (a lone request is enqueued straight into its destination; several go to a forwarder
// actor that enqueues them from a CAF worker, where scheduling their destinations costs no lock
// or wake-up). The companion hands the replies (on whichever CAF worker sends them) to a queue
// that the kj thread drains, woken once per batch of replies rather than once per reply. No CAF-side state or
// timer exists per call: a call the kj side gave up on (deadline, cancellation) is forgotten,
// and its late reply is dropped.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include <caf/all.hpp>
#include <kj/async.h>
#include <kj/timer.h>

#include "wire_errors.hpp"

namespace triplane::rpc::detail {

/// Requests of one kj event-loop turn, handed to the forwarder actor in one message.
struct request_batch {
  std::shared_ptr<std::vector<std::pair<caf::actor, caf::mailbox_element_ptr>>> items;
};

} // namespace triplane::rpc::detail

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(triplane::rpc::detail::request_batch)

namespace triplane::rpc::detail {

/// Owned by the RPC thread; every member function is called on that thread only.
class caf_bridge : private kj::TaskSet::ErrorHandler {
public:
  caf_bridge(caf::actor_system& sys, kj::Timer& timer);
  ~caf_bridge() noexcept(false);
  caf_bridge(const caf_bridge&) = delete;
  caf_bridge& operator=(const caf_bridge&) = delete;

  /// Sends `msg` to `dest` as a request; the promise resolves with its reply of type Reply, or
  /// rejects with the reply's error as a triplane exception, or with `timeout` when no reply
  /// came within `timeout`. Dropping the promise forgets the request (its reply is dropped).
  template <class Reply>
  kj::Promise<Reply> ask(const caf::actor& dest, caf::message msg,
                         std::chrono::milliseconds timeout) {
    return ask<Reply>(dest, std::move(msg), timeout, [](kj::Exception&& e) { return kj::mv(e); });
  }

  /// As above; a failure (an error reply, the timeout) is passed through `on_error`
  /// (kj::Exception&& -> kj::Exception, copyable) first, in the same continuation.
  template <class Reply, class OnError>
  kj::Promise<Reply> ask(const caf::actor& dest, caf::message msg,
                         std::chrono::milliseconds timeout, OnError on_error) {
    return send_request(dest, std::move(msg), timeout)
      .then([on_error](caf::message&& reply) -> Reply {
              if (reply.match_elements<Reply>()) return std::move(reply.get_mutable_as<Reply>(0));
              kj::throwFatalException(on_error(error_of_reply(reply)));
            },
            [on_error](kj::Exception&& e) -> Reply {
              kj::throwFatalException(on_error(kj::mv(e)));
            });
  }

  caf::actor_system& system() { return sys_; }

  /// While one lives, the requests sent are "drainable": fail_drainable() rejects them. For
  /// calls whose only asynchronous step is one request, so that drain() can cancel them without
  /// a kj::Canceler node per call on the hot path.
  class drainable_scope {
  public:
    explicit drainable_scope(caf_bridge& b) : bridge_(b), before_(b.drainable_) {
      bridge_.drainable_ = true;
    }
    ~drainable_scope() { bridge_.drainable_ = before_; }
    drainable_scope(const drainable_scope&) = delete;
    drainable_scope& operator=(const drainable_scope&) = delete;

  private:
    caf_bridge& bridge_;
    bool before_;
  };

  /// Rejects every pending drainable request with `e` (their late replies are dropped).
  void fail_drainable(const kj::Exception& e);

  /// Calls issued and replies received: for tests and benchmarks.
  struct counters {
    uint64_t requests = 0, request_batches = 0, replies = 0, wakeups = 0, timeouts = 0;
  };
  const counters& stats() const { return stats_; }

private:
  /// The promise side of one request, owned by the promise ask() returned: registered under
  /// its request key while the promise lives, so dropping the promise forgets the request.
  class reply_adapter {
  public:
    reply_adapter(kj::PromiseFulfiller<caf::message>& f, caf_bridge& bridge, uint64_t key);
    ~reply_adapter();
    reply_adapter(const reply_adapter&) = delete;
    reply_adapter& operator=(const reply_adapter&) = delete;

  private:
    caf_bridge& bridge_;
    uint64_t key_;
  };
  /// The replies the companion received, shared with CAF threads.
  struct inbox {
    std::mutex mu;
    std::vector<std::pair<uint64_t, caf::message>> replies;
    kj::Own<kj::CrossThreadPromiseFulfiller<void>> wake;  ///< set while the kj side waits
  };
  /// Requests of one timeout value in the order they were sent: their deadlines are in order
  /// too, so one timer (for the oldest) serves them all.
  struct deadline_lane {
    std::deque<std::pair<kj::TimePoint, uint64_t>> queue;  ///< (deadline, request key)
  };

  kj::Promise<caf::message> send_request(const caf::actor& dest, caf::message msg,
                                         std::chrono::milliseconds timeout);
  /// The exception for a reply that is not the expected type: its error, or an internal one.
  static kj::Exception error_of_reply(const caf::message& reply);
  void flush_requests();
  kj::Promise<void> receive_replies();
  void deliver();
  void watch_deadlines(kj::TimePoint fired_for);
  void expire_due();
  void taskFailed(kj::Exception&& e) override;

  caf::actor_system& sys_;
  kj::Timer& timer_;
  caf::actor companion_;
  caf::actor forwarder_;
  std::shared_ptr<std::vector<std::pair<caf::actor, caf::mailbox_element_ptr>>> outbox_;
  std::shared_ptr<inbox> inbox_;
  struct pending_request {
    kj::PromiseFulfiller<caf::message>* fulfiller;
    bool drainable;
  };
  std::unordered_map<uint64_t, pending_request> pending_;
  bool drainable_ = false;  ///< set by a live drainable_scope
  std::unordered_map<int64_t, deadline_lane> lanes_;  ///< by timeout in ms
  kj::Maybe<kj::TimePoint> timer_armed_for_;
  std::vector<std::pair<uint64_t, caf::message>> delivering_;
  counters stats_;
  kj::TaskSet tasks_;
};

} // namespace triplane::rpc::detail
