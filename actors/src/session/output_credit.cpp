// Credit counter with an eventfd so a poll() loop can wait for credit beside its pipes.
#include "session/output_credit.hpp"

#include <cerrno>
#include <cstring>
#include <limits>
#include <string>

#include <sys/eventfd.h>
#include <unistd.h>

namespace triplane::actors::session {

expected<std::shared_ptr<output_credit>> output_credit::create(uint64_t initial) {
  int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return make_error(errc::io_error, std::string("eventfd: ") + std::strerror(errno));
  return std::shared_ptr<output_credit>(new output_credit(fd, initial));
}

output_credit::~output_credit() { ::close(wake_fd_); }

void output_credit::grant(uint64_t bytes) {
  auto cur = available_.load(std::memory_order_relaxed);
  uint64_t next;
  do {
    next = cur > std::numeric_limits<uint64_t>::max() - bytes ? std::numeric_limits<uint64_t>::max()
                                                              : cur + bytes;
  } while (!available_.compare_exchange_weak(cur, next, std::memory_order_acq_rel));
  uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof one);
}

void output_credit::consume(uint64_t bytes) {
  auto cur = available_.load(std::memory_order_relaxed);
  uint64_t next;
  do {
    next = cur > bytes ? cur - bytes : 0;
  } while (!available_.compare_exchange_weak(cur, next, std::memory_order_acq_rel));
}

void output_credit::clear_wakeup() {
  uint64_t n;
  (void)!::read(wake_fd_, &n, sizeof n);
}

} // namespace triplane::actors::session
