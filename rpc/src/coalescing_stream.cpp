// coalescing_stream: buffered reads; writes gathered per event-loop turn or per eager_bytes.
#include "coalescing_stream.hpp"

#include <algorithm>
#include <cstring>

namespace triplane::rpc::detail {
namespace {

// The read buffer starts small (an idle connection costs little: the node holds thousands)
// and doubles whenever a read fills it, up to the largest size.
constexpr size_t min_read_buffer = 4 * 1024;
constexpr size_t max_read_buffer = 64 * 1024;

} // namespace

coalescing_stream::coalescing_stream(kj::Own<kj::AsyncIoStream> inner, size_t high_water,
                                     size_t eager_bytes)
  : forwarding_stream(kj::mv(inner)), high_water_(high_water), eager_bytes_(eager_bytes),
    rbuf_(kj::heapArray<kj::byte>(min_read_buffer)), tasks_(*this) {}

coalescing_stream::~coalescing_stream() noexcept(false) = default;

kj::Promise<size_t> coalescing_stream::tryRead(void* buffer, size_t min_bytes,
                                               size_t max_bytes) {
  auto* out = static_cast<kj::byte*>(buffer);
  size_t n = std::min(max_bytes, rend_ - rbegin_);
  if (n > 0) {
    std::memcpy(out, rbuf_.begin() + rbegin_, n);
    rbegin_ += n;
  }
  if (n >= min_bytes) return n;
  return fill_then_read(out, min_bytes, max_bytes, n);
}

kj::Promise<size_t> coalescing_stream::fill_then_read(kj::byte* out, size_t min_bytes,
                                                      size_t max_bytes, size_t done) {
  // The buffer is empty here. A large remainder (a big message body) goes straight to the
  // caller's memory: copying it through the buffer would gain no syscall.
  if (min_bytes - done >= max_read_buffer) {
    ++stats_.reads;
    return inner_->tryRead(out + done, min_bytes - done, max_bytes - done)
      .then([this, out, done](size_t got) {
        stats_.bytes_read += got;
        if (observer_ && got > 0) observer_(out + done, got);
        return done + got;
      });
  }
  ++stats_.reads;
  return inner_->tryRead(rbuf_.begin(), 1, rbuf_.size())
    .then([this, out, min_bytes, max_bytes, done](size_t got) -> kj::Promise<size_t> {
      stats_.bytes_read += got;
      rbegin_ = 0;
      rend_ = got;
      if (got == 0) return done;  // EOF: fewer than min_bytes, as tryRead() allows
      if (observer_) observer_(rbuf_.begin(), got);
      size_t n = std::min(max_bytes - done, got);
      std::memcpy(out + done, rbuf_.begin(), n);
      if (got == rbuf_.size() && rbuf_.size() < max_read_buffer) grow_read_buffer();
      rbegin_ = n;
      if (done + n >= min_bytes) return done + n;
      return fill_then_read(out, min_bytes, max_bytes, done + n);
    });
}

void coalescing_stream::grow_read_buffer() {
  auto bigger = kj::heapArray<kj::byte>(rbuf_.size() * 2);
  std::memcpy(bigger.begin(), rbuf_.begin() + rbegin_, rend_ - rbegin_);
  rend_ -= rbegin_;
  rbegin_ = 0;
  rbuf_ = kj::mv(bigger);
}

kj::Promise<void> coalescing_stream::write(const void* buffer, size_t size) {
  kj::ArrayPtr<const kj::byte> piece(static_cast<const kj::byte*>(buffer), size);
  return write(kj::arrayPtr(&piece, 1));
}

kj::Promise<void> coalescing_stream::write(
  kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  KJ_IF_MAYBE(e, failed_) { return kj::cp(*e); }
  for (auto p : pieces) pending_.insert(pending_.end(), p.begin(), p.end());
  if (!writing_) {
    if (pending_.size() >= eager_bytes_) start_write();
    else if (!flush_scheduled_) schedule_flush();
  }
  return accepted();
}

kj::Promise<void> coalescing_stream::accepted() {
  if (pending_.size() <= high_water_) return kj::READY_NOW;
  auto paf = kj::newPromiseAndFulfiller<void>();
  blocked_writers_.push_back(kj::mv(paf.fulfiller));
  return kj::mv(paf.promise);
}

void coalescing_stream::schedule_flush() {
  flush_scheduled_ = true;
  // evalLast: after every event already queued, so the replies and Finish messages that the
  // current burst of incoming messages produces leave together (up to eager_bytes_, which go
  // at once so that the peer can start on them while this loop is still busy).
  tasks_.add(kj::evalLast([this]() {
    flush_scheduled_ = false;
    if (!writing_) {
      if (!pending_.empty()) start_write();
      else written_out();
    }
  }));
}

void coalescing_stream::start_write() {
  writing_ = true;
  sending_.clear();
  sending_.swap(pending_);
  ++stats_.writes;
  stats_.bytes_written += sending_.size();
  tasks_.add(inner_->write(sending_.data(), sending_.size()).then([this]() {
    writing_ = false;
    if (pending_.size() <= high_water_) {
      for (auto& w : blocked_writers_) w->fulfill();
      blocked_writers_.clear();
    }
    if (pending_.size() >= eager_bytes_) start_write();
    else if (!flush_scheduled_) schedule_flush();  // what was written meanwhile, or the end
  }));
}

void coalescing_stream::written_out() {
  for (auto& w : blocked_writers_) w->fulfill();
  blocked_writers_.clear();
  if (shutdown_requested_) {
    shutdown_requested_ = false;
    inner_->shutdownWrite();
  }
}

void coalescing_stream::taskFailed(kj::Exception&& e) {
  writing_ = false;
  pending_.clear();
  for (auto& w : blocked_writers_) w->reject(kj::cp(e));
  blocked_writers_.clear();
  failed_ = kj::mv(e);
}

void coalescing_stream::shutdownWrite() {
  if (writing_ || flush_scheduled_ || !pending_.empty()) {
    shutdown_requested_ = true;
    return;
  }
  inner_->shutdownWrite();
}

} // namespace triplane::rpc::detail
