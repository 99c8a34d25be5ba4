// question_counter against messages made by Cap'n Proto itself, fed whole and in random cuts.
#include "question_counter.hpp"

#include <catch2/catch.hpp>

#include <random>
#include <string>
#include <vector>

#include <capnp/rpc.capnp.h>
#include <capnp/serialize.h>

using triplane::rpc::detail::question_counter;

namespace {

std::string framed(capnp::MessageBuilder& b) {
  auto words = capnp::messageToFlatArray(b);
  auto bytes = words.asBytes();
  return {reinterpret_cast<const char*>(bytes.begin()), bytes.size()};
}

std::string bootstrap(uint32_t question) {
  capnp::MallocMessageBuilder b;
  b.initRoot<capnp::rpc::Message>().initBootstrap().setQuestionId(question);
  return framed(b);
}

/// A call whose parameters hold `payload` bytes; `first_segment_words` small makes the message
/// span several segments (as a large call does).
std::string call(uint32_t question, size_t payload, unsigned first_segment_words = 1024) {
  capnp::MallocMessageBuilder b(first_segment_words, capnp::AllocationStrategy::FIXED_SIZE);
  auto c = b.initRoot<capnp::rpc::Message>().initCall();
  c.setQuestionId(question);
  c.setInterfaceId(0x1234);
  c.setMethodId(1);
  c.initTarget().setImportedCap(0);
  c.initParams().getContent().setAs<capnp::Text>(std::string(payload, 'x'));
  return framed(b);
}

std::string finish(uint32_t question) {
  capnp::MallocMessageBuilder b;
  b.initRoot<capnp::rpc::Message>().initFinish().setQuestionId(question);
  return framed(b);
}

std::string ret(uint32_t answer) {
  capnp::MallocMessageBuilder b;
  auto r = b.initRoot<capnp::rpc::Message>().initReturn();
  r.setAnswerId(answer);
  r.initResults().getContent().setAs<capnp::Text>("answer");
  return framed(b);
}

std::string release(uint32_t id) {
  capnp::MallocMessageBuilder b;
  b.initRoot<capnp::rpc::Message>().initRelease().setId(id);
  return framed(b);
}

} // namespace

TEST_CASE("the question counter follows calls, bootstraps and finishes through any cut of the "
          "stream", "[rpc][transport]") {
  std::string stream;
  stream += bootstrap(0);
  stream += call(1, 10);
  stream += call(2, 5000, 16);      // several segments
  stream += call(3, 100000, 64);
  stream += ret(7);                 // answers to the peer's own calls count nothing
  stream += release(3);
  stream += finish(1);
  stream += bootstrap(4);
  stream += finish(0);
  stream += call(5, 0);
  const size_t messages = 10;
  const uint64_t open = 4;          // 2, 3, 4, 5

  SECTION("whole") {
    question_counter q;
    q.feed(stream.data(), stream.size());
    CHECK(q.messages() == messages);
    CHECK(q.unfinished() == open);
    CHECK_FALSE(q.lost_framing());
  }
  SECTION("a byte at a time") {
    question_counter q;
    for (char c : stream) q.feed(&c, 1);
    CHECK(q.messages() == messages);
    CHECK(q.unfinished() == open);
  }
  SECTION("random cuts") {
    std::mt19937 rng(42);
    for (int round = 0; round < 200; ++round) {
      question_counter q;
      for (size_t at = 0; at < stream.size();) {
        size_t n = std::min(stream.size() - at, size_t{1} + rng() % 300);
        q.feed(stream.data() + at, n);
        at += n;
      }
      REQUIRE(q.messages() == messages);
      REQUIRE(q.unfinished() == open);
    }
  }
}

TEST_CASE("a message whose root is not where Cap'n Proto puts it counts as a question",
          "[rpc][transport]") {
  // A 2-word first segment cannot hold the root struct: the builder leaves a far pointer there.
  // Cap'n Proto's RPC writer never does (its first segment fits the root), a client crafting
  // messages might, to hide its calls: they count.
  question_counter q;
  auto far_call = call(1, 10, 2);
  q.feed(far_call.data(), far_call.size());
  CHECK(q.unfinished() == 1);
  capnp::MallocMessageBuilder b(2, capnp::AllocationStrategy::FIXED_SIZE);
  b.initRoot<capnp::rpc::Message>().initFinish().setQuestionId(1);
  auto far_finish = framed(b);
  q.feed(far_finish.data(), far_finish.size());
  CHECK(q.unfinished() == 2);
  CHECK(q.messages() == 2);
}

TEST_CASE("the question counter never goes below zero and gives up on framing it cannot follow",
          "[rpc][transport]") {
  question_counter q;
  auto f = finish(9);  // a Finish of a question never asked
  q.feed(f.data(), f.size());
  CHECK(q.unfinished() == 0);
  auto c = call(1, 3);
  q.feed(c.data(), c.size());
  CHECK(q.unfinished() == 1);
  // A segment table claiming 2^32 segments: Cap'n Proto's reader aborts such a connection.
  const unsigned char bad[8] = {0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0};
  q.feed(bad, sizeof bad);
  CHECK(q.lost_framing());
  q.feed(c.data(), c.size());
  CHECK(q.unfinished() == 1);
}
