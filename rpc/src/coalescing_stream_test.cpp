// coalescing_stream over a real socket pair (and kj's in-memory pipe for back-pressure): bytes arrive intact and in order, the writes of one
// event-loop turn leave in one write, reads are served from one buffered read, and a writer
// beyond the high-water mark waits for the socket.
#include <catch2/catch.hpp>

#include <string>

#include <kj/async-io.h>
#include <kj/vector.h>

#include "coalescing_stream.hpp"

using triplane::rpc::detail::coalescing_stream;

namespace {

std::string pattern(size_t n, size_t seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>('a' + (i * 7 + seed) % 26);
  return s;
}

std::string read_exactly(kj::AsyncInputStream& in, size_t n, kj::WaitScope& ws) {
  std::string out(n, '\0');
  in.read(out.data(), n).wait(ws);
  return out;
}

} // namespace

TEST_CASE("writes of one event-loop turn leave in one write and arrive intact and in order",
          "[rpc][transport]") {
  auto io = kj::setupAsyncIo();
  auto pipe = io.provider->newTwoWayPipe();
  coalescing_stream out{kj::mv(pipe.ends[0]), 64 * 1024, 1 << 20};  // eager only past 1 MiB
  std::string expected;
  kj::Vector<kj::Promise<void>> writes;
  for (size_t i = 0; i < 100; ++i) {
    auto piece = pattern(40 + i, i);
    expected += piece;
    writes.add(out.write(piece.data(), piece.size()));  // copied: `piece` may go now
  }
  kj::joinPromises(writes.releaseAsArray()).wait(io.waitScope);
  CHECK(read_exactly(*pipe.ends[1], expected.size(), io.waitScope) == expected);
  CHECK(out.stats().writes == 1);
  CHECK(out.stats().bytes_written == expected.size());
}

TEST_CASE("a long turn's writes leave once eager_bytes have gathered, without waiting for the "
          "turn to end, and arrive intact and in order",
          "[rpc][transport]") {
  auto io = kj::setupAsyncIo();
  auto pipe = io.provider->newTwoWayPipe();
  coalescing_stream out{kj::mv(pipe.ends[0]), 64 * 1024, 4096};
  std::string expected;
  kj::Vector<kj::Promise<void>> writes;
  size_t first_write_at = 0;
  for (size_t i = 0; i < 100; ++i) {
    auto piece = pattern(40 + i, i);
    expected += piece;
    writes.add(out.write(piece.data(), piece.size()));
    // The loop has not turned: only an eager write can have started.
    if (first_write_at == 0 && out.stats().writes == 1) first_write_at = expected.size();
  }
  CHECK(first_write_at >= 4096);
  CHECK(first_write_at < 4096 + 140);  // at the piece that crossed the threshold
  kj::joinPromises(writes.releaseAsArray()).wait(io.waitScope);
  CHECK(read_exactly(*pipe.ends[1], expected.size(), io.waitScope) == expected);
  // ~9.4 KiB: one eager write; what came while it was in progress gathers behind it.
  CHECK(out.stats().writes >= 2);
  CHECK(out.stats().writes <= 3);
  CHECK(out.stats().bytes_written == expected.size());
}

TEST_CASE("small reads are served from one buffered read of what the socket holds",
          "[rpc][transport]") {
  auto io = kj::setupAsyncIo();
  auto pipe = io.provider->newTwoWayPipe();
  coalescing_stream in{kj::mv(pipe.ends[1])};
  std::string sent = pattern(8 * 200, 3);
  pipe.ends[0]->write(sent.data(), sent.size()).wait(io.waitScope);  // fits the kernel buffer
  std::string got;
  for (size_t i = 0; i < 200; ++i) got += read_exactly(in, 8, io.waitScope);
  CHECK(got == sent);
  CHECK(in.stats().reads == 1);

  SECTION("a read larger than the buffer goes straight to the caller's memory") {
    std::string big = pattern(1 << 20, 5);
    auto writing = pipe.ends[0]->write(big.data(), big.size());
    CHECK(read_exactly(in, big.size(), io.waitScope) == big);
    writing.wait(io.waitScope);
  }
  SECTION("end of stream yields fewer bytes than asked, as tryRead allows") {
    std::string tail = "xyz";
    pipe.ends[0]->write(tail.data(), tail.size()).wait(io.waitScope);
    pipe.ends[0]->shutdownWrite();
    char buf[16];
    CHECK(in.tryRead(buf, 16, 16).wait(io.waitScope) == 3);
    CHECK(std::string(buf, 3) == tail);
    CHECK(in.tryRead(buf, 1, 16).wait(io.waitScope) == 0);
  }
}

TEST_CASE("a writer beyond the high-water mark waits until the socket took the bytes",
          "[rpc][transport]") {
  auto io = kj::setupAsyncIo();
  // kj's in-memory pipe completes a write only when the reader has taken it all: a socket
  // whose peer reads nothing, without a kernel buffer in between.
  auto pipe = kj::newTwoWayPipe();
  coalescing_stream out{kj::mv(pipe.ends[0]), 16};
  std::string small = "0123456789";
  auto first = out.write(small.data(), small.size());
  CHECK(first.poll(io.waitScope));  // under the mark: accepted at once
  first.wait(io.waitScope);
  std::string big = pattern(64, 1);
  auto second = out.write(big.data(), big.size());
  CHECK_FALSE(second.poll(io.waitScope));
  auto got = read_exactly(*pipe.ends[1], small.size() + big.size(), io.waitScope);
  second.wait(io.waitScope);
  CHECK(got == small + big);
}

TEST_CASE("shutdownWrite delivers the buffered bytes before the end of stream",
          "[rpc][transport]") {
  auto io = kj::setupAsyncIo();
  auto pipe = io.provider->newTwoWayPipe();
  coalescing_stream out{kj::mv(pipe.ends[0])};
  std::string msg = pattern(1000, 9);
  auto w = out.write(msg.data(), msg.size());
  out.shutdownWrite();
  auto all = pipe.ends[1]->readAllText().wait(io.waitScope);
  w.wait(io.waitScope);
  CHECK(std::string(all.cStr(), all.size()) == msg);
}
