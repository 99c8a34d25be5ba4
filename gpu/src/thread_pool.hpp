// A fixed set of threads that run one parallel region at a time (the caller takes part), for the
// CPU backend's matmuls and attention, and for running tensor-parallel ranks side by side.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace triplane::gpu {

class thread_pool {
public:
  /// `threads` >= 1 workers in total, the calling thread included (threads - 1 are spawned).
  explicit thread_pool(int threads);
  ~thread_pool();
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  /// Calls fn(i) for every i in [0, size()), i = 0 on the calling thread; returns when all are done.
  /// Not reentrant: one region at a time per pool. fn must not throw.
  void run_on_each(const std::function<void(int)>& fn);

  /// Splits [0, n) into at most size() contiguous ranges of at least `min_chunk` and runs
  /// fn(begin, end) on each. The split depends only on n, size() and min_chunk.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk = 1);

private:
  void worker_loop(int index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_cv_;
  std::condition_variable done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stopping_ = false;
};

} // namespace triplane::gpu
