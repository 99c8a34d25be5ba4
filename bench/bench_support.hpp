// Shared helpers of the benchmark programs: percentiles, a plain-text table, a JSON report,
// and the `--json FILE` flag. Header-only, no dependencies beyond the standard library.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace triplane::bench {

/// The p-th percentile (0..100) of `samples` by nearest rank; sorts a copy.
inline double percentile(std::vector<double> samples, double p) {
  if (samples.empty()) return 0;
  std::sort(samples.begin(), samples.end());
  auto rank = static_cast<size_t>(p / 100.0 * static_cast<double>(samples.size() - 1) + 0.5);
  return samples[std::min(rank, samples.size() - 1)];
}

inline double micros_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
}

/// Rows of named figures, printed as an aligned table and written as JSON.
class report {
public:
  explicit report(std::string name) : name_(std::move(name)) {}

  /// Adds one figure of a row; rows keep insertion order.
  void add(const std::string& row, const std::string& column, double value) {
    auto it = std::find_if(rows_.begin(), rows_.end(), [&](auto& r) { return r.first == row; });
    if (it == rows_.end()) {
      rows_.push_back({row, {}});
      it = rows_.end() - 1;
    }
    it->second.push_back({column, value});
  }

  void note(const std::string& key, const std::string& value) { notes_[key] = value; }

  void print() const {
    std::printf("\n== %s ==\n", name_.c_str());
    for (auto& [key, value] : notes_) std::printf("  %s: %s\n", key.c_str(), value.c_str());
    for (auto& [row, cells] : rows_) {
      std::printf("  %-44s", row.c_str());
      for (auto& [column, value] : cells) std::printf("  %s=%.4g", column.c_str(), value);
      std::printf("\n");
    }
    std::fflush(stdout);
  }

  std::string json() const {
    std::string out = "{\"benchmark\":\"" + name_ + "\",\"notes\":{";
    bool first = true;
    for (auto& [key, value] : notes_) {
      out += (first ? "" : ",") + quote(key) + ":" + quote(value);
      first = false;
    }
    out += "},\"rows\":{";
    first = true;
    for (auto& [row, cells] : rows_) {
      out += (first ? "" : ",") + quote(row) + ":{";
      bool first_cell = true;
      for (auto& [column, value] : cells) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.6g", value);
        out += (first_cell ? "" : ",") + quote(column) + ":" + buf;
        first_cell = false;
      }
      out += "}";
      first = false;
    }
    return out + "}}";
  }

private:
  static std::string quote(const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    return out + "\"";
  }

  std::string name_;
  std::map<std::string, std::string> notes_;
  std::vector<std::pair<std::string, std::vector<std::pair<std::string, double>>>> rows_;
};

/// Writes every report as one JSON array to `path`; false when it cannot be written.
inline bool write_json(const std::string& path, const std::vector<const report*>& reports) {
  std::ofstream out(path);
  if (!out) return false;
  out << "[";
  for (size_t i = 0; i < reports.size(); ++i) out << (i ? "," : "") << reports[i]->json();
  out << "]\n";
  return static_cast<bool>(out);
}

/// Finds `--json FILE` (or `--json=FILE`) in argv; empty when absent.
inline std::string json_path(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--json" && i + 1 < argc) return argv[i + 1];
    if (arg.rfind("--json=", 0) == 0) return arg.substr(7);
  }
  return {};
}

/// Integer flag `--name N` (or `--name=N`), else `fallback`.
inline long long int_flag(int argc, char** argv, const std::string& name, long long fallback) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == name && i + 1 < argc) return std::stoll(argv[i + 1]);
    if (arg.rfind(name + "=", 0) == 0) return std::stoll(arg.substr(name.size() + 1));
  }
  return fallback;
}

} // namespace triplane::bench
