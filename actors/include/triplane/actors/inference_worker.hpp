// The inference worker: a supervised actor that owns one engine backend (the CPU backend, one GPU or
// one tensor-parallel group) and serves generate requests from it with continuous batching,
// streaming, cancellation and admission control. Protocol: inference_protocol.hpp.
//
// Threads. The actor itself only does bookkeeping (admission, ids, sink monitors, stats) and never
// blocks a scheduler thread. Model loading and every engine step run on a thread the worker owns
// (the engine thread); it streams tokens straight to the sinks. Requests sent while the model loads
// wait in the mailbox and are answered once it is loaded.
//
// Batching. Between steps the engine thread takes new requests and cancellations, lets queued
// requests join the batch (FIFO, up to max_running, when the KV pool has room for their context),
// and builds one step: a decode token for every running request whose context is cached, then
// prefill chunks for the others, oldest first, within step_token_budget. Finished, stopped and
// cancelled requests leave the batch and free their KV blocks at once.
//
// Admission (answered immediately, never a crash): overloaded when max_queued requests already
// wait, or when the KV blocks the request needs (prompt + min(max_new_tokens,
// decode_reserve_tokens)) exceed the pool minus what accepted requests already reserved.
// Preemption: when running requests grow past their reservations and a step finds the KV pool
// exhausted, the youngest request of the step is evicted (blocks freed) and put back at the head of
// the queue; it later recomputes its prompt and the tokens it generated (already streamed; not
// sent again) and continues with the same sampler, so its output is unchanged. A request whose
// context cannot fit even the empty pool ends with error overloaded.
//
// Failure. A step that fails with anything but overloaded (or throws) ends every request of that
// step with error internal and every other request with error unavailable, then the worker exits
// with that error as its reason, so its supervisor restarts it (which reloads the model). A model
// that fails to load also ends the worker with the load error. On a normal stop (user_shutdown)
// every pending request ends with error unavailable.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "triplane/actors/inference_protocol.hpp"
#include "triplane/gpu/backend.hpp"
#include "triplane/runtime/error.hpp"
#include "triplane/runtime/supervisor.hpp"

namespace spdlog {
class logger;
} // namespace spdlog

namespace triplane::actors::inference {

struct worker_options {
  /// model_info.name; empty: the model directory's last path component.
  std::string name;
  int64_t max_running = 64;            ///< requests in the batch at once (>= 1)
  int64_t max_queued = 256;            ///< accepted requests waiting to join (>= 0)
  /// Tokens per engine step (>= 1): decodes first (always all of them), prefill chunks in what is
  /// left, so a long prompt is spread over steps instead of stalling the decoders.
  int64_t step_token_budget = 256;
  /// KV space reserved per request beyond its prompt at admission (>= 0); decoding past it can
  /// lead to preemption.
  int64_t decode_reserve_tokens = 16;
  /// Where loading, failures and restarts are logged; null: spdlog's default logger.
  std::shared_ptr<spdlog::logger> logger;
};

/// invalid_argument naming the bad field, or none.
caf::error validate(const worker_options& options);

/// Makes the worker's backend; runs on the engine thread, once per worker incarnation.
using backend_maker = std::function<expected<std::unique_ptr<gpu::backend>>()>;

/// A backend_maker that opens the Hugging Face model directory `model_dir` and builds a backend
/// with `options` (the checkpoint is released once the backend holds the weights).
backend_maker load_model(std::string model_dir, gpu::backend_options options);

/// Spawns a worker as a child of `parent` (a supervisor: see runtime::child_factory). The worker
/// starts loading at once; a maker error ends the worker with that error. Precondition:
/// validate(options) succeeded (make_worker_factory checks it).
caf::actor spawn_worker(caf::local_actor* parent, backend_maker make_backend, worker_options options);

/// Spawns a worker with no parent (tools, tests).
caf::actor spawn_worker(caf::actor_system& sys, backend_maker make_backend, worker_options options);

/// A child factory for a supervisor's child_spec: each call spawns a new worker incarnation that
/// loads `model_dir` with `backend`. Errors: validate(options)'s (checked once, here).
expected<runtime::child_factory> make_worker_factory(std::string model_dir, gpu::backend_options backend,
                                                     worker_options options);

/// The same with any backend maker (a test wrapper around a real backend, a preloaded model).
expected<runtime::child_factory> make_worker_factory(backend_maker make_backend, worker_options options);

/// A permanent child spec named `id` running make_worker_factory(model_dir, backend, options), for a
/// node's or an inference supervisor's children. The shutdown timeout covers finishing the current
/// engine step (or model load) before the worker exits. Errors: make_worker_factory's, and
/// invalid_argument for an empty id.
expected<runtime::child_spec> worker_child_spec(std::string id, std::string model_dir, gpu::backend_options backend,
                                                worker_options options,
                                                std::chrono::milliseconds shutdown_timeout = std::chrono::seconds(30));

/// The blocks a request with `tokens` of context occupies in a pool of `block_size`-token blocks.
int64_t kv_blocks_for(int64_t tokens, int64_t block_size);

} // namespace triplane::actors::inference
