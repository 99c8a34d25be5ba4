// State of one RPC server shared by its connections and capabilities. Lives on the RPC thread
// and is touched only there (no locking); CAF threads reach it only through cross-thread
// fulfillers.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <capnp/capability.h>
#include <kj/async.h>
#include <kj/timer.h>

#include "caf_bridge.hpp"
#include "metrics.hpp"
#include "triplane/rpc/server.hpp"
#include "triplane/runtime/directory.hpp"

namespace triplane::rpc::detail {

/// Shared by every capability and call of one tenant, across connections.
/// What every Session capability of one tenant open on one id shares. Sessions exist implicitly
/// in the session kind (any call activates one), so without this a capability kept after a
/// destroy, through it or another connection, would silently start a new empty session.
struct session_incarnation {
  enum class phase : uint8_t { live, destroying, destroyed };
  phase state = phase::live;
};

struct tenant_state {
  std::string name;
  std::string scope_prefix;  ///< "<escaped name>/": how its sessions' directory ids begin
  role who = role::tenant;
  uint32_t in_flight = 0;
  uint32_t open_sessions = 0;
  /// By scoped id, for ids with an open Session capability (an entry goes with the last one).
  std::unordered_map<std::string, std::weak_ptr<session_incarnation>> incarnations;

  // Stored sessions (limits::max_stored_sessions_per_tenant), see server_core::count_stored().
  std::optional<uint64_t> stored_sessions;  ///< unknown until counted
  uint32_t stored_reserved = 0;             ///< creates and forks in progress holding a slot
  bool stored_counting = false;             ///< a count is in flight; stored_counted resolves then
  kj::ForkedPromise<void> stored_counted = nullptr;
  /// By scoped id: the latest call in progress that opens, creates, forks onto or destroys the
  /// id. They run one after another (id_turn), so that a create learns whether it (and not
  /// another) stored the id, and no open hands out a capability of an id whose destroy
  /// overtook it.
  struct turn {
    uint64_t ticket = 0;
    kj::ForkedPromise<void> done = nullptr;
  };
  std::unordered_map<std::string, turn> turns;
  uint64_t turn_tickets = 0;

  /// The live incarnation of `full_id`: a new one when none is held or the held one is being
  /// (or was) destroyed, whose capabilities keep it.
  std::shared_ptr<session_incarnation> incarnation_of(const std::string& full_id) {
    auto& slot = incarnations[full_id];
    auto current = slot.lock();
    if (!current || current->state != session_incarnation::phase::live)
      slot = current = std::make_shared<session_incarnation>();
    return current;
  }
  /// After a capability let go of its incarnation: forgets the id once no capability holds it.
  void forget_if_unused(const std::string& full_id) {
    auto found = incarnations.find(full_id);
    if (found != incarnations.end() && found->second.expired()) incarnations.erase(found);
  }
};

/// One client connection's own bookkeeping.
struct connection_state {
  std::string peer;
  uint32_t auth_failures = 0;
  uint32_t auth_unchecked = 0;  ///< authenticate calls waiting for their turn
  /// The earliest time the next authenticate call is checked (see bootstrap_impl).
  kj::TimePoint next_auth_check = kj::origin<kj::TimePoint>();
  bool authenticated = false;
  kj::Own<kj::PromiseFulfiller<void>> close;  ///< fulfilling it closes the connection
};

class server_core;

/// One new stored session a create or fork may add: reserved by
/// server_core::reserve_stored_session(), counted by commit() once the store has it, released
/// otherwise when destroyed.
class stored_session_slot {
public:
  explicit stored_session_slot(std::shared_ptr<tenant_state> t) : tenant_(std::move(t)) {
    ++tenant_->stored_reserved;
  }
  ~stored_session_slot() { --tenant_->stored_reserved; }
  stored_session_slot(const stored_session_slot&) = delete;
  stored_session_slot& operator=(const stored_session_slot&) = delete;
  void commit() {
    if (!committed_ && tenant_->stored_sessions) ++*tenant_->stored_sessions;
    committed_ = true;
  }

private:
  std::shared_ptr<tenant_state> tenant_;
  bool committed_ = false;
};

/// A call's turn on one scoped id (tenant_state::turns): ready() resolves when the calls on the
/// id before it finished; the next one's turn comes when this is destroyed.
class id_turn {
public:
  id_turn(std::shared_ptr<tenant_state> t, std::string full_id);
  ~id_turn();
  id_turn(const id_turn&) = delete;
  id_turn& operator=(const id_turn&) = delete;
  kj::Promise<void> ready() { return kj::mv(before_); }

private:
  std::shared_ptr<tenant_state> tenant_;
  std::string full_id_;
  uint64_t ticket_;
  kj::Promise<void> before_ = kj::READY_NOW;
  kj::Own<kj::PromiseFulfiller<void>> done_;
};

/// How a call's deadline and drain() are enforced. `timer`: run() races the body against a
/// timer of its own and wraps it in a kj::Canceler (any body). `its_request`: the body sends one
/// bridge request, with the same deadline, synchronously and does nothing asynchronous besides:
/// that request's timeout answers the call, and drain() fails the request (no second timer and
/// no canceler per call on the hot path).
enum class deadline_by { timer, its_request };

/// One admitted call: counts it in flight, records its latency and outcome when done.
class call_slot {
public:
  call_slot(server_core& core, const char* method, std::shared_ptr<tenant_state> tenant,
            bool counted);
  ~call_slot();
  void finish(errc outcome);

private:
  server_core& core_;
  const char* method_;
  std::shared_ptr<tenant_state> tenant_;
  bool counted_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
};

class server_core {
public:
  server_core(server_options opts, caf::actor_system& sys, caf::actor directory, kj::Timer& timer);

  /// Runs `body` (() -> kj::Promise<void>) as one call of `method`: refuses it when draining
  /// (unavailable) or when the tenant is at its concurrency limit (overloaded); bounds it by
  /// `deadline` (timeout); counts it; makes it cancellable by drain(). Admin calls
  /// (`tenant == nullptr` or `admin_call`) are neither limited nor cancelled by drain.
  ///
  /// A failure that is not a triplane error (a call the schema cannot decode: wrong parameter
  /// struct, nesting or size limits) closes the caller's connection `conn`.
  template <class Body>
  kj::Promise<void> run(const char* method, std::shared_ptr<tenant_state> tenant,
                        std::chrono::milliseconds deadline, Body&& body, bool admin_call = false,
                        std::shared_ptr<connection_state> conn = nullptr,
                        deadline_by enforced = deadline_by::timer);

  /// Resolves once no counted call is in flight, or after `deadline`; then cancels what is
  /// left and answers how many calls were cancelled. Leaves the server draining.
  kj::Promise<size_t> drain(std::chrono::milliseconds deadline);

  /// The tenant state for an authenticated token (created on first use).
  std::shared_ptr<tenant_state> tenant_for(const token_record& rec);

  /// Resolves once `tenant`'s stored sessions are counted (at once when they are, or when no
  /// session_catalog is set). See api_impl.cpp for how the count is kept.
  kj::Promise<void> count_stored(const std::shared_ptr<tenant_state>& tenant);
  /// A slot for one more stored session of `tenant` (after count_stored() resolved), or
  /// limit_exceeded naming the limit and how to make room.
  kj::Own<stored_session_slot> reserve_stored_session(const std::shared_ptr<tenant_state>& tenant);

  /// The bootstrap capability of a new connection.
  capnp::Capability::Client make_bootstrap(std::shared_ptr<connection_state> conn);

  /// Sends `inner` to the session `full_id` (of `tenant`, which outlives the call) through the
  /// directory; an error's text loses the tenant's scoping.
  template <class Reply>
  kj::Promise<Reply> ask_session(const tenant_state& tenant, const std::string& full_id,
                                 caf::message inner, std::chrono::milliseconds timeout);

  const server_options opts;
  caf::actor directory;
  caf_bridge bridge;
  kj::Timer& timer;
  rpc_metrics metrics;
  bool draining = false;
  uint64_t in_flight = 0;  ///< counted (non-admin) calls

private:
  friend class call_slot;
  void call_done(bool counted);

  kj::Canceler canceler_;
  std::unordered_map<std::string, std::shared_ptr<tenant_state>> tenants_;
  std::vector<kj::Own<kj::PromiseFulfiller<void>>> idle_waiters_;
};

/// Closes `conn` when `e` is a decoding failure of the client's message.
void close_on_malformed(const std::shared_ptr<connection_state>& conn, const kj::Exception& e);

template <class Body>
kj::Promise<void> server_core::run(const char* method, std::shared_ptr<tenant_state> tenant,
                                   std::chrono::milliseconds deadline, Body&& body,
                                   bool admin_call, std::shared_ptr<connection_state> conn,
                                   deadline_by enforced) {
  bool counted = tenant && !admin_call;
  if (counted && draining) {
    metrics.record(method, 0, errc::unavailable);
    wire::fail(errc::unavailable, "the node is draining; retry on another node");
  }
  if (counted && tenant->in_flight >= opts.limits.max_concurrent_calls_per_tenant) {
    metrics.record(method, 0, errc::overloaded);
    wire::fail(errc::overloaded,
               "tenant '" + tenant->name + "' has " + std::to_string(tenant->in_flight)
                 + " calls in flight (limit "
                 + std::to_string(opts.limits.max_concurrent_calls_per_tenant) + "); retry later");
  }
  auto slot = kj::heap<call_slot>(*this, method, tenant, counted);
  auto* s = slot.get();
  // its_request: drain() cancels the call by failing its one request, sent by the body now
  // (see caf_bridge::drainable_scope).
  std::optional<caf_bridge::drainable_scope> drainable;
  if (counted && enforced == deadline_by::its_request) drainable.emplace(bridge);
  kj::Promise<void> work = kj::evalNow(kj::fwd<Body>(body));
  drainable.reset();
  if (enforced == deadline_by::timer) {
    auto ms = static_cast<int64_t>(deadline.count());
    work = work.exclusiveJoin(timer.afterDelay(ms * kj::MILLISECONDS).then([method, ms]() {
      return kj::Promise<void>(wire::make_exception(
        errc::timeout, std::string(method) + " did not finish within " + std::to_string(ms) + " ms"));
    }));
    if (counted) work = canceler_.wrap(kj::mv(work));
  }
  return work
    .then([s]() { s->finish(errc::ok); },
          [s, conn](kj::Exception&& e) {
            close_on_malformed(conn, e);
            s->finish(wire::code_of(e));
            kj::throwFatalException(kj::mv(e));
          })
    .attach(kj::mv(slot));
}

/// Removes the server's tenant scoping ("<tenant>/") from an error text: clients never see it.
kj::Exception unscoped(const kj::Exception& e, const std::string& scope_prefix);

template <class Reply>
kj::Promise<Reply> server_core::ask_session(const tenant_state& tenant, const std::string& full_id,
                                            caf::message inner,
                                            std::chrono::milliseconds timeout) {
  return bridge.ask<Reply>(
    directory,
    caf::make_message(runtime::call_atom::value, std::string("session"), full_id,
                      std::move(inner)),
    timeout, [&tenant](kj::Exception&& e) { return unscoped(e, tenant.scope_prefix); });
}

} // namespace triplane::rpc::detail
