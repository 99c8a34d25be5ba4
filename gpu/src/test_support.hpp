// Helpers shared by the gpu layer's unit tests: fixture locations, the expected outputs of the
// reference fixtures, temporary directories and hand-made safetensors files.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "triplane/gpu/backend.hpp"
#include "triplane/gpu/checkpoint.hpp"
#include "triplane/gpu/safetensors.hpp"

namespace triplane::gpu::testing {

inline std::string fixture_dir(const std::string& model) {
  return std::string(TRIPLANE_FIXTURES_DIR) + "/llama/" + model;
}

struct expected_prompt {
  std::vector<int32_t> ids;
  std::vector<float> logits;  // [T, vocab]
  std::vector<int32_t> greedy;
  std::vector<float> margin;
};

/// The three prompts of a fixture's expected.safetensors. Aborts the test on a malformed file.
inline std::vector<expected_prompt> load_expected(const std::string& model) {
  const std::string path = fixture_dir(model) + "/expected.safetensors";
  auto file = safetensors_file::open(path);
  if (!file) {
    std::fprintf(stderr, "cannot open %s: %s\n", path.c_str(), describe(file.error()).c_str());
    std::abort();
  }
  auto get = [&](const std::string& name) -> const tensor_view& {
    const auto* t = (*file)->find(name);
    if (t == nullptr) {
      std::fprintf(stderr, "%s: missing %s\n", path.c_str(), name.c_str());
      std::abort();
    }
    return *t;
  };
  std::vector<expected_prompt> out;
  for (int k = 0; k < 3; ++k) {
    const std::string p = "prompt" + std::to_string(k);
    expected_prompt e;
    auto ids = tensor_to_i64(get(p + ".input_ids"), path);
    auto greedy = tensor_to_i64(get(p + ".greedy"), path);
    if (!ids || !greedy) std::abort();
    for (auto v : *ids) e.ids.push_back(static_cast<int32_t>(v));
    for (auto v : *greedy) e.greedy.push_back(static_cast<int32_t>(v));
    e.logits = *tensor_to_f32(get(p + ".logits"), path);
    e.margin = *tensor_to_f32(get(p + ".greedy_margin"), path);
    out.push_back(std::move(e));
  }
  return out;
}

/// A fresh directory under /tmp, removed with its contents on destruction.
class temp_dir {
public:
  temp_dir() {
    char tmpl[] = "/tmp/triplane-gpu-test-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

private:
  std::string path_;
};

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// A safetensors file from a literal header and data section; `declared_length` overrides the
/// 8-byte header length (to test a lying header).
inline std::string raw_safetensors(const std::string& header, const std::string& data,
                                   int64_t declared_length = -1) {
  uint64_t n = declared_length >= 0 ? static_cast<uint64_t>(declared_length) : header.size();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + header + data;
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// All tensors of a safetensors file, as tensors to write (bytes copied).
inline std::vector<tensor_to_write> copy_tensors(const safetensors_file& file) {
  std::vector<tensor_to_write> out;
  for (const auto& t : file.tensors())
    out.push_back({t.name, t.type, t.shape, std::vector<unsigned char>(t.data, t.data + t.nbytes)});
  return out;
}

inline std::unique_ptr<backend> make_cpu(const std::string& model, int tp = 1, int64_t kv_bytes = int64_t{64} << 20,
                                         const std::string& config_name = "config.json") {
  auto ckpt = checkpoint::open(fixture_dir(model), config_name);
  if (!ckpt) {
    std::fprintf(stderr, "checkpoint %s: %s\n", model.c_str(), describe(ckpt.error()).c_str());
    std::abort();
  }
  backend_options opts;
  opts.tensor_parallel = tp;
  opts.kv_cache_bytes = kv_bytes;
  auto b = make_backend(**ckpt, opts);
  if (!b) {
    std::fprintf(stderr, "backend %s: %s\n", model.c_str(), describe(b.error()).c_str());
    std::abort();
  }
  return std::move(*b);
}

/// Logits for every position of `ids`, run as one prefill of a new sequence.
inline std::vector<float> prompt_logits(backend& b, const std::vector<int32_t>& ids, sequence_id id = 1000) {
  if (b.add_sequence(id)) std::abort();
  auto out = b.forward({step_item{id, ids, true}});
  b.free_sequence(id);
  if (!out) {
    std::fprintf(stderr, "forward: %s\n", describe(out.error()).c_str());
    std::abort();
  }
  return (*out)[0].values;
}

/// max |a - b| over all elements; sizes must match.
inline float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = a.size() == b.size() ? 0.0f : INFINITY;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

inline float value_range(const std::vector<float>& v) {
  auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  return *hi - *lo;
}

} // namespace triplane::gpu::testing
