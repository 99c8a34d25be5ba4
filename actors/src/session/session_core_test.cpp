// A session end to end without actors: persistence, rehydration, dedup, fork, destroy, quotas,
// background processes, tar, and the real workload.
#include "session/testing/session_fixture.hpp"
#include "session/testing/tar_writer.hpp"

#include <csignal>
#include <fstream>
#include <future>
#include <random>
#include <set>
#include <thread>

#include <fcntl.h>
#include <sys/resource.h>

using namespace triplane;
using namespace triplane::actors;
using namespace triplane::actors::session;
using namespace triplane::actors::session::testing;

namespace {

file_write_request file(std::string path, std::string data, uint32_t mode = 0644) {
  return {std::move(path), std::move(data), mode, true, false};
}

std::string read_all(session_core& s, const std::string& path) {
  auto d = s.read_file({path, 0, 0});
  REQUIRE(d);
  return d->data;
}

/// A session with a 1 MiB workspace quota that holds one 4-byte file, keep.txt.
std::unique_ptr<session_core> activate_with_1mib_quota(node_fixture& f, const std::string& id) {
  auto s = f.activate(id);
  session_settings settings;
  settings.workspace_quota_bytes = 1 << 20;
  REQUIRE(s->configure(settings));
  REQUIRE(s->write_file(file("keep.txt", "keep")));
  return s;
}

/// Kills the background process `id` of `s`, which must have run until then (not ended on an
/// error of its own).
void kill_and_check_it_was_running(session_core& s, uint64_t id) {
  REQUIRE(s.bg_signal(id, SIGKILL));
  auto done = s.bg_wait(id, 10000);
  REQUIRE(done);
  INFO(done->result.stderr_data);
  CHECK_FALSE(done->running);
  CHECK(done->result.term_signal == SIGKILL);
}

} // namespace

TEST_CASE("a session's files, kv, env, cwd and history survive passivation", "[session]") {
  node_fixture f;
  {
    auto s = f.activate("alpha");
    REQUIRE(s->write_file(file("dir/a.txt", "hello")));
    REQUIRE(s->write_file(file("run.sh", "#!/bin/sh\necho run:$GREETING\n", 0755)));
    REQUIRE(s->kv_put("note/1", "remember"));
    REQUIRE(s->set_env({{"GREETING", "hi"}}, {}));
    REQUIRE(s->set_cwd("dir"));
    auto r = s->exec(shell("ln -s a.txt link; mkdir -p empty/deeper; pwd; echo more > b.txt"));
    REQUIRE(r);
    CHECK(r->stdout_data == "/workspace/dir\n");
    REQUIRE_FALSE(s->passivate());
    CHECK_FALSE(std::filesystem::exists(s->workspace_dir()));
  }
  f.open_db();  // a fresh database handle: nothing survives in memory
  auto s = f.activate("alpha");
  CHECK_FALSE(s->stats().materialized);
  CHECK(read_all(*s, "dir/a.txt") == "hello");
  CHECK(read_all(*s, "dir/b.txt") == "more\n");
  auto link = s->stat_file("dir/link");
  REQUIRE(link);
  CHECK(link->type == file_type::symlink);
  CHECK(link->link_target == "a.txt");
  CHECK(s->stat_file("dir/empty/deeper"));
  CHECK(s->stat_file("run.sh")->mode == 0755);
  CHECK(s->kv_get("note/1").value == "remember");
  auto info = s->info();
  CHECK(info.cwd == "dir");
  CHECK(info.env.at("GREETING") == "hi");
  REQUIRE(info.history.size() == 1);
  CHECK(info.history[0].exit_code == 0);
  auto r = s->exec(shell("../run.sh"));
  REQUIRE(r);
  CHECK(r->stdout_data == "run:hi\n");
}

TEST_CASE("kv keys with a NUL byte are refused, and binary keys and values survive passivation",
          "[session][bad-input]") {
  // The record stores keys as Cap'n Proto Text, which ends at a NUL: "a\0x" would come back as
  // "a", overwriting the value of "a" (or of "a\0y").
  node_fixture f;
  const std::string binary_key("k\xff\x01", 3), binary_value("v\0\xff", 3);
  {
    auto s = f.activate("kv-bytes");
    REQUIRE(s->kv_put("a", "plain"));
    for (const auto& bad : {std::string("a\0x", 3), std::string("\0", 1), std::string("a\0", 2)}) {
      INFO(bad.size());
      auto r = s->kv_put(bad, "shadows a");
      REQUIRE_FALSE(r);
      CHECK(code_of(r.error()) == errc::invalid_argument);
    }
    REQUIRE(s->kv_put(binary_key, binary_value));
    REQUIRE(s->kv_list("").size() == 2);
    REQUIRE(s->kv_list("k\xff").size() == 1);
    auto over = s->kv_put("big", std::string(2u << 20, 'x'));  // over the node's 1 MiB
    REQUIRE_FALSE(over);
    CHECK(code_of(over.error()) == errc::limit_exceeded);
    REQUIRE_FALSE(s->passivate());
  }
  f.open_db();
  auto s = f.activate("kv-bytes");
  auto all = s->kv_list("");
  REQUIRE(all.size() == 2);
  CHECK(all[0].key == "a");
  CHECK(all[0].value == "plain");
  CHECK(all[1].key == binary_key);
  CHECK(all[1].value == binary_value);
}

TEST_CASE("after an exec only the changed files are read and stored", "[session]") {
  node_fixture f;
  auto s = f.activate("sync");
  REQUIRE(s->exec(shell("for i in $(seq 1 50); do echo file $i > f$i.txt; done")));
  CHECK(s->stats().files_read == 50);
  // Files written within a timestamp tick of the sync that recorded them are read once more
  // by the next sync (workspace_sync.cpp: racily clean entries); after a pause, no longer.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  REQUIRE(s->exec(shell("true")));
  CHECK(s->stats().files_read <= 50);
  CHECK(s->stats().chunks_written == 0);
  auto r = s->exec(shell("echo changed >> f7.txt; cat f1.txt"));
  REQUIRE(r);
  CHECK(s->stats().files_read == 1);
  CHECK(s->stats().chunks_written == 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  REQUIRE(s->exec(shell("true")));
  CHECK(s->stats().files_read == 1);  // f7, written just before the last sync: unchanged
  CHECK(s->stats().chunks_written == 0);
  REQUIRE(s->exec(shell("true")));
  CHECK(s->stats().files_read == 0);
}

TEST_CASE("identical content is stored once and reclaimed when its last session is destroyed", "[session]") {
  node_fixture f;
  std::string big(3 * chunk_bytes + 123, 'x');
  for (size_t i = 0; i < big.size(); i += 4096) big[i] = static_cast<char>('a' + (i / 4096) % 26);
  auto a = f.activate("a");
  auto b = f.activate("b");
  REQUIRE(a->write_file(file("big.bin", big)));
  REQUIRE(b->write_file(file("copy/big.bin", big)));
  auto stats = f.store->stats();
  REQUIRE(stats);
  CHECK(stats->chunks == 4);
  CHECK(stats->chunk_bytes == big.size());
  auto first = sha256(big.substr(0, chunk_bytes));
  CHECK(*f.store->refcount(first) == 2);
  REQUIRE_FALSE(a->destroy());
  CHECK(*f.store->refcount(first) == 1);
  CHECK(f.store->stats()->chunks == 4);
  REQUIRE_FALSE(b->destroy());
  CHECK(*f.store->refcount(first) == 0);
  CHECK(f.store->stats()->chunks == 0);
  CHECK(f.store->stats()->sessions == 0);
  CHECK_FALSE(*f.store->exists("a"));
}

TEST_CASE("changes whose storing failed are stored by the next save, not forgotten", "[session]") {
  // A failed write of the record (here: the WAL cannot grow, as on a full disk) must leave the
  // session able to store the same changes later; remembering them as stored would drop them
  // at passivation and make every later save refer to chunks that were never written.
  node_fixture f;
  auto s = f.activate("retry");
  REQUIRE(s->write_file(file("old.txt", "old")));
  std::filesystem::path wal;
  for (const auto& e : std::filesystem::directory_iterator(f.base / "db"))
    if (e.path().extension() == ".log" && (wal.empty() || e.path() > wal)) wal = e.path();
  REQUIRE_FALSE(wal.empty());
  const std::string data(300000, 'n');
  {
    struct rlimit saved {};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
    auto previous = ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit low = saved;
    low.rlim_cur = data.size() + 16;  // the workspace file fits; the WAL, already longer, cannot take it
    REQUIRE(std::filesystem::file_size(wal) > 16);
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &low) == 0);
    auto failed = s->write_file(file("new.bin", data));
    ::setrlimit(RLIMIT_FSIZE, &saved);
    ::signal(SIGXFSZ, previous);
    REQUIRE_FALSE(failed);
  }
  f.open_db();  // RocksDB refuses writes after a failed WAL write until reopened
  REQUIRE_FALSE(s->passivate());  // stores what the failed save could not
  s = f.activate("retry");
  CHECK(read_all(*s, "new.bin") == data);
  auto later = s->write_file(file("later.txt", "later"));
  INFO((later ? std::string() : describe(later.error())));
  REQUIRE(later);
  REQUIRE_FALSE(s->passivate());
  f.open_db();
  auto back = f.activate("retry");
  CHECK(read_all(*back, "old.txt") == "old");
  CHECK(read_all(*back, "later.txt") == "later");
  CHECK(read_all(*back, "new.bin") == data);
}

TEST_CASE("fork copies a session without copying file contents", "[session]") {
  node_fixture f;
  auto parent = f.activate("parent");
  REQUIRE(parent->write_file(file("src/main.c", "int main(){return 0;}\n")));
  REQUIRE(parent->write_file(file("data.bin", std::string(100000, 'd'))));
  REQUIRE(parent->kv_put("k", "v"));
  auto before = f.store->stats();
  auto child_info = parent->fork("child");
  REQUIRE(child_info);
  CHECK(child_info->forked_from == "parent");
  CHECK(child_info->file_count == 2);
  auto after = f.store->stats();
  CHECK(after->chunks == before->chunks);
  CHECK(after->chunk_bytes == before->chunk_bytes);
  CHECK(*f.store->refcount(sha256(std::string(100000, 'd'))) == 2);
  CHECK(code_of(parent->fork("child").error()) == errc::already_exists);

  auto child = f.activate("child");
  CHECK(read_all(*child, "src/main.c") == "int main(){return 0;}\n");
  CHECK(child->kv_get("k").value == "v");
  REQUIRE(child->write_file(file("src/main.c", "int main(){return 1;}\n")));
  CHECK(read_all(*parent, "src/main.c") == "int main(){return 0;}\n");
  REQUIRE_FALSE(parent->destroy());
  CHECK(read_all(*child, "data.bin").size() == 100000);
  CHECK(*f.store->refcount(sha256(std::string(100000, 'd'))) == 1);
}

TEST_CASE("the store lists and counts stored session ids by prefix, in pages, without "
          "activating them", "[session]") {
  node_fixture f;
  for (std::string id : {"t/b", "t/a", "t/c", "u/a", "t"}) {
    auto s = f.activate(id);
    REQUIRE(s->kv_put("k", "v"));
    REQUIRE_FALSE(s->persist());
  }
  auto never_stored = f.activate("t/never");
  auto gone = f.activate("t/gone");
  REQUIRE(gone->kv_put("k", "v"));
  REQUIRE_FALSE(gone->persist());
  REQUIRE_FALSE(gone->destroy());

  auto ids = f.store->list_ids("t/", "", 10);
  REQUIRE(ids);
  CHECK(*ids == std::vector<std::string>{"t/a", "t/b", "t/c"});
  auto page = f.store->list_ids("t/", "", 2);
  REQUIRE(page);
  REQUIRE(*page == std::vector<std::string>{"t/a", "t/b"});
  auto next = f.store->list_ids("t/", page->back(), 2);
  REQUIRE(next);
  CHECK(*next == std::vector<std::string>{"t/c"});
  auto none = f.store->list_ids("t/", "t/c", 2);
  REQUIRE(none);
  CHECK(none->empty());
  CHECK(*f.store->count_ids("t/") == 3);
  CHECK(*f.store->count_ids("") == 5);
  CHECK(*f.store->count_ids("v/") == 0);
}

TEST_CASE("a fork onto the id of a live session that was never stored becomes that session",
          "[session]") {
  // The id is free in the store (fork checks only that), but its session may be live: looked at
  // (info, kv) or destroyed and kept live as a fresh one. It must see the fork's state, and must
  // not overwrite the fork's record with its own (which also left the fork's chunk references
  // counted for ever).
  node_fixture f;
  auto parent = f.activate("parent");
  REQUIRE(parent->write_file(file("a.txt", "from the parent")));
  REQUIRE(parent->kv_put("k", "v"));
  session_record unaware;  // a first save where a record exists is refused, not an overwrite
  unaware.id = "parent";
  CHECK(code_of(f.store->save(unaware, nullptr, {})) == errc::already_exists);
  auto child = f.activate("child");
  CHECK(child->info().file_count == 0);  // live, nothing stored
  auto reused = f.activate("reused");
  REQUIRE(reused->write_file(file("old.txt", "old")));
  REQUIRE_FALSE(reused->destroy());  // live again as a fresh, unstored session
  REQUIRE(parent->fork("child"));
  REQUIRE(parent->fork("reused"));
  for (auto* s : {child.get(), reused.get()}) {
    INFO(s->id());
    CHECK(s->info().file_count == 1);
    CHECK(s->kv_get("k").value == "v");
    CHECK(read_all(*s, "a.txt") == "from the parent");
    CHECK(code_of(s->stat_file("old.txt").error()) == errc::not_found);
    REQUIRE(s->write_file(file("own.txt", s->id())));
    REQUIRE_FALSE(s->passivate());
    auto back = f.activate(s->id());
    CHECK(read_all(*back, "a.txt") == "from the parent");
    CHECK(read_all(*back, "own.txt") == s->id());
  }
  REQUIRE_FALSE(parent->destroy());
  REQUIRE_FALSE(child->destroy());
  REQUIRE_FALSE(reused->destroy());
  CHECK(f.store->stats()->chunks == 0);
  CHECK(f.store->stats()->sessions == 0);
  CHECK(*f.store->refcount(sha256("from the parent")) == 0);
}

TEST_CASE("chunk reference counts always equal the references of the stored records, and nothing "
          "is left once every session is destroyed", "[session]") {
  // Random writes (3 contents, some over a chunk), rewrites back and forth, execs, moves,
  // removes, forks, passivations and destroys over a growing set of sessions; after every step
  // the store is checked whole.
  node_fixture f;
  auto sessions = *f.db->column("sandbox.sessions");
  auto refs = *f.db->column("sandbox.refs");
  auto chunks = *f.db->column("sandbox.chunks");
  auto check_store = [&] {
    std::map<std::string, uint64_t> referenced;
    REQUIRE_FALSE(f.db->for_each(sessions, "", [&](std::string_view k, std::string_view v) {
      auto r = decode_record(v, std::string(k));
      REQUIRE(r);
      for (const auto& [path, e] : r->files)
        for (const auto& c : e.chunks) ++referenced[c];
      return true;
    }));
    std::map<std::string, uint64_t> counted;
    REQUIRE_FALSE(f.db->for_each(refs, "", [&](std::string_view k, std::string_view) {
      auto n = f.store->refcount(k);
      REQUIRE(n);
      if (*n) counted[std::string(k)] = *n;
      return true;
    }));
    CHECK(counted == referenced);
    std::set<std::string> stored;
    REQUIRE_FALSE(f.db->for_each(chunks, "", [&](std::string_view k, std::string_view) {
      stored.insert(std::string(k));
      return true;
    }));
    std::set<std::string> wanted;
    for (const auto& [c, n] : referenced) wanted.insert(c);
    CHECK(stored == wanted);
  };
  std::mt19937 rng(42);
  std::map<std::string, std::unique_ptr<session_core>> live;
  std::vector<std::string> ids;
  auto get = [&](const std::string& id) -> session_core& {
    auto& p = live[id];
    if (!p) p = f.activate(id);
    return *p;
  };
  auto name = [&] { return "f" + std::to_string(rng() % 3); };
  for (int step = 0; step < 300; ++step) {
    unsigned op = rng() % 10;
    std::string id = ids.empty() || op == 0 ? "s" + std::to_string(step) : ids[rng() % ids.size()];
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
    INFO("step " << step << " op " << op << " session " << id);
    auto& s = get(id);
    std::string content(1000 + (rng() % 3) * chunk_bytes, static_cast<char>('a' + rng() % 3));
    switch (op) {
      case 0:
      case 1: (void)s.write_file(file(name(), content)); break;
      case 2: (void)s.exec(shell("echo $$ > g; cp f0 f9 2>/dev/null; true")); break;
      case 3: {
        auto child = "s" + std::to_string(step) + "-fork";
        if (s.fork(child)) ids.push_back(child);
        break;
      }
      case 4:
        REQUIRE_FALSE(s.passivate());
        live.erase(id);
        break;
      case 5: REQUIRE_FALSE(s.destroy()); break;
      case 6: (void)s.remove_file({name(), true}); break;
      case 7: (void)s.move_file({name(), name(), true}); break;
      case 8: (void)s.read_file({"f0", 0, 10}); break;
      case 9: {  // hard links: made, written through, and left as the only name
        std::string link = "f" + std::to_string(3 + rng() % 2);
        (void)s.exec(shell("ln -f " + name() + " " + link + " 2>/dev/null; " +
                           (rng() % 2 ? "echo more >> " + link + "; " : "") + "true"));
        break;
      }
    }
    check_store();
  }
  for (const auto& id : ids) REQUIRE_FALSE(get(id).destroy());
  check_store();
  CHECK(f.store->stats()->chunks == 0);
  CHECK(f.store->stats()->sessions == 0);
  size_t counters = 0;
  REQUIRE_FALSE(f.db->for_each(refs, "", [&](std::string_view, std::string_view) {
    ++counters;
    return true;
  }));
  CHECK(counters == 0);
}

TEST_CASE("destroy removes the workspace, the record and the session's chunks", "[session]") {
  node_fixture f;
  auto s = f.activate("doomed");
  REQUIRE(s->exec(shell("head -c 300000 /dev/urandom > r.bin")));
  auto dir = s->workspace_dir();
  CHECK(std::filesystem::exists(dir));
  REQUIRE_FALSE(s->destroy());
  CHECK_FALSE(std::filesystem::exists(dir));
  CHECK(f.store->stats()->chunks == 0);
  CHECK_FALSE(*f.store->exists("doomed"));
  CHECK(s->info().file_count == 0);
  CHECK_FALSE(s->persist());
  CHECK_FALSE(*f.store->exists("doomed"));  // nothing changed since: nothing stored
  auto again = f.activate("doomed");
  CHECK(again->info().file_count == 0);
}

TEST_CASE("creating more files than a workspace may hold is refused and the workspace restored",
          "[session][bad-input]") {
  node_fixture f;
  f.node.max_workspace_entries = 50;  // keep.txt is one
  auto s = f.activate("inodes");
  REQUIRE(s->write_file(file("keep.txt", "keep")));
  SECTION("a command that creates many empty files") {
    auto r = s->exec(shell("for i in $(seq 1 100); do : > f$i; done; echo done"));
    REQUIRE(r);
    INFO(r->message);
    CHECK(r->quota_exceeded);
    CHECK(r->message.find("over its limit of 50") != std::string::npos);
    CHECK(code_of(s->stat_file("f1").error()) == errc::not_found);
  }
  SECTION("a command that keeps creating them is stopped while it runs") {
    auto keeps_going = shell("i=0; while true; do i=$((i+1)); mkdir d$i; done");
    keeps_going.timeout_ms = 30000;
    auto r = s->exec(keeps_going);
    REQUIRE(r);
    INFO(r->message);
    CHECK(r->quota_exceeded);
    CHECK_FALSE(r->timed_out);
    CHECK(r->message.find("while running") != std::string::npos);
    CHECK(code_of(s->stat_file("d1").error()) == errc::not_found);
  }
  SECTION("directories made through the API count too") {
    for (int i = 0; i < 49; ++i) REQUIRE(s->make_directory({"d" + std::to_string(i), false, 0755}));
    auto past = s->make_directory({"one-too-many", false, 0755});
    REQUIRE_FALSE(past);
    CHECK(code_of(past.error()) == errc::limit_exceeded);
    CHECK(code_of(s->stat_file("one-too-many").error()) == errc::not_found);
  }
  // Whatever was refused, the session goes on, with what it held before, after a rehydration
  // too.
  auto ok = s->exec(shell("ls | wc -l"));
  REQUIRE(ok);
  CHECK_FALSE(ok->quota_exceeded);
  CHECK(read_all(*s, "keep.txt") == "keep");
  REQUIRE_FALSE(s->passivate());
  s.reset();
  auto again = f.activate("inodes");
  CHECK(read_all(*again, "keep.txt") == "keep");
  CHECK(code_of(again->stat_file("f1").error()) == errc::not_found);
}

TEST_CASE("filling the disk past the quota is refused and the workspace restored", "[session][bad-input]") {
  node_fixture f;
  auto s = activate_with_1mib_quota(f, "quota");
  SECTION("a command that writes many files") {
    auto r = s->exec(shell("for i in $(seq 1 20); do head -c 100000 /dev/zero > f$i; done; echo done"));
    REQUIRE(r);
    CHECK(r->quota_exceeded);
    CHECK(r->message.find("quota") != std::string::npos);
    CHECK(code_of(s->stat_file("f1").error()) == errc::not_found);
  }
  SECTION("a command that keeps writing is stopped while it runs") {
    auto r = s->exec(shell("i=0; while true; do i=$((i+1)); head -c 200000 /dev/zero > f$i; done"));
    REQUIRE(r);
    CHECK(r->quota_exceeded);
    CHECK_FALSE(r->timed_out);
    CHECK(r->message.find("while running") != std::string::npos);
    CHECK(code_of(s->stat_file("f1").error()) == errc::not_found);
  }
  SECTION("one file past the size limit") {
    auto r = s->exec(shell("head -c 5000000 /dev/zero > big; echo rc=$?"));
    REQUIRE(r);
    CHECK(r->enforced.file_size == limit_mechanism::rlimit);
    auto st = s->stat_file("big");
    if (st) CHECK(st->size <= (1u << 20));
  }
  SECTION("one file stops at what is left of the quota") {
    REQUIRE(s->write_file(file("half", std::string(600000, 'h'))));
    auto r = s->exec(shell("head -c 700000 /dev/zero > big; wc -c < big"));
    REQUIRE(r);
    INFO(r->stdout_data << r->stderr_data << r->message);
    const uint64_t left = (1u << 20) - 600000 - 4;  // keep.txt holds 4 bytes
    CHECK(r->stdout_data == std::to_string(left) + "\n");
    CHECK_FALSE(r->quota_exceeded);
    auto st = s->stat_file("big");
    REQUIRE(st);
    CHECK(st->size == left);
    CHECK(read_all(*s, "half").size() == 600000);
  }
  SECTION("an archive larger than what is left") {
    REQUIRE(s->write_file(file("half", std::string(600000, 'h'))));
    auto make = shell("head -c 500000 /dev/zero > /tmp/z && tar -cf - -C /tmp z");
    make.limits.max_file_bytes = 10 << 20;  // /tmp is under the derived limit too
    auto made = s->exec(make);
    REQUIRE(made);
    REQUIRE(made->stdout_data.size() > 500000);
    auto r = s->tar_in({"in", made->stdout_data});
    REQUIRE_FALSE(r);
    CHECK(code_of(r.error()) == errc::limit_exceeded);
    CHECK(code_of(s->stat_file("in").error()) == errc::not_found);
  }
  SECTION("a write through the files API") {
    auto w = s->write_file(file("huge", std::string(2 << 20, 'h')));
    REQUIRE_FALSE(w);
    CHECK(code_of(w.error()) == errc::limit_exceeded);
    REQUIRE(s->write_file(file("half1", std::string(600000, 'h'))));
    auto w2 = s->write_file(file("half2", std::string(600000, 'h')));
    REQUIRE_FALSE(w2);
    CHECK(code_of(w2.error()) == errc::limit_exceeded);
    CHECK(code_of(s->stat_file("half2").error()) == errc::not_found);
  }
  CHECK(read_all(*s, "keep.txt") == "keep");
  // Healthy afterwards.
  auto ok = s->exec(shell("echo fine"));
  REQUIRE(ok);
  CHECK(ok->stdout_data == "fine\n");
}

TEST_CASE("bad exec requests get clear errors and the session stays usable", "[session][bad-input]") {
  node_fixture f;
  auto s = f.activate("bad");
  exec_request empty;
  CHECK(code_of(s->exec(empty).error()) == errc::invalid_argument);
  exec_request both;
  both.argv = {"true"};
  both.shell = "true";
  CHECK(code_of(s->exec(both).error()) == errc::invalid_argument);
  exec_request escape = shell("pwd");
  escape.cwd = "../..";
  CHECK(code_of(s->exec(escape).error()) == errc::invalid_argument);
  exec_request bad_env = shell("true");
  bad_env.env["A=B"] = "x";
  CHECK(code_of(s->exec(bad_env).error()) == errc::invalid_argument);
  REQUIRE(s->write_file(file("script.sh", "echo hi\n", 0644)));
  exec_request noexec;
  noexec.argv = {"./script.sh"};
  auto r = s->exec(noexec);
  REQUIRE(r);
  CHECK(r->exit_code != 0);
  CHECK(r->stderr_data.find("ermission denied") != std::string::npos);
  auto shadow = s->exec(shell("cat /etc/shadow"));
  REQUIRE(shadow);
  CHECK(shadow->exit_code != 0);
  CHECK(shadow->stdout_data.empty());
  CHECK(s->exec(shell("echo ok"))->stdout_data == "ok\n");
}

TEST_CASE("a background process keeps the session live until it ends", "[session]") {
  node_fixture f;
  auto s = f.activate("bg");
  std::atomic<int> ended{0};
  auto st = s->bg_start(shell("echo started; sleep 30"), [&](uint64_t) { ++ended; });
  REQUIRE(st);
  CHECK(st->running);
  CHECK(s->running_background() == 1);
  auto refused = s->passivate();
  CHECK(code_of(refused) == errc::unavailable);
  auto polled = s->bg_wait(st->bg_id, 300);
  REQUIRE(polled);
  CHECK(polled->running);
  CHECK(polled->result.stdout_data == "started\n");
  REQUIRE(s->bg_signal(st->bg_id, SIGTERM));
  auto done = s->bg_wait(st->bg_id, 10000);
  REQUIRE(done);
  CHECK_FALSE(done->running);
  CHECK(done->result.term_signal == SIGTERM);
  CHECK(ended == 1);
  CHECK(s->bg_list().size() == 1);
  CHECK(code_of(s->bg_poll(99).error()) == errc::not_found);
  CHECK(code_of(s->bg_signal(st->bg_id, 1000).error()) == errc::invalid_argument);
  CHECK_FALSE(s->passivate());
}

TEST_CASE("a background process that fills the workspace past the quota is stopped",
          "[session][bad-input]") {
  node_fixture f;
  auto s = activate_with_1mib_quota(f, "bg-quota");
  // Each file is under the per-file limit: only the supervisor's walk can stop this.
  auto st = s->bg_start(shell("i=0; while true; do i=$((i+1)); head -c 200000 /dev/zero > f$i; "
                              "sleep 0.02; done"),
                        nullptr);
  REQUIRE(st);
  auto done = s->bg_wait(st->bg_id, 10000);
  REQUIRE(done);
  INFO(done->result.message);
  REQUIRE_FALSE(done->running);
  CHECK(done->result.quota_exceeded);
  CHECK(done->result.term_signal == SIGKILL);
  CHECK(done->result.message.find("while running") != std::string::npos);
  CHECK(done->result.enforced.workspace_quota == limit_mechanism::supervisor);
  // Stopped within a walk or two of crossing the quota (~5 files), not after filling the disk.
  auto files = s->list_files({"", false});
  REQUIRE(files);
  CHECK(files->size() < 40);
  // What it wrote is not kept: the workspace goes back to its stored state when it is stored.
  REQUIRE_FALSE(s->passivate());
  auto again = f.activate("bg-quota");
  CHECK(code_of(again->stat_file("f1").error()) == errc::not_found);
  CHECK(read_all(*again, "keep.txt") == "keep");
}

TEST_CASE("a tree deeper than one system call can name survives passivation", "[session]") {
  // A command creates directories one name at a time, so their paths have no length limit;
  // storing and restoring them must not have one either (a restore that fails leaves the
  // session unusable for good). 24 levels of 200-byte names: 4,824 bytes, past PATH_MAX.
  node_fixture f;
  {
    auto s = f.activate("deep");
    auto r = s->exec(shell("python3 -c \"import os\n"
                           "for level in range(24):\n"
                           "  os.mkdir('d' * 200); os.chdir('d' * 200)\n"
                           "  open('at-%d.txt' % level, 'w').write('level %d' % level)\n\""));
    REQUIRE(r);
    INFO(r->stderr_data);
    REQUIRE(r->exit_code == 0);
    REQUIRE_FALSE(s->passivate());
  }
  auto s = f.activate("deep");
  auto r = s->exec(shell("python3 -c \"import os\n"
                         "for level in range(24):\n"
                         "  os.chdir('d' * 200); print(open('at-%d.txt' % level).read())\n\""));
  REQUIRE(r);
  INFO(r->stderr_data);
  CHECK(r->exit_code == 0);
  std::string expected;
  for (int level = 0; level < 24; ++level) expected += "level " + std::to_string(level) + "\n";
  CHECK(r->stdout_data == expected);
  CHECK(s->info().file_count == 24);
}

TEST_CASE("changes a failed sync could not store are stored at passivation, not dropped",
          "[session][bad-input]") {
  // A sync can fail after the change is on disk (here: the node is out of descriptors while
  // it scans). The operation reports the error; the change stays in the live workspace, so
  // the session must not forget it needs storing: passivation would otherwise drop it.
  node_fixture f;
  auto s = f.activate("nofile");
  auto made = s->exec(shell("mkdir -p $(seq -s / 1 30) && echo deep > $(seq -s / 1 30)/deep.txt"));
  REQUIRE(made);
  REQUIRE(made->exit_code == 0);
  size_t open_fds = 0;
  for (auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)e;
    ++open_fds;
  }
  struct rlimit saved {};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  struct rlimit low = saved;
  low.rlim_cur = open_fds + 12;  // enough for the write, not for a scan 30 directories deep
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
  auto r = s->write_file(file("tick", "t"));
  ::setrlimit(RLIMIT_NOFILE, &saved);
  REQUIRE_FALSE(r);
  CHECK(code_of(r.error()) == errc::io_error);
  CHECK(read_all(*s, "tick") == "t");  // on disk, not stored yet
  REQUIRE_FALSE(s->passivate());
  auto back = f.activate("nofile");
  std::string deep;
  for (int i = 1; i <= 30; ++i) deep += std::to_string(i) + "/";
  CHECK(read_all(*back, deep + "deep.txt") == "deep\n");
  CHECK(read_all(*back, "tick") == "t");
}

TEST_CASE("a directory swapped for a symlink to a host path while the node stores the workspace "
          "never makes the node read that host path", "[session][bad-input]") {
  // The sandbox cannot reach host paths, but the node reads the workspace on the host, where a
  // symlink the command made does lead out. A background process flips 'a' between a directory
  // holding secret.txt and a symlink to a host directory holding a secret.txt of its own, while
  // the node syncs (a large file it rewrites each round is hashed first, widening the window
  // between the scan and the read).
  node_fixture f;
  auto outside = f.base / "outside";
  std::filesystem::create_directories(outside);
  const std::string secret = "host secret, never to be stored\n";
  std::ofstream(outside / "secret.txt") << secret;
  auto s = f.activate("swap");
  auto st = s->bg_start(
      shell("python3 -c \"import os, time\n"
            "os.mkdir('real'); open('real/secret.txt', 'w').write('inside')\n"
            "os.symlink('" + outside.string() + "', 'link')\n"
            "open('big', 'wb').write(bytes(16 << 20))\n"
            "while True:\n"
            "  os.utime('big'); os.utime('real/secret.txt')\n"
            "  os.rename('real', 'a'); time.sleep(0.002); os.rename('a', 'real')\n"
            "  os.rename('link', 'a'); time.sleep(0.002); os.rename('a', 'link')\n\""),
      nullptr);
  REQUIRE(st);
  bool stored_host_bytes = false;
  for (int round = 0; round < 40 && !stored_host_bytes; ++round) {
    (void)s->write_file(file("tick", std::to_string(round)));  // a sync; it may fail in the race
    stored_host_bytes = *f.store->refcount(sha256(secret)) > 0 || f.store->chunk(sha256(secret));
  }
  CHECK_FALSE(stored_host_bytes);
  kill_and_check_it_was_running(*s, st->bg_id);
}

TEST_CASE("a file swapped for a fifo while the node stores the workspace does not hang the session",
          "[session][bad-input]") {
  // The node opens changed files to hash them; a fifo swapped in between the scan and that open
  // would block it until a writer comes, and with it every later operation of the session.
  node_fixture f;
  auto s = f.activate("fifo");
  auto st = s->bg_start(
      shell("python3 -c \"import os, time\n"
            "open('file', 'w').write('x'); os.mkfifo('fifo')\n"
            "open('big', 'wb').write(bytes(16 << 20))\n"
            "while True:\n"
            "  os.utime('big'); os.utime('file')\n"
            "  os.rename('file', 'p'); time.sleep(0.002); os.rename('p', 'file')\n"
            "  os.rename('fifo', 'p'); time.sleep(0.002); os.rename('p', 'fifo')\n\""),
      nullptr);
  REQUIRE(st);
  std::atomic<bool> stop{false};
  auto syncs = std::async(std::launch::async, [&] {
    for (int round = 0; round < 40 && !stop; ++round)
      (void)s->write_file(file("tick", std::to_string(round)));  // a sync
  });
  bool hung = syncs.wait_for(std::chrono::seconds(30)) != std::future_status::ready;
  CHECK_FALSE(hung);
  stop = true;
  while (syncs.wait_for(std::chrono::milliseconds(10)) != std::future_status::ready)
    for (const char* name : {"p", "fifo"}) {  // a writer releases a reader blocked on the fifo
      int fd = ::open((s->workspace_dir() + "/" + name).c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
      if (fd >= 0) ::close(fd);
    }
  kill_and_check_it_was_running(*s, st->bg_id);
}

TEST_CASE("a directory goes out and back in as a tar archive", "[session]") {
  node_fixture f;
  auto s = f.activate("tar");
  REQUIRE(s->write_file(file("proj/a.txt", "A")));
  REQUIRE(s->write_file(file("proj/sub/b.txt", "B")));
  auto archive = s->tar_out("proj");
  REQUIRE(archive);
  CHECK(archive->size() >= 1024);
  auto n = s->tar_in({"copy", *archive});
  REQUIRE(n);
  CHECK(*n >= 3);
  CHECK(read_all(*s, "copy/sub/b.txt") == "B");
  CHECK_FALSE(s->tar_in({"bad", "this is not a tar archive at all"}));
  // An archive whose members climb out with '..' or are absolute: tar (inside the sandbox)
  // refuses them, and nothing appears outside the workspace.
  auto made = s->exec(shell(
      "python3 -c \"import tarfile, io\n"
      "with tarfile.open('evil.tar', 'w') as t:\n"
      "  for name in ('../../escaped.txt', '/abs.txt', 'fine.txt'):\n"
      "    data = b'x'; info = tarfile.TarInfo(name); info.size = 1; t.addfile(info, io.BytesIO(data))\n\""));
  REQUIRE(made);
  REQUIRE(made->exit_code == 0);
  auto evil = s->read_file({"evil.tar", 0, 0});
  REQUIRE(evil);
  auto r = s->tar_in({"unpack", evil->data});
  REQUIRE_FALSE(r);
  CHECK(code_of(r.error()) == errc::invalid_argument);
  auto ws = std::filesystem::path(s->workspace_dir());
  CHECK_FALSE(std::filesystem::exists(ws.parent_path() / "escaped.txt"));
  CHECK_FALSE(std::filesystem::exists(ws / "escaped.txt"));
  CHECK_FALSE(std::filesystem::exists("/abs.txt"));
  CHECK(code_of(s->tar_out("../x").error()) == errc::invalid_argument);
}

TEST_CASE("an archive that fails part-way extracts nothing", "[session][bad-input]") {
  node_fixture f;
  auto s = f.activate("tar-atomic");
  REQUIRE(s->write_file(file("keep/existing.txt", "old")));
  REQUIRE(s->write_file(file("clash/inside.txt", "i")));
  REQUIRE(s->write_file(file("make_tars.py",
                             "import tarfile, io\n"
                             "def make(path, members):\n"
                             "  with tarfile.open(path, 'w') as t:\n"
                             "    for name in members:\n"
                             "      info = tarfile.TarInfo(name); info.size = 1; t.addfile(info, io.BytesIO(b'x'))\n"
                             "make('midway.tar', ['first.txt', 'sub/second.txt', '../../escape.txt', 'last.txt'])\n"
                             "make('clash.tar', ['new.txt', 'clash'])\n"
                             "make('merge.tar', ['keep/added.txt', 'top.txt'])\n")));
  auto made = s->exec(shell("python3 make_tars.py"));
  REQUIRE(made);
  REQUIRE(made->exit_code == 0);
  auto archive = [&](const std::string& name) {
    auto d = s->read_file({name, 0, 0});
    REQUIRE(d);
    return d->data;
  };
  auto root_names = [&] {
    std::string out;
    auto l = s->list_files({"", false});
    REQUIRE(l);
    for (const auto& e : *l) out += e.path + " ";
    return out;
  };
  const std::string before = root_names();

  SECTION("tar fails on a member after others were written") {
    auto r = s->tar_in({"unpack", archive("midway.tar")});
    REQUIRE_FALSE(r);
    CHECK(code_of(r.error()) == errc::invalid_argument);
    CHECK(code_of(s->stat_file("unpack").error()) == errc::not_found);
    CHECK(root_names() == before);  // no staging directory left either
    r = s->tar_in({"", archive("midway.tar")});
    REQUIRE_FALSE(r);
    CHECK(code_of(s->stat_file("first.txt").error()) == errc::not_found);
    CHECK(root_names() == before);
  }
  SECTION("a member would replace a directory by a file") {
    auto r = s->tar_in({"", archive("clash.tar")});
    REQUIRE_FALSE(r);
    CHECK(code_of(r.error()) == errc::invalid_argument);
    CHECK(describe(r.error()).find("clash") != std::string::npos);
    CHECK(code_of(s->stat_file("new.txt").error()) == errc::not_found);
    CHECK(read_all(*s, "clash/inside.txt") == "i");
    CHECK(root_names() == before);
  }
  SECTION("a valid archive merges into existing directories") {
    auto r = s->tar_in({"", archive("merge.tar")});
    REQUIRE(r);
    CHECK(read_all(*s, "keep/existing.txt") == "old");
    CHECK(read_all(*s, "keep/added.txt") == "x");
    CHECK(read_all(*s, "top.txt") == "x");
  }
  // What was (not) extracted is what was stored.
  bool merged = static_cast<bool>(s->stat_file("top.txt"));
  REQUIRE_FALSE(s->passivate());
  auto back = f.activate("tar-atomic");
  CHECK(code_of(back->stat_file("first.txt").error()) == errc::not_found);
  CHECK(code_of(back->stat_file("unpack/first.txt").error()) == errc::not_found);
  CHECK(code_of(back->stat_file("new.txt").error()) == errc::not_found);
  CHECK(static_cast<bool>(back->stat_file("keep/added.txt")) == merged);
}

TEST_CASE("a Python project and a C program survive passivation and see a one-file change", "[session][workload]") {
  node_fixture f;
  std::map<std::string, std::string> files = {
      {"py/calc.py", "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n"},
      {"py/test_calc.py",
       "import unittest\nfrom calc import add, mul\n\nclass T(unittest.TestCase):\n"
       "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"
       "    def test_mul(self):\n        self.assertEqual(mul(2, 3), 6)\n\n"
       "if __name__ == '__main__':\n    unittest.main()\n"},
      {"c/Makefile", "hello: hello.c greet.h\n\tcc -O1 -o hello hello.c\n\nclean:\n\trm -f hello\n"},
      {"c/greet.h", "#define GREETING \"hello from c\"\n"},
      {"c/hello.c", "#include <stdio.h>\n#include \"greet.h\"\nint main(void){puts(GREETING);return 0;}\n"},
  };
  {
    auto s = f.activate("work");
    for (const auto& [path, data] : files) REQUIRE(s->write_file(file(path, data)));
    auto t = s->exec(shell("cd py && python3 -m unittest -v 2>&1"));
    REQUIRE(t);
    INFO(t->stdout_data);
    CHECK(t->exit_code == 0);
    CHECK(t->stdout_data.find("Ran 2 tests") != std::string::npos);
    auto b = s->exec(shell("cd c && make && ./hello"));
    REQUIRE(b);
    INFO(b->stdout_data << b->stderr_data);
    CHECK(b->exit_code == 0);
    CHECK(b->stdout_data.find("hello from c") != std::string::npos);
    REQUIRE_FALSE(s->passivate());
  }
  f.open_db();
  auto s = f.activate("work");
  // Untouched files come back byte-identical, the built binary included.
  for (const auto& [path, data] : files) CHECK(read_all(*s, path) == data);
  auto binary = read_all(*s, "c/hello");
  CHECK(s->stat_file("c/hello")->mode & 0100);
  // Change one file in each project.
  // (A different size as well: Python's .pyc check is source mtime in whole seconds + size,
  // and this test runs within one second of the first write.)
  REQUIRE(s->write_file(file("py/calc.py", "def add(a, b):\n    return a - b  # bug\n\ndef mul(a, b):\n    return a * b\n")));
  REQUIRE(s->write_file(file("c/greet.h", "#define GREETING \"changed greeting\"\n")));
  auto t = s->exec(shell("cd py && python3 -m unittest 2>&1"));
  REQUIRE(t);
  CHECK(t->exit_code != 0);
  CHECK(t->stdout_data.find("FAILED (failures=1)") != std::string::npos);
  auto b = s->exec(shell("cd c && make && ./hello"));
  REQUIRE(b);
  INFO(b->stdout_data << b->stderr_data);
  CHECK(b->stdout_data.find("cc -O1") != std::string::npos);  // make saw the change
  CHECK(b->stdout_data.find("changed greeting") != std::string::npos);
  CHECK(read_all(*s, "py/test_calc.py") == files["py/test_calc.py"]);
  CHECK(read_all(*s, "c/hello.c") == files["c/hello.c"]);
  CHECK(read_all(*s, "c/Makefile") == files["c/Makefile"]);
  CHECK(read_all(*s, "c/hello") != binary);
  // Nothing to rebuild on an unchanged tree: mtimes were restored too.
  REQUIRE_FALSE(s->passivate());
  auto s2 = f.activate("work");
  auto again = s2->exec(shell("cd c && make"));
  REQUIRE(again);
  CHECK(again->stdout_data.find("up to date") != std::string::npos);
}

TEST_CASE("a corrupted chunk fails the first exec and nothing the command did is returned or stored",
          "[session][bad-input]") {
  node_fixture f;
  {
    auto s = f.activate("rotten");
    REQUIRE(s->write_file(file("a.txt", "hello")));
    REQUIRE_FALSE(s->passivate());
  }
  auto chunks = f.db->column("sandbox.chunks");
  REQUIRE(chunks);
  REQUIRE_FALSE(f.db->put(*chunks, sha256("hello"), "HELLO", storage::durability::process_crash));
  auto s = f.activate("rotten");
  SECTION("checked beside the command") {
    auto r = s->exec(shell("cat a.txt; echo made > marker.txt"));
    REQUIRE_FALSE(r);
    CHECK(code_of(r.error()) == errc::corrupted);
  }
  SECTION("checked before a streaming command starts") {
    std::string streamed;
    auto r = s->exec(shell("cat a.txt; echo made > marker.txt"),
                     [&](output_stream, std::string_view data) { streamed.append(data); });
    REQUIRE_FALSE(r);
    CHECK(code_of(r.error()) == errc::corrupted);
    CHECK(streamed.empty());
  }
  CHECK_FALSE(std::filesystem::exists(s->workspace_dir()));
  auto stored = f.store->load("rotten");
  REQUIRE(stored);
  REQUIRE(*stored);
  CHECK((*stored)->files.count("marker.txt") == 0);
  CHECK((*stored)->history.empty());
}

TEST_CASE("an archive with a device or fifo member is refused naming it, and nothing of it lands",
          "[session][tar][bad-input]") {
  // A workspace keeps regular files, directories and symlinks only: such a member used to be
  // extracted (a fifo) or fail tar without saying why (a device), and a fifo then vanished at
  // the next passivation while tar_in had reported success.
  node_fixture f;
  auto s = f.activate("tar-special");
  REQUIRE(s->write_file(file("keep.txt", "keep")));
  struct row {
    const char* style;
    char type;
    const char* type_name;
  };
  auto r = GENERATE(row{"ustar", '6', "fifo"}, row{"ustar", '3', "character device"},
                    row{"ustar", '4', "block device"}, row{"pax", '6', "fifo"}, row{"gnu", '6', "fifo"});
  INFO(r.style << " " << r.type_name);
  // (pax and GNU long names: longer than a ustar name field holds)
  const std::string special =
      std::string("sub/") + (r.style == std::string("ustar") ? "special" : "special-" + std::string(120, 'x'));
  tar_writer w;
  w.add("first.txt", '0', "1").add("sub/", '5', "", "", 0755);
  if (r.style == std::string("pax")) w.add_pax(special, r.type);
  else if (r.style == std::string("gnu")) w.add_gnu_long(special, r.type);
  else w.add(special, r.type);
  w.add("last.txt", '0', "2");
  for (std::string dir : {"", "unpack"}) {
    INFO("into '" << dir << "'");
    auto in = s->tar_in({dir, w.finish()});
    REQUIRE_FALSE(in);
    CHECK(code_of(in.error()) == errc::invalid_argument);
    CHECK(describe(in.error()).find("'" + special + "'") != std::string::npos);
    CHECK(describe(in.error()).find(r.type_name) != std::string::npos);
  }
  auto listed = s->list_files({"", true});
  REQUIRE(listed);
  REQUIRE(listed->size() == 1);  // no member, no staging directory
  CHECK(listed->front().path == "keep.txt");
  REQUIRE_FALSE(s->passivate());
  auto back = f.activate("tar-special");
  CHECK(code_of(back->stat_file("first.txt").error()) == errc::not_found);
  CHECK(code_of(back->stat_file("unpack").error()) == errc::not_found);
  CHECK(read_all(*back, "keep.txt") == "keep");
}

TEST_CASE("hard-link members of an archive arrive with their contents under every name",
          "[session][tar]") {
  node_fixture f;
  auto s = f.activate("tar-hardlinks");
  tar_writer w;
  w.add("d/", '5', "", "", 0755)
      .add("d/a.txt", '0', "shared contents")
      .add("d/b.txt", '1', "", "d/a.txt")
      .add("top.txt", '1', "", "d/a.txt");
  auto in = s->tar_in({"unpack", w.finish()});
  REQUIRE(in);
  CHECK(read_all(*s, "unpack/d/b.txt") == "shared contents");
  CHECK(read_all(*s, "unpack/top.txt") == "shared contents");
  REQUIRE_FALSE(s->passivate());
  auto back = f.activate("tar-hardlinks");
  for (const char* name : {"unpack/d/a.txt", "unpack/d/b.txt", "unpack/top.txt"}) {
    INFO(name);
    CHECK(read_all(*back, name) == "shared contents");
  }
  // ... and they are still one file.
  auto counts = back->exec(shell("stat -c %h unpack/d/a.txt unpack/d/b.txt unpack/top.txt"));
  REQUIRE(counts);
  CHECK(counts->stdout_data == "3\n3\n3\n");
  // A hard link to a name the archive does not hold: tar fails, nothing lands.
  tar_writer dangling;
  dangling.add("x.txt", '0', "x").add("y.txt", '1', "", "missing.txt");
  auto bad = back->tar_in({"", dangling.finish()});
  REQUIRE_FALSE(bad);
  CHECK(code_of(bad.error()) == errc::invalid_argument);
  CHECK(code_of(back->stat_file("x.txt").error()) == errc::not_found);
}

TEST_CASE("hard links a command made stay one file across passivation, rehydration and fork",
          "[session]") {
  node_fixture f;
  auto s = f.activate("links");
  auto made = s->exec(shell("printf one > a && mkdir d && ln a b && ln a d/c"));
  REQUIRE(made);
  REQUIRE(made->exit_code == 0);
  auto link_counts = [](session_core& x, const std::string& names) {
    auto r = x.exec(shell("stat -c %h " + names + " 2>&1"));
    REQUIRE(r);
    return r->stdout_data;
  };
  REQUIRE_FALSE(s->passivate());
  s = f.activate("links");
  CHECK(link_counts(*s, "a b d/c") == "3\n3\n3\n");
  auto wrote = s->exec(shell("printf ' two' >> a"));  // through one name ...
  REQUIRE(wrote);
  REQUIRE(wrote->exit_code == 0);
  CHECK(read_all(*s, "b") == "one two");  // ... seen through the others
  CHECK(read_all(*s, "d/c") == "one two");
  CHECK(*f.store->refcount(sha256("one two")) == 1);  // one file's chunk, counted once
  CHECK(s->info().workspace_bytes == 7);

  SECTION("after another passivation") {
    REQUIRE_FALSE(s->passivate());
    s = f.activate("links");
    CHECK(link_counts(*s, "a b d/c") == "3\n3\n3\n");
    REQUIRE(s->exec(shell("printf ' three' >> d/c")));
    CHECK(read_all(*s, "a") == "one two three");
  }
  SECTION("in a fork, whose files stay its own") {
    REQUIRE(s->fork("links-fork"));
    CHECK(*f.store->refcount(sha256("one two")) == 2);
    auto child = f.activate("links-fork");
    CHECK(link_counts(*child, "a b d/c") == "3\n3\n3\n");
    REQUIRE(child->exec(shell("printf ' three' >> d/c")));
    CHECK(read_all(*child, "a") == "one two three");
    CHECK(read_all(*child, "b") == "one two three");
    CHECK(read_all(*s, "a") == "one two");
    CHECK(read_all(*s, "b") == "one two");
    REQUIRE_FALSE(child->passivate());
    child = f.activate("links-fork");
    CHECK(link_counts(*child, "a b d/c") == "3\n3\n3\n");
  }
  SECTION("removing names keeps the others") {
    REQUIRE(s->remove_file({"a", false}));
    REQUIRE_FALSE(s->passivate());
    s = f.activate("links");
    CHECK(link_counts(*s, "b d/c") == "2\n2\n");
    CHECK(read_all(*s, "b") == "one two");
    REQUIRE(s->exec(shell("rm b")));
    REQUIRE_FALSE(s->passivate());
    s = f.activate("links");
    CHECK(link_counts(*s, "d/c") == "1\n");
    CHECK(read_all(*s, "d/c") == "one two");
    CHECK(*f.store->refcount(sha256("one two")) == 1);
  }
  REQUIRE_FALSE(s->destroy());
  if (auto child = f.store->load("links-fork"); child && *child)
    REQUIRE_FALSE(f.activate("links-fork")->destroy());
  CHECK(*f.store->refcount(sha256("one two")) == 0);
  CHECK(f.store->stats()->chunks == 0);
}
