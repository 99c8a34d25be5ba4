// Rendezvous hashing: owner = argmax over members of hash(member, kind, id).
#include "triplane/cluster/rendezvous_placement.hpp"

#include <algorithm>
#include <unordered_set>

namespace triplane::cluster {
namespace {

/// 64-bit FNV-1a over bytes, continued from `seed`; stable across builds and platforms, unlike
/// std::hash, because every node must compute the same owners.
uint64_t fnv1a(uint64_t seed, const std::string& bytes) {
  uint64_t h = seed;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

/// A finalizer that spreads FNV's output over all 64 bits (splitmix64's mixer).
uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

} // namespace

expected<rendezvous_placement> rendezvous_placement::make(std::vector<std::string> members, std::string self) {
  if (members.empty()) return make_error(errc::invalid_argument, "a cluster needs at least one member");
  std::unordered_set<std::string> seen;
  for (auto& m : members) {
    if (m.empty()) return make_error(errc::invalid_argument, "a cluster member has an empty name");
    if (!seen.insert(m).second)
      return make_error(errc::invalid_argument, "cluster member '" + m + "' is listed twice");
  }
  auto self_pos = std::find(members.begin(), members.end(), self);
  if (self_pos == members.end())
    return make_error(errc::invalid_argument, "this node '" + self + "' is not among the cluster members");
  rendezvous_placement out;
  out.self_index_ = static_cast<size_t>(self_pos - members.begin());
  for (auto& m : members) out.member_seeds_.push_back(fnv1a(0xcbf29ce484222325ull, m));
  out.members_ = std::move(members);
  return out;
}

const std::string& rendezvous_placement::owner(const std::string& kind, const std::string& id) const {
  size_t best = 0;
  uint64_t best_weight = 0;
  for (size_t i = 0; i < members_.size(); ++i) {
    uint64_t h = fnv1a(member_seeds_[i], kind);
    h = fnv1a(h ^ 0xff, id);  // separator: ("ab","c") and ("a","bc") differ
    uint64_t weight = mix(h);
    if (i == 0 || weight > best_weight || (weight == best_weight && members_[i] < members_[best])) {
      best = i;
      best_weight = weight;
    }
  }
  return members_[best];
}

bool rendezvous_placement::is_local(const std::string& kind, const std::string& id) const {
  return &owner(kind, id) == &members_[self_index_];
}

} // namespace triplane::cluster
