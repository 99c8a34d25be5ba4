// Block pool and block tables of the paged KV cache.
#include "triplane/gpu/kv_cache.hpp"

#include <algorithm>
#include <unordered_set>

namespace triplane::gpu {

kv_block_manager::kv_block_manager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(static_cast<size_t>(num_blocks)), block_size_(block_size) {
  free_.reserve(num_blocks_);
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

caf::error kv_block_manager::add_sequence(sequence_id id) {
  if (!sequences_.emplace(id, sequence_state{}).second)
    return make_error(errc::already_exists, "kv cache: sequence " + std::to_string(id) + " already exists");
  return caf::none;
}

void kv_block_manager::free_sequence(sequence_id id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return;
  for (auto b : it->second.blocks) free_.push_back(b);
  sequences_.erase(it);
}

int64_t kv_block_manager::length(sequence_id id) const {
  auto it = sequences_.find(id);
  return it == sequences_.end() ? -1 : it->second.length;
}

expected<std::vector<planned_sequence>> kv_block_manager::plan(const std::vector<sequence_id>& ids,
                                                                const std::vector<int64_t>& counts) {
  if (ids.size() != counts.size())
    return make_error(errc::invalid_argument, "kv cache: ids and counts differ in length");
  std::unordered_set<sequence_id> seen;
  int64_t needed = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    auto it = sequences_.find(ids[i]);
    if (it == sequences_.end())
      return make_error(errc::not_found, "kv cache: sequence " + std::to_string(ids[i]) + " is not registered");
    if (!seen.insert(ids[i]).second)
      return make_error(errc::invalid_argument,
                        "kv cache: sequence " + std::to_string(ids[i]) + " appears twice in one step");
    if (counts[i] < 1)
      return make_error(errc::invalid_argument, "kv cache: sequence " + std::to_string(ids[i]) + " has no tokens");
    int64_t total = it->second.length + counts[i];
    int64_t blocks = (total + block_size_ - 1) / block_size_;
    needed += std::max<int64_t>(0, blocks - static_cast<int64_t>(it->second.blocks.size()));
  }
  if (needed > free_blocks())
    return make_error(errc::overloaded, "kv cache: step needs " + std::to_string(needed) + " more blocks, " +
                                            std::to_string(free_blocks()) + " of " + std::to_string(num_blocks_) +
                                            " are free");
  std::vector<planned_sequence> out;
  out.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    auto& s = sequences_.at(ids[i]);
    int64_t total = s.length + counts[i];
    while (static_cast<int64_t>(s.blocks.size()) * block_size_ < total) {
      s.blocks.push_back(free_.back());
      free_.pop_back();
    }
    planned_sequence p;
    p.id = ids[i];
    p.start_position = s.length;
    p.num_tokens = counts[i];
    p.slots.resize(static_cast<size_t>(counts[i]));
    for (int64_t t = 0; t < counts[i]; ++t) {
      int64_t pos = s.length + t;
      p.slots[static_cast<size_t>(t)] = int64_t{s.blocks[static_cast<size_t>(pos / block_size_)]} * block_size_ +
                                        pos % block_size_;
    }
    p.block_table = &s.blocks;
    out.push_back(std::move(p));
  }
  return out;
}

void kv_block_manager::commit(const std::vector<planned_sequence>& plan) {
  for (const auto& p : plan) {
    auto it = sequences_.find(p.id);
    if (it != sequences_.end()) it->second.length = p.start_position + p.num_tokens;
  }
}

void kv_block_manager::trim(sequence_state& s) {
  auto keep = static_cast<size_t>((s.length + block_size_ - 1) / block_size_);
  while (s.blocks.size() > keep) {
    free_.push_back(s.blocks.back());
    s.blocks.pop_back();
  }
}

void kv_block_manager::rollback(const std::vector<planned_sequence>& plan) {
  for (const auto& p : plan) {
    auto it = sequences_.find(p.id);
    if (it != sequences_.end()) trim(it->second);
  }
}

} // namespace triplane::gpu
