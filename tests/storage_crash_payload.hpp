// Shared by storage_crash_writer and storage_crash_test: the payload a given (id, version) save
// carries, so the checker can tell a surviving record is exactly what was written.
#pragma once

#include <cstdint>
#include <string>

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

} // namespace triplane::storage::crash
