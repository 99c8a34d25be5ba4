// RPC metrics bookkeeping.
#include "metrics.hpp"

#include <algorithm>

namespace triplane::rpc::detail {

void rpc_metrics::record(std::string_view method, uint64_t latency_us, errc outcome) {
  auto i = methods_.find(method);
  if (i == methods_.end()) i = methods_.emplace(std::string(method), per_method{}).first;
  auto& m = i->second;
  ++m.calls;
  m.max_us = std::max(m.max_us, latency_us);
  if (m.recent.size() < window) {
    m.recent.push_back(latency_us);
  } else {
    m.recent[m.next] = latency_us;
    m.next = (m.next + 1) % window;
  }
  if (outcome != errc::ok) {
    ++m.errors;
    ++errors_[outcome];
  }
}

std::vector<method_summary> rpc_metrics::summarize() const {
  std::vector<method_summary> out;
  for (const auto& [name, m] : methods_) {
    method_summary s;
    s.method = name;
    s.calls = m.calls;
    s.errors = m.errors;
    s.max_us = m.max_us;
    auto sorted = m.recent;
    std::sort(sorted.begin(), sorted.end());
    auto pct = [&](double p) -> uint64_t {
      if (sorted.empty()) return 0;
      auto i = static_cast<size_t>(p * static_cast<double>(sorted.size() - 1));
      return sorted[i];
    };
    s.p50_us = pct(0.50);
    s.p90_us = pct(0.90);
    s.p99_us = pct(0.99);
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<std::pair<std::string, uint64_t>> rpc_metrics::errors() const {
  std::vector<std::pair<std::string, uint64_t>> out;
  for (const auto& [code, n] : errors_) out.emplace_back(to_string(code), n);
  return out;
}

} // namespace triplane::rpc::detail
