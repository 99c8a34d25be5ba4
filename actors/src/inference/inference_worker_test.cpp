// Tests of the inference worker on the CPU backend and the tiny f32 fixture: streamed tokens against
// the reference and the engine, batching invariance, joins mid-flight, stop tokens, lengths, seeded
// sampling, cancellation, sink death, admission control, preemption, supervised restart after a
// failed step, and responsiveness while the engine runs.
#include "triplane/actors/inference_worker.hpp"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <random>
#include <thread>

#include <caf/all.hpp>
#include <catch2/catch.hpp>

#include "triplane/gpu/checkpoint.hpp"
#include "triplane/gpu/generate.hpp"
#include "triplane/gpu/safetensors.hpp"

using namespace std::chrono_literals;
using namespace triplane;
using namespace triplane::actors::inference;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

namespace {

const std::string model_dir = std::string(TRIPLANE_FIXTURES_DIR) + "/llama/tiny-llama-f32";

gpu::backend_options cpu_options(int64_t kv_bytes = int64_t{16} << 20) {
  gpu::backend_options o;
  o.kind = gpu::backend_kind::cpu;
  o.threads = 1;
  o.kv_cache_bytes = kv_bytes;
  return o;
}

// Bytes of one KV block of the fixture (f32, 3 layers, 2 KV heads of 16, 16 slots).
constexpr int64_t fixture_block_bytes = 2 * 3 * 16 * 2 * 16 * 4;

struct expected_prompt {
  std::vector<int32_t> ids;
  std::vector<int32_t> greedy;
  std::vector<float> margin;
};

std::vector<expected_prompt> load_expected() {
  const std::string path = model_dir + "/expected.safetensors";
  auto file = gpu::safetensors_file::open(path);
  REQUIRE(file);
  auto get = [&](const std::string& name) -> const gpu::tensor_view& {
    const auto* t = (*file)->find(name);
    REQUIRE(t != nullptr);
    return *t;
  };
  std::vector<expected_prompt> out;
  for (int k = 0; k < 3; ++k) {
    const std::string p = "prompt" + std::to_string(k);
    expected_prompt e;
    auto ids = gpu::tensor_to_i64(get(p + ".input_ids"), path);
    auto greedy = gpu::tensor_to_i64(get(p + ".greedy"), path);
    auto margin = gpu::tensor_to_f32(get(p + ".greedy_margin"), path);
    REQUIRE((ids && greedy && margin));
    for (auto v : *ids) e.ids.push_back(static_cast<int32_t>(v));
    for (auto v : *greedy) e.greedy.push_back(static_cast<int32_t>(v));
    e.margin = *margin;
    out.push_back(std::move(e));
  }
  return out;
}

// TEST ONLY: the real CPU backend behind a wrapper that counts forward calls (across incarnations:
// the counter is shared), can sleep in each one (a slow device), and can fail the Nth one with an
// internal error before touching the real backend (a device fault; all-or-nothing holds).
class test_backend : public gpu::backend {
public:
  test_backend(std::unique_ptr<gpu::backend> real, std::shared_ptr<std::atomic<int64_t>> forwards,
               int64_t fail_at, milliseconds delay)
      : real_(std::move(real)), forwards_(std::move(forwards)), fail_at_(fail_at), delay_(delay) {}

  gpu::backend_kind kind() const override { return real_->kind(); }
  const gpu::model_config& config() const override { return real_->config(); }
  int tensor_parallel() const override { return real_->tensor_parallel(); }
  caf::error add_sequence(gpu::sequence_id id) override { return real_->add_sequence(id); }
  void free_sequence(gpu::sequence_id id) override { real_->free_sequence(id); }
  int64_t sequence_length(gpu::sequence_id id) const override { return real_->sequence_length(id); }
  gpu::kv_cache_stats kv_stats() const override { return real_->kv_stats(); }
  expected<std::vector<gpu::step_logits>> forward(const std::vector<gpu::step_item>& items) override {
    const int64_t n = ++*forwards_;
    if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
    if (n == fail_at_) return make_error(errc::internal, "injected device fault at forward " + std::to_string(n));
    return real_->forward(items);
  }

private:
  std::unique_ptr<gpu::backend> real_;
  std::shared_ptr<std::atomic<int64_t>> forwards_;
  int64_t fail_at_;
  milliseconds delay_;
};

struct test_backend_spec {
  int64_t kv_bytes = int64_t{16} << 20;
  int64_t fail_at = -1;  // forward number (1-based, across incarnations) that fails; -1: none
  milliseconds delay{0};
  std::shared_ptr<std::atomic<int64_t>> forwards = std::make_shared<std::atomic<int64_t>>(0);
};

backend_maker test_maker(const test_backend_spec& spec) {
  return [spec]() -> expected<std::unique_ptr<gpu::backend>> {
    auto real = load_model(model_dir, cpu_options(spec.kv_bytes))();
    if (!real) return real.error();
    return std::unique_ptr<gpu::backend>(
        new test_backend(std::move(*real), spec.forwards, spec.fail_at, spec.delay));
  };
}

// The engine by itself: what one request yields when it runs alone.
std::vector<int32_t> run_alone(const std::vector<int32_t>& prompt, int64_t max_new, sampling s = {},
                               std::vector<int32_t> stops = {}) {
  auto engine = load_model(model_dir, cpu_options())();
  REQUIRE(engine);
  gpu::generate_request req;
  req.prompt = prompt;
  req.max_new_tokens = max_new;
  req.sampling.temperature = s.temperature;
  req.sampling.top_k = s.top_k;
  req.sampling.top_p = s.top_p;
  req.sampling.seed = s.seed;
  req.stop_tokens = std::move(stops);
  auto out = gpu::generate(**engine, req);
  REQUIRE(out);
  return out->tokens;
}

// What the `triplane generate` command prints for a greedy run.
std::vector<int32_t> run_generate_command(const std::vector<int32_t>& prompt, int64_t max_new) {
  std::string cmd = std::string(TRIPLANE_GENERATE_EXE) + " --model " + model_dir + " --threads 1 --max-new-tokens " +
                    std::to_string(max_new) + " --tokens ";
  for (size_t i = 0; i < prompt.size(); ++i) cmd += (i ? "," : "") + std::to_string(prompt[i]);
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  REQUIRE(::pclose(p) == 0);
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos < out.size() && out[pos] != '\n') {
    size_t end = out.find_first_of(",\n", pos);
    ids.push_back(static_cast<int32_t>(std::stol(out.substr(pos, end - pos))));
    pos = end + (out[end] == ',' ? 1 : 0);
  }
  return ids;
}

std::vector<int32_t> random_prompt(size_t n, uint32_t seed) {
  std::vector<int32_t> out;
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    out.push_back(static_cast<int32_t>((x >> 8) % 384));
  }
  return out;
}

struct system_config : caf::actor_system_config {
  system_config() {
    set("scheduler.max-threads", 2);
    register_inference_types(*this);
  }
};

generate_request make_request(const std::vector<int32_t>& prompt, int64_t max_new, caf::actor sink) {
  generate_request r;
  r.prompt = prompt;
  r.max_new_tokens = max_new;
  r.sink = std::move(sink);
  return r;
}

// Sends a generate request and waits for its answer (stream messages stay in the mailbox).
expected<uint64_t> submit(caf::scoped_actor& self, const caf::actor& worker, generate_request req) {
  expected<uint64_t> out{make_error(errc::timeout, "no answer")};
  self->request(worker, caf::duration{30s}, std::move(req))
      .receive([&](generate_accepted& a) { out = a.request_id; }, [&](caf::error& e) { out = std::move(e); });
  return out;
}

struct stream {
  std::vector<int32_t> tokens;
  std::vector<int64_t> indices;
  bool finished = false;
  generation_finished end;
};

// Receives stream messages until `count` requests have finished (or 60 s pass).
void collect(caf::scoped_actor& self, std::map<uint64_t, stream>& streams, size_t count) {
  auto finished = [&] {
    size_t n = 0;
    for (auto& [id, s] : streams) n += s.finished ? 1 : 0;
    return n;
  };
  bool timed_out = false;
  while (finished() < count && !timed_out) {
    self->receive(
        [&](token_event& ev) {
          streams[ev.request_id].tokens.push_back(ev.token);
          streams[ev.request_id].indices.push_back(ev.index);
        },
        [&](generation_finished& f) {
          streams[f.request_id].finished = true;
          streams[f.request_id].end = f;
        },
        caf::after(std::chrono::seconds(60)) >> [&] { timed_out = true; });
  }
  REQUIRE_FALSE(timed_out);
}

stream generate_one(caf::scoped_actor& self, const caf::actor& worker, generate_request req) {
  auto id = submit(self, worker, std::move(req));
  REQUIRE(id);
  std::map<uint64_t, stream> streams;
  collect(self, streams, 1);
  REQUIRE(streams.count(*id) == 1);
  return streams[*id];
}

worker_stats stats_of(caf::scoped_actor& self, const caf::actor& worker) {
  worker_stats out;
  bool ok = false;
  self->request(worker, caf::duration{10s}, stats_atom::value)
      .receive([&](worker_stats& s) { out = s; ok = true; }, [&](caf::error& e) { FAIL(describe(e)); });
  REQUIRE(ok);
  return out;
}

// Polls the worker's stats until `pred` holds (the engine publishes after each step).
template <class Pred>
worker_stats wait_for_stats(caf::scoped_actor& self, const caf::actor& worker, Pred pred) {
  auto deadline = steady_clock::now() + 20s;
  worker_stats s = stats_of(self, worker);
  while (!pred(s) && steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
    s = stats_of(self, worker);
  }
  return s;
}

void stop(caf::scoped_actor& self, const caf::actor& a) {
  self->monitor(a);
  self->send_exit(a, caf::exit_reason::user_shutdown);
  self->receive([](caf::down_msg&) {}, caf::after(std::chrono::seconds(30)) >> [] { FAIL("no down_msg"); });
}

worker_options default_worker() {
  worker_options o;
  o.name = "tiny";
  return o;
}

} // namespace

TEST_CASE("greedy tokens streamed by the worker equal the reference continuation and the engine's", "[inference][worker]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto worker = spawn_worker(sys, load_model(model_dir, cpu_options()), default_worker());
  for (const auto& e : load_expected()) {
    INFO("prompt of " << e.ids.size() << " tokens");
    auto got = generate_one(self, worker, make_request(e.ids, 12, self));
    CHECK(got.end.reason == finish_reason::length);
    CHECK(got.end.generated_tokens == 12);
    CHECK(got.end.prompt_tokens == static_cast<int64_t>(e.ids.size()));
    CHECK(got.end.time_to_first_token_us >= 0);
    CHECK(got.end.time_to_first_token_us <= got.end.total_us);
    std::vector<int64_t> want_indices(12);
    for (int64_t i = 0; i < 12; ++i) want_indices[static_cast<size_t>(i)] = i;
    CHECK(got.indices == want_indices);
    CHECK(got.tokens == run_alone(e.ids, 12));
    CHECK(got.tokens == run_generate_command(e.ids, 12));
    // Against transformers: equal up to the first near-tie (the README's prompt 0 has one).
    for (size_t i = 0; i < e.greedy.size(); ++i) {
      INFO("step " << i << " margin " << e.margin[i]);
      if (e.margin[i] < 1e-3f) break;
      REQUIRE(got.tokens[i] == e.greedy[i]);
    }
  }
  model_info info;
  self->request(worker, caf::duration{10s}, info_atom::value)
      .receive([&](model_info& i) { info = i; }, [&](caf::error& e) { FAIL(describe(e)); });
  CHECK(info.name == "tiny");
  CHECK(info.backend == "cpu");
  CHECK(info.tensor_parallel == 1);
  CHECK(info.vocab_size == 384);
  CHECK(info.num_layers == 3);
  CHECK(info.num_kv_heads == 2);
  CHECK(info.max_position_embeddings == 1024);
  CHECK(info.kv_blocks_total == (int64_t{16} << 20) / fixture_block_bytes);
  stop(self, worker);
}

TEST_CASE("concurrent requests of different lengths get the tokens they get alone", "[inference][worker][batching]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto opts = default_worker();
  opts.step_token_budget = 16;  // forces chunked prefill and prefill/decode mixes
  auto worker = spawn_worker(sys, load_model(model_dir, cpu_options()), opts);
  struct job {
    std::vector<int32_t> prompt;
    int64_t max_new;
  };
  std::vector<job> jobs;
  for (const auto& e : load_expected()) jobs.push_back({e.ids, 12});
  jobs.push_back({random_prompt(40, 1), 30});
  jobs.push_back({random_prompt(100, 2), 5});
  jobs.push_back({random_prompt(3, 3), 50});
  jobs.push_back({random_prompt(64, 4), 1});
  std::map<uint64_t, size_t> job_of;
  for (size_t i = 0; i < jobs.size(); ++i) {
    auto id = submit(self, worker, make_request(jobs[i].prompt, jobs[i].max_new, self));
    REQUIRE(id);
    job_of[*id] = i;
  }
  std::map<uint64_t, stream> streams;
  collect(self, streams, jobs.size());
  uint64_t alone_steps = 0;
  for (auto& [id, s] : streams) {
    const auto& j = jobs[job_of.at(id)];
    INFO("job " << job_of.at(id) << ": prompt " << j.prompt.size() << ", max_new " << j.max_new);
    CHECK(s.end.reason == finish_reason::length);
    CHECK(s.tokens == run_alone(j.prompt, j.max_new));
    alone_steps += static_cast<uint64_t>((j.prompt.size() + 15) / 16 + j.max_new - 1);
  }
  auto st = stats_of(self, worker);
  INFO("steps " << st.steps << " vs " << alone_steps << " one at a time");
  CHECK(st.steps < alone_steps);  // requests shared steps
  CHECK(st.requests_completed == jobs.size());
  CHECK(st.kv_blocks_free == st.kv_blocks_total);
  stop(self, worker);
}

TEST_CASE("a request joining mid-flight shares the batch and both keep their tokens", "[inference][worker][batching]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec spec;
  spec.delay = 2ms;  // keeps the first request running while the second arrives
  auto worker = spawn_worker(sys, test_maker(spec), default_worker());
  auto first_prompt = random_prompt(20, 7);
  auto second_prompt = random_prompt(50, 8);
  auto first = submit(self, worker, make_request(first_prompt, 80, self));
  REQUIRE(first);
  std::map<uint64_t, stream> streams;
  // Wait for the first request's 5th token, then send the second.
  while (streams[*first].tokens.size() < 5)
    self->receive([&](token_event& ev) { streams[ev.request_id].tokens.push_back(ev.token); },
                  caf::after(std::chrono::seconds(30)) >> [] { FAIL("no tokens"); });
  auto second = submit(self, worker, make_request(second_prompt, 20, self));
  REQUIRE(second);
  size_t first_tokens_at_second_end = 0;
  bool timed_out = false;
  while (!(streams[*first].finished && streams[*second].finished) && !timed_out)
    self->receive(
        [&](token_event& ev) { streams[ev.request_id].tokens.push_back(ev.token); },
        [&](generation_finished& f) {
          streams[f.request_id].finished = true;
          if (f.request_id == *second) first_tokens_at_second_end = streams[*first].tokens.size();
        },
        caf::after(std::chrono::seconds(60)) >> [&] { timed_out = true; });
  REQUIRE_FALSE(timed_out);
  CHECK(streams[*first].tokens == run_alone(first_prompt, 80));
  CHECK(streams[*second].tokens == run_alone(second_prompt, 20));
  // The second ran while the first was still decoding (joined the batch, not queued behind it).
  CHECK(first_tokens_at_second_end < 80);
  stop(self, worker);
}

TEST_CASE("generation ends on a stop token, which is streamed, or at max_new_tokens", "[inference][worker]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto worker = spawn_worker(sys, load_model(model_dir, cpu_options()), default_worker());
  auto prompt = random_prompt(10, 11);
  auto alone = run_alone(prompt, 20);
  SECTION("stop token") {
    // The first token that differs from the first generated one, so the stop is not at index 0.
    size_t k = 1;
    while (k < alone.size() && std::find(alone.begin(), alone.begin() + static_cast<long>(k), alone[k]) !=
                                   alone.begin() + static_cast<long>(k))
      ++k;
    REQUIRE(k < alone.size());
    auto req = make_request(prompt, 20, self);
    req.stop_tokens = {alone[k], 383};
    auto got = generate_one(self, worker, req);
    CHECK(got.end.reason == finish_reason::stop);
    CHECK(got.tokens == std::vector<int32_t>(alone.begin(), alone.begin() + static_cast<long>(k) + 1));
    CHECK(got.end.generated_tokens == static_cast<int64_t>(k) + 1);
  }
  SECTION("max_new_tokens") {
    for (int64_t n : {1, 3, 20}) {
      INFO("max_new_tokens " << n);
      auto got = generate_one(self, worker, make_request(prompt, n, self));
      CHECK(got.end.reason == finish_reason::length);
      CHECK(got.tokens == std::vector<int32_t>(alone.begin(), alone.begin() + n));
    }
  }
  stop(self, worker);
}

TEST_CASE("seeded sampling is reproducible, inside a batch too, and matches the engine", "[inference][worker][sampling]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto worker = spawn_worker(sys, load_model(model_dir, cpu_options()), default_worker());
  auto prompt = random_prompt(12, 21);
  sampling s;
  s.temperature = 0.9f;
  s.top_k = 50;
  s.top_p = 0.95f;
  s.seed = 42;
  auto with = [&](sampling x) {
    auto r = make_request(prompt, 24, self);
    r.sampling = x;
    return r;
  };
  sampling other = s;
  other.seed = 43;
  // Three at once: two with seed 42 and one with 43.
  auto a = submit(self, worker, with(s));
  auto b = submit(self, worker, with(s));
  auto c = submit(self, worker, with(other));
  REQUIRE((a && b && c));
  std::map<uint64_t, stream> streams;
  collect(self, streams, 3);
  CHECK(streams[*a].tokens == streams[*b].tokens);
  CHECK(streams[*a].tokens == run_alone(prompt, 24, s));
  CHECK(streams[*c].tokens == run_alone(prompt, 24, other));
  CHECK(streams[*a].tokens != streams[*c].tokens);
  stop(self, worker);
}

TEST_CASE("bad requests are refused with invalid_argument naming the problem", "[inference][worker][validation]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto worker = spawn_worker(sys, load_model(model_dir, cpu_options()), default_worker());
  struct bad_case {
    const char* what;
    generate_request req;
    const char* mentions;
  };
  std::vector<bad_case> cases;
  cases.push_back({"empty prompt", make_request({}, 4, self), "empty"});
  cases.push_back({"token out of range", make_request({1, 384}, 4, self), "vocabulary"});
  cases.push_back({"negative token", make_request({-1}, 4, self), "vocabulary"});
  cases.push_back({"zero max_new_tokens", make_request({1}, 0, self), "max_new_tokens"});
  cases.push_back({"past the positions", make_request(random_prompt(1000, 1), 25, self), "positions"});
  cases.push_back({"no sink", make_request({1}, 4, caf::actor{}), "sink"});
  auto bad_sampling = make_request({1}, 4, self);
  bad_sampling.sampling.top_p = 1.5f;
  cases.push_back({"top_p above 1", bad_sampling, "top_p"});
  auto many_stops = make_request({1}, 4, self);
  many_stops.stop_tokens.assign(1025, 7);
  cases.push_back({"too many stop tokens", many_stops, "stop tokens"});
  for (auto& c : cases) {
    INFO(c.what);
    auto r = submit(self, worker, c.req);
    REQUIRE_FALSE(r);
    CHECK(code_of(r.error()) == errc::invalid_argument);
    CHECK(describe(r.error()).find(c.mentions) != std::string::npos);
  }
  CHECK(stats_of(self, worker).requests_accepted == 0);
  stop(self, worker);
}

TEST_CASE("a cancelled request ends with reason cancelled and frees its KV blocks", "[inference][worker][cancel]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec spec;
  spec.delay = 2ms;
  auto worker = spawn_worker(sys, test_maker(spec), default_worker());
  auto id = submit(self, worker, make_request(random_prompt(40, 5), 900, self));
  REQUIRE(id);
  std::map<uint64_t, stream> streams;
  while (streams[*id].tokens.size() < 3)
    self->receive([&](token_event& ev) { streams[ev.request_id].tokens.push_back(ev.token); },
                  caf::after(std::chrono::seconds(30)) >> [] { FAIL("no tokens"); });
  auto busy = stats_of(self, worker);
  CHECK(busy.running == 1);
  CHECK(busy.kv_blocks_free < busy.kv_blocks_total);
  bool acked = false;
  self->request(worker, caf::duration{10s}, cancel_atom::value, *id)
      .receive([&](caf::ok_atom) { acked = true; }, [&](caf::error& e) { FAIL(describe(e)); });
  CHECK(acked);
  collect(self, streams, 1);
  CHECK(streams[*id].end.reason == finish_reason::cancelled);
  CHECK(streams[*id].end.generated_tokens < 900);
  auto idle = wait_for_stats(self, worker, [](const worker_stats& s) { return s.running == 0; });
  CHECK(idle.running == 0);
  CHECK(idle.kv_blocks_free == idle.kv_blocks_total);
  CHECK(idle.kv_blocks_reserved == 0);
  CHECK(idle.requests_cancelled == 1);
  // A finished (or unknown) id is not_found.
  self->request(worker, caf::duration{10s}, cancel_atom::value, *id)
      .receive([&](caf::ok_atom) { FAIL("cancel of a finished request succeeded"); },
               [&](caf::error& e) { CHECK(code_of(e) == errc::not_found); });
  stop(self, worker);
}

TEST_CASE("a request whose sink goes down is cancelled and its KV blocks freed", "[inference][worker][cancel]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec spec;
  spec.delay = 2ms;
  auto worker = spawn_worker(sys, test_maker(spec), default_worker());
  // The sink tells us about its first token, then we kill it.
  caf::actor test = self;
  auto sink = sys.spawn([test](caf::event_based_actor* me) -> caf::behavior {
    return {
        [test, me](token_event& ev) {
          if (ev.index == 0) me->send(test, ev);
        },
        [](generation_finished&) {},
    };
  });
  auto id = submit(self, worker, make_request(random_prompt(30, 9), 900, sink));
  REQUIRE(id);
  self->receive([](token_event&) {}, caf::after(std::chrono::seconds(30)) >> [] { FAIL("no token"); });
  self->send_exit(sink, caf::exit_reason::kill);
  auto s = wait_for_stats(self, worker, [](const worker_stats& x) { return x.requests_cancelled == 1 && x.running == 0; });
  CHECK(s.requests_cancelled == 1);
  CHECK(s.running == 0);
  CHECK(s.kv_blocks_free == s.kv_blocks_total);
  CHECK(s.kv_blocks_reserved == 0);
  CHECK(s.tokens_generated < 900);
  stop(self, worker);
}

TEST_CASE("a request the KV pool cannot hold is refused with overloaded and the worker stays healthy", "[inference][worker][admission]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec spec;
  spec.kv_bytes = 8 * fixture_block_bytes;  // 8 blocks = 128 token slots
  spec.delay = 2ms;
  auto worker = spawn_worker(sys, test_maker(spec), default_worker());
  SECTION("larger than the whole pool") {
    auto r = submit(self, worker, make_request(random_prompt(200, 1), 4, self));
    REQUIRE_FALSE(r);
    CHECK(code_of(r.error()) == errc::overloaded);
    CHECK(describe(r.error()).find("never") != std::string::npos);
  }
  SECTION("while the pool is reserved by a running request") {
    auto big_prompt = random_prompt(80, 2);  // 80 + 16 reserve = 6 blocks
    auto big = submit(self, worker, make_request(big_prompt, 40, self));
    REQUIRE(big);
    auto refused = submit(self, worker, make_request(random_prompt(40, 3), 10, self));  // 4 blocks
    REQUIRE_FALSE(refused);
    CHECK(code_of(refused.error()) == errc::overloaded);
    CHECK(describe(refused.error()).find("KV cache is full") != std::string::npos);
    std::map<uint64_t, stream> streams;
    collect(self, streams, 1);
    CHECK(streams[*big].end.reason == finish_reason::length);
    CHECK(streams[*big].tokens == run_alone(big_prompt, 40));
    CHECK(stats_of(self, worker).requests_rejected == 1);
  }
  // Healthy: the same worker serves the next request.
  auto prompt = random_prompt(40, 3);
  auto later = generate_one(self, worker, make_request(prompt, 10, self));
  CHECK(later.end.reason == finish_reason::length);
  CHECK(later.tokens == run_alone(prompt, 10));
  auto s = stats_of(self, worker);
  CHECK(s.kv_blocks_free == s.kv_blocks_total);
  stop(self, worker);
}

TEST_CASE("a full queue answers overloaded at once", "[inference][worker][admission]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec spec;
  spec.delay = 5ms;
  auto opts = default_worker();
  opts.max_running = 1;
  opts.max_queued = 1;
  auto worker = spawn_worker(sys, test_maker(spec), opts);
  auto a = submit(self, worker, make_request(random_prompt(8, 1), 40, self));
  auto b = submit(self, worker, make_request(random_prompt(8, 2), 5, self));
  REQUIRE((a && b));
  auto t0 = steady_clock::now();
  auto c = submit(self, worker, make_request(random_prompt(8, 3), 5, self));
  auto answer_ms = std::chrono::duration_cast<milliseconds>(steady_clock::now() - t0).count();
  REQUIRE_FALSE(c);
  CHECK(code_of(c.error()) == errc::overloaded);
  CHECK(describe(c.error()).find("queue is full") != std::string::npos);
  CHECK(answer_ms < 150);  // not after the running request (40 steps of >= 5 ms)
  std::map<uint64_t, stream> streams;
  collect(self, streams, 2);
  CHECK(streams[*a].end.reason == finish_reason::length);
  CHECK(streams[*b].end.reason == finish_reason::length);
  CHECK(streams[*b].end.queued_us > 0);
  stop(self, worker);
}

TEST_CASE("requests that outgrow the KV pool are preempted, recomputed, and keep their tokens", "[inference][worker][preemption]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec spec;
  spec.kv_bytes = 8 * fixture_block_bytes;  // 128 token slots
  auto worker = spawn_worker(sys, test_maker(spec), default_worker());
  // Each reserves 4 blocks (40 + 16 tokens) but grows to 7 (100 tokens): both cannot stay.
  auto p1 = random_prompt(40, 31);
  auto p2 = random_prompt(40, 32);
  auto a = submit(self, worker, make_request(p1, 60, self));
  auto b = submit(self, worker, make_request(p2, 60, self));
  REQUIRE((a && b));
  std::map<uint64_t, stream> streams;
  collect(self, streams, 2);
  CHECK(streams[*a].end.reason == finish_reason::length);
  CHECK(streams[*b].end.reason == finish_reason::length);
  CHECK(streams[*a].tokens == run_alone(p1, 60));
  CHECK(streams[*b].tokens == run_alone(p2, 60));
  std::vector<int64_t> want(60);
  for (int64_t i = 0; i < 60; ++i) want[static_cast<size_t>(i)] = i;
  CHECK(streams[*b].indices == want);  // recomputed tokens are not streamed twice
  auto s = stats_of(self, worker);
  CHECK(s.preemptions >= 1);
  CHECK(streams[*a].end.preemptions + streams[*b].end.preemptions == static_cast<int64_t>(s.preemptions));
  CHECK(s.kv_blocks_free == s.kv_blocks_total);
  stop(self, worker);
}

TEST_CASE("a request that outgrows the whole KV pool alone ends with overloaded after its tokens so far", "[inference][worker][preemption]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec spec;
  spec.kv_bytes = 8 * fixture_block_bytes;  // 128 token slots
  auto worker = spawn_worker(sys, test_maker(spec), default_worker());
  auto prompt = random_prompt(60, 61);
  auto got = generate_one(self, worker, make_request(prompt, 100, self));  // reserves 5 blocks, needs 10
  CHECK(got.end.reason == finish_reason::error);
  CHECK(got.end.error_code == errc::overloaded);
  // Position 127 is the last slot: 60 prompt tokens + 68 generated, of which 67 were fed.
  CHECK(got.end.generated_tokens == 69);
  auto alone = run_alone(prompt, 100);
  CHECK(got.tokens == std::vector<int32_t>(alone.begin(), alone.begin() + got.end.generated_tokens));
  auto s = stats_of(self, worker);
  CHECK(s.kv_blocks_free == s.kv_blocks_total);
  CHECK(s.requests_failed == 1);
  // Still serving.
  auto small = generate_one(self, worker, make_request(random_prompt(5, 62), 3, self));
  CHECK(small.end.reason == finish_reason::length);
  stop(self, worker);
}

TEST_CASE("under a mixed load with cancels and preemptions every request ends exactly once and the pool drains", "[inference][worker][stress]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec spec;
  spec.kv_bytes = 32 * fixture_block_bytes;  // 512 token slots: admission refusals and preemptions
  auto opts = default_worker();
  opts.step_token_budget = 32;
  opts.max_running = 6;
  opts.max_queued = 8;
  opts.decode_reserve_tokens = 4;
  auto worker = spawn_worker(sys, test_maker(spec), opts);
  std::mt19937 rng(1234);
  struct job {
    std::vector<int32_t> prompt;
    int64_t max_new = 0;
  };
  std::map<uint64_t, job> accepted;
  std::map<uint64_t, stream> streams;
  int64_t refused = 0;
  auto drain = [&] {  // takes whatever stream messages are there now
    bool more = true;
    while (more)
      self->receive(
          [&](token_event& ev) {
            auto& s = streams[ev.request_id];
            CHECK_FALSE(s.finished);
            s.tokens.push_back(ev.token);
            s.indices.push_back(ev.index);
          },
          [&](generation_finished& f) {
            auto& s = streams[f.request_id];
            CHECK_FALSE(s.finished);  // exactly one final message
            s.finished = true;
            s.end = f;
          },
          caf::after(std::chrono::milliseconds(0)) >> [&] { more = false; });
  };
  for (int i = 0; i < 60; ++i) {
    job j{random_prompt(1 + rng() % 40, 100 + static_cast<uint32_t>(i)), 1 + static_cast<int64_t>(rng() % 150)};
    auto id = submit(self, worker, make_request(j.prompt, j.max_new, self));
    if (id) {
      accepted[*id] = j;
    } else {
      CHECK(code_of(id.error()) == errc::overloaded);
      ++refused;
    }
    if (id && rng() % 4 == 0)  // cancel some, at once or a little later
      self->request(worker, caf::duration{10s}, cancel_atom::value, *id)
          .receive([](caf::ok_atom) {}, [](caf::error& e) { CHECK(code_of(e) == errc::not_found); });
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 8));
    drain();
  }
  size_t unfinished = 0;
  for (auto& [id, j] : accepted) unfinished += streams[id].finished ? 0 : 1;
  collect(self, streams, accepted.size());
  INFO(accepted.size() << " accepted, " << refused << " refused");
  CHECK(accepted.size() >= 10);
  CHECK(refused >= 1);
  size_t checked = 0;
  for (auto& [id, j] : accepted) {
    auto& s = streams[id];
    INFO("request " << id << ": prompt " << j.prompt.size() << ", max_new " << j.max_new);
    REQUIRE(s.finished);
    CHECK(static_cast<int64_t>(s.tokens.size()) == s.end.generated_tokens);
    for (size_t k = 0; k < s.indices.size(); ++k) CHECK(s.indices[k] == static_cast<int64_t>(k));
    auto alone = run_alone(j.prompt, j.max_new);
    if (s.end.reason == finish_reason::length) {
      CHECK(s.tokens == alone);
      ++checked;
    } else {
      CHECK(((s.end.reason == finish_reason::cancelled) ||
             (s.end.reason == finish_reason::error && s.end.error_code == errc::overloaded)));
      CHECK(s.tokens == std::vector<int32_t>(alone.begin(), alone.begin() + static_cast<long>(s.tokens.size())));
    }
  }
  CHECK(checked >= 5);
  (void)unfinished;
  auto st = wait_for_stats(self, worker, [](const worker_stats& x) { return x.running == 0 && x.queued == 0; });
  WARN("stress: " << accepted.size() << " accepted, " << refused << " refused, " << st.preemptions
                  << " preemptions, " << st.requests_cancelled << " cancelled, " << st.steps << " steps");
  CHECK(st.running == 0);
  CHECK(st.queued == 0);
  CHECK(st.kv_blocks_free == st.kv_blocks_total);
  CHECK(st.kv_blocks_reserved == 0);
  CHECK(st.requests_accepted == accepted.size());
  CHECK(st.requests_rejected == static_cast<uint64_t>(refused));
  CHECK(st.requests_completed + st.requests_cancelled + st.requests_failed == accepted.size());
  stop(self, worker);
}

TEST_CASE("a failed step fails its requests and the supervisor restarts the worker, which serves again", "[inference][worker][supervision]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec faulty;
  faulty.fail_at = 6;  // the 6th forward of the faulty worker, mid-generation
  faulty.delay = 1ms;
  auto faulty_factory = make_worker_factory(test_maker(faulty), default_worker());
  auto healthy_spec = worker_child_spec("healthy", model_dir, cpu_options(), worker_options{});
  REQUIRE((faulty_factory && healthy_spec));
  CHECK(healthy_spec->restart == runtime::restart_type::permanent);
  CHECK(code_of(worker_child_spec("", model_dir, cpu_options(), worker_options{}).error()) == errc::invalid_argument);
  runtime::supervisor_spec spec;
  spec.flags.name = "inference";
  spec.children.push_back(runtime::child_spec{"faulty", *faulty_factory});
  spec.children.push_back(*healthy_spec);
  auto sup = runtime::spawn_supervisor(sys, spec);
  REQUIRE(sup);
  auto lookup = [&](const std::string& id) {
    caf::actor out;
    self->request(*sup, caf::duration{10s}, runtime::sup::lookup_atom::value, id)
        .receive([&](caf::actor& a) { out = a; }, [&](caf::error&) {});
    return out;
  };
  auto first = lookup("faulty");
  auto healthy = lookup("healthy");
  REQUIRE(first);
  REQUIRE(healthy);
  auto a = submit(self, first, make_request(random_prompt(10, 41), 30, self));
  auto b = submit(self, first, make_request(random_prompt(12, 42), 30, self));
  REQUIRE((a && b));
  std::map<uint64_t, stream> streams;
  collect(self, streams, 2);
  // The step's requests end with internal (both, unless the second had not joined the batch
  // yet: then it ends with unavailable).
  CHECK(streams[*a].end.reason == finish_reason::error);
  CHECK(streams[*a].end.error_code == errc::internal);
  CHECK(streams[*a].end.error_message.find("injected device fault") != std::string::npos);
  CHECK(streams[*a].end.generated_tokens < 30);
  CHECK(streams[*b].end.reason == finish_reason::error);
  CHECK((streams[*b].end.error_code == errc::internal || streams[*b].end.error_code == errc::unavailable));
  CHECK(streams[*b].end.generated_tokens < 30);
  // The supervisor restarts it: a new incarnation answers (routing goes by id, stable).
  caf::actor second;
  auto deadline = steady_clock::now() + 20s;
  while (steady_clock::now() < deadline) {
    second = lookup("faulty");
    if (second && second != first) break;
    std::this_thread::sleep_for(10ms);
  }
  REQUIRE(second);
  REQUIRE(second != first);
  auto prompt = random_prompt(10, 43);
  auto again = generate_one(self, second, make_request(prompt, 12, self));
  CHECK(again.end.reason == finish_reason::length);
  CHECK(again.tokens == run_alone(prompt, 12));
  // The other worker kept running: same incarnation, serves.
  CHECK(lookup("healthy") == healthy);
  auto other = generate_one(self, healthy, make_request(prompt, 12, self));
  CHECK(other.tokens == again.tokens);
  std::vector<runtime::child_info> children;
  self->request(*sup, caf::duration{10s}, runtime::sup::which_children_atom::value)
      .receive([&](std::vector<runtime::child_info>& c) { children = c; }, [&](caf::error& e) { FAIL(describe(e)); });
  REQUIRE(children.size() == 2);
  CHECK(children[0].restarts == 1);
  CHECK(children[1].restarts == 0);
  stop(self, *sup);
}

TEST_CASE("the node stays responsive while the engine runs long steps", "[inference][worker][responsiveness]") {
  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 1);  // one scheduler thread: a blocking step would stall it
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  test_backend_spec spec;
  spec.delay = 200ms;  // a slow device step
  auto worker = spawn_worker(sys, test_maker(spec), default_worker());
  auto echo = sys.spawn([](caf::event_based_actor*) -> caf::behavior { return {[](int x) { return x; }}; });
  auto id = submit(self, worker, make_request(random_prompt(10, 51), 20, self));
  REQUIRE(id);
  self->receive([](token_event&) {}, caf::after(std::chrono::seconds(30)) >> [] { FAIL("no token"); });
  // Stats are as of the last finished step: wait until they show the request.
  REQUIRE(wait_for_stats(self, worker, [](const worker_stats& x) { return x.running == 1; }).running == 1);
  int64_t worst_us = 0;
  for (int i = 0; i < 20; ++i) {
    auto t0 = steady_clock::now();
    self->request(echo, caf::duration{5s}, i).receive([](int) {}, [](caf::error& e) { FAIL(describe(e)); });
    worst_us = std::max<int64_t>(worst_us, std::chrono::duration_cast<std::chrono::microseconds>(steady_clock::now() - t0).count());
    // The worker itself answers too (stats need no engine step).
    auto t1 = steady_clock::now();
    auto s = stats_of(self, worker);
    worst_us = std::max<int64_t>(worst_us, std::chrono::duration_cast<std::chrono::microseconds>(steady_clock::now() - t1).count());
    CHECK(s.running == 1);
    std::this_thread::sleep_for(7ms);
  }
  // Were steps run on the one scheduler thread, some round trip would wait most of a step.
  INFO("worst round trip " << worst_us << " us; a step takes 200 ms");
  CHECK(worst_us < 100000);
  self->request(worker, caf::duration{10s}, cancel_atom::value, *id).receive([](caf::ok_atom) {}, [](caf::error&) {});
  std::map<uint64_t, stream> streams;
  collect(self, streams, 1);
  self->send_exit(echo, caf::exit_reason::user_shutdown);
  stop(self, worker);
}

TEST_CASE("a worker whose model fails to load exits with the load error", "[inference][worker][supervision]") {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto worker = spawn_worker(sys, load_model("/nonexistent/model", cpu_options()), default_worker());
  self->monitor(worker);
  caf::error reason;
  self->receive([&](caf::down_msg& dm) { reason = dm.reason; },
                caf::after(std::chrono::seconds(30)) >> [] { FAIL("no down_msg"); });
  CHECK(code_of(reason) == errc::not_found);
}

TEST_CASE("worker options and factories are validated", "[inference][worker][validation]") {
  worker_options o;
  CHECK_FALSE(validate(o));
  o.max_running = 0;
  CHECK(code_of(validate(o)) == errc::invalid_argument);
  o = {};
  o.step_token_budget = 0;
  CHECK(code_of(make_worker_factory(model_dir, cpu_options(), o).error()) == errc::invalid_argument);
  CHECK(kv_blocks_for(0, 16) == 0);
  CHECK(kv_blocks_for(1, 16) == 1);
  CHECK(kv_blocks_for(16, 16) == 1);
  CHECK(kv_blocks_for(17, 16) == 2);
}
