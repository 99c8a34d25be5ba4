// Sampling: reproducible with a seed, greedy at top-k 1 and at temperature 0, stop tokens honoured.
#include <catch2/catch.hpp>

#include <map>

#include "test_support.hpp"
#include "triplane/gpu/generate.hpp"
#include "triplane/gpu/sampler.hpp"

using namespace triplane::gpu;
using namespace triplane::gpu::testing;

TEST_CASE("sampling with the same seed reproduces the same tokens, another seed does not", "[sampler]") {
  auto engine = make_cpu("tiny-llama-f32");
  generate_request req;
  req.prompt = {340, 369, 105};
  req.max_new_tokens = 24;
  req.sampling.temperature = 1.5f;
  req.sampling.top_p = 0.95f;
  req.sampling.seed = 42;
  auto a = generate(*engine, req);
  auto b = generate(*engine, req);
  req.sampling.seed = 43;
  auto c = generate(*engine, req);
  REQUIRE(a);
  REQUIRE(b);
  REQUIRE(c);
  CHECK(a->tokens == b->tokens);
  CHECK(a->tokens != c->tokens);
}

TEST_CASE("top-k 1 and temperature near zero are greedy", "[sampler]") {
  auto engine = make_cpu("tiny-llama-f32");
  const auto e = load_expected("tiny-llama-f32")[1];
  generate_request req;
  req.prompt = e.ids;
  req.max_new_tokens = 12;
  auto greedy = generate(*engine, req);
  REQUIRE(greedy);
  CHECK(greedy->tokens == e.greedy);
  req.sampling.temperature = 2.0f;
  req.sampling.top_k = 1;
  req.sampling.seed = 9;
  auto top1 = generate(*engine, req);
  REQUIRE(top1);
  CHECK(top1->tokens == greedy->tokens);
  req.sampling.top_k = 0;
  req.sampling.temperature = 1e-6f;
  auto cold = generate(*engine, req);
  REQUIRE(cold);
  CHECK(cold->tokens == greedy->tokens);
}

TEST_CASE("sampled frequencies follow the tempered, truncated distribution", "[sampler]") {
  // logits ln(4), ln(2), ln(1), ln(1) -> probabilities 0.5, 0.25, 0.125, 0.125.
  const float logits[] = {std::log(4.0f), std::log(2.0f), 0.0f, 0.0f};
  sampling_params p;
  p.temperature = 1.0f;
  p.seed = 1;
  sampler s(p);
  std::map<int, int> counts;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[s.sample(logits, 4)];
  CHECK(counts[0] / double(n) == Approx(0.5).margin(0.02));
  CHECK(counts[1] / double(n) == Approx(0.25).margin(0.02));
  CHECK(counts[3] / double(n) == Approx(0.125).margin(0.02));
  SECTION("top-k 2 keeps the two most likely, renormalised") {
    p.top_k = 2;
    sampler k2(p);
    std::map<int, int> c;
    for (int i = 0; i < n; ++i) ++c[k2.sample(logits, 4)];
    CHECK(c[2] + c[3] == 0);
    CHECK(c[0] / double(n) == Approx(2.0 / 3).margin(0.02));
  }
  SECTION("top-p 0.7 keeps the smallest set reaching 70%") {
    p.top_p = 0.7f;
    sampler tp(p);
    std::map<int, int> c;
    for (int i = 0; i < n; ++i) ++c[tp.sample(logits, 4)];
    CHECK(c[2] + c[3] == 0);
    CHECK(c[1] > 0);
  }
}

TEST_CASE("generation stops after a stop token", "[sampler]") {
  auto engine = make_cpu("tiny-llama-f32");
  const auto e = load_expected("tiny-llama-f32")[2];  // greedy: 176, 247, 56, ...
  generate_request req;
  req.prompt = e.ids;
  req.max_new_tokens = 12;
  req.stop_tokens = {56, 999};
  auto out = generate(*engine, req);
  REQUIRE(out);
  CHECK(out->stopped);
  CHECK(out->tokens == std::vector<int32_t>{176, 247, 56});
  req.stop_tokens = {};
  req.max_new_tokens = 0;
  auto none = generate(*engine, req);
  REQUIRE(none);
  CHECK(none->tokens.empty());
  CHECK(engine->kv_stats().free_blocks == engine->kv_stats().num_blocks);  // sequences freed
}

TEST_CASE("invalid sampling parameters are refused", "[sampler]") {
  auto bad = GENERATE(sampling_params{-1.0f, 0, 1.0f, 0}, sampling_params{1.0f, -2, 1.0f, 0},
                      sampling_params{1.0f, 0, 0.0f, 0}, sampling_params{1.0f, 0, 1.5f, 0});
  CHECK(triplane::code_of(validate(bad)) == triplane::errc::invalid_argument);
}
