// Virtual actors: persistent actors addressed by (kind, id), activated on their first message,
// passivated to storage when idle. This header is what a developer implements to add a kind.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <caf/behavior.hpp>
#include <caf/fwd.hpp>

#include "triplane/runtime/error.hpp"
#include "triplane/storage/state_store.hpp"

namespace triplane::runtime {

/// When a kind's state is written to storage.
enum class persistence : uint8_t {
  at_passivation = 0,  ///< only when the actor passivates (and at clean shutdown)
  every_change = 1,    ///< "durable": after every handler that called mark_changed(), before its
                       ///< reply leaves; a crash loses nothing that was acknowledged
};

/// What the runtime offers one activation. Valid from restore() until the activation ends;
/// only use it from inside the activation's own handlers.
class activation_context {
public:
  virtual ~activation_context() = default;
  virtual const std::string& kind() const = 0;
  virtual const std::string& id() const = 0;
  /// This activation's epoch (strictly increasing per id across activations).
  virtual uint64_t epoch() const = 0;
  /// The hosting CAF actor, for request()/send()/delayed_send() from handlers.
  virtual caf::event_based_actor* self() = 0;
  /// The state changed in the current handler: every_change kinds persist before the reply.
  virtual void mark_changed() = 0;
  /// While held (>0 holds), the actor is neither idle-passivated nor evicted by the live cap;
  /// e.g. a session with a running background process. Balanced by release_pin().
  virtual void pin() = 0;
  virtual void release_pin() = 0;
  /// Writes the current snapshot now (one atomic write). Errors from storage, e.g. stale_epoch.
  virtual caf::error persist_now() = 0;
};

/// One live activation of a kind. Created by the kind's factory, driven by the runtime on one
/// CAF actor (never concurrently), destroyed after passivation or failure.
class virtual_actor {
public:
  virtual ~virtual_actor() = default;

  /// Loads state. `state` is std::nullopt for an id that was never persisted. Returning an
  /// error fails the activation: the messages waiting for it get that error.
  virtual caf::error restore(activation_context& ctx, const std::optional<storage::stored_state>& state) = 0;

  /// The message handlers. A handler's return value is the reply. A handler that throws ends
  /// the activation; its supervisor-side restart reloads the last persisted state.
  virtual caf::behavior make_behavior(activation_context& ctx) = 0;

  /// Serialises the current state (a Cap'n Proto message from schemas/). An error at an idle
  /// or live-cap passivation keeps the activation live (retried later); at shutdown it is
  /// logged and the unsaved changes are lost.
  virtual expected<std::string> snapshot() = 0;

  /// The schema version snapshot() writes; stored with every record.
  virtual uint32_t schema_version() const = 0;

  /// Called after the final snapshot is stored (at shutdown: also when storing it failed),
  /// before the activation is destroyed: release what the state does not need on disk
  /// (temporary files, processes).
  virtual void on_passivate() {}
};

/// How the runtime treats one kind.
struct kind_spec {
  std::string name;  ///< the kind's name in keys and logs, e.g. "session"
  std::function<std::unique_ptr<virtual_actor>(const std::string& id)> factory;
  std::chrono::milliseconds idle_timeout{30000};  ///< passivate after this long without messages
  persistence when = persistence::at_passivation;
  std::optional<storage::durability> durability;  ///< unset: the node's default
};

} // namespace triplane::runtime
