// Flow control of a streamed command's output: how many bytes the sink is ready to take. The
// pumping thread (sandbox_process::pump) consumes credit as it hands output to the sink and
// stops reading the command's pipes while there is none, so a fast command blocks on its full
// pipe instead of piling output up in memory; another thread grants credit as the sink drains.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "triplane/runtime/error.hpp"

namespace triplane::actors::session {

class output_credit {
public:
  /// Starts with `initial` bytes of credit. io_error when no eventfd can be made.
  static expected<std::shared_ptr<output_credit>> create(uint64_t initial);
  ~output_credit();
  output_credit(const output_credit&) = delete;
  output_credit& operator=(const output_credit&) = delete;

  /// Adds `bytes` (saturating) and wakes a pump waiting for credit. Thread-safe.
  void grant(uint64_t bytes);
  /// Credit left now. Thread-safe.
  uint64_t available() const { return available_.load(std::memory_order_acquire); }
  /// Takes `bytes` (at most available(): only the pumping thread consumes).
  void consume(uint64_t bytes);
  /// Readable after a grant: poll it beside the pipes while out of credit.
  int wake_fd() const { return wake_fd_; }
  /// Clears wake_fd's readiness (call after poll reported it).
  void clear_wakeup();

private:
  explicit output_credit(int fd, uint64_t initial) : available_(initial), wake_fd_(fd) {}
  std::atomic<uint64_t> available_;
  int wake_fd_;
};

} // namespace triplane::actors::session
