// In-process collective: ranks are threads that publish buffer pointers and meet at barriers.
#include <condition_variable>
#include <cstring>
#include <mutex>

#include "triplane/gpu/collective.hpp"

namespace triplane::gpu {

namespace {

// A reusable barrier (std::barrier is C++20).
class barrier {
public:
  explicit barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    auto gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != gen; });
  }

private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

struct shared_state {
  explicit shared_state(int n) : ranks(n), sync(n), sources(static_cast<size_t>(n)) {}
  int ranks;
  barrier sync;
  std::vector<const float*> sources;
};

class cpu_collective final : public collective {
public:
  cpu_collective(std::shared_ptr<shared_state> state, int rank) : state_(std::move(state)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return state_->ranks; }

  caf::error all_reduce_sum(float* data, size_t count) override {
    if (state_->ranks == 1) return caf::none;
    // Publish, then every rank sums all buffers in rank order into scratch (identical on every
    // rank), waits until all have read, and only then overwrites its own buffer.
    state_->sources[static_cast<size_t>(rank_)] = data;
    state_->sync.arrive_and_wait();
    scratch_.assign(count, 0.0f);
    for (int r = 0; r < state_->ranks; ++r) {
      const float* src = state_->sources[static_cast<size_t>(r)];
      for (size_t i = 0; i < count; ++i) scratch_[i] += src[i];
    }
    state_->sync.arrive_and_wait();
    std::memcpy(data, scratch_.data(), count * sizeof(float));
    return caf::none;
  }

  caf::error all_gather(const float* send, size_t count, float* recv) override {
    state_->sources[static_cast<size_t>(rank_)] = send;
    state_->sync.arrive_and_wait();
    for (int r = 0; r < state_->ranks; ++r)
      std::memcpy(recv + static_cast<size_t>(r) * count, state_->sources[static_cast<size_t>(r)],
                  count * sizeof(float));
    state_->sync.arrive_and_wait();  // nobody reuses `send` before every rank has copied it
    return caf::none;
  }

private:
  std::shared_ptr<shared_state> state_;
  int rank_;
  std::vector<float> scratch_;
};

} // namespace

std::vector<std::unique_ptr<collective>> make_cpu_collective_group(int ranks) {
  auto state = std::make_shared<shared_state>(ranks);
  std::vector<std::unique_ptr<collective>> out;
  for (int r = 0; r < ranks; ++r) out.push_back(std::make_unique<cpu_collective>(state, r));
  return out;
}

} // namespace triplane::gpu
