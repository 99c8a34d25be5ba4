// Serving benchmark: the inference worker (continuous batching, streaming through actors) beside the
// bare engine on the same backend, measured in the same run: requests one at a time through
// gpu::generate (no batching: the floor the worker must beat) and a hand-written lock-step batch
// over the backend (the ceiling for batching without actors, streaming or scheduling).
//   bench_inference_serving [--json FILE] [--requests N] [--prompt P] [--new-tokens T] [--threads N]
//                           [--repeats N] [--model DIR]
#include <algorithm>
#include <cstdio>
#include <map>
#include <thread>

#include <caf/all.hpp>

#include "bench_support.hpp"
#include "triplane/actors/inference_worker.hpp"
#include "triplane/gpu/generate.hpp"
#include "triplane/gpu/sampler.hpp"

using namespace triplane;
using namespace triplane::actors::inference;
using steady = std::chrono::steady_clock;

namespace {

std::vector<int32_t> prompt_for(int64_t n, int64_t salt, int64_t vocab) {
  std::vector<int32_t> p;
  for (int64_t i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((i * 131 + salt * 17 + 1) % vocab));
  return p;
}

double seconds_since(steady::time_point t) { return std::chrono::duration<double>(steady::now() - t).count(); }

// Lock-step batch straight on the backend: all prompts in one step, then one decode step per token.
double lockstep_batch(gpu::backend& engine, int64_t requests, int64_t prompt, int64_t new_tokens) {
  const int64_t vocab = engine.config().vocab_size;
  std::vector<gpu::step_item> items;
  for (int64_t r = 0; r < requests; ++r) {
    if (engine.add_sequence(static_cast<gpu::sequence_id>(1000 + r))) return -1;
    items.push_back({static_cast<gpu::sequence_id>(1000 + r), prompt_for(prompt, r, vocab), false});
  }
  auto t = steady::now();
  for (int64_t step = 0; step < new_tokens; ++step) {
    auto out = engine.forward(items);
    if (!out) {
      std::fprintf(stderr, "lock-step forward: %s\n", describe(out.error()).c_str());
      return -1;
    }
    if (step + 1 == new_tokens) break;
    for (size_t i = 0; i < items.size(); ++i) {
      const auto& v = (*out)[i].values;
      items[i].tokens = {gpu::argmax(v.data() + (v.size() - static_cast<size_t>(vocab)), vocab)};
    }
  }
  double s = seconds_since(t);
  for (auto& item : items) engine.free_sequence(item.sequence);
  return s;
}

struct worker_run {
  double seconds = 0;
  std::vector<double> ttft_ms, total_ms;
  int64_t tokens = 0;
};

worker_run through_worker(caf::actor_system& sys, const caf::actor& worker, int64_t requests, int64_t prompt,
                          int64_t new_tokens, int64_t vocab) {
  caf::scoped_actor self{sys};
  worker_run run;
  auto t = steady::now();
  for (int64_t r = 0; r < requests; ++r) {
    generate_request req;
    req.prompt = prompt_for(prompt, r, vocab);
    req.max_new_tokens = new_tokens;
    req.sink = self;
    self->request(worker, caf::duration{std::chrono::seconds(60)}, std::move(req))
        .receive([](generate_accepted&) {},
                 [](caf::error& e) { std::fprintf(stderr, "generate: %s\n", describe(e).c_str()); });
  }
  int64_t finished = 0;
  while (finished < requests) {
    self->receive([&](token_event&) { ++run.tokens; },
                  [&](generation_finished& f) {
                    ++finished;
                    run.ttft_ms.push_back(static_cast<double>(f.time_to_first_token_us) / 1e3);
                    run.total_ms.push_back(static_cast<double>(f.total_us) / 1e3);
                  });
  }
  run.seconds = seconds_since(t);
  return run;
}

} // namespace

int main(int argc, char** argv) {
  const std::string json = bench::json_path(argc, argv);
  const int64_t requests = bench::int_flag(argc, argv, "--requests", 32);
  const int64_t prompt = bench::int_flag(argc, argv, "--prompt", 64);
  const int64_t new_tokens = bench::int_flag(argc, argv, "--new-tokens", 64);
  const int threads = static_cast<int>(
      bench::int_flag(argc, argv, "--threads", std::max(1u, std::thread::hardware_concurrency())));
  std::string model = std::string(TRIPLANE_FIXTURES_DIR) + "/llama/tiny-llama-f32";
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--model") model = argv[i + 1];
  if (requests < 1 || prompt < 1 || new_tokens < 1) {
    std::fprintf(stderr, "--requests, --prompt and --new-tokens must be >= 1\n");
    return 2;
  }

  gpu::backend_options options;
  options.threads = threads;
  options.kv_cache_bytes = int64_t{512} << 20;
  auto engine = load_model(model, options)();
  if (!engine) {
    std::fprintf(stderr, "%s\n", describe(engine.error()).c_str());
    return 1;
  }
  const int64_t vocab = (*engine)->config().vocab_size;
  const double total_tokens = static_cast<double>(requests * new_tokens);

  bench::report rep("inference_serving");
  rep.note("model", model);
  rep.note("backend", "cpu, threads " + std::to_string(threads));
  rep.note("shape", std::to_string(requests) + " requests x (" + std::to_string(prompt) + " prompt + " +
                        std::to_string(new_tokens) + " new tokens), greedy");

  // Each figure is the best of `repeats` rounds; a round runs all four in turn, so that the load of
  // a shared machine falls on them alike (ratios hold, absolute figures do not).
  const int64_t repeats = bench::int_flag(argc, argv, "--repeats", 3);
  auto one_at_a_time = [&] {
    auto t = steady::now();
    for (int64_t r = 0; r < requests; ++r) {
      gpu::generate_request req;
      req.prompt = prompt_for(prompt, r, vocab);
      req.max_new_tokens = new_tokens;
      if (!gpu::generate(**engine, req, 1)) return 1e300;
    }
    return seconds_since(t);
  };
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  auto worker = spawn_worker(sys, load_model(model, options), worker_options{});
  through_worker(sys, worker, 1, prompt, 2, vocab);  // waits for the model load
  one_at_a_time();                                   // warm-up
  double sequential = 1e300, lockstep = 1e300;
  worker_run single, batch;
  single.seconds = batch.seconds = 1e300;
  for (int64_t i = 0; i < repeats; ++i) {
    sequential = std::min(sequential, one_at_a_time());
    double l = lockstep_batch(**engine, requests, prompt, new_tokens);
    if (l < 0) return 1;
    lockstep = std::min(lockstep, l);
    auto one = through_worker(sys, worker, 1, prompt, new_tokens, vocab);
    if (one.seconds < single.seconds) single = one;
    auto all = through_worker(sys, worker, requests, prompt, new_tokens, vocab);
    if (all.tokens != requests * new_tokens)
      std::fprintf(stderr, "worker streamed %lld tokens\n", static_cast<long long>(all.tokens));
    if (all.seconds < batch.seconds) batch = all;
  }
  const double engine_single = sequential / static_cast<double>(requests);
  rep.add("engine, one request at a time", "tok_s", total_tokens / sequential);
  rep.add("engine, lock-step batch of all", "tok_s", total_tokens / lockstep);
  rep.add("engine, lock-step batch of all", "vs_one_at_a_time", sequential / lockstep);
  rep.add("worker, 1 request", "tok_s", static_cast<double>(new_tokens) / single.seconds);
  rep.add("worker, 1 request", "vs_engine_1_request", engine_single / single.seconds);
  rep.add("worker, all requests at once", "tok_s", total_tokens / batch.seconds);
  rep.add("worker, all requests at once", "vs_one_at_a_time", sequential / batch.seconds);
  rep.add("worker, all requests at once", "vs_lockstep", lockstep / batch.seconds);
  rep.add("worker, all requests at once", "ttft_p50_ms", bench::percentile(batch.ttft_ms, 50));
  rep.add("worker, all requests at once", "ttft_p99_ms", bench::percentile(batch.ttft_ms, 99));
  rep.add("worker, all requests at once", "total_p50_ms", bench::percentile(batch.total_ms, 50));
  rep.add("worker, all requests at once", "total_p99_ms", bench::percentile(batch.total_ms, 99));
  caf::anon_send_exit(worker, caf::exit_reason::user_shutdown);

  rep.print();
  if (!json.empty() && !bench::write_json(json, {&rep})) {
    std::fprintf(stderr, "cannot write %s\n", json.c_str());
    return 1;
  }
  return 0;
}
