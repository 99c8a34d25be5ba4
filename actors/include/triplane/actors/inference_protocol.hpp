// The messages of an inference worker (inference_worker.hpp): what a client sends, what the worker
// streams to the client's sink, and what it answers about itself. Stable: these types cross the
// network (CAF) and the RPC adapter maps them field by field to Cap'n Proto. Fields are only ever
// appended; enum values are never renumbered.
//
// Conversation:
//   client -> worker   generate_request                 reply: generate_accepted, or an error:
//                                                        invalid_argument (bad request),
//                                                        overloaded (queue full, KV pool cannot
//                                                        hold the prompt + reserve: retry later),
//                                                        unavailable (worker stopping)
//   worker -> sink     token_event*  then exactly one generation_finished (always, also on
//                      cancellation, preemption failure, a failed step or worker shutdown)
//   client -> worker   (cancel_atom, request_id)        reply: caf::ok_atom, or not_found
//   client -> worker   (info_atom)                      reply: model_info
//   client -> worker   (stats_atom)                     reply: worker_stats
// Sink messages are sent anonymously (no sender) and need no reply. They come from the worker's
// engine thread, so a sink may see the first token_event before the client sees generate_accepted.
// The sink stays the requester's: the worker only monitors it (a sink that goes down cancels).
// Retrying after overloaded or after a worker restart is the client's decision.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/meta/type_name.hpp>

#include "triplane/runtime/error.hpp"

namespace triplane::actors::inference {

/// (cancel_atom, uint64_t request_id): stop the request at the next step boundary.
using cancel_atom = caf::atom_constant<caf::atom("inf_cancel")>;
/// (info_atom): the served model.
using info_atom = caf::atom_constant<caf::atom("inf_info")>;
/// (stats_atom): the worker's load and counters.
using stats_atom = caf::atom_constant<caf::atom("inf_stats")>;

/// How the next token is chosen (see triplane::gpu::sampling_params). temperature <= 0 is greedy
/// (argmax); otherwise logits / temperature, then top_k (0: off), then top_p (1: off), drawn from a
/// generator seeded with `seed`: the same request with the same seed yields the same tokens.
struct sampling {
  float temperature = 0.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, sampling& x) {
  return f(caf::meta::type_name("triplane.inference.sampling"), x.temperature, x.top_k, x.top_p,
           x.seed);
}

/// One generation. Validated by the worker: prompt not empty and every id in [0, vocab);
/// 1 <= max_new_tokens; prompt + max_new_tokens <= the model's max_position_embeddings; sampling
/// as gpu::validate; at most 1024 stop tokens; sink valid. The worker monitors the sink: if it goes down the request is
/// cancelled.
struct generate_request {
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 16;
  inference::sampling sampling;
  /// Generation ends after emitting one of these (the stop token is streamed and counted).
  std::vector<int32_t> stop_tokens;
  /// Receives token_event and generation_finished messages.
  caf::actor sink;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generate_request& x) {
  return f(caf::meta::type_name("triplane.inference.generate_request"), x.prompt, x.max_new_tokens,
           x.sampling, x.stop_tokens, x.sink);
}

/// The reply to an accepted generate_request. request_id names the request in stream messages and
/// in cancel; it is unique within a worker incarnation and, in practice, across incarnations (ids
/// start at a random 32-bit offset times 2^32), so a stale id does not cancel someone else's work.
struct generate_accepted {
  uint64_t request_id = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generate_accepted& x) {
  return f(caf::meta::type_name("triplane.inference.generate_accepted"), x.request_id);
}

/// One generated token, streamed as soon as it is sampled. index counts from 0 per request; the
/// events of one request arrive in index order.
struct token_event {
  uint64_t request_id = 0;
  int32_t token = 0;
  int64_t index = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, token_event& x) {
  return f(caf::meta::type_name("triplane.inference.token_event"), x.request_id, x.token, x.index);
}

/// Why a generation ended. Wire values are fixed.
enum class finish_reason : uint8_t {
  length = 0,     ///< max_new_tokens generated
  stop = 1,       ///< a stop token was generated (it is the last token)
  cancelled = 2,  ///< cancel message, or the sink went down
  error = 3,      ///< see error_code / error_message
};

const char* to_string(finish_reason reason);

/// The last message of a request's stream.
struct generation_finished {
  uint64_t request_id = 0;
  finish_reason reason = finish_reason::length;
  /// For reason == error: overloaded (preempted and could not fit the KV pool again), internal (the
  /// engine step failed: the worker restarts), unavailable (the worker stopped or failed while the
  /// request waited). errc::ok otherwise.
  errc error_code = errc::ok;
  std::string error_message;
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;    ///< tokens streamed (token_event count)
  int64_t time_to_first_token_us = -1;  ///< acceptance to first token; -1 when none was generated
  int64_t total_us = 0;            ///< acceptance to this message
  int64_t queued_us = 0;           ///< acceptance to joining the batch (the first time)
  int64_t preemptions = 0;         ///< times the request was evicted for KV space and recomputed
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generation_finished& x) {
  return f(caf::meta::type_name("triplane.inference.generation_finished"), x.request_id, x.reason,
           x.error_code, x.error_message, x.prompt_tokens, x.generated_tokens,
           x.time_to_first_token_us, x.total_us, x.queued_us, x.preemptions);
}

/// What a worker serves.
struct model_info {
  std::string name;     ///< the model directory's last path component (or the worker's name)
  std::string backend;  ///< "cpu" | "cuda"
  int32_t tensor_parallel = 1;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  int64_t kv_block_size = 0;    ///< token slots per KV block
  int64_t kv_blocks_total = 0;  ///< blocks in the pool (per rank)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, model_info& x) {
  return f(caf::meta::type_name("triplane.inference.model_info"), x.name, x.backend,
           x.tensor_parallel, x.vocab_size, x.hidden_size, x.intermediate_size, x.num_layers,
           x.num_heads, x.num_kv_heads, x.head_dim, x.max_position_embeddings, x.kv_block_size,
           x.kv_blocks_total);
}

/// A snapshot of a worker's load (as of its last engine step) and counters since it started.
struct worker_stats {
  int64_t running = 0;          ///< requests in the batch
  int64_t queued = 0;           ///< accepted, waiting to join the batch
  int64_t kv_blocks_free = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_reserved = 0;  ///< promised to accepted requests (admission accounting)
  uint64_t tokens_generated = 0;
  uint64_t prompt_tokens_processed = 0;  ///< prefill tokens run (recomputation included)
  uint64_t steps = 0;           ///< engine forward steps
  uint64_t requests_accepted = 0;
  uint64_t requests_rejected = 0;  ///< answered overloaded
  uint64_t requests_completed = 0; ///< finished by length or stop
  uint64_t requests_cancelled = 0;
  uint64_t requests_failed = 0;
  uint64_t preemptions = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, worker_stats& x) {
  return f(caf::meta::type_name("triplane.inference.worker_stats"), x.running, x.queued,
           x.kv_blocks_free, x.kv_blocks_total, x.kv_blocks_reserved, x.tokens_generated,
           x.prompt_tokens_processed, x.steps, x.requests_accepted, x.requests_rejected,
           x.requests_completed, x.requests_cancelled, x.requests_failed, x.preemptions);
}

/// Registers every type above under its type name, so that they cross the network. Call on the
/// config of every node that talks to inference workers (before the actor_system is made).
void register_inference_types(caf::actor_system_config& cfg);

} // namespace triplane::actors::inference
