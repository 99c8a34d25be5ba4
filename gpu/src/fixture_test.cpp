// The CPU backend against the transformers reference fixtures: logits, greedy continuations,
// config forms, batching, tensor parallelism and KV-cached decoding.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

#include "test_support.hpp"
#include "triplane/gpu/generate.hpp"

using namespace triplane::gpu;
using namespace triplane::gpu::testing;

namespace {

// Compares a greedy continuation with the reference: equal at every step until the first step
// whose reference margin is within `tie` (a near-tie may legitimately flip and diverge after).
void check_greedy(const std::vector<int32_t>& got, const expected_prompt& e, float tie) {
  REQUIRE(got.size() == e.greedy.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("step " << i << " margin " << e.margin[i] << " tie tolerance " << tie);
    if (got[i] != e.greedy[i]) {
      CHECK(e.margin[i] <= tie);
      return;
    }
  }
}

} // namespace

TEST_CASE("the CPU backend reproduces the reference logits and greedy tokens of both fixtures", "[fixture]") {
  const std::string model = GENERATE(as<std::string>{}, "tiny-llama-f32", "tiny-llama-bf16");
  INFO(model);
  auto engine = make_cpu(model);
  auto expected = load_expected(model);
  for (size_t k = 0; k < expected.size(); ++k) {
    const auto& e = expected[k];
    INFO("prompt " << k);
    auto logits = prompt_logits(*engine, e.ids);
    const float range = value_range(e.logits);
    const float err = max_abs_diff(logits, e.logits);
    INFO("max abs error " << err << " over range " << range);
    CHECK(err <= 1e-4f * range);
    generate_request req;
    req.prompt = e.ids;
    req.max_new_tokens = 12;
    auto out = generate(*engine, req, 7);
    REQUIRE(out);
    // A step is a tie when the reference margin is within our error on both logits.
    check_greedy(out->tokens, e, 2 * std::max(err, 1e-6f));
  }
}

TEST_CASE("the legacy and the transformers-5 config forms load the same model", "[fixture][config]") {
  auto modern = make_cpu("tiny-llama-f32", 1, 8 << 20, "config.json");
  auto legacy = make_cpu("tiny-llama-f32", 1, 8 << 20, "config.legacy.json");
  CHECK(modern->config().rope.theta == legacy->config().rope.theta);
  CHECK(modern->config().num_kv_heads == legacy->config().num_kv_heads);
  for (const auto& e : load_expected("tiny-llama-f32"))
    CHECK(prompt_logits(*modern, e.ids) == prompt_logits(*legacy, e.ids));
}

TEST_CASE("a prompt gives the same tokens alone and inside a batch of other prompts", "[fixture][batch]") {
  auto engine = make_cpu("tiny-llama-f32");
  auto expected = load_expected("tiny-llama-f32");
  // Alone: each prompt by itself, greedy with the KV cache.
  std::vector<std::vector<int32_t>> alone;
  std::vector<std::vector<float>> alone_first_logits;
  for (const auto& e : expected) {
    generate_request req;
    req.prompt = e.ids;
    req.max_new_tokens = 12;
    auto out = generate(*engine, req, 1);
    REQUIRE(out);
    alone.push_back(out->tokens);
    auto all = prompt_logits(*engine, e.ids);
    alone_first_logits.emplace_back(all.end() - engine->config().vocab_size, all.end());
  }
  // Together: all three prefill in one step, then decode in lock-step; prompt 1 joins one step
  // late to mix a prefill with decodes.
  std::vector<std::vector<int32_t>> together(expected.size());
  std::vector<std::vector<float>> last(expected.size());
  for (sequence_id s = 0; s < expected.size(); ++s) REQUIRE(!engine->add_sequence(10 + s));
  for (int step = 0; step < 14; ++step) {
    std::vector<step_item> items;
    std::vector<size_t> who;
    for (size_t s = 0; s < expected.size(); ++s) {
      if (s == 1 && step == 0) continue;
      if (together[s].size() == 12) continue;
      if (last[s].empty()) items.push_back({10 + s, expected[s].ids, false});
      else items.push_back({10 + s, {together[s].back()}, false});
      who.push_back(s);
    }
    if (items.empty()) break;
    auto out = engine->forward(items);
    REQUIRE(out);
    for (size_t i = 0; i < who.size(); ++i) {
      auto s = who[i];
      last[s] = (*out)[i].values;
      if (together[s].empty()) {
        INFO("prompt " << s << ": last prefill logits alone vs in a batch");
        CHECK(max_abs_diff(last[s], alone_first_logits[s]) <= 1e-5f * value_range(alone_first_logits[s]));
      }
      together[s].push_back(argmax(last[s].data(), engine->config().vocab_size));
    }
  }
  for (size_t s = 0; s < expected.size(); ++s) {
    INFO("prompt " << s);
    CHECK(together[s] == alone[s]);
  }
}

TEST_CASE("tensor-parallel CPU ranks give the single-rank result", "[fixture][tp]") {
  const int tp = GENERATE(2, 4);
  INFO("tp " << tp);
  auto single = make_cpu("tiny-llama-f32", 1);
  auto split = make_cpu("tiny-llama-f32", tp);
  CHECK(split->tensor_parallel() == tp);
  for (const auto& e : load_expected("tiny-llama-f32")) {
    auto a = prompt_logits(*single, e.ids);
    auto b = prompt_logits(*split, e.ids);
    CHECK(max_abs_diff(a, b) <= 1e-5f * value_range(a));
    generate_request req;
    req.prompt = e.ids;
    req.max_new_tokens = 12;
    auto ta = generate(*single, req);
    auto tb = generate(*split, req);
    REQUIRE(ta);
    REQUIRE(tb);
    CHECK(ta->tokens == tb->tokens);
  }
}

TEST_CASE("tensor parallelism the model's heads cannot be split into is refused", "[tp]") {
  auto ckpt = checkpoint::open(fixture_dir("tiny-llama-f32"));
  REQUIRE(ckpt);
  backend_options opts;
  opts.tensor_parallel = 3;  // 8 heads are not divisible by 3
  auto b = make_backend(**ckpt, opts);
  REQUIRE(!b);
  CHECK(triplane::code_of(b.error()) == triplane::errc::invalid_argument);
  CHECK_THAT(triplane::describe(b.error()), Catch::Contains("num_attention_heads"));
}

TEST_CASE("KV-cached decoding matches recomputing the whole sequence", "[fixture][kv]") {
  auto engine = make_cpu("tiny-llama-f32");
  const auto e = load_expected("tiny-llama-f32")[2];
  const int64_t vocab = engine->config().vocab_size;
  // Feed the prompt in uneven chunks, then decode token by token, and compare the logits of each
  // position with one full forward pass over the same tokens.
  std::vector<int32_t> sequence = e.ids;
  for (int i = 0; i < 5; ++i) sequence.push_back(e.greedy[static_cast<size_t>(i)]);
  auto full = prompt_logits(*engine, sequence);
  REQUIRE(!engine->add_sequence(5));
  std::vector<float> cached;
  size_t pos = 0;
  const size_t chunks[] = {5, 1, 11, 6};  // 23 prompt tokens
  for (size_t c : chunks) {
    std::vector<int32_t> part(sequence.begin() + static_cast<std::ptrdiff_t>(pos),
                              sequence.begin() + static_cast<std::ptrdiff_t>(pos + c));
    auto out = engine->forward({{5, part, true}});
    REQUIRE(out);
    cached.insert(cached.end(), (*out)[0].values.begin(), (*out)[0].values.end());
    pos += c;
  }
  for (; pos < sequence.size(); ++pos) {
    auto out = engine->forward({{5, {sequence[pos]}, false}});
    REQUIRE(out);
    cached.insert(cached.end(), (*out)[0].values.begin(), (*out)[0].values.end());
  }
  CHECK(engine->sequence_length(5) == static_cast<int64_t>(sequence.size()));
  REQUIRE(cached.size() == sequence.size() * static_cast<size_t>(vocab));
  CHECK(max_abs_diff(cached, full) <= 1e-5f * value_range(full));
}
