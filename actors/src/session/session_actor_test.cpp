// The session virtual actor under CAF, hosted by a hand-made activation context (the directory
// drives it the same way): forwarding, streaming, pins, responsiveness while commands block.
#include <caf/all.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include <unistd.h>

#include "triplane/actors/session_host.hpp"
#include "triplane/actors/session_types.hpp"
#include "triplane/storage/database.hpp"

using namespace triplane;
using namespace triplane::actors;
using namespace std::chrono_literals;

namespace {

struct test_context final : runtime::activation_context {
  std::string kind_ = "session", id_;
  caf::event_based_actor* self_ = nullptr;
  std::atomic<int> pins{0};
  const std::string& kind() const override { return kind_; }
  const std::string& id() const override { return id_; }
  uint64_t epoch() const override { return 1; }
  caf::event_based_actor* self() override { return self_; }
  void mark_changed() override {}
  void pin() override { ++pins; }
  void release_pin() override { --pins; }
  caf::error persist_now() override { return {}; }
};

struct activation {
  std::shared_ptr<runtime::virtual_actor> va;
  std::shared_ptr<test_context> ctx;
  caf::actor handle;
};

caf::behavior host(caf::event_based_actor* self, std::shared_ptr<runtime::virtual_actor> va,
                   std::shared_ptr<test_context> ctx) {
  ctx->self_ = self;
  if (auto err = va->restore(*ctx, std::nullopt)) {
    self->quit(err);
    return {};
  }
  return va->make_behavior(*ctx);
}

struct config : caf::actor_system_config {
  config() {
    add_session_message_types(*this);
    set("scheduler.max-threads", 2);
  }
};

struct fixture {
  std::filesystem::path base;
  std::unique_ptr<storage::database> db;
  std::unique_ptr<session_host> sessions;
  config cfg;
  std::unique_ptr<caf::actor_system> sys;

  explicit fixture(std::chrono::milliseconds worker_idle = 5s) {
    char tmpl[] = "/tmp/tp-session-actor-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    base = tmpl;
    storage::database_options opts;
    opts.path = (base / "db").string();
    opts.column_families = session_host::column_families();
    auto d = storage::database::open(opts);
    REQUIRE(d);
    db = std::move(*d);
    session_host_options so;
    so.workspaces_dir = (base / "ws").string();
    so.worker_idle_timeout = worker_idle;
    auto h = session_host::create(*db, so);
    REQUIRE(h);
    sessions = std::move(*h);
    sys = std::make_unique<caf::actor_system>(cfg);
  }
  ~fixture() {
    sys.reset();
    sessions.reset();
    db.reset();
    std::filesystem::remove_all(base);
  }
  activation activate(const std::string& id) {
    activation a;
    a.va = std::shared_ptr<runtime::virtual_actor>(sessions->make_session(id));
    a.ctx = std::make_shared<test_context>();
    a.ctx->id_ = id;
    a.handle = sys->spawn(host, a.va, a.ctx);
    return a;
  }
  /// What the directory does at passivation: snapshot, stop the actor, on_passivate.
  void passivate(activation& a) {
    REQUIRE(a.va->snapshot());
    caf::anon_send_exit(a.handle, caf::exit_reason::user_shutdown);
    a.va->on_passivate();
  }
};

template <class T, class... Ts>
T call(caf::actor_system& sys, const caf::actor& dest, Ts&&... xs) {
  caf::scoped_actor self{sys};
  T out{};
  self->request(dest, 30s, std::forward<Ts>(xs)...)
    .receive([&](T& r) { out = std::move(r); },
             [&](caf::error& e) { FAIL("unexpected error: " << describe(e)); });
  return out;
}

caf::error call_error(caf::actor_system& sys, const caf::actor& dest, caf::message msg) {
  caf::scoped_actor self{sys};
  caf::error out;
  self->request(dest, 30s, std::move(msg)).receive([](caf::message&) {}, [&](caf::error& e) { out = e; });
  return out;
}

/// Threads of this process.
size_t thread_count() {
  size_t n = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

exec_request shell(const std::string& s) {
  exec_request r;
  r.shell = s;
  return r;
}

} // namespace

TEST_CASE("the session actor runs commands and file operations through its worker", "[session][actor]") {
  fixture f;
  auto a = f.activate("s1");
  file_write_request w{"hello.txt", "hi there", 0644, false, false};
  auto e = call<file_entry>(*f.sys, a.handle, file_write_atom::value, w);
  CHECK(e.size == 8);
  auto r = call<exec_result>(*f.sys, a.handle, exec_atom::value, shell("cat hello.txt; exit 4"));
  CHECK(r.stdout_data == "hi there");
  CHECK(r.exit_code == 4);
  CHECK(call<bool>(*f.sys, a.handle, kv_put_atom::value, std::string("k"), std::string("v")));
  auto v = call<kv_value>(*f.sys, a.handle, kv_get_atom::value, std::string("k"));
  CHECK(v.found);
  CHECK(v.value == "v");
  CHECK_FALSE(call<kv_value>(*f.sys, a.handle, kv_get_atom::value, std::string("nope")).found);
  auto err = call_error(*f.sys, a.handle,
                        caf::make_message(file_read_atom::value, file_read_request{"../etc/passwd", 0, 0}));
  CHECK(code_of(err) == errc::invalid_argument);
  auto empty = call_error(*f.sys, a.handle, caf::make_message(exec_atom::value, exec_request{}));
  CHECK(code_of(empty) == errc::invalid_argument);
  CHECK(a.ctx->pins == 0);
  f.passivate(a);
}

TEST_CASE("streaming exec delivers chunks to the sink before the result", "[session][actor]") {
  fixture f;
  auto a = f.activate("stream");
  caf::scoped_actor self{*f.sys};
  self->send(a.handle, exec_stream_atom::value,
             shell("for i in 1 2 3 4; do echo line$i; sleep 0.05; done"), caf::actor{self});
  std::string streamed;
  uint64_t expected_seq = 0;
  bool done = false;
  exec_result result;
  while (!done) {
    self->receive(
      [&](exec_chunk_atom, const exec_chunk& c) {
        CHECK(c.seq == expected_seq++);
        streamed += c.data;
      },
      [&](exec_result& r) {
        result = std::move(r);
        done = true;
      },
      caf::after(10s) >> [&] { FAIL("no result"); });
  }
  CHECK(streamed == "line1\nline2\nline3\nline4\n");
  CHECK(result.stdout_data == streamed);
  CHECK(expected_seq >= 2);
  f.passivate(a);
}

TEST_CASE("the node answers other actors while sessions run blocking commands", "[session][actor]") {
  fixture f;
  std::vector<activation> busy;
  for (int i = 0; i < 3; ++i) busy.push_back(f.activate("busy" + std::to_string(i)));
  auto pong = f.sys->spawn([]() -> caf::behavior { return {[](int x) { return x; }}; });
  caf::scoped_actor self{*f.sys};
  for (auto& b : busy) self->send(b.handle, exec_atom::value, shell("sleep 1"));
  std::this_thread::sleep_for(200ms);
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 10; ++i)
    self->request(pong, 5s, i).receive([](int) {}, [](caf::error&) { FAIL("ping failed"); });
  auto took = std::chrono::steady_clock::now() - start;
  CHECK(took < 200ms);
  for (size_t i = 0; i < busy.size(); ++i)
    self->receive([](exec_result& r) { CHECK(r.exit_code == 0); }, caf::after(10s) >> [] { FAIL("no reply"); });
  for (auto& b : busy) CHECK(b.ctx->pins == 0);
  self->send_exit(pong, caf::exit_reason::user_shutdown);
  for (auto& b : busy) f.passivate(b);
}

TEST_CASE("a running background process pins the session until it ends", "[session][actor]") {
  fixture f;
  auto a = f.activate("bg");
  auto st = call<bg_status>(*f.sys, a.handle, bg_start_atom::value, shell("sleep 0.3; echo end"));
  CHECK(st.running);
  CHECK(a.ctx->pins == 1);
  auto done = call<bg_status>(*f.sys, a.handle, bg_wait_atom::value, st.bg_id, uint64_t{5000});
  CHECK_FALSE(done.running);
  CHECK(done.result.stdout_data == "end\n");
  for (int i = 0; i < 100 && a.ctx->pins != 0; ++i) std::this_thread::sleep_for(10ms);
  CHECK(a.ctx->pins == 0);
  f.passivate(a);
}

TEST_CASE("fork and passivation through the actor keep the files", "[session][actor]") {
  fixture f;
  auto a = f.activate("orig");
  call<file_entry>(*f.sys, a.handle, file_write_atom::value, file_write_request{"d/x.txt", "x", 0644, true, false});
  auto info = call<session_info>(*f.sys, a.handle, fork_atom::value, std::string("copy"));
  CHECK(info.id == "copy");
  f.passivate(a);
  auto b = f.activate("copy");
  auto d = call<file_data>(*f.sys, b.handle, file_read_atom::value, file_read_request{"d/x.txt", 0, 0});
  CHECK(d.data == "x");
  CHECK(call<bool>(*f.sys, b.handle, destroy_atom::value));
  f.passivate(b);
  auto again = f.activate("orig");
  auto still = call<file_data>(*f.sys, again.handle, file_read_atom::value, file_read_request{"d/x.txt", 0, 0});
  CHECK(still.data == "x");
  f.passivate(again);
}

TEST_CASE("a running exec can be cancelled while it blocks", "[session][actor]") {
  fixture f;
  auto a = f.activate("cancel");
  caf::scoped_actor self{*f.sys};
  CHECK_FALSE(call<bool>(*f.sys, a.handle, exec_cancel_atom::value));
  auto start = std::chrono::steady_clock::now();
  self->send(a.handle, exec_atom::value, shell("sleep 30"));
  bool cancelled = false;
  for (int i = 0; i < 100 && !cancelled; ++i) {
    std::this_thread::sleep_for(20ms);
    cancelled = call<bool>(*f.sys, a.handle, exec_cancel_atom::value);
  }
  CHECK(cancelled);
  self->receive(
    [&](exec_result& r) {
      CHECK(r.term_signal == 9);
      CHECK(r.message.find("cancelled") != std::string::npos);
    },
    caf::after(10s) >> [] { FAIL("no reply"); });
  CHECK(std::chrono::steady_clock::now() - start < 10s);
  auto info = call<session_info>(*f.sys, a.handle, info_atom::value);
  CHECK(info.stored);
  f.passivate(a);
}

TEST_CASE("passivation at shutdown cancels a running exec instead of racing it", "[session][actor]") {
  fixture f;
  auto a = f.activate("shutdown");
  call<file_entry>(*f.sys, a.handle, file_write_atom::value, file_write_request{"keep.txt", "k", 0644, false, false});
  caf::scoped_actor self{*f.sys};
  self->send(a.handle, exec_atom::value, shell("echo partial > p.txt; sleep 30"));
  std::this_thread::sleep_for(300ms);
  auto start = std::chrono::steady_clock::now();
  f.passivate(a);  // what the directory does for pinned sessions at shutdown
  CHECK(std::chrono::steady_clock::now() - start < 10s);
  auto b = f.activate("shutdown");
  auto d = call<file_data>(*f.sys, b.handle, file_read_atom::value, file_read_request{"keep.txt", 0, 0});
  CHECK(d.data == "k");
  f.passivate(b);
}

namespace {

/// A flow-controlled sink run by the test thread: receives chunks, passes `grant(chunk)` bytes
/// back as credit, records what came and the most bytes ever outstanding.
struct credit_sink_run {
  std::string out;
  uint64_t received = 0, granted = 0, max_outstanding = 0, next_seq = 0;
  bool in_order = true;
  exec_result result;
  std::optional<caf::error> error;
};

template <class Pace>
credit_sink_run run_with_credit(caf::scoped_actor& self, const caf::actor& session,
                                exec_request req, uint64_t window, Pace&& pace) {
  credit_sink_run run;
  self->send(session, exec_stream_atom::value, std::move(req), caf::actor{self}, window);
  bool done = false;
  while (!done) {
    self->receive(
      [&](exec_chunk_atom, const exec_chunk& c) {
        run.in_order = run.in_order && c.seq == run.next_seq++;
        run.out += c.data;
        run.received += c.data.size();
        run.max_outstanding = std::max(run.max_outstanding, run.received - run.granted);
        auto sender = caf::actor_cast<caf::actor>(self->current_sender());
        if (pace(c.data.size())) {
          self->send(sender, exec_credit_atom::value, uint64_t{c.data.size()});
          run.granted += c.data.size();
        }
      },
      [&](exec_result& r) {
        run.result = std::move(r);
        done = true;
      },
      [&](caf::error& e) {
        run.error = e;
        done = true;
      },
      caf::after(60s) >> [&] {
        FAIL("no result");
        done = true;
      });
  }
  return run;
}

std::string numbers(int n) {
  std::string s;
  for (int i = 1; i <= n; ++i) s += std::to_string(i) + "\n";
  return s;
}

} // namespace

TEST_CASE("a sink that grants credit slowly receives all output in order with at most its window "
          "outstanding and the exec succeeds", "[session][actor][flow]") {
  fixture f;
  auto a = f.activate("flow");
  caf::scoped_actor self{*f.sys};
  auto req = shell("seq 1 200000");  // ~1.3 MB
  req.limits.stdout_cap_bytes = 8u << 20;
  const uint64_t window = 16 * 1024;
  int chunks = 0;
  auto run = run_with_credit(self, a.handle, req, window, [&](size_t) {
    if (++chunks % 4 == 0) std::this_thread::sleep_for(2ms);  // a slow consumer
    return true;
  });
  REQUIRE_FALSE(run.error);
  CHECK(run.result.exited);
  CHECK(run.result.exit_code == 0);
  CHECK_FALSE(run.result.stdout_truncated);
  CHECK(run.in_order);
  CHECK(run.out == numbers(200000));
  CHECK(run.max_outstanding <= window);
  CHECK(run.result.stdout_data.empty());  // under flow control the output went to the sink only
  CHECK(a.ctx->pins == 0);
  f.passivate(a);
}

TEST_CASE("a sink that grants no more credit holds a fast command in its pipe until its timeout",
          "[session][actor][flow]") {
  fixture f;
  auto a = f.activate("stuck");
  caf::scoped_actor self{*f.sys};
  auto req = shell("yes | head -c 100000000");
  req.limits.stdout_cap_bytes = 200u << 20;
  req.timeout_ms = 1500;
  const uint64_t window = 8192;
  auto start = std::chrono::steady_clock::now();
  auto run = run_with_credit(self, a.handle, req, window, [](size_t) { return false; });
  REQUIRE_FALSE(run.error);
  CHECK(run.received == window);  // exactly the window, nothing more was read from the pipe
  CHECK(run.result.timed_out);
  CHECK(run.result.term_signal == 9);
  CHECK(std::chrono::steady_clock::now() - start < 10s);
  SECTION("and a window of 0 is refused") {
    self->send(a.handle, exec_stream_atom::value, shell("true"), caf::actor{self}, uint64_t{0});
    self->receive([](exec_result&) { FAIL("ran"); },
                  [](caf::error& e) { CHECK(code_of(e) == errc::invalid_argument); },
                  caf::after(10s) >> [] { FAIL("no reply"); });
  }
  f.passivate(a);
}

TEST_CASE("a flow-controlled exec held by a sink that grants nothing ends at once when cancelled, "
          "not at its timeout", "[session][actor][flow][cancel]") {
  fixture f;
  auto a = f.activate("held");
  caf::scoped_actor self{*f.sys};
  auto req = shell("yes | head -c 100000000");
  req.limits.stdout_cap_bytes = 200u << 20;
  req.timeout_ms = 30000;
  const uint64_t window = 8192;
  self->send(a.handle, exec_stream_atom::value, req, caf::actor{self}, window);
  uint64_t received = 0;
  // The window arrives, then nothing: the command waits on its full pipe.
  while (received < window)
    self->receive([&](exec_chunk_atom, const exec_chunk& c) { received += c.data.size(); },
                  caf::after(10s) >> [] { FAIL("no output"); });
  std::this_thread::sleep_for(300ms);
  auto start = std::chrono::steady_clock::now();
  CHECK(call<bool>(*f.sys, a.handle, exec_cancel_atom::value, self->address()));
  bool done = false;
  while (!done)
    self->receive([&](exec_chunk_atom, const exec_chunk& c) { received += c.data.size(); },
                  [&](exec_result& r) {
                    CHECK(r.term_signal == 9);
                    CHECK(r.message.find("cancelled") != std::string::npos);
                    done = true;
                  },
                  caf::after(20s) >> [&] {
                    FAIL("no result");
                    done = true;
                  });
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(received == window);
  CHECK(a.ctx->pins == 0);
  f.passivate(a);
}

TEST_CASE("output still in the pipe when the command has ended is delivered as credit comes, and "
          "dropped at the deadline when none comes", "[session][actor][flow]") {
  fixture f;
  auto a = f.activate("tail");
  caf::scoped_actor self{*f.sys};
  // 40000 bytes: the window, the rest fits the pipe, so the command exits at once.
  auto req = shell("head -c 40000 /dev/zero | tr '\\0' 'q'");
  req.limits.stdout_cap_bytes = 1u << 20;
  req.timeout_ms = 1500;
  const uint64_t window = 8192;
  SECTION("credit after the exit gets the rest") {
    bool paused = false;
    auto run = run_with_credit(self, a.handle, req, window, [&](size_t) {
      if (!paused) {
        paused = true;
        std::this_thread::sleep_for(500ms);  // the command ends meanwhile
      }
      return true;
    });
    REQUIRE_FALSE(run.error);
    CHECK(run.result.exit_code == 0);
    CHECK_FALSE(run.result.stdout_truncated);
    CHECK(run.out == std::string(40000, 'q'));
  }
  SECTION("no credit: the rest is dropped at the deadline and the result says so") {
    auto run = run_with_credit(self, a.handle, req, window, [](size_t) { return false; });
    REQUIRE_FALSE(run.error);
    CHECK(run.received == window);
    CHECK(run.result.exited);
    CHECK(run.result.exit_code == 0);
    CHECK(run.result.stdout_truncated);
    CHECK(run.result.message.find("dropped") != std::string::npos);
  }
  f.passivate(a);
}

TEST_CASE("credit is a bound on what the session sends, not a kill: a sink that stalls and then "
          "resumes gets everything", "[session][actor][flow]") {
  fixture f;
  auto a = f.activate("resume");
  caf::scoped_actor self{*f.sys};
  auto req = shell("head -c 3000000 /dev/zero | tr '\\0' 'z'; echo; echo done >&2");
  req.limits.stdout_cap_bytes = 8u << 20;
  const uint64_t window = 64 * 1024;
  uint64_t seen = 0;
  bool stalled = false;
  auto run = run_with_credit(self, a.handle, req, window, [&](size_t n) {
    seen += n;
    if (!stalled && seen >= window) {  // hold the whole window for a while
      stalled = true;
      std::this_thread::sleep_for(500ms);
    }
    return true;
  });
  REQUIRE_FALSE(run.error);
  CHECK(run.result.exit_code == 0);
  CHECK(run.out == std::string(3000000, 'z') + "\ndone\n");  // stdout and stderr, each in order
  CHECK(run.max_outstanding <= window);
  f.passivate(a);
}

TEST_CASE("an exec queued behind another is cancelled by its requester and never runs, and the "
          "running one is not touched", "[session][actor][cancel]") {
  fixture f;
  auto a = f.activate("queue");
  caf::scoped_actor first{*f.sys};
  caf::scoped_actor second{*f.sys};
  first->send(a.handle, exec_atom::value, shell("sleep 1; echo first"));
  std::this_thread::sleep_for(200ms);
  second->send(a.handle, exec_atom::value, shell("echo ran > marker.txt"));
  std::this_thread::sleep_for(100ms);
  CHECK(call<bool>(*f.sys, a.handle, exec_cancel_atom::value, second->address()));
  second->receive([](exec_result&) { FAIL("the queued exec ran"); },
                  [](caf::error& e) { CHECK(code_of(e) == errc::cancelled); },
                  caf::after(10s) >> [] { FAIL("no reply"); });
  first->receive(
    [](exec_result& r) {
      CHECK(r.exit_code == 0);
      CHECK(r.stdout_data == "first\n");
    },
    caf::after(10s) >> [] { FAIL("no reply"); });
  auto err = call_error(*f.sys, a.handle, caf::make_message(file_stat_atom::value, std::string("marker.txt")));
  CHECK(code_of(err) == errc::not_found);
  // Nothing left to cancel for either of them now.
  CHECK_FALSE(call<bool>(*f.sys, a.handle, exec_cancel_atom::value, second->address()));
  CHECK_FALSE(call<bool>(*f.sys, a.handle, exec_cancel_atom::value, first->address()));
  SECTION("cancelling by requester kills that requester's running exec") {
    first->send(a.handle, exec_atom::value, shell("sleep 30"));
    std::this_thread::sleep_for(500ms);  // the session is idle: it runs by now
    CHECK(call<bool>(*f.sys, a.handle, exec_cancel_atom::value, first->address()));
    first->receive([](exec_result& r) { CHECK(r.term_signal == 9); },
                   [](caf::error& e) { FAIL("not run: " << describe(e)); },
                   caf::after(10s) >> [] { FAIL("no reply"); });
  }
  CHECK(a.ctx->pins == 0);
  f.passivate(a);
}

TEST_CASE("two session hosts cannot share a workspaces directory", "[sandbox][session]") {
  fixture f;
  storage::database_options opts;
  opts.path = (f.base / "db2").string();
  opts.column_families = session_host::column_families();
  auto db2 = storage::database::open(opts);
  REQUIRE(db2);
  session_host_options so;
  so.workspaces_dir = (f.base / "ws").string();
  auto second = session_host::create(**db2, so);
  REQUIRE_FALSE(second);
  CHECK(code_of(second.error()) == errc::unavailable);
  CHECK(describe(second.error()).find("in use by another node") != std::string::npos);
  // Once the first host is gone, the directory is free again.
  f.sessions.reset();
  auto third = session_host::create(**db2, so);
  CHECK(third);
}

TEST_CASE("an idle live session holds no worker thread; its next operation starts one",
          "[sandbox][session]") {
  fixture f(200ms);
  constexpr int sessions = 20;
  std::vector<activation> live;
  for (int i = 0; i < sessions; ++i) live.push_back(f.activate("idle" + std::to_string(i)));
  // Activated, no operation yet: no worker threads.
  std::this_thread::sleep_for(100ms);
  const auto before = thread_count();
  // Each session's worker runs its operation on its own thread while it lasts...
  for (auto& a : live)
    REQUIRE(call<bool>(*f.sys, a.handle, kv_put_atom::value, std::string("k"), std::string("v")));
  const auto busy = thread_count();
  CHECK(busy >= before + sessions);
  // ... and stops after the idle timeout, while the sessions stay live.
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (thread_count() > before && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(50ms);
  INFO("threads: before " << before << ", busy " << busy << ", now " << thread_count());
  CHECK(thread_count() <= before);
  for (auto& a : live) CHECK(call<kv_value>(*f.sys, a.handle, kv_get_atom::value, std::string("k")).value == "v");
  for (auto& a : live) f.passivate(a);
}

TEST_CASE("kv reads of an idle session are answered without waking its worker, and never overtake "
          "an operation sent before them",
          "[sandbox][session]") {
  fixture f(200ms);
  auto a = f.activate("reads");
  caf::scoped_actor self{*f.sys};
  // Order: each get is sent right behind a put, without waiting for the put's answer; the put
  // is still queued for (or running on) the worker when the get arrives, so the get waits too.
  for (int i = 0; i < 50; ++i) {
    auto value = "v" + std::to_string(i);
    auto put = self->request(a.handle, 30s, kv_put_atom::value, std::string("k"), value);
    auto get = self->request(a.handle, 30s, kv_get_atom::value, std::string("k"));
    auto list = self->request(a.handle, 30s, kv_list_atom::value, std::string("k"));
    put.receive([](bool) {}, [](caf::error& e) { FAIL(describe(e)); });
    get.receive([&](kv_value& v) { CHECK(v.value == value); }, [](caf::error& e) { FAIL(describe(e)); });
    list.receive(
      [&](std::vector<kv_entry>& v) {
        REQUIRE(v.size() == 1);
        CHECK(v[0].value == value);
      },
      [](caf::error& e) { FAIL(describe(e)); });
  }
  // Idle: once the worker has stopped, reads start no thread.
  auto deadline = std::chrono::steady_clock::now() + 10s;
  const auto idle = [&] {
    auto before = thread_count();
    std::this_thread::sleep_for(300ms);
    return thread_count() == before;
  };
  while (!idle() && std::chrono::steady_clock::now() < deadline) {}
  const auto before = thread_count();
  for (int i = 0; i < 200; ++i)
    CHECK(call<kv_value>(*f.sys, a.handle, kv_get_atom::value, std::string("k")).value == "v49");
  CHECK(call<std::vector<kv_entry>>(*f.sys, a.handle, kv_list_atom::value, std::string()).size() == 1);
  CHECK(thread_count() == before);  // a started worker would stay for its 200 ms idle timeout
  CHECK(a.ctx->pins == 0);
  f.passivate(a);
}

TEST_CASE("a live session keeps a sandbox ready for its next exec only while its worker lives",
          "[sandbox][session]") {
  fixture f(300ms);
  // bwrap processes this process started (children are listed per thread that forked them).
  auto bwraps = [] {
    size_t n = 0;
    for (auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
      std::ifstream children(task.path() / "children");
      int pid = 0;
      while (children >> pid) {
        std::ifstream comm("/proc/" + std::to_string(pid) + "/comm");
        std::string name;
        if (comm >> name && name == "bwrap") ++n;
      }
    }
    return n;
  };
  auto wait_for = [&](auto pred) {
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (!pred() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(20ms);
    return pred();
  };
  auto a = f.activate("warm");
  REQUIRE(call<file_entry>(*f.sys, a.handle, file_write_atom::value,
                           file_write_request{"x", "1", 0644, false, false}).size == 1);
  // The node's pool keeps its own pre-started sandboxes: count on top of them.
  std::this_thread::sleep_for(500ms);
  const auto base = bwraps();
  auto r = call<exec_result>(*f.sys, a.handle, exec_atom::value, shell("cat x"));
  CHECK(r.stdout_data == "1");
  // One command since activation: none kept (a session woken for one command would only pay
  // for a second setup).
  std::this_thread::sleep_for(200ms);
  CHECK(bwraps() <= base);
  auto second = call<exec_result>(*f.sys, a.handle, exec_atom::value, shell("cat x"));
  CHECK(second.stdout_data == "1");
  INFO("bwrap children before: " << base << ", now: " << bwraps());
  CHECK(wait_for([&] { return bwraps() > base; }));  // the next exec's sandbox
  auto again = call<exec_result>(*f.sys, a.handle, exec_atom::value, shell("cat x; echo 2 > x"));
  CHECK(again.stdout_data == "1");
  CHECK(call<exec_result>(*f.sys, a.handle, exec_atom::value, shell("cat x")).stdout_data == "2\n");
  // The worker stops after its idle timeout and takes the ready sandbox with it.
  CHECK(wait_for([&] { return bwraps() <= base; }));
  CHECK(call<exec_result>(*f.sys, a.handle, exec_atom::value, shell("cat x")).stdout_data == "2\n");
  f.passivate(a);
  CHECK(wait_for([&] { return bwraps() <= base; }));
}
