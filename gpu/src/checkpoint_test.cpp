// Model directories: sharded loading, and the checks of tensors against the config.
#include <catch2/catch.hpp>

#include <filesystem>

#include "test_support.hpp"
#include "triplane/gpu/model_config.hpp"

using namespace triplane::gpu;
using namespace triplane::gpu::testing;
using triplane::describe;

namespace {

// A copy of the f32 fixture's directory whose tensors went through `edit` first.
template <class Edit>
void write_model(const temp_dir& dir, Edit edit) {
  const std::string src = fixture_dir("tiny-llama-f32");
  std::filesystem::copy_file(src + "/config.json", dir.file("config.json"));
  auto f = safetensors_file::open(src + "/model.safetensors");
  REQUIRE(f);
  auto tensors = copy_tensors(**f);
  edit(tensors);
  REQUIRE(!write_safetensors(dir.file("model.safetensors"), tensors));
}

void expect_checkpoint_error(const temp_dir& dir, const std::string& needle) {
  auto c = checkpoint::open(dir.path());
  REQUIRE(!c);
  const std::string msg = describe(c.error());
  INFO(msg);
  CHECK(msg.find(dir.path()) != std::string::npos);
  CHECK(msg.find(needle) != std::string::npos);
}

const std::string q0 = "model.layers.0.self_attn.q_proj.weight";

} // namespace

TEST_CASE("a model with a missing tensor is refused, naming it", "[checkpoint]") {
  temp_dir dir;
  write_model(dir, [](std::vector<tensor_to_write>& t) {
    t.erase(std::remove_if(t.begin(), t.end(), [](const tensor_to_write& x) { return x.name == q0; }), t.end());
  });
  expect_checkpoint_error(dir, "tensor '" + q0 + "' is missing");
}

TEST_CASE("a tensor whose shape disagrees with the config is refused", "[checkpoint]") {
  temp_dir dir;
  write_model(dir, [](std::vector<tensor_to_write>& t) {
    for (auto& x : t)
      if (x.name == q0) x.shape = {64, 256};  // same bytes, wrong shape
  });
  expect_checkpoint_error(dir, "tensor '" + q0 + "' has shape [64, 256], the config implies [128, 128]");
}

TEST_CASE("a weight of a non-float dtype is refused", "[checkpoint]") {
  temp_dir dir;
  write_model(dir, [](std::vector<tensor_to_write>& t) {
    for (auto& x : t)
      if (x.name == q0) x.type = dtype::i32;  // same byte size
  });
  expect_checkpoint_error(dir, "tensor '" + q0 + "' has dtype I32, expected F32, F16 or BF16");
}

TEST_CASE("F16 weights load and agree with the F32 model to half precision", "[checkpoint]") {
  temp_dir dir;
  write_model(dir, [](std::vector<tensor_to_write>& t) {
    for (auto& x : t) {
      std::vector<unsigned char> half(x.data.size() / 2);
      for (size_t i = 0; i < x.data.size() / 4; ++i) {
        float v;
        std::memcpy(&v, x.data.data() + 4 * i, 4);
        uint16_t h = f32_to_f16(v);
        std::memcpy(half.data() + 2 * i, &h, 2);
      }
      x.type = dtype::f16;
      x.data = std::move(half);
    }
  });
  auto c = checkpoint::open(dir.path());
  REQUIRE(c);
  CHECK((*c)->weight_dtype() == dtype::f16);
  auto b = make_backend(**c, backend_options{});
  REQUIRE(b);
  const auto e = load_expected("tiny-llama-f32")[2];
  auto logits = prompt_logits(**b, e.ids);
  // f16 has an 11-bit significand: a relative weight error of 2^-12 gives logits within ~1e-2.
  CHECK(max_abs_diff(logits, e.logits) <= 1e-2f * value_range(e.logits));
}

TEST_CASE("a sharded model loads through its index and equals the single file", "[checkpoint]") {
  temp_dir dir;
  const std::string src = fixture_dir("tiny-llama-f32");
  std::filesystem::copy_file(src + "/config.json", dir.file("config.json"));
  auto f = safetensors_file::open(src + "/model.safetensors");
  REQUIRE(f);
  auto tensors = copy_tensors(**f);
  std::vector<tensor_to_write> a, b;
  std::string map;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const bool first = i % 2 == 0;
    map += std::string(map.empty() ? "" : ",") + "\"" + tensors[i].name + "\": \"model-0000" + (first ? "1" : "2") +
           "-of-00002.safetensors\"";
    (first ? a : b).push_back(tensors[i]);
  }
  REQUIRE(!write_safetensors(dir.file("model-00001-of-00002.safetensors"), a));
  REQUIRE(!write_safetensors(dir.file("model-00002-of-00002.safetensors"), b));
  write_bytes(dir.file("model.safetensors.index.json"), "{\"metadata\": {}, \"weight_map\": {" + map + "}}");
  auto sharded = checkpoint::open(dir.path());
  REQUIRE(sharded);
  auto engine = make_backend(**sharded, backend_options{});
  REQUIRE(engine);
  auto single = make_cpu("tiny-llama-f32");
  const auto e = load_expected("tiny-llama-f32")[1];
  CHECK(prompt_logits(**engine, e.ids) == prompt_logits(*single, e.ids));

  SECTION("an index naming a path outside the directory is refused") {
    write_bytes(dir.file("model.safetensors.index.json"),
                "{\"weight_map\": {\"" + q0 + "\": \"../model.safetensors\"}}");
    expect_checkpoint_error(dir, "not a file name");
  }
  SECTION("an index missing a tensor is refused") {
    write_bytes(dir.file("model.safetensors.index.json"),
                "{\"weight_map\": {\"" + q0 + "\": \"model-00001-of-00002.safetensors\"}}");
    expect_checkpoint_error(dir, "missing from weight_map");
  }
}

TEST_CASE("config fields are validated with errors naming the field", "[config]") {
  const std::string base = R"("vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4)";
  auto parse = [&](const std::string& extra) { return parse_model_config("{" + base + extra + "}", "cfg.json"); };
  auto ok = parse("");
  REQUIRE(ok);
  CHECK(ok->num_kv_heads == 4);
  CHECK(ok->head_dim == 16);
  CHECK(ok->rope.theta == 10000.0);
  CHECK(!ok->tie_word_embeddings);

  struct bad_case {
    std::string extra, needle;
  };
  auto c = GENERATE(values<bad_case>({
      {R"(, "num_key_value_heads": 3)", "field 'num_attention_heads' (4) is not divisible by num_key_value_heads (3)"},
      {R"(, "num_key_value_heads": 0)", "field 'num_key_value_heads' is 0"},
      {R"(, "rms_norm_eps": "small")", "field 'rms_norm_eps' must be a number, got string"},
      {R"(, "tie_word_embeddings": 1)", "field 'tie_word_embeddings' must be a boolean"},
      {R"(, "head_dim": 15)", "RoPE needs an even head dimension"},
      {R"(, "rope_parameters": {"rope_type": "yarn", "factor": 4.0})", "only default, linear and llama3"},
      {R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0})", "field 'low_freq_factor' is missing"},
      {R"(, "hidden_act": "gelu")", "field 'hidden_act'"},
      {R"(, "max_position_embeddings": 1.5)", "must be an integer, got a non-integer number"},
  }));
  INFO(c.extra);
  auto r = parse(c.extra);
  REQUIRE(!r);
  INFO(describe(r.error()));
  CHECK(describe(r.error()).find("cfg.json: ") != std::string::npos);
  CHECK(describe(r.error()).find(c.needle) != std::string::npos);
  auto missing = parse_model_config(R"({"vocab_size": 32})", "cfg.json");
  REQUIRE(!missing);
  CHECK(describe(missing.error()).find("field 'hidden_size' is missing") != std::string::npos);
}

TEST_CASE("llama3 RoPE scaling matches transformers' inverse frequencies", "[config]") {
  // Llama 3.1 settings; expected values: transformers' _compute_llama3_parameters for head_dim 128,
  // theta 500000, factor 8, low 1, high 4, original 8192 (indices 0, 20, 40, 63).
  for (const char* form : {R"("rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})",
                           R"("rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})"}) {
    auto cfg = parse_model_config(std::string(R"({"vocab_size": 32, "hidden_size": 4096, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8, )") + form + "}", "c");
    REQUIRE(cfg);
    CHECK(cfg->rope.kind == rope_kind::llama3);
    auto inv = rope_inv_freq(*cfg);
    REQUIRE(inv.size() == 64);
    // Independent double-precision evaluation of the same piecewise formula.
    for (size_t i = 0; i < inv.size(); ++i) {
      double f = 1.0 / std::pow(500000.0, (2.0 * i) / 128.0);
      double wavelen = 2 * M_PI / f, expected = f;
      if (wavelen > 8192.0) expected = f / 8;
      else if (wavelen >= 8192.0 / 4) {
        double smooth = (8192.0 / wavelen - 1) / (4 - 1);
        expected = (1 - smooth) * f / 8 + smooth * f;
      }
      INFO("index " << i);
      CHECK(inv[i] == Approx(expected).epsilon(1e-5));
    }
    CHECK(inv[0] == 1.0f);
    CHECK(inv[63] == Approx(1.0 / std::pow(500000.0, 126.0 / 128.0) / 8).epsilon(1e-5));
  }
}
