// Placement of virtual actors across the nodes of a cluster by rendezvous (highest-random-weight)
// hashing: every node computes the same owner for (kind, id) from the same member list, and a
// membership change moves only the ids of the nodes that joined or left.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "triplane/runtime/directory.hpp"

namespace triplane::cluster {

/// Immutable; thread-safe. The directory asks is_local() for every activation.
class rendezvous_placement final : public runtime::placement {
public:
  /// `members`: the names of every node in the cluster (this one included); `self`: this node's
  /// name. Errors: invalid_argument for an empty list, duplicate or empty names, or `self` not
  /// among the members.
  static expected<rendezvous_placement> make(std::vector<std::string> members, std::string self);

  bool is_local(const std::string& kind, const std::string& id) const override;

  /// The member that owns (kind, id).
  const std::string& owner(const std::string& kind, const std::string& id) const;

  const std::vector<std::string>& members() const { return members_; }

private:
  rendezvous_placement() = default;
  std::vector<std::string> members_;
  std::vector<uint64_t> member_seeds_;
  size_t self_index_ = 0;
};

} // namespace triplane::cluster
