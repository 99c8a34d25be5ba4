// Step-level tests of the continuous batcher on the real CPU backend: the per-step token budget,
// prefill chunking that keeps decoders going, retirement, and all-or-nothing failure handling.
#include "continuous_batcher.hpp"

#include <map>

#include <catch2/catch.hpp>

#include "triplane/actors/inference_worker.hpp"
#include "triplane/gpu/generate.hpp"

using namespace triplane;
using namespace triplane::actors::inference;

namespace {

const std::string model_dir = std::string(TRIPLANE_FIXTURES_DIR) + "/llama/tiny-llama-f32";

std::unique_ptr<gpu::backend> make_engine() {
  gpu::backend_options o;
  o.threads = 1;
  o.kv_cache_bytes = int64_t{16} << 20;
  auto b = load_model(model_dir, o)();
  REQUIRE(b);
  return std::move(*b);
}

// Records events with the step they happened in.
struct recorder : batch_listener {
  int64_t step = 0;
  std::map<uint64_t, std::vector<int32_t>> tokens;
  std::map<uint64_t, std::vector<int64_t>> token_steps;
  std::map<uint64_t, generation_finished> finished;
  int64_t released_blocks = 0;
  void on_token(const caf::actor&, const token_event& ev) override {
    tokens[ev.request_id].push_back(ev.token);
    token_steps[ev.request_id].push_back(step);
  }
  void on_finished(const caf::actor&, const generation_finished& f, int64_t reserved) override {
    finished[f.request_id] = f;
    released_blocks += reserved;
  }
};

admitted_request make(uint64_t id, std::vector<int32_t> prompt, int64_t max_new) {
  admitted_request r;
  r.id = id;
  r.request.prompt = std::move(prompt);
  r.request.max_new_tokens = max_new;
  r.reserved_blocks = 1;
  r.accepted_at = steady_clock::now();
  return r;
}

std::vector<int32_t> prompt_of(size_t n, int32_t salt) {
  std::vector<int32_t> p;
  for (size_t i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((i * 37 + static_cast<size_t>(salt) * 11) % 384));
  return p;
}

void run_until_idle(continuous_batcher& b, recorder& rec) {
  for (int guard = 0; guard < 10000 && !b.idle(); ++guard) {
    ++rec.step;
    REQUIRE_FALSE(b.step());
  }
  REQUIRE(b.idle());
}

} // namespace

TEST_CASE("a long prompt is prefilled in budget-sized chunks while running requests keep decoding", "[inference][batcher]") {
  auto engine = make_engine();
  recorder rec;
  const int64_t budget = 8;
  continuous_batcher batcher(*engine, 16, budget, rec);
  batcher.submit(make(1, prompt_of(5, 1), 60));
  for (int i = 0; i < 3; ++i) {
    ++rec.step;
    REQUIRE_FALSE(batcher.step());
  }
  const int64_t long_joined = rec.step + 1;
  batcher.submit(make(2, prompt_of(100, 2), 4));
  run_until_idle(batcher, rec);
  // Request 2's first token comes after ceil(100 / (budget - 1)) steps of prefill...
  const int64_t first_of_long = rec.token_steps[2].front();
  CHECK(first_of_long - long_joined + 1 == (100 + budget - 2) / (budget - 1));
  // ...and request 1 produced a token in every one of them.
  int64_t decoded_meanwhile = 0;
  for (auto s : rec.token_steps[1])
    if (s >= long_joined && s <= first_of_long) ++decoded_meanwhile;
  CHECK(decoded_meanwhile == first_of_long - long_joined + 1);
  // Budgets did not change the tokens.
  for (auto [id, prompt, n] : {std::tuple<uint64_t, std::vector<int32_t>, int64_t>{1, prompt_of(5, 1), 60},
                               {2, prompt_of(100, 2), 4}}) {
    gpu::generate_request req;
    req.prompt = prompt;
    req.max_new_tokens = n;
    auto alone = gpu::generate(*engine, req, 99);
    REQUIRE(alone);
    CHECK(rec.tokens[id] == alone->tokens);
    CHECK(rec.finished[id].reason == finish_reason::length);
  }
  CHECK(engine->kv_stats().free_blocks == engine->kv_stats().num_blocks);
  CHECK(rec.released_blocks == 2);
  CHECK(batcher.counters().prompt_tokens_processed == 105);
  CHECK(batcher.counters().tokens_generated == 64);
}

TEST_CASE("max_running bounds the batch and the queue drains in order", "[inference][batcher]") {
  auto engine = make_engine();
  recorder rec;
  continuous_batcher batcher(*engine, 2, 64, rec);
  for (uint64_t id = 1; id <= 5; ++id) batcher.submit(make(id, prompt_of(6, static_cast<int32_t>(id)), 5));
  ++rec.step;
  REQUIRE_FALSE(batcher.step());
  CHECK(batcher.running() == 2);
  CHECK(batcher.waiting() == 3);
  run_until_idle(batcher, rec);
  REQUIRE(rec.finished.size() == 5);
  // FIFO: request k's first token is no earlier than request k-1's.
  for (uint64_t id = 2; id <= 5; ++id) CHECK(rec.token_steps[id].front() >= rec.token_steps[id - 1].front());
  CHECK(rec.token_steps[3].front() > rec.token_steps[1].back());
}

TEST_CASE("cancelling a waiting or running request releases it without a step", "[inference][batcher]") {
  auto engine = make_engine();
  recorder rec;
  continuous_batcher batcher(*engine, 1, 64, rec);
  batcher.submit(make(1, prompt_of(20, 1), 50));
  batcher.submit(make(2, prompt_of(20, 2), 50));
  ++rec.step;
  REQUIRE_FALSE(batcher.step());
  CHECK(engine->kv_stats().free_blocks < engine->kv_stats().num_blocks);
  batcher.cancel(2);  // waiting
  batcher.cancel(1);  // running
  batcher.cancel(77); // unknown: nothing
  CHECK(batcher.idle());
  CHECK(rec.finished[1].reason == finish_reason::cancelled);
  CHECK(rec.finished[2].reason == finish_reason::cancelled);
  CHECK(rec.finished[2].generated_tokens == 0);
  CHECK(rec.finished[2].time_to_first_token_us == -1);
  CHECK(engine->kv_stats().free_blocks == engine->kv_stats().num_blocks);
  CHECK(batcher.counters().cancelled == 2);
}
