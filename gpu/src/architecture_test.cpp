// Architecture variants the fixtures do not cover, checked by equivalence: tied embeddings equal
// an untied head holding the same matrix; multi-query attention (1 KV head) equals multi-head
// attention whose KV heads are copies of that one head; both also under tensor parallelism.
#include <catch2/catch.hpp>

#include <cstring>
#include <regex>

#include "test_support.hpp"

using namespace triplane::gpu;
using namespace triplane::gpu::testing;

namespace {

// Writes the f32 fixture to `dir` with config fields replaced and tensors edited.
template <class Edit>
void write_variant(const temp_dir& dir, const std::vector<std::pair<std::string, std::string>>& fields, Edit edit) {
  const std::string src = fixture_dir("tiny-llama-f32");
  std::string config = read_text(src + "/config.json");
  for (const auto& [field, value] : fields) {
    std::regex pattern("\"" + field + "\": [^,\\n]*");
    REQUIRE(std::regex_search(config, pattern));
    config = std::regex_replace(config, pattern, "\"" + field + "\": " + value);
  }
  write_bytes(dir.file("config.json"), config);
  auto f = safetensors_file::open(src + "/model.safetensors");
  REQUIRE(f);
  auto tensors = copy_tensors(**f);
  edit(tensors);
  REQUIRE(!write_safetensors(dir.file("model.safetensors"), tensors));
}

tensor_to_write* find(std::vector<tensor_to_write>& t, const std::string& name) {
  for (auto& x : t)
    if (x.name == name) return &x;
  return nullptr;
}

std::unique_ptr<backend> open_dir(const temp_dir& dir, int tp) {
  auto ckpt = checkpoint::open(dir.path());
  REQUIRE(ckpt);
  backend_options opts;
  opts.tensor_parallel = tp;
  opts.kv_cache_bytes = 8 << 20;
  auto b = make_backend(**ckpt, opts);
  REQUIRE(b);
  return std::move(*b);
}

} // namespace

TEST_CASE("tied embeddings serve as the output head", "[architecture]") {
  temp_dir tied, untied;
  write_variant(tied, {{"tie_word_embeddings", "true"}}, [](std::vector<tensor_to_write>& t) {
    t.erase(std::remove_if(t.begin(), t.end(), [](const tensor_to_write& x) { return x.name == "lm_head.weight"; }),
            t.end());
  });
  write_variant(untied, {}, [](std::vector<tensor_to_write>& t) {
    find(t, "lm_head.weight")->data = find(t, "model.embed_tokens.weight")->data;
  });
  const auto ids = load_expected("tiny-llama-f32")[2].ids;
  auto reference = prompt_logits(*open_dir(untied, 1), ids);
  CHECK(prompt_logits(*open_dir(tied, 1), ids) == reference);
  const int tp = GENERATE(2, 4);
  INFO("tp " << tp);
  CHECK(max_abs_diff(prompt_logits(*open_dir(tied, tp), ids), reference) <= 1e-5f * value_range(reference));
}

TEST_CASE("one KV head shared by all query heads equals copies of it per head", "[architecture]") {
  // head_dim 16, hidden 128: the fixture's KV head 0 is rows [0, 16) of k_proj and v_proj.
  auto keep_head0 = [](std::vector<tensor_to_write>& t, int copies) {
    for (auto& x : t) {
      if (x.name.find("k_proj") == std::string::npos && x.name.find("v_proj") == std::string::npos) continue;
      const size_t head_bytes = 16 * 128 * 4;
      std::vector<unsigned char> heads(head_bytes * static_cast<size_t>(copies));
      for (int c = 0; c < copies; ++c) std::memcpy(heads.data() + head_bytes * static_cast<size_t>(c), x.data.data(), head_bytes);
      x.data = std::move(heads);
      x.shape = {16 * copies, 128};
    }
  };
  temp_dir mqa, mha;
  write_variant(mqa, {{"num_key_value_heads", "1"}}, [&](std::vector<tensor_to_write>& t) { keep_head0(t, 1); });
  write_variant(mha, {{"num_key_value_heads", "8"}}, [&](std::vector<tensor_to_write>& t) { keep_head0(t, 8); });
  const auto ids = load_expected("tiny-llama-f32")[2].ids;
  auto reference = prompt_logits(*open_dir(mha, 1), ids);
  CHECK(max_abs_diff(prompt_logits(*open_dir(mqa, 1), ids), reference) <= 1e-6f * value_range(reference));
  const int tp = GENERATE(2, 4, 8);  // MQA: the one KV head is replicated on every rank
  INFO("tp " << tp);
  CHECK(max_abs_diff(prompt_logits(*open_dir(mqa, tp), ids), reference) <= 1e-5f * value_range(reference));
  CHECK(max_abs_diff(prompt_logits(*open_dir(mha, tp), ids), reference) <= 1e-5f * value_range(reference));
}

TEST_CASE("a vocabulary the ranks cannot split evenly gives the single-rank logits", "[architecture]") {
  const bool tied = GENERATE(false, true);
  INFO("tied " << tied);
  temp_dir dir;
  std::vector<std::pair<std::string, std::string>> fields = {{"vocab_size", "383"}};
  if (tied) fields.push_back({"tie_word_embeddings", "true"});
  write_variant(dir, fields, [&](std::vector<tensor_to_write>& t) {
    for (auto& x : t)
      if (x.name == "model.embed_tokens.weight" || x.name == "lm_head.weight") {
        x.shape = {383, 128};
        x.data.resize(383 * 128 * 4);
      }
    if (tied)
      t.erase(std::remove_if(t.begin(), t.end(), [](const tensor_to_write& x) { return x.name == "lm_head.weight"; }),
              t.end());
  });
  const auto ids = load_expected("tiny-llama-f32")[1].ids;
  auto reference = prompt_logits(*open_dir(dir, 1), ids);
  REQUIRE(reference.size() == ids.size() * 383);
  const int tp = GENERATE(2, 4);
  INFO("tp " << tp);
  CHECK(max_abs_diff(prompt_logits(*open_dir(dir, tp), ids), reference) <= 1e-5f * value_range(reference));
}
