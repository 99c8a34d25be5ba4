// Continuous batching over one backend: joins, chunked prefill within a token budget, decoding,
// sampling, streaming, retirement and preemption by recomputation.
#include "continuous_batcher.hpp"

#include <algorithm>
#include <utility>

#include "triplane/actors/inference_worker.hpp"

namespace triplane::actors::inference {

namespace {

int64_t micros_between(steady_clock::time_point from, steady_clock::time_point to) {
  return std::chrono::duration_cast<std::chrono::microseconds>(to - from).count();
}

} // namespace

// The KV cache holds context[0, cached). A step feeds context[cached, ...): the whole rest is a
// decode token (1) or a prefill chunk; when the cache then covers the whole context, the step's
// logits give the next token, which is appended. After a preemption cached drops to 0 and the same
// rule recomputes prompt and generated tokens before sampling continues.
struct continuous_batcher::live_request {
  admitted_request in;
  std::vector<int32_t> context;  // prompt followed by the generated tokens
  int64_t generated = 0;
  int64_t cached = 0;
  bool in_backend = false;
  bool done = false;
  uint64_t order = 0;
  int64_t preemptions = 0;
  gpu::sampler sampler;
  bool joined_once = false;
  steady_clock::time_point joined_at;
  steady_clock::time_point first_token_at;

  live_request(admitted_request r, uint64_t order_)
      : in(std::move(r)), order(order_), sampler(to_params(in.request.sampling)) {
    context = in.request.prompt;
  }

  static gpu::sampling_params to_params(const sampling& s) {
    gpu::sampling_params p;
    p.temperature = s.temperature;
    p.top_k = s.top_k;
    p.top_p = s.top_p;
    p.seed = s.seed;
    return p;
  }
};

continuous_batcher::continuous_batcher(gpu::backend& engine, int64_t max_running,
                                       int64_t step_token_budget, batch_listener& listener)
    : engine_(engine), max_running_(max_running), step_token_budget_(step_token_budget),
      listener_(listener) {}

continuous_batcher::~continuous_batcher() {
  for (auto& r : running_)
    if (r->in_backend) engine_.free_sequence(r->in.id);
}

void continuous_batcher::submit(admitted_request request) {
  waiting_.push_back(std::make_unique<live_request>(std::move(request), next_order_++));
}

void continuous_batcher::cancel(uint64_t id) {
  for (auto& r : running_)
    if (r->in.id == id && !r->done) finish(*r, finish_reason::cancelled);
  for (auto& r : waiting_)
    if (r->in.id == id && !r->done) finish(*r, finish_reason::cancelled);
  erase_finished();
}

void continuous_batcher::fail_all(errc code, const std::string& message) {
  for (auto& r : running_)
    if (!r->done) finish(*r, finish_reason::error, code, message);
  for (auto& r : waiting_)
    if (!r->done) finish(*r, finish_reason::error, code, message);
  erase_finished();
}

void continuous_batcher::finish(live_request& r, finish_reason reason, errc code, std::string message) {
  if (r.in_backend) {
    engine_.free_sequence(r.in.id);
    r.in_backend = false;
  }
  r.done = true;
  auto now = steady_clock::now();
  generation_finished msg;
  msg.request_id = r.in.id;
  msg.reason = reason;
  msg.error_code = code;
  msg.error_message = std::move(message);
  msg.prompt_tokens = static_cast<int64_t>(r.in.request.prompt.size());
  msg.generated_tokens = r.generated;
  msg.time_to_first_token_us = r.generated > 0 ? micros_between(r.in.accepted_at, r.first_token_at) : -1;
  msg.total_us = micros_between(r.in.accepted_at, now);
  msg.queued_us = micros_between(r.in.accepted_at, r.joined_once ? r.joined_at : now);
  msg.preemptions = r.preemptions;
  switch (reason) {
    case finish_reason::length:
    case finish_reason::stop: ++counters_.completed; break;
    case finish_reason::cancelled: ++counters_.cancelled; break;
    case finish_reason::error: ++counters_.failed; break;
  }
  listener_.on_finished(r.in.request.sink, msg, r.in.reserved_blocks);
}

void continuous_batcher::erase_finished() {
  auto is_done = [](const request_ptr& r) { return r->done; };
  running_.erase(std::remove_if(running_.begin(), running_.end(), is_done), running_.end());
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), is_done), waiting_.end());
}

// FIFO: the head of the queue joins when a batch slot is free and the pool has room for its whole
// context plus one block of headroom per running request (each may need a block for its next
// token). When it does not fit, later requests wait too (no starvation of long prompts).
void continuous_batcher::join_waiting() {
  const auto stats = engine_.kv_stats();
  while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < max_running_) {
    live_request& head = *waiting_.front();
    const int64_t need = kv_blocks_for(static_cast<int64_t>(head.context.size()), stats.block_size);
    if (need > stats.num_blocks) {
      finish(head, finish_reason::error, errc::overloaded,
             "the context of " + std::to_string(head.context.size()) + " tokens needs " +
                 std::to_string(need) + " KV blocks but the pool has " +
                 std::to_string(stats.num_blocks));
      waiting_.pop_front();
      continue;
    }
    const int64_t free_now = engine_.kv_stats().free_blocks - static_cast<int64_t>(running_.size());
    if (need > free_now && !running_.empty()) break;
    if (auto err = engine_.add_sequence(head.in.id)) {
      finish(head, finish_reason::error, errc::internal,
             "cannot register the sequence: " + describe(err));
      waiting_.pop_front();
      continue;
    }
    head.in_backend = true;
    head.cached = 0;
    if (!head.joined_once) {
      head.joined_once = true;
      head.joined_at = steady_clock::now();
    }
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

void continuous_batcher::preempt(live_request& victim) {
  engine_.free_sequence(victim.in.id);
  victim.in_backend = false;
  victim.cached = 0;
  ++victim.preemptions;
  ++counters_.preemptions;
  for (auto it = running_.begin(); it != running_.end(); ++it) {
    if (it->get() == &victim) {
      waiting_.push_front(std::move(*it));
      running_.erase(it);
      return;
    }
  }
}

caf::error continuous_batcher::step() {
  join_waiting();
  // Decodes first, each one token; then prefill chunks, oldest first, in what the budget leaves.
  std::vector<live_request*> members;
  std::vector<gpu::step_item> items;
  for (auto& r : running_) {
    if (static_cast<int64_t>(r->context.size()) - r->cached == 1) {
      members.push_back(r.get());
      items.push_back(gpu::step_item{r->in.id, {r->context.back()}, false});
    }
  }
  int64_t budget = step_token_budget_ - static_cast<int64_t>(items.size());
  for (auto& r : running_) {
    const int64_t rest = static_cast<int64_t>(r->context.size()) - r->cached;
    if (rest <= 1 || budget <= 0) continue;
    const int64_t chunk = std::min(rest, budget);
    budget -= chunk;
    members.push_back(r.get());
    items.push_back(gpu::step_item{
        r->in.id,
        std::vector<int32_t>(r->context.begin() + r->cached, r->context.begin() + r->cached + chunk),
        false});
  }
  if (items.empty()) return caf::none;

  expected<std::vector<gpu::step_logits>> out{std::vector<gpu::step_logits>{}};
  for (;;) {
    out = engine_.forward(items);
    if (out) break;
    if (code_of(out.error()) != errc::overloaded) {
      caf::error err = out.error();
      const std::string why = "engine step failed: " + describe(err);
      for (auto* r : members) finish(*r, finish_reason::error, errc::internal, why);
      erase_finished();
      return err;
    }
    // KV pool exhausted: evict the youngest request of the step and retry without it. A request
    // alone in the batch that still does not fit never will: it ends with overloaded.
    size_t victim = 0;
    for (size_t i = 1; i < members.size(); ++i)
      if (members[i]->order > members[victim]->order) victim = i;
    if (running_.size() == 1) {
      finish(*members[victim], finish_reason::error, errc::overloaded,
             "the KV pool cannot hold this request's context even alone: " + describe(out.error()));
      erase_finished();
      return caf::none;
    }
    preempt(*members[victim]);
    members.erase(members.begin() + static_cast<std::ptrdiff_t>(victim));
    items.erase(items.begin() + static_cast<std::ptrdiff_t>(victim));
    if (items.empty()) return caf::none;
  }
  ++counters_.steps;

  const int64_t vocab = engine_.config().vocab_size;
  const auto now = steady_clock::now();
  for (size_t i = 0; i < members.size(); ++i) {
    live_request& r = *members[i];
    const auto fed = static_cast<int64_t>(items[i].tokens.size());
    const bool decode = fed == 1 && r.generated > 0 && r.cached + 1 == static_cast<int64_t>(r.context.size());
    if (!decode) counters_.prompt_tokens_processed += static_cast<uint64_t>(fed);
    r.cached += fed;
    if (r.cached < static_cast<int64_t>(r.context.size())) continue;  // prefill continues
    const auto& logits = (*out)[i].values;
    const int32_t token = r.sampler.sample(logits.data() + (logits.size() - static_cast<size_t>(vocab)), vocab);
    r.context.push_back(token);
    const int64_t index = r.generated++;
    if (index == 0) r.first_token_at = now;
    ++counters_.tokens_generated;
    listener_.on_token(r.in.request.sink, token_event{r.in.id, token, index});
    const auto& stops = r.in.request.stop_tokens;
    if (std::find(stops.begin(), stops.end(), token) != stops.end())
      finish(r, finish_reason::stop);
    else if (r.generated >= r.in.request.max_new_tokens)
      finish(r, finish_reason::length);
  }
  erase_finished();
  return caf::none;
}

} // namespace triplane::actors::inference
