// caf_bridge against real CAF actors: replies, error replies, timeouts, requests the kj side
// dropped, dead destinations, and many requests in flight at once.
#include <catch2/catch.hpp>

#include <chrono>
#include <thread>

#include <caf/all.hpp>
#include <kj/async-io.h>
#include <kj/vector.h>

#include "caf_bridge.hpp"

using namespace std::chrono_literals;
using triplane::rpc::detail::caf_bridge;
namespace wire = triplane::rpc::wire;

using slow_atom = caf::atom_constant<caf::atom("slow")>;
using fail_atom = caf::atom_constant<caf::atom("fail")>;
using mute_atom = caf::atom_constant<caf::atom("mute")>;
using answer_atom = caf::atom_constant<caf::atom("answer")>;

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(caf::response_promise)

namespace {

/// Doubles an int; answers `slow` with 7 after a delay; `fail` with a triplane error; `mute`
/// never (the promise is kept, so no broken-promise error either).
caf::behavior echo(caf::event_based_actor* self) {
  auto kept = std::make_shared<std::vector<caf::response_promise>>();
  return {
    [](int x) { return x * 2; },
    [self](slow_atom, int delay_ms) {
      auto rp = self->make_response_promise();
      self->delayed_send(self, std::chrono::milliseconds(delay_ms), answer_atom::value, rp);
    },
    [](answer_atom, caf::response_promise& rp) { rp.deliver(7); },
    [](fail_atom) -> caf::result<int> {
      return triplane::make_error(triplane::errc::not_found, "no such thing");
    },
    [self, kept](mute_atom) { kept->push_back(self->make_response_promise()); },
  };
}

struct fixture {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  kj::AsyncIoContext io = kj::setupAsyncIo();
  fixture() {
    cfg.set("scheduler.max-threads", 2);
    sys = std::make_unique<caf::actor_system>(cfg);
  }
};

} // namespace

TEST_CASE("the bridge delivers replies, error replies and timeouts to the kj side",
          "[rpc][bridge]") {
  fixture f;
  auto actor = f.sys->spawn(echo);
  {
    caf_bridge bridge{*f.sys, f.io.provider->getTimer()};

    SECTION("many requests in flight each get their own reply, in few wake-ups") {
      kj::Vector<kj::Promise<int>> calls;
      for (int i = 0; i < 1000; ++i)
        calls.add(bridge.ask<int>(actor, caf::make_message(i), 5000ms));
      auto results = kj::joinPromises(calls.releaseAsArray()).wait(f.io.waitScope);
      for (int i = 0; i < 1000; ++i) REQUIRE(results[i] == 2 * i);
      CHECK(bridge.stats().replies == 1000);
      CHECK(bridge.stats().request_batches < 1000);
      CHECK(bridge.stats().wakeups < 1000);
    }
    SECTION("an error reply rejects with its triplane code and message") {
      auto p = bridge.ask<int>(actor, caf::make_message(fail_atom::value), 5000ms);
      try {
        p.wait(f.io.waitScope);
        FAIL("expected a rejection");
      } catch (kj::Exception& e) {
        CHECK(wire::code_of(e) == triplane::errc::not_found);
        CHECK(wire::message_of(e).find("no such thing") != std::string::npos);
      }
    }
    SECTION("a request nobody answers rejects with timeout after its deadline") {
      auto t0 = std::chrono::steady_clock::now();
      auto p = bridge.ask<int>(actor, caf::make_message(mute_atom::value), 100ms);
      try {
        p.wait(f.io.waitScope);
        FAIL("expected a timeout");
      } catch (kj::Exception& e) {
        CHECK(wire::code_of(e) == triplane::errc::timeout);
      }
      CHECK(std::chrono::steady_clock::now() - t0 >= 100ms);
      CHECK(bridge.stats().timeouts == 1);
    }
    SECTION("a reply after the deadline, or to a dropped request, is discarded") {
      auto late = bridge.ask<int>(actor, caf::make_message(slow_atom::value, 200), 50ms);
      CHECK_THROWS_AS(late.wait(f.io.waitScope), kj::Exception);
      {
        auto dropped = bridge.ask<int>(actor, caf::make_message(slow_atom::value, 50), 5000ms);
      }
      // Both late replies arrive meanwhile; later requests still get theirs.
      f.io.provider->getTimer().afterDelay(300 * kj::MILLISECONDS).wait(f.io.waitScope);
      CHECK(bridge.ask<int>(actor, caf::make_message(21), 5000ms).wait(f.io.waitScope) == 42);
      CHECK(bridge.stats().replies == 3);
    }
    SECTION("a request to a dead actor rejects with unavailable") {
      auto dead = f.sys->spawn(echo);
      caf::anon_send_exit(dead, caf::exit_reason::kill);
      std::this_thread::sleep_for(50ms);
      auto p = bridge.ask<int>(dead, caf::make_message(1), 5000ms);
      try {
        p.wait(f.io.waitScope);
        FAIL("expected a rejection");
      } catch (kj::Exception& e) {
        CHECK(wire::code_of(e) == triplane::errc::unavailable);
      }
    }
  }
  caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
}
