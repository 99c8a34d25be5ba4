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

#include "triplane/runtime/virtual_actor.hpp"
#include "triplane/storage/state_store.hpp"

namespace triplane::runtime {

/// `(call_atom, kind, id, caf::message)` to the directory: delivers the message to (kind, id)
/// and answers with the handler's reply, or an error (not_found for an unknown kind, the
/// activation's error when restore() failed, e.g. corrupted naming the id).
using call_atom = caf::atom_constant<caf::atom("tp_call")>;
/// `(passivate_atom, kind, id)`: passivate now if live (reply: bool, whether it was live).
using passivate_atom = caf::atom_constant<caf::atom("tp_passiv")>;
/// `(passivate_atom)`: passivate every live activation (shutdown; reply: count).
/// `(stats_atom)`: reply directory_stats.
using stats_atom = caf::atom_constant<caf::atom("tp_stats")>;

struct directory_stats {
  uint64_t live = 0;           ///< activations currently live on this node
  uint64_t activations = 0;    ///< total activations since start
  uint64_t passivations = 0;   ///< total passivations since start
  uint64_t failures = 0;       ///< activations or handlers that failed
};

/// Decides which node owns an id. Local-only today; a cluster backend swaps this in.
class placement {
public:
  virtual ~placement() = default;
  /// True when this node should host (kind, id).
  virtual bool is_local(const std::string& kind, const std::string& id) const = 0;
};

struct directory_options {
  size_t max_live = 100000;       ///< live-activation cap per node; LRU passivated beyond it
  size_t shards = 0;              ///< routing actors; 0 = one per scheduler thread
  storage::durability default_durability = storage::durability::process_crash;
  std::chrono::milliseconds idle_check_granularity{1000};
};

} // namespace triplane::runtime
