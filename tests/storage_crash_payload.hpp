// Shared by storage_crash_writer and storage_crash_test: the payload a given (id, version) save
// carries, so the checker can tell a surviving record is exactly what was written, and the
// layout of the batch mode's chunks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace triplane::storage::crash {

inline std::string payload_for(const std::string& id, uint64_t version) {
  std::string out = id + "@" + std::to_string(version) + ":";
  uint64_t x = version * 0x9E3779B97F4A7C15u + id.size();
  while (out.size() < 512) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    out.push_back(static_cast<char>('a' + x % 26));
  }
  return out;
}

inline std::vector<std::string> batch_column_families() { return {"chunks", "refs", "manifests"}; }

/// Chunk keys sort in number order: "c" and 12 zero-padded digits.
inline std::string chunk_key(uint64_t n) {
  std::string digits = std::to_string(n);
  return "c" + std::string(12 - std::min<size_t>(12, digits.size()), '0') + digits;
}

inline uint64_t chunk_number(std::string_view key) {
  return std::stoull(std::string(key.substr(1)));
}

} // namespace triplane::storage::crash
