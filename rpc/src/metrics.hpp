// Operator metrics of the RPC server: calls, errors and latency per method, errors per code,
// connections. Lives on the RPC thread only (no locking).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "triplane/runtime/error.hpp"

namespace triplane::rpc::detail {

struct method_summary {
  std::string method;
  uint64_t calls = 0, errors = 0;
  uint64_t p50_us = 0, p90_us = 0, p99_us = 0, max_us = 0;
};

class rpc_metrics {
public:
  void record(std::string_view method, uint64_t latency_us, errc outcome);
  std::vector<method_summary> summarize() const;
  /// (code name, count) for every code seen.
  std::vector<std::pair<std::string, uint64_t>> errors() const;

  uint64_t open_connections = 0;
  uint64_t connections_total = 0;
  uint64_t auth_failures = 0;

private:
  // Latency percentiles come from the most recent samples of each method: bounded memory,
  // and recent behaviour is what an operator asks about.
  static constexpr size_t window = 4096;
  struct per_method {
    uint64_t calls = 0, errors = 0, max_us = 0;
    std::vector<uint64_t> recent;  // ring of up to `window` samples
    size_t next = 0;
  };
  std::map<std::string, per_method, std::less<>> methods_;  // no allocation per lookup
  std::map<errc, uint64_t> errors_;
};

} // namespace triplane::rpc::detail
