// Behaviour of the virtual-actor directory: activation, ordering, passivation, durability,
// failures, against a real RocksDB state store in a temporary directory.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include <unistd.h>

#include <caf/all.hpp>

#include "triplane/runtime/directory.hpp"
#include "triplane/storage/state_store.hpp"

using namespace std::chrono_literals;
using namespace triplane;
using namespace triplane::runtime;

namespace {

using incr_atom = caf::atom_constant<caf::atom("incr")>;
using boom_atom = caf::atom_constant<caf::atom("boom")>;
using pin_atom = caf::atom_constant<caf::atom("pin")>;
using log_atom = caf::atom_constant<caf::atom("log")>;
using tick_atom_t = caf::atom_constant<caf::atom("ticktock")>;
using poke_atom = caf::atom_constant<caf::atom("poke")>;

/// Counts activations of the test kinds across the whole process.
std::atomic<int> constructed{0};
/// While set, every counter's snapshot() fails, as a full disk would make it.
std::atomic<bool> snapshots_fail{false};

/// A test kind: an integer counter plus the ordered list of values it was sent.
class counter final : public virtual_actor {
public:
  caf::error restore(activation_context&, const std::optional<storage::stored_state>& state) override {
    ++constructed;
    if (!state) return caf::none;
    if (state->payload.size() < 8) return make_error(errc::corrupted, "counter payload too short");
    std::memcpy(&value_, state->payload.data(), 8);
    log_.assign(state->payload.begin() + 8, state->payload.end());
    return caf::none;
  }

  caf::behavior make_behavior(activation_context& ctx) override {
    auto* c = &ctx;
    return {
      [this, c](incr_atom, int64_t n) {
        value_ += n;
        c->mark_changed();
        return value_;
      },
      [this](caf::get_atom) { return value_; },
      [this, c](log_atom, int32_t x) {
        log_ += std::to_string(x) + ",";
        c->mark_changed();
        return static_cast<int64_t>(log_.size());
      },
      [this](log_atom) { return log_; },
      [](boom_atom) -> int64_t { throw std::runtime_error("boom requested"); },
      [c](pin_atom, bool on) {
        if (on) c->pin(); else c->release_pin();
        return on;
      },
      [c](poke_atom, const caf::actor& target) {
        // A plain send: whatever `target` answers comes back as a message, an error included.
        c->self()->send(target, poke_atom::value);
        return true;
      },
      [c](tick_atom_t) {
        // A self-sent timer: arrives directly, not through the directory.
        c->self()->delayed_send(c->self(), 20ms, tick_atom_t::value);
      },
    };
  }

  expected<std::string> snapshot() override {
    if (snapshots_fail) return make_error(errc::io_error, "no space left on device (test)");
    std::string out(8, '\0');
    std::memcpy(out.data(), &value_, 8);
    out += log_;
    return out;
  }

  uint32_t schema_version() const override { return 1; }

private:
  int64_t value_ = 0;
  std::string log_;
};

struct fixture {
  std::filesystem::path dir;
  std::unique_ptr<storage::state_store> store;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  directory dir_handle;

  explicit fixture(std::vector<kind_spec> kinds = default_kinds(), directory_options opts = {}) {
    static std::atomic<int> counter_{0};
    dir = std::filesystem::temp_directory_path() /
          ("triplane-dir-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++));
    std::filesystem::remove_all(dir);
    open_store();
    cfg.set("scheduler.max-threads", 2);
    sys = std::make_unique<caf::actor_system>(cfg);
    if (opts.idle_check_granularity == 1000ms) opts.idle_check_granularity = 20ms;
    auto started = directory::start(*sys, *store, std::move(kinds), std::move(opts));
    REQUIRE(started);
    dir_handle = std::move(*started);
  }

  void open_store() {
    storage::store_options so;
    so.path = dir.string();
    auto opened = storage::state_store::open(so);
    REQUIRE(opened);
    store = std::move(*opened);
  }

  ~fixture() {
    (void)dir_handle.stop(*sys, 5s);
    sys.reset();
    store.reset();
    std::filesystem::remove_all(dir);
  }

  static std::vector<kind_spec> default_kinds() {
    kind_spec lazy{"counter", [](const std::string&) { return std::make_unique<counter>(); }, 60s,
                   persistence::at_passivation, std::nullopt};
    kind_spec durable{"durable", [](const std::string&) { return std::make_unique<counter>(); }, 60s,
                      persistence::every_change, std::nullopt};
    kind_spec quick{"quick", [](const std::string&) { return std::make_unique<counter>(); }, 100ms,
                    persistence::at_passivation, std::nullopt};
    return {lazy, durable, quick};
  }

  template <class T, class... Ts>
  expected<T> call(const std::string& kind, const std::string& id, Ts... xs) {
    caf::scoped_actor self{*sys};
    expected<T> result = make_error(errc::internal, "no reply");
    self->request(dir_handle.front(), 5s, call_atom::value, kind, id, caf::make_message(xs...))
      .receive([&](T& x) { result = std::move(x); }, [&](caf::error& e) { result = std::move(e); });
    return result;
  }

  bool passivate(const std::string& kind, const std::string& id) {
    caf::scoped_actor self{*sys};
    bool out = false;
    self->request(dir_handle.front(), 5s, passivate_atom::value, kind, id)
      .receive([&](bool b) { out = b; }, [&](caf::error&) {});
    return out;
  }

  directory_stats stats() {
    caf::scoped_actor self{*sys};
    directory_stats out;
    self->request(dir_handle.front(), 5s, stats_atom::value)
      .receive([&](directory_stats& s) { out = s; }, [&](caf::error&) {});
    return out;
  }
};

} // namespace

TEST_CASE("a thousand concurrent first messages to one id activate it once", "[directory]") {
  fixture f;
  constructed = 0;
  caf::scoped_actor self{*f.sys};
  constexpr int n = 1000;
  // A thousand actors each send their first message at once, half through the front, half
  // straight to the shard; each reports the reply to the test.
  caf::actor collector = self;
  for (int i = 0; i < n; ++i) {
    auto target = (i % 2 == 0) ? f.dir_handle.front() : f.dir_handle.route("counter", "hot");
    f.sys->spawn([target, collector](caf::event_based_actor* me) {
      me->request(target, 10s, call_atom::value, std::string{"counter"}, std::string{"hot"},
                  caf::make_message(incr_atom::value, int64_t{1}))
        .then([me, collector](int64_t v) { me->send(collector, v); },
              [me, collector](caf::error&) { me->send(collector, int64_t{-1}); });
    });
  }
  int ok = 0;
  int64_t max_seen = 0;
  for (int i = 0; i < n; ++i)
    self->receive([&](int64_t v) {
      if (v > 0) ++ok;
      max_seen = std::max(max_seen, v);
    });
  CHECK(ok == n);
  CHECK(max_seen == n);
  CHECK(constructed == 1);
  CHECK(f.call<int64_t>("counter", "hot", caf::get_atom::value).value() == n);
  CHECK(f.stats().activations == 1);
}

TEST_CASE("concurrent first messages from many actors activate once and all arrive", "[directory]") {
  fixture f;
  constructed = 0;
  constexpr int senders = 50;
  constexpr int per_sender = 20;
  std::vector<caf::actor> spawned;
  caf::scoped_actor self{*f.sys};
  auto front = f.dir_handle.front();
  for (int s = 0; s < senders; ++s) {
    spawned.push_back(f.sys->spawn([front, per_sender = per_sender](caf::event_based_actor* me) -> caf::behavior {
      for (int i = 0; i < per_sender; ++i)
        me->request(front, 10s, call_atom::value, std::string{"counter"}, std::string{"race"},
                    caf::make_message(incr_atom::value, int64_t{1}))
          .then([](int64_t) {});
      return {};
    }));
  }
  for (auto& a : spawned) self->wait_for(a);
  CHECK(constructed == 1);
  CHECK(f.call<int64_t>("counter", "race", caf::get_atom::value).value() == senders * per_sender);
}

TEST_CASE("messages sent during activation are delivered in order", "[directory]") {
  fixture f;
  caf::scoped_actor self{*f.sys};
  // Fire-and-forget sends from one sender: CAF keeps per-sender order through the shard.
  for (int32_t i = 0; i < 200; ++i)
    self->send(f.dir_handle.front(), call_atom::value, std::string{"counter"}, std::string{"ordered"},
               caf::make_message(log_atom::value, i));
  std::string expected_log;
  for (int i = 0; i < 200; ++i) expected_log += std::to_string(i) + ",";
  auto log = f.call<std::string>("counter", "ordered", log_atom::value);
  REQUIRE(log);
  CHECK(*log == expected_log);
}

TEST_CASE("order holds across a passivation that races with new messages", "[directory]") {
  fixture f;
  caf::scoped_actor self{*f.sys};
  for (int32_t i = 0; i < 300; ++i) {
    self->send(f.dir_handle.front(), call_atom::value, std::string{"counter"}, std::string{"flappy"},
               caf::make_message(log_atom::value, i));
    // Sent behind calls that may still be on their way to the activation: they all come first.
    // (Calls go through the router, passivation requests through the shard: calls sent after
    // this request may still reach the activation before it stops.)
    if (i % 50 == 25)
      self->send(f.dir_handle.front(), passivate_atom::value, std::string{"counter"}, std::string{"flappy"});
    // Waited for: the calls after it meet a stopped activation (or one stopping) and must
    // bring it back with everything stored, in order.
    if (i % 50 == 49) {
      bool passivated = false;
      self->request(f.dir_handle.front(), 5s, passivate_atom::value, std::string{"counter"},
                    std::string{"flappy"})
        .receive([&](bool b) { passivated = b; }, [&](caf::error& e) { FAIL(describe(e)); });
      CHECK(passivated);
    }
  }
  std::string expected_log;
  for (int i = 0; i < 300; ++i) expected_log += std::to_string(i) + ",";
  auto log = f.call<std::string>("counter", "flappy", log_atom::value);
  REQUIRE(log);
  CHECK(*log == expected_log);
  auto st = f.stats();
  INFO("activations " << st.activations << ", passivations " << st.passivations);
  CHECK(st.activations >= 6);
}

TEST_CASE("calls through route() keep each sender's order while passivations race with them",
          "[directory]") {
  fixture f;
  static constexpr int32_t senders = 4;
  static constexpr int32_t per_sender = 500;
  caf::scoped_actor self{*f.sys};
  // Each sender fires its calls without waiting, so they meet the id live (delivered straight to
  // the activation), passivating (buffered at the shard) and absent (queued at the shard).
  auto route = f.dir_handle.route("counter", "braided");
  std::vector<caf::actor> spawned;
  for (int32_t s = 0; s < senders; ++s)
    spawned.push_back(f.sys->spawn([route, s](caf::event_based_actor* me) -> caf::behavior {
      // Bursts of 25 calls a millisecond apart, so that passivations fall between and inside them.
      me->send(me, int32_t{0});
      return {[me, route, s](int32_t from) {
        int32_t to = std::min(from + 25, per_sender);
        for (int32_t i = from; i < to; ++i)
          me->send(route, call_atom::value, std::string{"counter"}, std::string{"braided"},
                   caf::make_message(log_atom::value, s * 100000 + i));
        if (to < per_sender) me->delayed_send(me, 1ms, to);
        else me->quit();
      },
      [](int64_t) {}};  // the activation's replies (plain sends are answered too)
    }));
  // Passivations from another sender, while the senders run.
  for (int i = 0; i < 40; ++i) {
    self->send(f.dir_handle.front(), passivate_atom::value, std::string{"counter"}, std::string{"braided"});
    std::this_thread::sleep_for(1ms);
  }
  for (auto& a : spawned) self->wait_for(a);
  // Every call has reached the directory; wait until all are applied, then check the log.
  std::string log;
  for (int attempt = 0; attempt < 200; ++attempt) {
    auto got = f.call<std::string>("counter", "braided", log_atom::value);
    REQUIRE(got);
    log = *got;
    if (std::count(log.begin(), log.end(), ',') == senders * per_sender) break;
    std::this_thread::sleep_for(10ms);
  }
  std::vector<int32_t> next(senders, 0);
  size_t start = 0;
  bool in_order = true;
  while (start < log.size()) {
    auto comma = log.find(',', start);
    int32_t v = std::stoi(log.substr(start, comma - start));
    int32_t s = v / 100000;
    if (v % 100000 != next[static_cast<size_t>(s)]) in_order = false;
    ++next[static_cast<size_t>(s)];
    start = comma + 1;
  }
  CHECK(in_order);
  for (int32_t s = 0; s < senders; ++s) CHECK(next[static_cast<size_t>(s)] == per_sender);
  CHECK(f.stats().activations > 1);
}

TEST_CASE("a stopped directory answers calls through route() with unavailable", "[directory]") {
  fixture f;
  REQUIRE(f.call<int64_t>("counter", "gone", incr_atom::value, int64_t{1}));
  auto route = f.dir_handle.route("counter", "gone");
  REQUIRE(f.dir_handle.stop(*f.sys, 5s));
  caf::scoped_actor self{*f.sys};
  caf::error got;
  self->request(route, 5s, call_atom::value, std::string{"counter"}, std::string{"gone"},
                caf::make_message(caf::get_atom::value))
    .receive([](int64_t) {}, [&](caf::error& e) { got = std::move(e); });
  INFO(describe(got));
  CHECK(code_of(got) == errc::unavailable);
}

TEST_CASE("an error that comes back as a plain message does not stop the activation", "[directory]") {
  fixture f;
  constructed = 0;
  REQUIRE(f.call<int64_t>("counter", "poker", incr_atom::value, int64_t{5}).value() == 5);
  // An actor that answers every message with an error.
  auto grump = f.sys->spawn([](caf::event_based_actor*) -> caf::behavior {
    return {[](poke_atom) -> caf::result<bool> { return make_error(errc::internal, "no pokes, please"); }};
  });
  REQUIRE(f.call<bool>("counter", "poker", poke_atom::value, grump).value());
  std::this_thread::sleep_for(100ms);  // the error reaches the activation as a message
  // Same activation, unsaved state intact (the kind persists only at passivation).
  CHECK(f.call<int64_t>("counter", "poker", caf::get_atom::value).value() == 5);
  CHECK(constructed == 1);
  CHECK(f.stats().failures == 0);
  caf::anon_send_exit(grump, caf::exit_reason::user_shutdown);
}

TEST_CASE("state survives passivation and rehydration exactly", "[directory]") {
  fixture f;
  for (int i = 0; i < 10; ++i) REQUIRE(f.call<int64_t>("counter", "a", incr_atom::value, int64_t{i}));
  REQUIRE(f.call<int64_t>("counter", "a", log_atom::value, int32_t{7}));
  auto before = f.call<std::string>("counter", "a", log_atom::value).value();
  constructed = 0;
  REQUIRE(f.passivate("counter", "a"));
  CHECK(f.stats().live == 0);
  auto after = f.call<int64_t>("counter", "a", caf::get_atom::value);
  INFO((after ? std::string{"ok"} : describe(after.error())));
  REQUIRE(after);
  CHECK(*after == 45);
  CHECK(f.call<std::string>("counter", "a", log_atom::value).value() == before);
  CHECK(constructed == 1);
  auto stored = f.store->load({"counter", "a"});
  REQUIRE(stored);
  REQUIRE(stored->has_value());
  CHECK((*stored)->schema_version == 1);
}

TEST_CASE("an idle actor passivates after its kind's idle timeout and a timer does not keep it live",
          "[directory]") {
  fixture f;
  REQUIRE(f.call<int64_t>("quick", "sleepy", incr_atom::value, int64_t{3}));
  // Start a self-rescheduling 20 ms timer inside the actor: it must not count as use.
  caf::scoped_actor self{*f.sys};
  self->send(f.dir_handle.front(), call_atom::value, std::string{"quick"}, std::string{"sleepy"},
             caf::make_message(tick_atom_t::value));
  auto deadline = std::chrono::steady_clock::now() + 3s;
  while (f.stats().live > 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(20ms);
  CHECK(f.stats().live == 0);
  CHECK(f.stats().passivations >= 1);
  CHECK(f.call<int64_t>("quick", "sleepy", caf::get_atom::value).value() == 3);
}

TEST_CASE("an actor whose state cannot be stored stays live until it can be", "[directory]") {
  fixture f;
  REQUIRE(f.call<int64_t>("quick", "fragile", incr_atom::value, int64_t{7}));
  constructed = 0;
  snapshots_fail = true;
  struct reset_flag {
    ~reset_flag() { snapshots_fail = false; }
  } reset;
  // Several idle timeouts (100 ms) pass: each attempt fails to store and keeps it live.
  std::this_thread::sleep_for(500ms);
  CHECK(f.stats().live == 1);
  CHECK(f.stats().passivations == 0);
  CHECK_FALSE(f.passivate("quick", "fragile"));
  CHECK(f.call<int64_t>("quick", "fragile", caf::get_atom::value).value() == 7);
  CHECK(constructed == 0);  // the same activation answered: nothing was reloaded
  snapshots_fail = false;
  auto deadline = std::chrono::steady_clock::now() + 3s;
  while (f.stats().live > 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(20ms);
  CHECK(f.stats().live == 0);
  CHECK(f.call<int64_t>("quick", "fragile", caf::get_atom::value).value() == 7);
  CHECK(constructed == 1);
}

TEST_CASE("a pinned actor is not passivated until released", "[directory]") {
  fixture f;
  REQUIRE(f.call<bool>("quick", "busy", pin_atom::value, true));
  std::this_thread::sleep_for(400ms);
  CHECK(f.stats().live == 1);
  CHECK_FALSE(f.passivate("quick", "busy"));
  REQUIRE(f.call<bool>("quick", "busy", pin_atom::value, false));
  auto deadline = std::chrono::steady_clock::now() + 3s;
  while (f.stats().live > 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(20ms);
  CHECK(f.stats().live == 0);
}

TEST_CASE("the live cap passivates the least recently used first", "[directory]") {
  directory_options opts;
  opts.max_live = 3;
  opts.shards = 1;
  fixture f(fixture::default_kinds(), opts);
  for (auto id : {"a", "b", "c"}) REQUIRE(f.call<int64_t>("counter", id, incr_atom::value, int64_t{1}));
  REQUIRE(f.call<int64_t>("counter", "a", incr_atom::value, int64_t{1}));  // b is now the oldest
  constructed = 0;
  REQUIRE(f.call<int64_t>("counter", "d", incr_atom::value, int64_t{1}));
  std::this_thread::sleep_for(100ms);
  CHECK(f.stats().live == 3);
  CHECK(f.stats().passivations == 1);
  // a, c, d are live: touching them constructs nothing; b rehydrates with its state.
  REQUIRE(f.call<int64_t>("counter", "a", caf::get_atom::value));
  CHECK(constructed == 1);  // d only
  CHECK(f.call<int64_t>("counter", "b", caf::get_atom::value).value() == 1);
  CHECK(constructed == 2);
}

TEST_CASE("a durable kind's acknowledged change is stored before the reply", "[directory]") {
  fixture f;
  REQUIRE(f.call<int64_t>("durable", "d", incr_atom::value, int64_t{5}).value() == 5);
  auto stored = f.store->load({"durable", "d"});
  REQUIRE(stored);
  REQUIRE(stored->has_value());
  int64_t v = 0;
  std::memcpy(&v, (*stored)->payload.data(), 8);
  CHECK(v == 5);
  // A lazily persisted kind has written nothing yet.
  REQUIRE(f.call<int64_t>("counter", "c", incr_atom::value, int64_t{5}));
  auto lazy = f.store->load({"counter", "c"});
  REQUIRE(lazy);
  CHECK_FALSE(lazy->has_value());
}

TEST_CASE("an actor that throws restarts from its last persisted state", "[directory]") {
  fixture f;
  REQUIRE(f.call<int64_t>("durable", "x", incr_atom::value, int64_t{2}));
  auto failed = f.call<int64_t>("durable", "x", boom_atom::value);
  REQUIRE_FALSE(failed);
  CHECK(code_of(failed.error()) == errc::internal);
  CHECK(describe(failed.error()).find("durable 'x'") != std::string::npos);
  // The next call activates again and sees the persisted value.
  auto deadline = std::chrono::steady_clock::now() + 3s;
  expected<int64_t> v = make_error(errc::internal, "");
  do {
    v = f.call<int64_t>("durable", "x", caf::get_atom::value);
  } while (!v && std::chrono::steady_clock::now() < deadline);
  REQUIRE(v);
  CHECK(*v == 2);
  CHECK(f.stats().activations == 2);
}

TEST_CASE("corrupted state fails only its own id with an error naming it", "[directory]") {
  fixture f;
  REQUIRE(f.call<int64_t>("durable", "good", incr_atom::value, int64_t{1}));
  REQUIRE(f.call<int64_t>("durable", "bad", incr_atom::value, int64_t{1}));
  REQUIRE(f.passivate("durable", "bad"));
  // Store a payload the kind cannot read (too short for its format).
  auto epoch = f.store->begin_activation({"durable", "bad"});
  REQUIRE(epoch);
  REQUIRE(f.store->save({"durable", "bad"}, *epoch, 1, "xx", storage::durability::process_crash));
  auto failed = f.call<int64_t>("durable", "bad", caf::get_atom::value);
  REQUIRE_FALSE(failed);
  CHECK(code_of(failed.error()) == errc::corrupted);
  CHECK(f.call<int64_t>("durable", "good", caf::get_atom::value).value() == 1);
  CHECK(f.call<int64_t>("durable", "fresh", incr_atom::value, int64_t{4}).value() == 4);
}

TEST_CASE("unknown kinds and malformed ids are refused with clear errors", "[directory]") {
  fixture f;
  auto unknown = f.call<int64_t>("nope", "a", caf::get_atom::value);
  REQUIRE_FALSE(unknown);
  CHECK(code_of(unknown.error()) == errc::not_found);
  CHECK(describe(unknown.error()).find("nope") != std::string::npos);
  auto empty = f.call<int64_t>("counter", "", caf::get_atom::value);
  REQUIRE_FALSE(empty);
  CHECK(code_of(empty.error()) == errc::invalid_argument);
  auto huge = f.call<int64_t>("counter", std::string(5000, 'x'), caf::get_atom::value);
  REQUIRE_FALSE(huge);
  CHECK(code_of(huge.error()) == errc::invalid_argument);
  auto wrong = f.call<int64_t>("counter", "a", std::string{"what"});
  REQUIRE_FALSE(wrong);
  CHECK(code_of(wrong.error()) == errc::invalid_argument);
}

TEST_CASE("kind declarations are validated", "[directory]") {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  auto dir = std::filesystem::temp_directory_path() / ("triplane-kinds-" + std::to_string(::getpid()));
  storage::store_options so;
  so.path = dir.string();
  auto store = storage::state_store::open(so);
  REQUIRE(store);
  kind_spec a;
  a.name = "a";
  a.factory = [](const std::string&) { return std::make_unique<counter>(); };
  std::vector<kind_spec> dup{a, a};
  auto r = directory::start(sys, **store, dup, {});
  REQUIRE_FALSE(r);
  CHECK(describe(r.error()).find("declared twice") != std::string::npos);
  kind_spec b;
  b.name = "b";
  std::vector<kind_spec> nofactory{b};
  CHECK_FALSE(directory::start(sys, **store, nofactory, {}));
  store->reset();
  std::filesystem::remove_all(dir);
}

TEST_CASE("stop passivates every live actor, pinned ones included", "[directory]") {
  fixture f;
  REQUIRE(f.call<int64_t>("counter", "p", incr_atom::value, int64_t{9}));
  REQUIRE(f.call<bool>("counter", "p", pin_atom::value, true));
  REQUIRE(f.call<int64_t>("counter", "q", incr_atom::value, int64_t{8}));
  auto stopped = f.dir_handle.stop(*f.sys, 5s);
  REQUIRE(stopped);
  CHECK(*stopped == 2);
  auto p = f.store->load({"counter", "p"});
  REQUIRE(p);
  REQUIRE(p->has_value());
}

