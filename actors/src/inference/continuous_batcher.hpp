// The scheduling core of an inference worker, free of threads and actors: a waiting queue and a
// running batch over one backend, advanced one engine step at a time. The worker's engine thread
// drives it; tests can drive it directly. See inference_worker.hpp for the policy it implements.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "triplane/actors/inference_protocol.hpp"
#include "triplane/gpu/backend.hpp"
#include "triplane/gpu/sampler.hpp"

namespace triplane::actors::inference {

using steady_clock = std::chrono::steady_clock;

/// An accepted request, as the worker actor hands it to the engine thread.
struct admitted_request {
  uint64_t id = 0;
  generate_request request;
  int64_t reserved_blocks = 0;  ///< admission accounting, returned in on_finished
  steady_clock::time_point accepted_at;
};

/// Where the batcher reports; called on the thread that drives it.
class batch_listener {
public:
  virtual ~batch_listener() = default;
  virtual void on_token(const caf::actor& sink, const token_event& event) = 0;
  /// The request has left the batcher (its KV blocks are free).
  virtual void on_finished(const caf::actor& sink, const generation_finished& finished,
                           int64_t reserved_blocks) = 0;
};

/// Counters since construction.
struct batcher_counters {
  uint64_t tokens_generated = 0;
  uint64_t prompt_tokens_processed = 0;
  uint64_t steps = 0;
  uint64_t completed = 0;
  uint64_t cancelled = 0;
  uint64_t failed = 0;
  uint64_t preemptions = 0;
};

/// Not thread-safe; `engine` and `listener` are borrowed and must outlive the batcher.
class continuous_batcher {
public:
  continuous_batcher(gpu::backend& engine, int64_t max_running, int64_t step_token_budget,
                     batch_listener& listener);
  ~continuous_batcher();

  /// Appends to the waiting queue. Precondition: the request was validated and its id is new.
  void submit(admitted_request request);
  /// Ends the request with reason cancelled if it is waiting or running; otherwise nothing.
  void cancel(uint64_t id);
  /// Runs one step (joins, one forward, sampling, streaming, retirements). Nothing to do is not an
  /// error. A forward failing with anything but overloaded: the requests of the step are ended
  /// with error internal, the others are left as they are, and the error is returned.
  caf::error step();
  /// Ends every request with reason error, `code` and `message`.
  void fail_all(errc code, const std::string& message);

  bool idle() const { return waiting_.empty() && running_.empty(); }
  int64_t running() const { return static_cast<int64_t>(running_.size()); }
  int64_t waiting() const { return static_cast<int64_t>(waiting_.size()); }
  const batcher_counters& counters() const { return counters_; }

private:
  struct live_request;
  using request_ptr = std::unique_ptr<live_request>;

  void join_waiting();
  void preempt(live_request& victim);
  void finish(live_request& r, finish_reason reason, errc code = errc::ok, std::string message = {});
  void erase_finished();

  gpu::backend& engine_;
  int64_t max_running_;
  int64_t step_token_budget_;
  batch_listener& listener_;
  std::deque<request_ptr> waiting_;
  std::vector<request_ptr> running_;  ///< in join order
  uint64_t next_order_ = 0;           ///< admission order: larger is younger
  batcher_counters counters_;
};

} // namespace triplane::actors::inference
