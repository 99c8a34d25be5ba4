// The virtual-actor directory: routes messages addressed by (kind, id) to the live activation,
// activating it from storage on demand, passivating idle ones, capping live ones per node.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/meta/type_name.hpp>

#include "triplane/runtime/virtual_actor.hpp"
#include "triplane/storage/state_store.hpp"

namespace triplane::runtime {

/// `(call_atom, kind, id, caf::message)` to the directory: delivers the message to (kind, id)
/// and answers with the handler's reply, or an error (not_found for an unknown kind, the
/// activation's error when restore() failed, e.g. corrupted naming the id).
using call_atom = caf::atom_constant<caf::atom("tp_call")>;
/// `(passivate_atom, kind, id)`: passivate now if live and not pinned (reply: bool, whether
/// a passivation happened). An activation whose state cannot be stored (snapshot() or the
/// store fails) stays live, as if pinned, and is tried again after its next idle timeout.
/// `(passivate_atom)`: passivate every live activation, pinned ones included, e.g. at shutdown
/// (reply: uint64_t count, once all are stored and stopped; a state that cannot be stored
/// then is logged as lost).
using passivate_atom = caf::atom_constant<caf::atom("tp_passiv")>;
/// `(stats_atom)`: reply directory_stats.
using stats_atom = caf::atom_constant<caf::atom("tp_stats")>;

struct directory_stats {
  uint64_t live = 0;           ///< activations currently live on this node
  uint64_t activations = 0;    ///< total activations since start
  uint64_t passivations = 0;   ///< total passivations since start
  uint64_t failures = 0;       ///< activations or handlers that failed
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, directory_stats& x) {
  return f(caf::meta::type_name("triplane.directory_stats"), x.live, x.activations,
           x.passivations, x.failures);
}

/// Decides which node owns an id. Local-only today; a cluster backend swaps this in.
class placement {
public:
  virtual ~placement() = default;
  /// True when this node should host (kind, id).
  virtual bool is_local(const std::string& kind, const std::string& id) const = 0;
};

/// Every id is local: the single-node placement.
class local_placement final : public placement {
public:
  bool is_local(const std::string&, const std::string&) const override { return true; }
};

struct directory_options {
  size_t max_live = 100000;       ///< live-activation cap per node; LRU passivated beyond it
  size_t shards = 0;              ///< routing actors; 0 = one per scheduler thread
  storage::durability default_durability = storage::durability::process_crash;
  std::chrono::milliseconds idle_check_granularity{1000};  ///< how often idleness is checked
  std::shared_ptr<const placement> owner = std::make_shared<local_placement>();
};

/// A running directory. Copyable; every member is thread-safe.
///
/// Each id belongs to one shard, the only actor that activates, passivates and evicts it: so at
/// most one activation per id exists on a node. Calls sent to route() are delivered by the
/// sender's own thread: straight into the live activation's mailbox (one delivery, like a plain
/// actor), or into the shard's mailbox while the id is absent, activating or passivating, where
/// they wait and are handed over in order. Calls from one sender to one id are delivered in the
/// order sent (CAF keeps per-sender order; a call never overtakes an earlier one waiting at the
/// shard). Activations stop when their shard stops; the shard is their supervisor: an
/// activation that fails is stopped and the next message activates the id again from its last
/// persisted state.
class directory {
public:
  directory() = default;

  /// The handle to send `(call_atom, kind, id, msg)` to, for any (kind, id): a router that runs
  /// in the sender's context rather than an actor with a mailbox, so a call to a live id costs
  /// no extra hop. It passes other messages (stats_atom, passivate_atom) to front(). Once the
  /// directory has stopped it answers everything with errc::unavailable. Keep to one of route()
  /// and front() per sender when the order of that sender's calls matters: a call through
  /// front() takes one more hop and can be overtaken by a later call through route().
  const caf::actor& route(const std::string& kind, const std::string& id) const;

  /// The directory's actor: forwards calls to route(), answers stats_atom and passivate_atom for
  /// the whole directory, and stops with the shards (a supervisor can watch it).
  const caf::actor& front() const { return front_; }

  /// Starts the directory's actors. `store` must outlive them (stop them first, with
  /// `passivate_atom` then an exit, or by destroying the actor system).
  /// Errors: invalid_argument for an empty, duplicate or malformed kind name or a kind without
  /// factory.
  static expected<directory> start(caf::actor_system& system, storage::state_store& store,
                                   std::vector<kind_spec> kinds, directory_options options);

  /// Passivates every live activation (pinned ones included) and refuses new calls with
  /// errc::unavailable from then on; waits up to `deadline`. Returns the number passivated, or
  /// timeout. The directory's actors keep running (their owner stops them).
  expected<uint64_t> drain(caf::actor_system& system, std::chrono::milliseconds deadline) const;

  /// drain(), then stops every actor of the directory (for directories started without a
  /// supervisor, e.g. in tests).
  expected<uint64_t> stop(caf::actor_system& system, std::chrono::milliseconds deadline);

private:
  caf::actor front_;
  caf::actor router_;
  std::vector<caf::actor> shards_;
};

} // namespace triplane::runtime
