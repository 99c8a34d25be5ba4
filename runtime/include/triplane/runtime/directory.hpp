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
/// a passivation happened). `(passivate_atom)`: passivate every live activation, pinned ones
/// included, e.g. at shutdown (reply: uint64_t count, once all are stored and stopped).
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
/// Messages for one id always go through the same shard, which is the only actor that
/// activates that id: so at most one activation per id exists on a node, messages that arrive
/// while it activates wait in its mailbox, and they are delivered in the order sent (CAF keeps
/// per-sender order). Activations stop when their shard stops; the shard is their supervisor:
/// an activation that fails is stopped and the next message activates the id again from its
/// last persisted state.
class directory {
public:
  directory() = default;

  /// The actor to send `(call_atom, kind, id, msg)` to for (kind, id). Sending there directly
  /// saves the hop through front().
  const caf::actor& route(const std::string& kind, const std::string& id) const;

  /// One actor for everything: forwards calls to the right shard, and answers stats_atom and
  /// passivate_atom for the whole directory.
  const caf::actor& front() const { return front_; }

  const std::vector<caf::actor>& shards() const { return shards_; }

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
  std::vector<caf::actor> shards_;
};

} // namespace triplane::runtime
