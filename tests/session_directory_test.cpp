// Sandbox sessions addressed through the runtime's directory: activation on the first message,
// passivation to RocksDB and rehydration with the workspace intact, pins while a background
// process runs, bad input answered as errors while the node keeps serving.
#include <catch2/catch.hpp>

#include <filesystem>

#include <caf/all.hpp>

#include "temp_directory.hpp"
#include "triplane/actors/session_host.hpp"
#include "triplane/actors/session_types.hpp"
#include "triplane/runtime/directory.hpp"
#include "triplane/storage/database.hpp"
#include "triplane/storage/state_store.hpp"

using namespace std::chrono_literals;
using namespace triplane;
using namespace triplane::actors;

namespace {

struct config : caf::actor_system_config {
  config() {
    add_session_message_types(*this);
    set("scheduler.max-threads", 2);
  }
};

struct node_fixture {
  testing::temp_directory tmp{"triplane-session-dir"};
  std::unique_ptr<storage::state_store> state;
  std::unique_ptr<storage::database> db;
  std::unique_ptr<session_host> sessions;
  config cfg;
  std::unique_ptr<caf::actor_system> sys;
  runtime::directory dir;

  node_fixture() {
    storage::store_options so;
    so.path = tmp.sub("state");
    auto st = storage::state_store::open(so);
    REQUIRE(st);
    state = std::move(*st);
    storage::database_options dbo;
    dbo.path = tmp.sub("sandbox");
    dbo.column_families = session_host::column_families();
    auto d = storage::database::open(dbo);
    REQUIRE(d);
    db = std::move(*d);
    session_host_options ho;
    ho.workspaces_dir = tmp.sub("workspaces");
    ho.idle_timeout = 60s;
    auto h = session_host::create(*db, ho);
    REQUIRE(h);
    sessions = std::move(*h);
    sys = std::make_unique<caf::actor_system>(cfg);
    runtime::directory_options opts;
    opts.idle_check_granularity = 20ms;
    auto started = runtime::directory::start(*sys, *state, {sessions->kind()}, opts);
    INFO((started ? std::string() : describe(started.error())));
    REQUIRE(started);
    dir = std::move(*started);
  }
  ~node_fixture() {
    (void)dir.stop(*sys, 10s);
    sys.reset();
    sessions.reset();
    db.reset();
    state.reset();
  }

  template <class T, class... Ts>
  expected<T> call(const std::string& id, Ts... xs) {
    caf::scoped_actor self{*sys};
    expected<T> result = make_error(errc::internal, "no reply");
    self->request(dir.front(), 30s, runtime::call_atom::value, std::string("session"), id,
                  caf::make_message(xs...))
      .receive([&](T& x) { result = std::move(x); }, [&](caf::error& e) { result = std::move(e); });
    return result;
  }

  bool passivate(const std::string& id) {
    caf::scoped_actor self{*sys};
    bool out = false;
    self->request(dir.front(), 30s, runtime::passivate_atom::value, std::string("session"), id)
      .receive([&](bool b) { out = b; }, [&](caf::error&) {});
    return out;
  }
};

exec_request shell(const std::string& s) {
  exec_request r;
  r.shell = s;
  return r;
}

} // namespace

TEST_CASE("a session activated through the directory keeps its workspace across passivation", "[session][directory]") {
  node_fixture n;
  auto w = n.call<file_entry>("agent-1", file_write_atom::value,
                              file_write_request{"notes/todo.txt", "ship it\n", 0644, true, false});
  REQUIRE(w);
  auto r = n.call<exec_result>("agent-1", exec_atom::value, shell("cat notes/todo.txt; echo done > out.txt"));
  REQUIRE(r);
  CHECK(r->stdout_data == "ship it\n");
  auto ws = std::filesystem::path(n.tmp.sub("workspaces"));
  CHECK_FALSE(std::filesystem::is_empty(ws));
  REQUIRE(n.passivate("agent-1"));
  // Only the staged /etc is left: the session's workspace is gone, RocksDB holds its files.
  for (auto& e : std::filesystem::directory_iterator(ws)) CHECK(e.path().filename().string().front() == '.');
  auto again = n.call<file_data>("agent-1", file_read_atom::value, file_read_request{"out.txt", 0, 0});
  REQUIRE(again);
  CHECK(again->data == "done\n");
  auto info = n.call<session_info>("agent-1", info_atom::value);
  REQUIRE(info);
  CHECK(info->file_count == 2);
  CHECK(info->history.size() == 1);
}

TEST_CASE("a session with a running background process is not passivated", "[session][directory]") {
  node_fixture n;
  auto st = n.call<bg_status>("bg", bg_start_atom::value, shell("sleep 0.5"));
  REQUIRE(st);
  CHECK(st->running);
  CHECK_FALSE(n.passivate("bg"));
  auto done = n.call<bg_status>("bg", bg_wait_atom::value, st->bg_id, uint64_t{10000});
  REQUIRE(done);
  CHECK_FALSE(done->running);
  bool passivated = false;
  for (int i = 0; i < 50 && !passivated; ++i) {
    passivated = n.passivate("bg");
    if (!passivated) std::this_thread::sleep_for(20ms);
  }
  CHECK(passivated);
}

TEST_CASE("bad requests through the directory get errors and other sessions keep working", "[session][directory][bad-input]") {
  node_fixture n;
  auto bad_path = n.call<file_entry>("victim", file_write_atom::value,
                                     file_write_request{"../../etc/evil", "x", 0644, true, false});
  REQUIRE_FALSE(bad_path);
  CHECK(code_of(bad_path.error()) == errc::invalid_argument);
  auto empty = n.call<exec_result>("victim", exec_atom::value, exec_request{});
  REQUIRE_FALSE(empty);
  CHECK(code_of(empty.error()) == errc::invalid_argument);
  auto bomb = n.call<exec_result>("victim", exec_atom::value, [] {
    exec_request r = shell("b() { b | b & }; b; sleep 1");
    r.limits.max_processes = 32;
    r.timeout_ms = 1500;
    return r;
  }());
  REQUIRE(bomb);
  auto other = n.call<exec_result>("bystander", exec_atom::value, shell("echo fine"));
  REQUIRE(other);
  CHECK(other->stdout_data == "fine\n");
  auto net = n.call<exec_result>("victim", exec_atom::value,
                                 shell("python3 -c \"import socket; socket.create_connection(('10.0.0.1', 80), 1)\""));
  REQUIRE(net);
  CHECK(net->exit_code != 0);
}
