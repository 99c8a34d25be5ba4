// A file descriptor owned by a scope or an object: closed when its owner goes.
#pragma once

#include <unistd.h>

namespace triplane::actors::session {

struct fd_guard {
  int fd = -1;  ///< -1: none
  fd_guard() = default;
  explicit fd_guard(int f) : fd(f) {}
  ~fd_guard() {
    if (fd >= 0) ::close(fd);
  }
  fd_guard(const fd_guard&) = delete;
  fd_guard& operator=(const fd_guard&) = delete;
};

} // namespace triplane::actors::session
