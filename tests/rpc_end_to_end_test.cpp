// End-to-end RPC tests over loopback against the real node: `triplane serve` runs as a separate
// process (runtime directory, sandbox sessions under bubblewrap, RocksDB, RPC server); clients
// are the real triplane::client library or raw Cap'n Proto stubs. Commands are real commands.
#include <catch2/catch.hpp>

#include <algorithm>
#include <dirent.h>
#include <fstream>
#include <optional>
#include <thread>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include "api.capnp.h"
#include "support/host_processes.hpp"
#include "support/raw_rpc_session.hpp"
#include "support/serve_process.hpp"
#include "support/temp_directory.hpp"
#include "triplane/rpc/client.hpp"

using triplane::testing::processes_with;

using namespace std::chrono_literals;
using triplane::errc;
using triplane::client::connection;
using triplane::test::node_process;

namespace {

std::unique_ptr<connection> connect_as(const node_process& node, const std::string& token) {
  auto c = connection::connect(node.endpoint(), token);
  if (!c) FAIL("connect: " << triplane::describe(c.error()));
  return std::move(*c);
}


template <class T>
errc code(const triplane::expected<T>& r) {
  return r ? errc::ok : triplane::code_of(r.error());
}

} // namespace

TEST_CASE("a tenant opens a session and reads back its kv entries and files", "[rpc]") {
  node_process node;
  auto alice = connect_as(node, node.tokens().alice);
  CHECK(alice->tenant() == "alice");
  CHECK_FALSE(alice->is_admin());

  auto missing = alice->open_session("notes", false);
  CHECK(code(missing) == errc::not_found);

  auto s = alice->open_session("notes", true);
  REQUIRE(s);
  REQUIRE(s->kv_put("plan", "write tests"));
  REQUIRE(s->kv_put("plan/2", std::string("bin\0ary", 7)));
  auto v = s->kv_get("plan");
  REQUIRE(v);
  REQUIRE(v->has_value());
  CHECK(**v == "write tests");
  auto b = s->kv_get("plan/2");
  REQUIRE(b);
  CHECK(**b == std::string("bin\0ary", 7));
  auto none = s->kv_get("absent");
  REQUIRE(none);
  CHECK_FALSE(none->has_value());
  auto keys = s->kv_list("plan");
  REQUIRE(keys);
  CHECK(*keys == std::vector<std::string>{"plan", "plan/2"});
  auto existed = s->kv_delete("plan");
  REQUIRE(existed);
  CHECK(*existed);

  REQUIRE(s->write_file("src/main.py", "print('hi')\n", true, false));
  auto data = s->read_file("src/main.py");
  REQUIRE(data);
  CHECK(*data == "print('hi')\n");
  auto part = s->read_file("src/main.py", 6, 4);
  REQUIRE(part);
  CHECK(*part == "'hi'");
  auto files = s->list_files("", true);
  REQUIRE(files);
  // Directories are entries too (sorted by path); mode carries the file type.
  REQUIRE(files->size() == 2);
  CHECK((*files)[0].path == "src");
  CHECK(S_ISDIR((*files)[0].mode));
  CHECK((*files)[1].path == "src/main.py");
  CHECK((*files)[1].size == 12);
  CHECK(S_ISREG((*files)[1].mode));
  CHECK(((*files)[1].mode & 0777) == 0644);
  auto bad = s->write_file("../escape", "x");
  CHECK(code(bad) == errc::invalid_argument);

  auto info = s->info();
  REQUIRE(info);
  CHECK(info->id == "notes");  // the tenant never sees the server's scoped id
  CHECK(info->kv_count == 1);
  CHECK(info->file_count == 1);

  // A second connection of the same tenant sees the same session.
  auto again = connect_as(node, node.tokens().alice);
  auto s2 = again->open_session("notes", false);
  REQUIRE(s2);
  auto v2 = s2->kv_get("plan/2");
  REQUIRE(v2);
  CHECK(v2->has_value());

  // fork copies, destroy removes.
  auto f = s->fork("notes-copy");
  REQUIRE(f);
  auto fv = f->read_file("src/main.py");
  REQUIRE(fv);
  CHECK(*fv == "print('hi')\n");
  auto taken = s->fork("notes-copy");
  REQUIRE_FALSE(taken);
  CHECK(code(taken) == errc::already_exists);
  // The error names the id the client knows, never the server's tenant-scoped one.
  auto why = triplane::describe(taken.error());
  INFO(why);
  CHECK(why.find("'notes-copy'") != std::string::npos);
  CHECK(why.find("alice/") == std::string::npos);
  REQUIRE(f->destroy());
  CHECK(code(alice->open_session("notes-copy", false)) == errc::not_found);
}

TEST_CASE("a session handle kept after its session was destroyed answers not_found instead of "
          "starting a new session", "[rpc]") {
  node_process node;
  auto a = connect_as(node, node.tokens().alice);
  auto b = connect_as(node, node.tokens().alice);
  auto s = a->open_session("scratch", true);
  REQUIRE(s);
  REQUIRE(s->write_file("a.txt", "first"));
  auto other = b->open_session("scratch", false);
  REQUIRE(other);
  REQUIRE(other->kv_put("k", "v"));

  REQUIRE(s->destroy());
  // The other connection's handle, and the destroying one, are stale now.
  auto write = other->write_file("b.txt", "second");
  REQUIRE_FALSE(write);
  CHECK(code(write) == errc::not_found);
  CHECK(triplane::describe(write.error()).find("was destroyed") != std::string::npos);
  CHECK(code(other->kv_get("k")) == errc::not_found);
  CHECK(code(s->kv_put("k", "again")) == errc::not_found);
  CHECK(code(s->read_file("a.txt")) == errc::not_found);
  // Nothing started a new session under the id.
  CHECK(code(a->open_session("scratch", false)) == errc::not_found);

  // Opened again with create=true: a new, empty session; the stale handles stay stale.
  auto fresh = b->open_session("scratch", true);
  REQUIRE(fresh);
  auto files = fresh->list_files("", true);
  REQUIRE(files);
  CHECK(files->empty());
  auto k = fresh->kv_get("k");
  REQUIRE(k);
  CHECK_FALSE(k->has_value());
  REQUIRE(fresh->write_file("c.txt", "third"));
  CHECK(code(other->read_file("c.txt")) == errc::not_found);
  auto c = fresh->read_file("c.txt");
  REQUIRE(c);
  CHECK(*c == "third");
}

TEST_CASE("a session handle used after its connection was closed fails with unavailable instead "
          "of crashing", "[rpc]") {
  node_process node;
  std::optional<triplane::client::session> orphan;
  {
    auto alice = connect_as(node, node.tokens().alice);
    auto s = alice->open_session("orphan", true);
    REQUIRE(s);
    REQUIRE(s->kv_put("k", "v"));
    orphan = *s;
  }  // the connection is gone; the handle is not
  auto r = orphan->kv_get("k");
  REQUIRE_FALSE(r);
  CHECK(triplane::code_of(r.error()) == errc::unavailable);
  CHECK(triplane::describe(r.error()).find("closed") != std::string::npos);
  triplane::client::exec_options opts;
  opts.shell = "true";
  CHECK(code(orphan->exec(opts)) == errc::unavailable);
  CHECK(code(orphan->fork("orphan-2")) == errc::unavailable);
  orphan.reset();  // destroying it is safe too
  // A new connection on this thread works and sees the data.
  auto again = connect_as(node, node.tokens().alice);
  auto s2 = again->open_session("orphan", false);
  REQUIRE(s2);
  auto v = s2->kv_get("k");
  REQUIRE(v);
  CHECK(v->value_or("") == "v");
}

TEST_CASE("a file read too large for one answer is refused with limit_exceeded and a range read "
          "of it works", "[rpc][limits]") {
  node_process node;
  auto alice = connect_as(node, node.tokens().alice);
  auto s = alice->open_session("huge", true);
  REQUIRE(s);
  // Just under the session's 64 MiB read limit, just over what one 64 MiB message carries with
  // its framing.
  triplane::client::exec_options opts;
  opts.shell = "head -c 67108860 /dev/zero > big";
  auto made = s->exec(opts);
  REQUIRE(made);
  REQUIRE(made->exit_code == 0);
  auto whole = s->read_file("big");
  REQUIRE_FALSE(whole);
  INFO(triplane::describe(whole.error()));
  CHECK(triplane::code_of(whole.error()) == errc::limit_exceeded);
  CHECK(triplane::describe(whole.error()).find("read a range") != std::string::npos);
  auto head = s->read_file("big", 0, 32u << 20);
  REQUIRE(head);
  CHECK(head->size() == (32u << 20));
  auto tail = s->read_file("big", 32u << 20);
  REQUIRE(tail);
  CHECK(tail->size() == 67108860 - (32u << 20));
}

TEST_CASE("a listing too large for one answer is refused whole and comes complete in pages",
          "[rpc][limits]") {
  node_process node;
  auto alice = connect_as(node, node.tokens().alice);
  auto s = alice->open_session("many-names", true);
  REQUIRE(s);
  // 17,000 empty files under a directory path of ~3,800 bytes: about 68 MB of listing, more
  // than one 64 MiB message, in a workspace that holds no data at all.
  triplane::client::exec_options opts;
  opts.argv = {"python3", "-c",
               "import os\n"
               "d = '/'.join(['d' * 250] * 15)\n"
               "os.makedirs(d)\n"
               "for i in range(17000): open(d + '/' + 'f' * 190 + '%06d' % i, 'w').close()\n"};
  opts.timeout_ms = 120000;
  auto made = s->exec(opts);
  REQUIRE(made);
  INFO(made->stderr_data);
  REQUIRE(made->exit_code == 0);

  {
    auto whole = s->list_files_page("", true, "", 0);
    REQUIRE_FALSE(whole);
    INFO(triplane::describe(whole.error()));
    CHECK(triplane::code_of(whole.error()) == errc::limit_exceeded);
    CHECK(triplane::describe(whole.error()).find("pages") != std::string::npos);
  }

  // A page stops where a message would overflow, whatever the limit asked for.
  auto first = s->list_files_page("", true, "", 100000);
  if (!first) FAIL(triplane::describe(first.error()));
  CHECK(first->more);
  CHECK(first->entries.size() < 17015);
  auto next = s->list_files_page("", true, first->entries.back().path, 10);
  REQUIRE(next);
  REQUIRE(next->entries.size() == 10);
  CHECK(next->entries.front().path > first->entries.back().path);

  auto all = s->list_files("", true);
  REQUIRE(all);
  CHECK(all->size() == 17000 + 15);  // the files and their 15 directories, each once
  CHECK(std::is_sorted(all->begin(), all->end(),
                       [](const auto& a, const auto& b) { return a.path < b.path; }));
  CHECK(std::adjacent_find(all->begin(), all->end(), [](const auto& a, const auto& b) {
          return a.path == b.path;
        }) == all->end());
}

TEST_CASE("a client on the same host reaches the node over its Unix-domain socket as over TCP",
          "[rpc][unix]") {
  triplane::testing::temp_directory dir{"triplane-rpc-unix"};
  auto path = dir.sub("api.sock");
  {
    // A socket file left by an earlier run is replaced; the listener is removed at stop.
    std::ofstream{path + ".probe"};  // not a socket: must stay untouched below
  }
  node_process node({"--listen-unix", path});
  struct stat st{};
  REQUIRE(lstat(path.c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));

  {
    // Sessions before their connections: a session must not outlive its connection.
    auto over_tcp = connect_as(node, node.tokens().alice);
    auto over_unix = connection::connect("unix:" + path, node.tokens().alice);
    REQUIRE(over_unix);
    CHECK((*over_unix)->tenant() == "alice");
    auto tcp_session = over_tcp->open_session("shared", true);
    REQUIRE(tcp_session);
    REQUIRE(tcp_session->kv_put("k", "written over tcp"));
    auto unix_session = (*over_unix)->open_session("shared", false);
    REQUIRE(unix_session);
    auto v = unix_session->kv_get("k");
    REQUIRE(v);
    REQUIRE(v->has_value());
    CHECK(**v == "written over tcp");
    REQUIRE(unix_session->kv_put("k2", "written over unix"));
    auto back = tcp_session->kv_get("k2");
    REQUIRE(back);
    REQUIRE(back->has_value());
    CHECK(**back == "written over unix");

    // Tokens are checked on this listener too.
    auto bad = connection::connect("unix:" + path, "not-a-token");
    CHECK(code(bad) == errc::permission_denied);
  }
  CHECK(node.stop() == 0);
  CHECK(lstat(path.c_str(), &st) != 0);  // removed by the server at stop
  CHECK(lstat((path + ".probe").c_str(), &st) == 0);
}

TEST_CASE("the node refuses to replace a file that is not a socket with its Unix listener",
          "[rpc][unix]") {
  triplane::testing::temp_directory dir{"triplane-rpc-unix"};
  auto path = dir.sub("not-a-socket");
  { std::ofstream{path} << "precious"; }
  CHECK_THROWS_AS(node_process({"--listen-unix", path}), std::runtime_error);
  std::ifstream in{path};
  std::string content;
  in >> content;
  CHECK(content == "precious");
}

TEST_CASE("exec output streams to the client's callback and exit codes come back", "[rpc]") {
  node_process node;
  auto alice = connect_as(node, node.tokens().alice);
  auto s = alice->open_session("runner", true);
  REQUIRE(s);

  std::string out, err;
  triplane::client::exec_options opts;
  opts.argv = {"echo", "hello", "world"};
  auto r = s->exec(opts, [&](triplane::client::output_stream st, std::string_view chunk) {
    (st == triplane::client::output_stream::out ? out : err) += chunk;
  });
  REQUIRE(r);
  CHECK(r->exit_code == 0);
  CHECK(out == "hello world\n");
  CHECK(r->stdout_data.empty());

  opts.argv = {"sh", "-c", "printf oops >&2"};
  out.clear();
  r = s->exec(opts, [&](triplane::client::output_stream st, std::string_view chunk) {
    (st == triplane::client::output_stream::out ? out : err) += chunk;
  });
  REQUIRE(r);
  CHECK(err == "oops");

  SECTION("without a callback the output comes in the result") {
    opts.argv = {"echo", "buffered"};
    auto b = s->exec(opts);
    REQUIRE(b);
    CHECK(b->stdout_data == "buffered\n");
  }
  SECTION("a failing command reports its exit code") {
    opts.argv.clear();
    opts.shell = "echo hi; exit 3";
    auto e = s->exec(opts);
    REQUIRE(e);
    CHECK(e->exit_code == 3);
    CHECK(e->signal == 0);
    CHECK(e->stdout_data == "hi\n");
  }
  SECTION("a large streamed output arrives complete and in order") {
    opts.argv.clear();
    opts.shell = "yes abcdefg | head -c 13107200";
    opts.output_cap_bytes = 16u << 20;
    uint64_t bytes = 0;
    bool in_order = true;
    auto f = s->exec(opts, [&](triplane::client::output_stream, std::string_view chunk) {
      for (char c : chunk) {
        if (c != "abcdefg\n"[bytes % 8]) in_order = false;
        ++bytes;
      }
    });
    REQUIRE(f);
    CHECK(f->exit_code == 0);
    CHECK(bytes == 200u * 65536u);
    CHECK(in_order);
    CHECK_FALSE(f->truncated);
  }
  SECTION("output beyond the cap is dropped and the result says truncated") {
    opts.argv.clear();
    opts.shell = "yes | head -c 3000000";
    uint64_t bytes = 0;
    auto f = s->exec(opts, [&](triplane::client::output_stream, std::string_view chunk) {
      bytes += chunk.size();
    });
    REQUIRE(f);
    CHECK(bytes == (1u << 20));  // the node's default cap
    CHECK(f->truncated);
    opts.output_cap_bytes = 1ull << 40;
    CHECK(code(s->exec(opts)) == errc::invalid_argument);
  }
  SECTION("a client whose output callback fails gets cancelled and keeps its connection") {
    opts.argv.clear();
    opts.shell = "yes | head -c 3276800";
    auto f = s->exec(opts, [](triplane::client::output_stream, std::string_view) {
      throw std::runtime_error("disk full on the client");
    });
    REQUIRE_FALSE(f);
    CHECK(triplane::code_of(f.error()) == errc::cancelled);
    CHECK(triplane::describe(f.error()).find("disk full on the client") != std::string::npos);
    CHECK(s->kv_put("still", "connected"));
  }
  SECTION("an empty command is refused with invalid_argument") {
    triplane::client::exec_options empty;
    CHECK(code(s->exec(empty)) == errc::invalid_argument);
  }
}

TEST_CASE("an exec without a timeout of its own is bounded by the node, not cut short by the "
          "client's per-call timeout", "[rpc][limits]") {
  node_process node;
  auto alice = connect_as(node, node.tokens().alice);
  auto s = alice->open_session("patient", true);
  REQUIRE(s);
  // The node's default exec timeout (60 s) applies; the client does not know it and must not
  // give up (and cancel the command) after its own 1 s call timeout.
  alice->set_call_timeout(1000ms);
  triplane::client::exec_options opts;
  opts.shell = "sleep 2; echo slept";
  auto r = s->exec(opts);
  REQUIRE(r);
  CHECK(r->stdout_data == "slept\n");
  // A command with its own timeout is still bounded by it plus the call timeout.
  opts.timeout_ms = 500;
  opts.shell = "sleep 5";
  auto start = std::chrono::steady_clock::now();
  auto killed = s->exec(opts);
  CHECK(std::chrono::steady_clock::now() - start < 3s);
  if (killed) CHECK(killed->exit_code != 0);
}

TEST_CASE("a bad token is refused with permission_denied and repeated failures close the "
          "connection", "[rpc][auth]") {
  node_process node;
  auto bad = connection::connect(node.endpoint(), "not-a-token");
  REQUIRE_FALSE(bad);
  CHECK(triplane::code_of(bad.error()) == errc::permission_denied);

  // Raw stub: five failures on one connection, each slower than the last, then hang-up.
  {
  triplane::test::raw_rpc_connection raw(node.endpoint());
  auto& boot = raw.bootstrap;
  auto& io = raw.io;
  auto start = std::chrono::steady_clock::now();
  int denied = 0;
  bool disconnected = false;
  for (int i = 0; i < 7 && !disconnected; ++i) {
    auto req = boot.authenticateRequest();
    req.setToken("guess-" + std::to_string(i));
    try {
      req.send().wait(io.waitScope);
      FAIL("a guessed token was accepted");
    } catch (kj::Exception& e) {
      std::string d = e.getDescription().cStr();
      if (d.find("triplane:permission_denied") != std::string::npos) ++denied;
      else disconnected = true;
    }
  }
  auto elapsed = std::chrono::steady_clock::now() - start;
  CHECK(denied >= 4);
  CHECK(disconnected);
  // 200 + 400 + 800 + 1600 ms of back-off before the fifth answer.
  CHECK(elapsed >= 2500ms);
  }

  // The node still serves good clients, and the failures show in the metrics.
  auto ops = connect_as(node, node.tokens().ops);
  auto m = ops->metrics();
  REQUIRE(m);
  CHECK(m->auth_failures >= 6);
}

TEST_CASE("pipelined authentication guesses are checked one at a time, slowed down and cut off "
          "like sequential ones", "[rpc][auth]") {
  node_process node;
  {
  triplane::test::raw_rpc_connection raw(node.endpoint());
  auto& boot = raw.bootstrap;
  auto& io = raw.io;
  // 40 wrong guesses sent at once, then the right token: the node must not check them all
  // at once (a pipelining client would otherwise guess as fast as it can send). After the
  // five failures a connection is allowed, the right token is never checked.
  auto start = std::chrono::steady_clock::now();
  kj::Vector<kj::Promise<std::string>> guesses;
  auto outcome = [](auto&& p) {
    return kj::mv(p).then([](auto&&) { return std::string("accepted"); },
                          [](kj::Exception&& e) { return std::string(e.getDescription().cStr()); });
  };
  for (int i = 0; i < 40; ++i) {
    auto req = boot.authenticateRequest();
    req.setToken("guess-" + std::to_string(i));
    guesses.add(outcome(req.send()));
  }
  auto right = boot.authenticateRequest();
  right.setToken(node.tokens().alice);
  auto answer = outcome(right.send()).wait(io.waitScope);
  auto took = std::chrono::steady_clock::now() - start;
  INFO("answer to the right token: " << answer << " after "
       << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
  CHECK(answer != "accepted");
  auto all = kj::joinPromises(guesses.releaseAsArray()).wait(io.waitScope);
  int accepted = 0;
  for (auto& a : all) accepted += a == "accepted";
  CHECK(accepted == 0);
  }

  auto ops = connect_as(node, node.tokens().ops);
  auto m = ops->metrics();
  REQUIRE(m);
  uint64_t denied = 0;
  for (const auto& mm : m->methods)
    if (mm.method == "Bootstrap.authenticate") denied = mm.errors;
  CHECK(denied >= 5);
  // A fresh connection with the right token is not slowed down by another's failures.
  auto fresh_start = std::chrono::steady_clock::now();
  auto alice = connect_as(node, node.tokens().alice);
  CHECK(std::chrono::steady_clock::now() - fresh_start < 500ms);
}

TEST_CASE("tenant B cannot open or read or list or fork tenant A's sessions even by guessing ids",
          "[rpc][isolation]") {
  node_process node;
  auto alice = connect_as(node, node.tokens().alice);
  auto bob = connect_as(node, node.tokens().bob);
  auto a = alice->open_session("project", true);
  REQUIRE(a);
  REQUIRE(a->kv_put("secret", "alice-only"));
  REQUIRE(a->write_file("key.pem", "PRIVATE"));

  // The same id names a different (absent) session for bob.
  CHECK(code(bob->open_session("project", false)) == errc::not_found);
  // Guessing the server's scoping or path tricks does not reach alice either.
  for (std::string guess : {"alice/project", "alice%2Fproject", "../alice/project",
                            "/alice/project", "alice", "project/../../alice/project"}) {
    INFO(guess);
    CHECK(code(bob->open_session(guess, false)) == errc::not_found);
  }
  // Ids that are not printable are refused outright.
  CHECK(code(bob->open_session("a\tb", true)) == errc::invalid_argument);
  CHECK(code(bob->open_session("a b", true)) == errc::invalid_argument);
  CHECK(code(bob->open_session("", true)) == errc::invalid_argument);
  CHECK(code(bob->open_session(std::string(201, 'x'), true)) == errc::invalid_argument);

  // Bob creating "project" gets his own empty session.
  auto b = bob->open_session("project", true);
  REQUIRE(b);
  auto secret = b->kv_get("secret");
  REQUIRE(secret);
  CHECK_FALSE(secret->has_value());
  auto files = b->list_files("", true);
  REQUIRE(files);
  CHECK(files->empty());
  CHECK(code(b->read_file("key.pem")) == errc::not_found);
  auto keys = b->kv_list("");
  REQUIRE(keys);
  CHECK(keys->empty());

  // Bob's fork stays in bob's namespace and copies bob's (empty) state.
  auto bf = b->fork("stolen");
  REQUIRE(bf);
  auto stolen = bf->kv_get("secret");
  REQUIRE(stolen);
  CHECK_FALSE(stolen->has_value());
  CHECK(code(alice->open_session("stolen", false)) == errc::not_found);

  // Alice's data is untouched.
  auto still = a->kv_get("secret");
  REQUIRE(still);
  CHECK(**still == "alice-only");
  // Bob's tenant cannot reach Admin.
  CHECK(code(bob->stats()) == errc::permission_denied);
}

namespace {

/// Every id `c` lists under `prefix`, page by page (`page_size` per call), checking that no page
/// is larger than asked and that `more` is set exactly when another page follows.
std::vector<std::string> list_all(connection& c, const std::string& prefix, uint32_t page_size) {
  std::vector<std::string> ids;
  std::string after;
  for (int pages = 0; pages < 1000; ++pages) {
    auto page = c.list_sessions(prefix, after, page_size);
    REQUIRE(page);
    CHECK(page->ids.size() <= page_size);
    ids.insert(ids.end(), page->ids.begin(), page->ids.end());
    if (!page->more) return ids;
    REQUIRE_FALSE(page->ids.empty());
    after = page->ids.back();
  }
  FAIL("listing did not end");
  return ids;
}

std::vector<std::string> sorted(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  return v;
}

} // namespace

TEST_CASE("a tenant lists its own stored sessions in byte order, page by page, and never "
          "another tenant's, even with the same ids or ids that look like the server's scoping",
          "[rpc][isolation][list]") {
  node_process node;
  auto alice = connect_as(node, node.tokens().alice);
  auto bob = connect_as(node, node.tokens().bob);
  // The same ids for both, and ids holding the scoping's separator '/' and its escape '%'.
  const std::vector<std::string> alice_ids{"project", "notes", "a/b", "%2F", "zeta", "n"};
  const std::vector<std::string> bob_ids{"project", "notes", "alice/project", "../alice/x",
                                         "alice%2Fproject", "bob/"};
  for (const auto& id : alice_ids) REQUIRE(alice->open_session(id, true));
  for (const auto& id : bob_ids) REQUIRE(bob->open_session(id, true));

  for (uint32_t page : {1u, 2u, 1000u}) {
    INFO("page size " << page);
    CHECK(list_all(*alice, "", page) == sorted(alice_ids));
    CHECK(list_all(*bob, "", page) == sorted(bob_ids));
  }
  // limit 0 is the node's page size.
  auto whole = alice->list_sessions();
  REQUIRE(whole);
  CHECK(whole->ids == sorted(alice_ids));
  CHECK_FALSE(whole->more);
  auto first = alice->list_sessions("", "", 2);
  REQUIRE(first);
  CHECK(first->ids == std::vector<std::string>{"%2F", "a/b"});
  CHECK(first->more);

  // Prefixes and `after` stay inside the tenant, whatever they hold.
  CHECK(list_all(*alice, "n", 10) == std::vector<std::string>{"n", "notes"});
  CHECK(list_all(*bob, "alice", 10) == std::vector<std::string>{"alice%2Fproject", "alice/project"});
  CHECK(list_all(*alice, "alice", 10).empty());
  CHECK(list_all(*bob, "../", 10) == std::vector<std::string>{"../alice/x"});
  CHECK(list_all(*alice, "../", 10).empty());
  auto tail = alice->list_sessions("", "project", 10);
  REQUIRE(tail);
  CHECK(tail->ids == std::vector<std::string>{"zeta"});
  auto beyond = bob->list_sessions("", "zzz", 10);
  REQUIRE(beyond);
  CHECK(beyond->ids.empty());
  CHECK_FALSE(beyond->more);

  // What no id could be is refused, naming the parameter.
  for (std::string bad : {std::string("a b"), std::string("a\tb"), std::string(201, 'x'),
                          std::string("\x7f"), std::string("a\xc3\xa9")}) {
    INFO(bad);
    auto r = bob->list_sessions(bad);
    CHECK(code(r) == errc::invalid_argument);
    if (!r) CHECK(triplane::describe(r.error()).find("prefix") != std::string::npos);
    CHECK(code(bob->list_sessions("", bad)) == errc::invalid_argument);
  }

  // The list follows creates, forks and destroys, on any connection of the tenant.
  auto notes = alice->open_session("notes", false);
  REQUIRE(notes);
  REQUIRE(notes->fork("notes-2"));
  auto other = connect_as(node, node.tokens().alice);
  CHECK(list_all(*other, "notes", 10) == std::vector<std::string>{"notes", "notes-2"});
  REQUIRE(notes->destroy());
  CHECK(list_all(*other, "notes", 10) == std::vector<std::string>{"notes-2"});
  REQUIRE(other->open_session("notes", true));
  CHECK(list_all(*alice, "notes", 10) == std::vector<std::string>{"notes", "notes-2"});
  // A session opened without create is not stored, hence not listed; bob's are untouched.
  CHECK(code(alice->open_session("ghost", false)) == errc::not_found);
  CHECK(list_all(*alice, "g", 10).empty());
  CHECK(list_all(*bob, "", 1000) == sorted(bob_ids));
}

TEST_CASE("a page of sessions holds at most 1000 ids, whatever limit the client asks for",
          "[rpc][list]") {
  node_process node;
  auto alice = connect_as(node, node.tokens().alice);
  std::vector<std::string> ids;
  for (int i = 0; i < 1003; ++i) {
    char id[16];
    std::snprintf(id, sizeof id, "s%04d", i);
    ids.emplace_back(id);
    REQUIRE(alice->open_session(id, true));
  }
  for (uint32_t asked : {0u, 1001u, UINT32_MAX}) {
    INFO("limit " << asked);
    auto page = alice->list_sessions("", "", asked);
    REQUIRE(page);
    CHECK(page->ids.size() == 1000);
    CHECK(page->more);
    CHECK(page->ids.back() == "s0999");
  }
  auto rest = alice->list_sessions("", "s0999");
  REQUIRE(rest);
  CHECK(rest->ids == std::vector<std::string>{"s1000", "s1001", "s1002"});
  CHECK_FALSE(rest->more);
  CHECK(list_all(*alice, "", 1000) == ids);
}

TEST_CASE("listing sessions reads storage and activates none of them", "[rpc][list]") {
  node_process node;
  {
    auto alice = connect_as(node, node.tokens().alice);
    for (int i = 0; i < 5; ++i) REQUIRE(alice->open_session("s" + std::to_string(i), true));
  }
  // After a restart every session is passivated: only a call to one activates it.
  node.restart();
  auto ops = connect_as(node, node.tokens().ops);
  auto alice = connect_as(node, node.tokens().alice);
  auto before = ops->stats();
  REQUIRE(before);
  CHECK(list_all(*alice, "", 2) == std::vector<std::string>{"s0", "s1", "s2", "s3", "s4"});
  auto after = ops->stats();
  REQUIRE(after);
  CHECK(after->activations_total == before->activations_total);
  CHECK(after->live_actors == before->live_actors);
  // Opening one does activate it (the check above can see an activation).
  REQUIRE(alice->open_session("s0", false));
  auto opened = ops->stats();
  REQUIRE(opened);
  CHECK(opened->activations_total == before->activations_total + 1);
}

TEST_CASE("a tenant's stored sessions are limited: creating or forking one more answers "
          "limit_exceeded until one is destroyed, also after a restart",
          "[rpc][limits]") {
  node_process node({"--triplane.rpc-max-stored-sessions=3"});
  auto alice = connect_as(node, node.tokens().alice);
  for (std::string id : {"s0", "s1", "s2"}) REQUIRE(alice->open_session(id, true));

  auto fourth = alice->open_session("s3", true);
  REQUIRE_FALSE(fourth);
  CHECK(code(fourth) == errc::limit_exceeded);
  auto why = triplane::describe(fourth.error());
  INFO(why);
  CHECK(why.find("limit 3") != std::string::npos);
  CHECK(why.find("destroy") != std::string::npos);
  // Existing sessions stay usable, also through create=true.
  auto s0 = alice->open_session("s0", true);
  REQUIRE(s0);
  REQUIRE(s0->kv_put("k", "v"));
  REQUIRE(alice->open_session("s1", false));
  // A fork is a new stored session too.
  auto fork = s0->fork("f");
  REQUIRE_FALSE(fork);
  CHECK(code(fork) == errc::limit_exceeded);
  // Another tenant has its own budget.
  auto bob = connect_as(node, node.tokens().bob);
  for (std::string id : {"s0", "s1", "s2"}) REQUIRE(bob->open_session(id, true));

  // A destroy frees a slot.
  auto s1 = alice->open_session("s1", false);
  REQUIRE(s1);
  REQUIRE(s1->destroy());
  REQUIRE(alice->open_session("s3", true));
  CHECK(code(alice->open_session("s4", true)) == errc::limit_exceeded);
  auto s3 = alice->open_session("s3", false);
  REQUIRE(s3);
  REQUIRE(s3->destroy());
  REQUIRE(s0->fork("f"));
  CHECK(code(s0->fork("g")) == errc::limit_exceeded);
  CHECK(code(alice->open_session("s4", true)) == errc::limit_exceeded);
  CHECK(list_all(*alice, "", 10) == std::vector<std::string>{"f", "s0", "s2"});

  // The count survives a restart: it is read back from storage.
  alice.reset();
  bob.reset();
  node.restart();
  alice = connect_as(node, node.tokens().alice);
  CHECK(code(alice->open_session("s4", true)) == errc::limit_exceeded);
  auto f = alice->open_session("f", false);
  REQUIRE(f);
  CHECK(code(f->fork("g")) == errc::limit_exceeded);
  REQUIRE(f->destroy());
  REQUIRE(alice->open_session("s4", true));
  CHECK(code(alice->open_session("s5", true)) == errc::limit_exceeded);
  CHECK(list_all(*alice, "", 10) == std::vector<std::string>{"s0", "s2", "s4"});
}

TEST_CASE("concurrent creates and forks never store more sessions than a tenant's limit",
          "[rpc][limits]") {
  node_process node({"--triplane.rpc-max-stored-sessions=4"});
  triplane::test::raw_rpc_connection raw(node.endpoint());
  auto auth = raw.bootstrap.authenticateRequest();
  auth.setToken(node.tokens().alice);
  auto tenant = auth.send().getTenant();
  auto open = tenant.sessionRequest();
  open.setId("base");
  open.setCreate(true);
  auto base = open.send().wait(raw.io.waitScope).getSession();  // stored before the race

  // All sent at once, before any answer: 4 creates of one id, 12 new ids, 6 forks.
  auto outcome = [](auto&& promise) {
    return promise.then([](auto&&) { return std::string("ok"); },
                        [](kj::Exception&& e) {
                          std::string d = e.getDescription().cStr();
                          if (d.find("triplane:limit_exceeded") != std::string::npos)
                            return std::string("limit");
                          return d;
                        });
  };
  kj::Vector<kj::Promise<std::string>> calls;
  // The creates of one id first: each must learn whether it stored the id, so only one of
  // them takes a slot.
  for (int i = 0; i < 4; ++i) {
    auto req = tenant.sessionRequest();
    req.setId("same");
    req.setCreate(true);
    calls.add(outcome(req.send()));
  }
  for (int i = 0; i < 12; ++i) {
    auto req = tenant.sessionRequest();
    req.setId("new-" + std::to_string(i));
    req.setCreate(true);
    calls.add(outcome(req.send()));
  }
  for (int i = 0; i < 6; ++i) {
    auto req = base.forkRequest();
    req.setNewId("fork-" + std::to_string(i));
    calls.add(outcome(req.send()));
  }
  auto results = kj::joinPromises(calls.releaseAsArray()).wait(raw.io.waitScope);
  int ok = 0, limited = 0;
  for (const auto& r : results) {
    INFO(r);
    CHECK((r == "ok" || r == "limit"));
    (r == "ok" ? ok : limited)++;
  }
  // The client library cannot share this thread's event loop: list with the raw API.
  std::vector<std::string> stored;
  {
    auto list = tenant.listSessionsRequest();
    list.setLimit(1000);
    auto page = list.send().wait(raw.io.waitScope);
    CHECK_FALSE(page.getMore());
    for (auto id : page.getIds()) stored.emplace_back(id.cStr(), id.size());
  }
  INFO("stored: " << stored.size() << ", ok: " << ok);
  // "base" plus exactly three more, whichever calls won.
  CHECK(stored.size() == 4);
  CHECK(std::count(stored.begin(), stored.end(), "base") == 1);
  // A create of an id that another create stored meanwhile succeeds without a slot.
  bool same_stored = std::count(stored.begin(), stored.end(), "same") == 1;
  int same_ok = 0;
  for (size_t i = 0; i < 4; ++i) same_ok += results[i] == "ok";
  CHECK(same_ok == (same_stored ? 4 : 0));
  CHECK(ok == static_cast<int>(stored.size()) - 1 + (same_stored ? 3 : 0));
  auto one_more = tenant.sessionRequest();
  one_more.setId("one-more");
  one_more.setCreate(true);
  CHECK(outcome(one_more.send()).wait(raw.io.waitScope) == "limit");
}

TEST_CASE("an open racing a destroy of the same id never hands out a handle that stores the "
          "session again", "[rpc][limits]") {
  node_process node({"--triplane.rpc-max-stored-sessions=2"});
  triplane::test::raw_rpc_connection raw(node.endpoint());
  auto auth = raw.bootstrap.authenticateRequest();
  auth.setToken(node.tokens().alice);
  auto tenant = auth.send().getTenant();
  auto create = tenant.sessionRequest();
  create.setId("x");
  create.setCreate(true);
  auto doomed = create.send().wait(raw.io.waitScope).getSession();

  // Sent together: the open reaches the node first, the destroy right behind it.
  auto open = tenant.sessionRequest();
  open.setId("x");
  open.setCreate(false);
  auto opened = open.send();
  auto destroyed = doomed.destroyRequest().send();
  destroyed.wait(raw.io.waitScope);
  auto handle = opened.wait(raw.io.waitScope).getSession();
  // The handle the open got is one of the destroyed session: stale, it stores nothing.
  auto put = handle.kvPutRequest();
  put.setKey("k");
  put.setValue(kj::StringPtr("v").asBytes());
  std::string outcome = "ok";
  put.send().then([](auto&&) {}, [&outcome](kj::Exception&& e) {
    outcome = e.getDescription().cStr();
  }).wait(raw.io.waitScope);
  INFO(outcome);
  CHECK(outcome.find("triplane:not_found") != std::string::npos);
  auto list = tenant.listSessionsRequest();
  CHECK(list.send().wait(raw.io.waitScope).getIds().size() == 0);
  // And the count agrees with the store: two new sessions fit, a third does not.
  for (std::string id : {"y", "z", "w"}) {
    auto req = tenant.sessionRequest();
    req.setId(id);
    req.setCreate(true);
    bool ok = req.send().then([](auto&&) { return true; }, [](kj::Exception&&) {
      return false;
    }).wait(raw.io.waitScope);
    INFO(id);
    CHECK(ok == (id != "w"));
  }
}

TEST_CASE("a client killed mid-exec gets its command cancelled on the node", "[rpc][cancel]") {
  node_process node;
  // The client runs in a child process (forked before this process opens any connection).
  // A marker no other process has: sleep accepts a fractional duration.
  const std::string marker = "sleep 30.4" + std::to_string(getpid() % 10000);
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    auto c = connection::connect(node.endpoint(), node.tokens().alice);
    if (!c) _exit(2);
    auto cs = (*c)->open_session("long", true);
    if (!cs) _exit(3);
    triplane::client::exec_options opts;
    opts.shell = marker;
    (void)cs->exec(opts);
    _exit(0);
  }
  // Wait until the command runs in its sandbox, then kill the client without any goodbye.
  bool started = false;
  for (int i = 0; i < 200 && !started; ++i) {
    started = processes_with(marker) > 0;
    if (!started) std::this_thread::sleep_for(50ms);
  }
  REQUIRE(started);
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);

  // The node notices the disconnect and kills the command (ss_cancel).
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    gone = processes_with(marker) == 0;
    if (!gone) std::this_thread::sleep_for(100ms);
  }
  CHECK(gone);
  // The session is free again at once (it runs one command at a time).
  auto alice = connect_as(node, node.tokens().alice);
  auto s = alice->open_session("long", false);
  REQUIRE(s);
  triplane::client::exec_options next;
  next.shell = "echo after";
  auto start = std::chrono::steady_clock::now();
  auto r = s->exec(next);
  REQUIRE(r);
  CHECK(r->stdout_data == "after\n");
  CHECK(std::chrono::steady_clock::now() - start < 10s);
  REQUIRE(s->kv_put("still", "serving"));
}

TEST_CASE("a slow-reading client gets all of an exec output far larger than the node's output "
          "buffer, intact and in order", "[rpc][flow]") {
  // A 1 MiB window; ~11 MB of output read at a few MB/s: the command waits on its pipe for the
  // client instead of being killed.
  node_process node({"--triplane.rpc-exec-output-buffer=1048576"});
  auto alice = connect_as(node, node.tokens().alice);
  auto s = alice->open_session("bulk", true);
  REQUIRE(s);
  std::string expected;
  for (int i = 1; i <= 1500000; ++i) expected += std::to_string(i) + "\n";
  triplane::client::exec_options opts;
  opts.shell = "seq 1 1500000";
  opts.output_cap_bytes = 32u << 20;
  std::string out, err;
  int chunks = 0;
  auto rss_start = node.rss_kib();
  long rss_peak = rss_start;
  auto start = std::chrono::steady_clock::now();
  auto r = s->exec(opts, [&](triplane::client::output_stream st, std::string_view chunk) {
    (st == triplane::client::output_stream::out ? out : err) += chunk;
    if (++chunks % 4 == 0) {
      rss_peak = std::max(rss_peak, node.rss_kib());
      std::this_thread::sleep_for(20ms);  // a slow reader: ~1 s of sleeps in all
    }
  });
  auto took = std::chrono::steady_clock::now() - start;
  REQUIRE(r);
  INFO("took " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
               << " ms in " << chunks << " chunks; RSS start " << rss_start << " KiB, peak "
               << rss_peak << " KiB");
  CHECK(r->exit_code == 0);
  CHECK(r->signal == 0);
  CHECK_FALSE(r->truncated);
  CHECK(out.size() == expected.size());
  CHECK(out == expected);
  CHECK(err.empty());
  CHECK(took > 500ms);  // the client set the pace
  // The node held about a window of it, not the whole output.
  CHECK(rss_peak - rss_start < 8 * 1024);
  auto ops = connect_as(node, node.tokens().ops);
  auto m = ops->metrics();
  REQUIRE(m);
  for (const auto& [c, n] : m->errors) CHECK(c != "limit_exceeded");
}

TEST_CASE("a dropped exec call still queued behind another exec of its session never runs, and "
          "the running exec is not disturbed", "[rpc][cancel]") {
  node_process node;
  triplane::test::raw_rpc_session raw(node.endpoint(), node.tokens().alice, "queued");
  auto& io = raw.io;
  auto& session = raw.session;
  auto wait_ms = [&](int ms) { raw.wait_ms(ms); };
  auto first = session.execRequest();
  first.initRequest().setShell("sleep 2; echo first");
  auto first_done = first.send();
  wait_ms(500);  // the first command runs
  {
    auto second = session.execRequest();
    second.initRequest().setShell("echo ran > marker.txt");
    auto second_done = second.send();
    wait_ms(300);  // the call has reached the session and waits behind the first command
  }  // dropped here: the call is cancelled
  auto r = first_done.wait(io.waitScope).getResult();
  CHECK(r.getExitCode() == 0);
  CHECK(r.getSignal() == 0);
  auto first_out = r.getStdout();
  CHECK(std::string(reinterpret_cast<const char*>(first_out.begin()), first_out.size())
        == "first\n");
  wait_ms(1000);  // room for anything still queued to run (it must not)
  auto check = session.execRequest();
  check.initRequest().setShell("test -e marker.txt && echo present || echo absent");
  auto c = check.send().wait(io.waitScope).getResult();
  auto text = c.getStdout();
  CHECK(std::string(reinterpret_cast<const char*>(text.begin()), text.size()) == "absent\n");
  auto ls = session.listFilesRequest();
  auto files = ls.send().wait(io.waitScope).getEntries();
  for (auto f : files) CHECK(std::string(f.getPath().cStr()) != "marker.txt");
}

TEST_CASE("per-tenant limits answer overloaded and limit_exceeded instead of queuing",
          "[rpc][limits]") {
  node_process node({"--triplane.rpc-max-calls=4", "--triplane.rpc-max-sessions=3"});

  SECTION("concurrent calls beyond the limit are refused with overloaded") {
    triplane::test::raw_rpc_session raw(node.endpoint(), node.tokens().alice, "busy");
    auto& io = raw.io;
    auto& session = raw.session;
    kj::Vector<kj::Promise<bool>> calls;
    for (int i = 0; i < 12; ++i) {
      auto req = session.execRequest();
      auto argv = req.initRequest().initArgv(2);
      argv.set(0, "sleep");
      argv.set(1, "0.5");
      calls.add(req.send().then([](auto&&) { return true; },
                                      [](kj::Exception&& e) {
                                        std::string d = e.getDescription().cStr();
                                        if (d.find("triplane:overloaded") == std::string::npos)
                                          kj::throwFatalException(kj::mv(e));
                                        return false;
                                      }));
    }
    auto results = kj::joinPromises(calls.releaseAsArray()).wait(io.waitScope);
    int ok = 0, refused = 0;
    for (bool r : results) (r ? ok : refused)++;
    CHECK(ok == 4);
    CHECK(refused == 8);
  }

  SECTION("open sessions beyond the limit are refused with limit_exceeded") {
    auto alice = connect_as(node, node.tokens().alice);
    std::vector<triplane::client::session> held;
    for (int i = 0; i < 3; ++i) {
      auto s = alice->open_session("s" + std::to_string(i), true);
      REQUIRE(s);
      held.push_back(*s);
    }
    auto fourth = alice->open_session("s3", true);
    CHECK(code(fourth) == errc::limit_exceeded);
    // Another tenant has its own budget.
    auto bob = connect_as(node, node.tokens().bob);
    CHECK(bob->open_session("s0", true));
    // Releasing a handle frees a slot (the release travels asynchronously).
    held.pop_back();
    bool reopened = false;
    for (int i = 0; i < 20 && !reopened; ++i) {
      reopened = static_cast<bool>(alice->open_session("s3", true));
      if (!reopened) std::this_thread::sleep_for(50ms);
    }
    CHECK(reopened);
  }
}

TEST_CASE("a call that outlives its deadline is answered with timeout", "[rpc][limits]") {
  node_process node({"--triplane.rpc-call-deadline=300ms"});
  auto alice = connect_as(node, node.tokens().alice);
  auto s = alice->open_session("slowpoke", true);
  REQUIRE(s);
  // A session runs one operation at a time: a kv get behind a 3 s command waits for it, longer
  // than the 300 ms call deadline (exec has its own deadline).
  std::thread busy([&] {
    auto c = connection::connect(node.endpoint(), node.tokens().alice);
    if (!c) return;
    auto bs = (*c)->open_session("slowpoke", false);
    if (!bs) return;
    triplane::client::exec_options opts;
    opts.shell = "sleep 3";
    (void)bs->exec(opts);
  });
  std::this_thread::sleep_for(1000ms);
  auto start = std::chrono::steady_clock::now();
  auto r = s->kv_get("answer");
  auto took = std::chrono::steady_clock::now() - start;
  busy.join();
  CHECK(code(r) == errc::timeout);
  CHECK(took < 1500ms);
  CHECK(s->kv_put("fast", "1"));
}

TEST_CASE("an admin reads node stats and rpc metrics and the supervision tree and drain cancels "
          "in-flight calls", "[rpc][admin]") {
  node_process node;
  // A client in a child process (forked before this process connects) starts a long exec
  // once the parent's traffic is done; the drain below must cancel it.
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    std::this_thread::sleep_for(1500ms);
    auto c = connection::connect(node.endpoint(), node.tokens().alice);
    if (!c) _exit(2);
    auto cs = (*c)->open_session("m2", true);
    if (!cs) _exit(3);
    triplane::client::exec_options opts;
    opts.argv = {"sleep", "20"};
    auto r = cs->exec(opts);
    _exit(!r && triplane::code_of(r.error()) == errc::unavailable ? 0 : 4);
  }
  // A second one reads a file of the same session while that exec runs: the read waits behind
  // it (a one-request call, cancelled by failing its request rather than by a canceler).
  pid_t reader = fork();
  REQUIRE(reader >= 0);
  if (reader == 0) {
    std::this_thread::sleep_for(1000ms);
    auto c = connection::connect(node.endpoint(), node.tokens().alice);
    if (!c) _exit(2);
    auto cs = (*c)->open_session("m2", true);  // before the exec: opening asks the session too
    if (!cs) _exit(3);
    std::this_thread::sleep_for(1000ms);
    auto r = cs->read_file("nothing-here");
    _exit(!r && triplane::code_of(r.error()) == errc::unavailable ? 0 : 4);
  }
  auto alice = connect_as(node, node.tokens().alice);
  auto s = alice->open_session("m", true);
  REQUIRE(s);
  for (int i = 0; i < 20; ++i) REQUIRE(s->kv_put("k", "v"));
  auto ops = connect_as(node, node.tokens().ops);
  CHECK(ops->is_admin());
  auto st = ops->stats();
  REQUIRE(st);
  CHECK(st->live_actors >= 1);
  CHECK(st->open_connections >= 2);
  auto m = ops->metrics();
  REQUIRE(m);
  bool saw_put = false;
  for (const auto& mm : m->methods)
    if (mm.method == "Session.kvPut") {
      saw_put = true;
      CHECK(mm.calls == 20);
      CHECK(mm.p50_us > 0);
      CHECK(mm.p99_us >= mm.p50_us);
    }
  CHECK(saw_put);
  auto tree = ops->supervision_tree();
  REQUIRE(tree);
  CHECK(tree->find("triplane.node") != std::string::npos);

  // Drain: the children's calls in flight are cancelled at the deadline; new calls get
  // unavailable.
  std::this_thread::sleep_for(3000ms);
  auto drained = ops->drain(300ms);
  REQUIRE(drained);
  CHECK(*drained == 2);
  for (pid_t p : {child, reader}) {
    int status = 0;
    waitpid(p, &status, 0);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
  CHECK(code(s->kv_get("k")) == errc::unavailable);
  auto after = ops->stats();
  REQUIRE(after);
  CHECK(after->draining);
}

namespace {

const std::string tiny_model = std::string(TRIPLANE_FIXTURES_DIR) + "/llama/tiny-llama-f32";

bool have_tiny_model() {
  if (access((tiny_model + "/model.safetensors").c_str(), R_OK) == 0) return true;
  WARN("SKIP: the tiny Llama fixture is missing at " << tiny_model
                                                     << " (set TRIPLANE_FIXTURES_DIR)");
  return false;
}

/// stdout of `command` (run through the shell).
std::string output_of(const std::string& command) {
  std::string out;
  FILE* p = popen(command.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

std::string joined(const std::vector<uint32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

} // namespace

TEST_CASE("greedy tokens generated over RPC by the node's inference worker equal triplane "
          "generate's for the same prompt", "[rpc][inference]") {
  if (!have_tiny_model()) return;
  node_process node({"--model", tiny_model});
  auto alice = connect_as(node, node.tokens().alice);

  auto models = alice->list_models();
  REQUIRE(models);
  REQUIRE(models->size() == 1);
  CHECK((*models)[0].name == "tiny-llama-f32");
  CHECK((*models)[0].vocab_size == 384);
  CHECK((*models)[0].backend == "cpu");
  CHECK((*models)[0].parameters > 0);

  const std::vector<uint32_t> prompt = {17, 200, 5, 99, 311, 42, 7};
  auto reference = output_of(std::string(TRIPLANE_SERVE_EXE) + " generate --model " + tiny_model
                             + " --tokens " + joined(prompt) + " --max-new-tokens 12");
  REQUIRE(reference.size() > 1);
  reference.pop_back();  // '\n'

  triplane::client::generate_options g;
  g.prompt_tokens = prompt;
  g.max_tokens = 12;
  // Streamed to the sink as the worker produces them.
  std::vector<uint32_t> streamed;
  int calls = 0;
  auto r = alice->generate(g, [&](const std::vector<uint32_t>& ids) {
    ++calls;
    streamed.insert(streamed.end(), ids.begin(), ids.end());
  });
  REQUIRE(r);
  CHECK(joined(streamed) == reference);
  CHECK(calls >= 1);
  CHECK(r->tokens.empty());
  CHECK(r->generated_tokens == 12);
  CHECK(r->prompt_tokens == 7);
  CHECK(r->finish_reason == "length");
  // Without a sink the tokens come in the result.
  auto whole = alice->generate(g);
  REQUIRE(whole);
  CHECK(joined(whole->tokens) == reference);

  SECTION("a stop token ends the generation and is the last token") {
    g.stop_tokens = {streamed[3]};
    auto s = alice->generate(g);
    REQUIRE(s);
    CHECK(s->finish_reason == "stop");
    // Up to and including the first occurrence of the stop token.
    auto first = std::find(streamed.begin(), streamed.end(), streamed[3]);
    CHECK(joined(s->tokens) == joined({streamed.begin(), first + 1}));
  }
  SECTION("a negative temperature means greedy, as api.capnp documents") {
    g.temperature = -1.0f;
    auto neg = alice->generate(g);
    REQUIRE(neg);
    CHECK(joined(neg->tokens) == reference);
  }
  SECTION("bad requests are refused with invalid_argument or not_found") {
    triplane::client::generate_options bad;
    CHECK(code(alice->generate(bad)) == errc::invalid_argument);  // empty prompt
    bad.prompt_tokens = {384};                                    // outside the vocabulary
    CHECK(code(alice->generate(bad)) == errc::invalid_argument);
    bad.prompt_tokens = {1};
    bad.model = "gpt-17";
    CHECK(code(alice->generate(bad)) == errc::not_found);
  }
  SECTION("triplane-cli generate prints the same tokens") {
    auto cli = output_of("TRIPLANE_ENDPOINT=" + node.endpoint() + " TRIPLANE_TOKEN="
                         + node.tokens().alice + " " + TRIPLANE_CLI + " generate --tokens "
                         + joined(prompt) + " --max-tokens 12 2>/dev/null");
    CHECK(cli == reference + "\n");
  }
}

TEST_CASE("a client that disconnects mid-generation has its call cancelled, the worker stops "
          "generating for it and keeps serving", "[rpc][inference][cancel]") {
  if (!have_tiny_model()) return;
  node_process node({"--model", tiny_model});
  // A long generation from a child process that is killed once tokens flow.
  int pipe_fds[2];
  REQUIRE(pipe(pipe_fds) == 0);
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    close(pipe_fds[0]);
    auto c = connection::connect(node.endpoint(), node.tokens().alice);
    if (!c) _exit(2);
    triplane::client::generate_options g;
    g.prompt_tokens = {1, 2, 3};
    g.max_tokens = 1000;  // the tiny model's context is 1024
    bool told = false;
    (void)(*c)->generate(g, [&](const std::vector<uint32_t>&) {
      if (!told && write(pipe_fds[1], "x", 1) == 1) told = true;
    });
    _exit(0);
  }
  close(pipe_fds[1]);
  char x;
  REQUIRE(read(pipe_fds[0], &x, 1) == 1);
  close(pipe_fds[0]);
  auto ops = connect_as(node, node.tokens().ops);
  auto before = ops->inference_stats();
  REQUIRE(before);
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  // The worker stops generating for it: the request leaves the batch as cancelled (not
  // completed) well short of its 1000 tokens, and the token counter stops moving.
  INFO("before the kill: running " << before->running << ", tokens " << before->tokens_generated);
  CHECK(before->requests_accepted == 1);
  CHECK(before->requests_completed == 0);  // it was generating when the client was killed
  triplane::client::inference_worker_stats after;
  for (int i = 0; i < 100; ++i) {
    auto st = ops->inference_stats();
    REQUIRE(st);
    after = *st;
    if (after.running == 0 && after.queued == 0) break;
    std::this_thread::sleep_for(50ms);
  }
  INFO("after: tokens " << after.tokens_generated << ", cancelled " << after.requests_cancelled);
  CHECK(after.running == 0);
  CHECK(after.requests_cancelled == 1);
  CHECK(after.requests_completed == 0);
  CHECK(after.tokens_generated < 1000);
  std::this_thread::sleep_for(300ms);
  auto later = ops->inference_stats();
  REQUIRE(later);
  CHECK(later->tokens_generated == after.tokens_generated);
  // The worker is free again: a short generation completes quickly, and with the same tokens
  // as before (nothing of the cancelled request leaks into it).
  auto alice = connect_as(node, node.tokens().alice);
  triplane::client::generate_options g;
  g.prompt_tokens = {17, 200, 5};
  g.max_tokens = 4;
  auto start = std::chrono::steady_clock::now();
  auto r = alice->generate(g);
  REQUIRE(r);
  CHECK(r->generated_tokens == 4);
  CHECK(std::chrono::steady_clock::now() - start < 20s);
  // The node saw the disconnect as a cancelled call (the adapter then sends the worker
  // inf_cancel and stops the sink actor, which the worker monitors).
  auto m = ops->metrics();
  REQUIRE(m);
  uint64_t cancelled = 0;
  for (const auto& [c, n] : m->errors)
    if (c == "cancelled") cancelled = n;
  CHECK(cancelled == 1);
  // Operators see the worker's counters in `triplane-cli stats`.
  auto cli = output_of("TRIPLANE_ENDPOINT=" + node.endpoint() + " TRIPLANE_TOKEN="
                       + node.tokens().ops + " " + TRIPLANE_CLI + " stats 2>&1");
  CHECK(cli.find("completed 1, cancelled 1,") != std::string::npos);
}

TEST_CASE("a client whose token callback fails gets its generation cancelled and keeps its "
          "connection", "[rpc][inference][cancel]") {
  if (!have_tiny_model()) return;
  node_process node({"--model", tiny_model});
  auto alice = connect_as(node, node.tokens().alice);
  triplane::client::generate_options g;
  g.prompt_tokens = {1, 2, 3};
  g.max_tokens = 1000;
  auto r = alice->generate(g, [](const std::vector<uint32_t>&) {
    throw std::runtime_error("token log is full on the client");
  });
  REQUIRE_FALSE(r);
  INFO(triplane::describe(r.error()));
  CHECK(triplane::code_of(r.error()) == errc::cancelled);
  CHECK(triplane::describe(r.error()).find("token log is full on the client") != std::string::npos);
  // The same connection keeps serving: a failing sink is the client's business, not a
  // malformed call.
  auto models = alice->list_models();
  REQUIRE(models);
  CHECK(models->size() == 1);
  g.max_tokens = 4;
  auto after = alice->generate(g);
  REQUIRE(after);
  CHECK(after->generated_tokens == 4);
  // The worker stopped generating for the failed call.
  auto ops = connect_as(node, node.tokens().ops);
  triplane::client::inference_worker_stats st;
  for (int i = 0; i < 100; ++i) {
    auto s = ops->inference_stats();
    REQUIRE(s);
    st = *s;
    if (st.running == 0 && st.queued == 0) break;
    std::this_thread::sleep_for(50ms);
  }
  CHECK(st.running == 0);
  CHECK(st.requests_cancelled == 1);
  CHECK(st.tokens_generated < 1000);
  auto m = ops->metrics();
  REQUIRE(m);
  for (const auto& [c, n] : m->errors) CHECK(c != "internal");
}

TEST_CASE("a generation that takes longer than the client's per-call timeout completes",
          "[rpc][inference][limits]") {
  if (!have_tiny_model()) return;
  node_process node({"--model", tiny_model});
  auto alice = connect_as(node, node.tokens().alice);
  alice->set_call_timeout(100ms);
  triplane::client::generate_options g;
  g.prompt_tokens = {1, 2, 3};
  g.max_tokens = 1000;
  auto start = std::chrono::steady_clock::now();
  auto r = alice->generate(g);
  auto took = std::chrono::steady_clock::now() - start;
  INFO("took " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
  REQUIRE(took > 100ms);  // else this test would prove nothing
  REQUIRE(r);
  CHECK(r->generated_tokens == 1000);
  CHECK(r->finish_reason == "length");
}
