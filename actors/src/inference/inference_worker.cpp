// The inference worker actor and its engine thread (policy: inference_worker.hpp).
#include "triplane/actors/inference_worker.hpp"

#include <condition_variable>
#include <exception>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "continuous_batcher.hpp"
#include "triplane/gpu/checkpoint.hpp"
#include "triplane/gpu/sampler.hpp"

namespace triplane::actors::inference {

namespace {

// Engine thread -> actor. Internal: not part of the protocol.
using ready_atom = caf::atom_constant<caf::atom("inf_ready")>;
using failed_atom = caf::atom_constant<caf::atom("inf_failed")>;
using done_atom = caf::atom_constant<caf::atom("inf_done")>;

// What the actor and the engine thread share. Every field is guarded by `mutex`; neither side
// holds it across an engine step or a send.
struct engine_link {
  std::mutex mutex;
  std::condition_variable wake;
  std::vector<admitted_request> submitted;  // accepted, not yet taken by the engine
  std::vector<uint64_t> cancels;
  bool stopping = false;
  int64_t engine_waiting = 0;   // in the batcher's queue (as of the engine's last look)
  int64_t running = 0;
  int64_t reserved_blocks = 0;  // admission accounting: added by the actor, released on finish
  int64_t kv_blocks_free = 0;
  int64_t kv_blocks_total = 0;
  batcher_counters counters;
};

spdlog::logger& log_of(const worker_options& options) {
  return options.logger ? *options.logger : *spdlog::default_logger();
}

model_info describe_model(const gpu::backend& engine, const std::string& name) {
  const auto& c = engine.config();
  const auto kv = engine.kv_stats();
  model_info info;
  info.name = name.empty() ? "model" : name;
  info.backend = gpu::to_string(engine.kind());
  info.tensor_parallel = engine.tensor_parallel();
  info.vocab_size = c.vocab_size;
  info.hidden_size = c.hidden_size;
  info.intermediate_size = c.intermediate_size;
  info.num_layers = c.num_layers;
  info.num_heads = c.num_heads;
  info.num_kv_heads = c.num_kv_heads;
  info.head_dim = c.head_dim;
  info.max_position_embeddings = c.max_position_embeddings;
  info.kv_block_size = kv.block_size;
  info.kv_blocks_total = kv.num_blocks;
  return info;
}

// Streams from the engine thread: straight to the sinks, and the end of each request to the actor.
class streaming_listener : public batch_listener {
public:
  streaming_listener(engine_link& link, caf::actor worker) : link_(link), worker_(std::move(worker)) {}

  void on_token(const caf::actor& sink, const token_event& event) override {
    caf::anon_send(sink, event);
  }

  void on_finished(const caf::actor& sink, const generation_finished& finished,
                   int64_t reserved_blocks) override {
    {
      std::lock_guard<std::mutex> guard(link_.mutex);
      link_.reserved_blocks -= reserved_blocks;
    }
    caf::anon_send(sink, finished);
    caf::anon_send(worker_, done_atom::value, finished.request_id);
  }

private:
  engine_link& link_;
  caf::actor worker_;
};

void publish(engine_link& link, const continuous_batcher& batcher, const gpu::backend& engine) {
  const auto kv = engine.kv_stats();
  std::lock_guard<std::mutex> guard(link.mutex);
  link.engine_waiting = batcher.waiting();
  link.running = batcher.running();
  link.kv_blocks_free = kv.free_blocks;
  link.kv_blocks_total = kv.num_blocks;
  link.counters = batcher.counters();
}

// Runs when the engine thread ends, whatever the path: from then on the actor refuses new requests
// (stopping), and requests it accepted that the engine never took still get their final message.
class link_closer {
public:
  explicit link_closer(engine_link& link) : link_(link) {}
  link_closer(const link_closer&) = delete;
  link_closer& operator=(const link_closer&) = delete;
  ~link_closer() {
    std::vector<admitted_request> orphans;
    {
      std::lock_guard<std::mutex> guard(link_.mutex);
      link_.stopping = true;
      orphans.swap(link_.submitted);
      link_.cancels.clear();
    }
    for (auto& r : orphans) {
      generation_finished f;
      f.request_id = r.id;
      f.reason = finish_reason::error;
      f.error_code = errc::unavailable;
      f.error_message = "the inference worker stopped before the request started; retry";
      f.prompt_tokens = static_cast<int64_t>(r.request.prompt.size());
      f.total_us = std::chrono::duration_cast<std::chrono::microseconds>(steady_clock::now() - r.accepted_at).count();
      f.queued_us = f.total_us;
      caf::anon_send(r.request.sink, f);
    }
  }

private:
  engine_link& link_;
};

// The engine thread: loads the model, then steps until stopped or a step fails. Owns the backend
// and the batcher; `worker` is released when the thread ends.
void run_engine(std::shared_ptr<engine_link> link, backend_maker make_backend,
                worker_options options, caf::actor worker) {
  link_closer closer(*link);
  std::unique_ptr<gpu::backend> engine;
  try {
    auto made = make_backend();
    if (!made) {
      caf::anon_send(worker, failed_atom::value, made.error());
      return;
    }
    engine = std::move(*made);
  } catch (const std::exception& e) {
    caf::anon_send(worker, failed_atom::value,
                   make_error(errc::internal, std::string("loading the model threw: ") + e.what()));
    return;
  } catch (...) {
    caf::anon_send(worker, failed_atom::value, make_error(errc::internal, "loading the model threw"));
    return;
  }
  if (!engine) {
    caf::anon_send(worker, failed_atom::value, make_error(errc::internal, "the backend maker returned no backend"));
    return;
  }
  streaming_listener listener(*link, worker);
  continuous_batcher batcher(*engine, options.max_running, options.step_token_budget, listener);
  publish(*link, batcher, *engine);
  caf::anon_send(worker, ready_atom::value, describe_model(*engine, options.name));
  for (;;) {
    std::vector<admitted_request> arrived;
    std::vector<uint64_t> cancels;
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(link->mutex);
      link->wake.wait(lock, [&] {
        return link->stopping || !link->submitted.empty() || !link->cancels.empty() || !batcher.idle();
      });
      arrived.swap(link->submitted);
      cancels.swap(link->cancels);
      stopping = link->stopping;
      link->engine_waiting += static_cast<int64_t>(arrived.size());
    }
    for (auto& r : arrived) batcher.submit(std::move(r));
    for (auto id : cancels) batcher.cancel(id);
    if (stopping) {
      batcher.fail_all(errc::unavailable, "the inference worker is stopping");
      publish(*link, batcher, *engine);
      return;
    }
    caf::error failure;
    try {
      failure = batcher.step();
    } catch (const std::exception& e) {
      failure = make_error(errc::internal, std::string("engine step threw: ") + e.what());
      batcher.fail_all(errc::internal, describe(failure));
    } catch (...) {
      failure = make_error(errc::internal, "engine step threw a non-standard exception");
      batcher.fail_all(errc::internal, describe(failure));
    }
    if (failure) {
      batcher.fail_all(errc::unavailable,
                       "the inference worker failed (" + describe(failure) + ") and restarts; retry");
      publish(*link, batcher, *engine);
      caf::anon_send(worker, failed_atom::value, failure);
      return;
    }
    publish(*link, batcher, *engine);
  }
}

struct worker_state {
  static inline const char* name = "inference_worker";

  worker_options options;
  std::shared_ptr<engine_link> link = std::make_shared<engine_link>();
  std::thread engine;
  model_info info;
  uint64_t next_id = 0;
  uint64_t accepted = 0;
  uint64_t rejected = 0;
  std::unordered_map<uint64_t, caf::actor_addr> sink_of;
  std::unordered_map<caf::actor_addr, std::vector<uint64_t>> requests_of;

  worker_state() {
    std::random_device seed;
    next_id = (static_cast<uint64_t>(seed()) << 32) + 1;
  }

  // The engine finishes its current step (or model load), ends what is left with unavailable and
  // returns; this wait is the one place the actor's thread waits for the engine.
  ~worker_state() {
    if (!engine.joinable()) return;
    {
      std::lock_guard<std::mutex> guard(link->mutex);
      link->stopping = true;
    }
    link->wake.notify_all();
    engine.join();
  }
};

using worker_actor = caf::stateful_actor<worker_state>;

// Stop tokens are checked after every generated token: keep the list short.
constexpr size_t max_stop_tokens = 1024;

caf::error validate_request(const generate_request& req, const model_info& info) {
  if (!req.sink) return make_error(errc::invalid_argument, "generate: the sink actor is invalid");
  if (req.prompt.empty()) return make_error(errc::invalid_argument, "generate: the prompt is empty");
  for (size_t i = 0; i < req.prompt.size(); ++i)
    if (req.prompt[i] < 0 || req.prompt[i] >= info.vocab_size)
      return make_error(errc::invalid_argument,
                        "generate: prompt token " + std::to_string(i) + " is " + std::to_string(req.prompt[i]) +
                            ", outside the vocabulary [0, " + std::to_string(info.vocab_size) + ")");
  if (req.max_new_tokens < 1)
    return make_error(errc::invalid_argument,
                      "generate: max_new_tokens must be >= 1, got " + std::to_string(req.max_new_tokens));
  const auto prompt = static_cast<int64_t>(req.prompt.size());
  if (req.max_new_tokens > info.max_position_embeddings - prompt)
    return make_error(errc::invalid_argument,
                      "generate: prompt (" + std::to_string(prompt) + ") + max_new_tokens (" +
                          std::to_string(req.max_new_tokens) + ") exceeds the model's " +
                          std::to_string(info.max_position_embeddings) + " positions");
  if (req.stop_tokens.size() > max_stop_tokens)
    return make_error(errc::invalid_argument, "generate: " + std::to_string(req.stop_tokens.size()) +
                                                  " stop tokens, at most " + std::to_string(max_stop_tokens));
  gpu::sampling_params p;
  p.temperature = req.sampling.temperature;
  p.top_k = req.sampling.top_k;
  p.top_p = req.sampling.top_p;
  p.seed = req.sampling.seed;
  if (auto err = gpu::validate(p))
    return make_error(errc::invalid_argument, "generate: " + describe(err));
  return caf::none;
}

caf::result<generate_accepted> admit(worker_actor* self, generate_request& req) {
  auto& st = self->state;
  if (auto err = validate_request(req, st.info)) return err;
  const int64_t reserve = std::min(req.max_new_tokens, st.options.decode_reserve_tokens);
  const int64_t need =
      kv_blocks_for(static_cast<int64_t>(req.prompt.size()) + reserve, st.info.kv_block_size);
  admitted_request admitted;
  {
    std::lock_guard<std::mutex> guard(st.link->mutex);
    auto& link = *st.link;
    if (link.stopping) return make_error(errc::unavailable, "the inference worker is stopping");
    const int64_t waiting = static_cast<int64_t>(link.submitted.size()) + link.engine_waiting;
    const int64_t capacity = st.options.max_queued + std::max<int64_t>(0, st.options.max_running - link.running);
    if (waiting >= capacity) {
      ++st.rejected;
      return make_error(errc::overloaded, "the inference queue is full: " + std::to_string(waiting) +
                                              " requests wait (max_queued " +
                                              std::to_string(st.options.max_queued) + "); retry later");
    }
    const int64_t total = st.info.kv_blocks_total;
    if (need > total - link.reserved_blocks) {
      ++st.rejected;
      if (need > total)
        return make_error(errc::overloaded,
                          "the KV cache can never hold this request: prompt + reserve needs " +
                              std::to_string(need) + " blocks, the pool has " + std::to_string(total));
      return make_error(errc::overloaded, "the KV cache is full: the request needs " + std::to_string(need) +
                                              " blocks, " + std::to_string(total - link.reserved_blocks) +
                                              " of " + std::to_string(total) +
                                              " are not reserved; retry later");
    }
    link.reserved_blocks += need;
    admitted.id = st.next_id++;
    admitted.reserved_blocks = need;
    admitted.accepted_at = steady_clock::now();
    admitted.request = req;  // copy: the sink handle is kept below
    link.submitted.push_back(std::move(admitted));
  }
  st.link->wake.notify_one();
  // The engine's end-of-request message (done_atom) is handled after this handler returns, so the
  // bookkeeping below is in place before it can arrive.
  const uint64_t id = st.next_id - 1;
  auto& mine = st.requests_of[req.sink.address()];
  if (mine.empty()) self->monitor(req.sink);
  mine.push_back(id);
  st.sink_of.emplace(id, req.sink.address());
  ++st.accepted;
  return generate_accepted{id};
}

void request_cancel(worker_actor* self, uint64_t id) {
  {
    std::lock_guard<std::mutex> guard(self->state.link->mutex);
    self->state.link->cancels.push_back(id);
  }
  self->state.link->wake.notify_one();
}

worker_stats current_stats(worker_actor* self) {
  auto& st = self->state;
  worker_stats out;
  std::lock_guard<std::mutex> guard(st.link->mutex);
  const auto& link = *st.link;
  out.running = link.running;
  out.queued = link.engine_waiting + static_cast<int64_t>(link.submitted.size());
  out.kv_blocks_free = link.kv_blocks_free;
  out.kv_blocks_total = link.kv_blocks_total;
  out.kv_blocks_reserved = link.reserved_blocks;
  out.tokens_generated = link.counters.tokens_generated;
  out.prompt_tokens_processed = link.counters.prompt_tokens_processed;
  out.steps = link.counters.steps;
  out.requests_accepted = st.accepted;
  out.requests_rejected = st.rejected;
  out.requests_completed = link.counters.completed;
  out.requests_cancelled = link.counters.cancelled;
  out.requests_failed = link.counters.failed;
  out.preemptions = link.counters.preemptions;
  return out;
}

caf::behavior serving(worker_actor* self) {
  return {
      [self](generate_request& req) { return admit(self, req); },
      [self](cancel_atom, uint64_t id) -> caf::result<caf::ok_atom> {
        if (self->state.sink_of.count(id) == 0)
          return make_error(errc::not_found, "no running or queued request " + std::to_string(id));
        request_cancel(self, id);
        return caf::ok_atom::value;
      },
      [self](info_atom) { return self->state.info; },
      [self](stats_atom) { return current_stats(self); },
      [self](done_atom, uint64_t id) {
        auto& st = self->state;
        auto it = st.sink_of.find(id);
        if (it == st.sink_of.end()) return;
        auto sink = it->second;
        st.sink_of.erase(it);
        auto mine = st.requests_of.find(sink);
        if (mine == st.requests_of.end()) return;  // the sink is down already
        auto& ids = mine->second;
        ids.erase(std::remove(ids.begin(), ids.end(), id), ids.end());
        if (ids.empty()) {
          self->demonitor(sink);
          st.requests_of.erase(mine);
        }
      },
      [self](failed_atom, caf::error& err) {
        log_of(self->state.options).error("inference worker '{}' failed: {}; exiting for restart",
                                          self->state.info.name, describe(err));
        self->quit(std::move(err));
      },
  };
}

caf::behavior worker_behavior(worker_actor* self, backend_maker make_backend, worker_options options) {
  auto& st = self->state;
  st.options = std::move(options);
  st.engine = std::thread(run_engine, st.link, std::move(make_backend), st.options,
                          caf::actor_cast<caf::actor>(self));
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    auto mine = st.requests_of.find(dm.source);
    if (mine == st.requests_of.end()) return;
    for (auto id : mine->second) request_cancel(self, id);
    st.requests_of.erase(mine);
  });
  // Until the model is loaded, client messages wait in the mailbox.
  self->set_default_handler(caf::skip);
  return {
      [self](ready_atom, model_info& info) {
        log_of(self->state.options)
            .info("inference worker '{}' ready: backend {}, tp {}, {} KV blocks of {} tokens", info.name,
                  info.backend, info.tensor_parallel, info.kv_blocks_total, info.kv_block_size);
        self->state.info = std::move(info);
        self->set_default_handler(caf::print_and_drop);
        self->become(serving(self));
      },
      [self](failed_atom, caf::error& err) {
        log_of(self->state.options).error("inference worker '{}' could not load its model: {}",
                                          self->state.options.name, describe(err));
        self->quit(std::move(err));
      },
  };
}

std::string last_component(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  auto slash = p.find_last_of('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

} // namespace

int64_t kv_blocks_for(int64_t tokens, int64_t block_size) {
  if (tokens <= 0 || block_size <= 0) return 0;
  return (tokens + block_size - 1) / block_size;
}

caf::error validate(const worker_options& options) {
  auto bad = [](const std::string& what) { return make_error(errc::invalid_argument, "worker options: " + what); };
  if (options.max_running < 1) return bad("max_running must be >= 1");
  if (options.max_queued < 0) return bad("max_queued must be >= 0");
  if (options.step_token_budget < 1) return bad("step_token_budget must be >= 1");
  if (options.decode_reserve_tokens < 0) return bad("decode_reserve_tokens must be >= 0");
  return caf::none;
}

backend_maker load_model(std::string model_dir, gpu::backend_options options) {
  return [model_dir = std::move(model_dir), options]() -> expected<std::unique_ptr<gpu::backend>> {
    auto weights = gpu::checkpoint::open(model_dir);
    if (!weights) return weights.error();
    return gpu::make_backend(**weights, options);
  };
}

caf::actor spawn_worker(caf::local_actor* parent, backend_maker make_backend, worker_options options) {
  return parent->spawn(worker_behavior, std::move(make_backend), std::move(options));
}

caf::actor spawn_worker(caf::actor_system& sys, backend_maker make_backend, worker_options options) {
  return sys.spawn(worker_behavior, std::move(make_backend), std::move(options));
}

expected<runtime::child_factory> make_worker_factory(backend_maker make_backend, worker_options options) {
  if (auto err = validate(options)) return err;
  if (!make_backend) return make_error(errc::invalid_argument, "worker factory: no backend maker");
  return runtime::child_factory{[make_backend = std::move(make_backend), options](caf::local_actor* parent) {
    return spawn_worker(parent, make_backend, options);
  }};
}

expected<runtime::child_factory> make_worker_factory(std::string model_dir, gpu::backend_options backend,
                                                     worker_options options) {
  if (options.name.empty()) options.name = last_component(model_dir);
  return make_worker_factory(load_model(std::move(model_dir), backend), std::move(options));
}

expected<runtime::child_spec> worker_child_spec(std::string id, std::string model_dir, gpu::backend_options backend,
                                                worker_options options, std::chrono::milliseconds shutdown_timeout) {
  if (id.empty()) return make_error(errc::invalid_argument, "inference worker child: empty id");
  auto factory = make_worker_factory(std::move(model_dir), backend, std::move(options));
  if (!factory) return factory.error();
  runtime::child_spec spec;
  spec.id = std::move(id);
  spec.start = std::move(*factory);
  spec.restart = runtime::restart_type::permanent;
  spec.shutdown_timeout = shutdown_timeout;
  spec.kind = runtime::child_kind::worker;
  return spec;
}

} // namespace triplane::actors::inference
