// Pre-started sandboxes: a first exec through one sees the rehydrated workspace and gets its
// argv, env, cwd, stdin and limits exactly as a sandbox started for it would.
#include "session/testing/session_fixture.hpp"

#include <csignal>
#include <fstream>

using namespace triplane;
using namespace triplane::actors;
using namespace triplane::actors::session;
using namespace triplane::actors::session::testing;

namespace {

struct pool_fixture : node_fixture {
  std::unique_ptr<sandbox_pool> pool;

  explicit pool_fixture(exec_limits profile = {}, size_t size = 2) {
    if (sandbox.exec_shim.empty()) return;
    auto p = sandbox_pool::create(sandbox, node.workspaces_dir + "/.sandbox-pool", profile, size);
    REQUIRE(p);
    pool = std::move(*p);
    node.pool = pool.get();
    REQUIRE(pool->wait_ready(size, 10000));
  }
  ~pool_fixture() {
    node.pool = nullptr;
    pool.reset();
  }

  /// A passivated session `id` holding `files` small files under src/.
  void passivated(const std::string& id, int files) {
    auto s = activate(id);
    for (int i = 0; i < files; ++i)
      REQUIRE(s->write_file({"src/f" + std::to_string(i), "file " + std::to_string(i) + "\n", 0644, true, false}));
    REQUIRE(s->write_file({"src/run.sh", "#!/bin/sh\necho ran\n", 0755, true, false}));
    REQUIRE_FALSE(s->passivate());
  }
};

} // namespace

TEST_CASE("a first exec through a pre-started sandbox sees the rehydrated files, argv, env, cwd and stdin",
          "[sandbox][pool]") {
  pool_fixture f;
  if (!f.pool) {
    WARN("triplane-sandbox-exec not found: no pre-started sandboxes to test");
    return;
  }
  f.passivated("alpha", 20);
  auto s = f.activate("alpha");
  exec_request req;
  req.argv = {"/bin/sh", "-c",
              "echo \"$1|$GREETING|$(pwd)|$PWD|$(ls | wc -l)|$(cat f7)\"; ./run.sh; cat",
              "sh", "argument with spaces"};
  req.env = {{"GREETING", "hi there"}};
  req.cwd = "src";
  req.stdin_data = "from stdin\n";
  auto r = s->exec(req);
  REQUIRE(r);
  INFO(r->stdout_data << r->stderr_data);
  CHECK(s->last_exec_phases().pooled);
  CHECK(r->exited);
  CHECK(r->exit_code == 0);
  CHECK(r->stdout_data ==
        "argument with spaces|hi there|/workspace/src|/workspace/src|21|file 7\nran\nfrom stdin\n");
  // The workspace is the session's: later operations and execs (fresh sandboxes) see it.
  REQUIRE(s->write_file({"src/later", "x", 0644, false, false}));
  auto again = s->exec(shell("ls src | wc -l"));
  REQUIRE(again);
  CHECK_FALSE(s->last_exec_phases().pooled);
  CHECK(again->stdout_data == "22\n");
  // Nothing of the pool's plumbing reaches the command: the same identity and descriptors as
  // in a sandbox started for it, and the first program (/run/triplane-exec) has removed itself
  // (an empty /run is what is left; a fresh sandbox has none).
  const std::string probe = "id -u; id -g; hostname; ls -l /proc/self/fd | tail -n +2 | cut -c 1-10; "
                            "test -e /run/triplane-exec && echo shim visible; ls -A /run 2>/dev/null; true";
  s->drop_warm_sandbox();  // the next exec starts its own sandbox
  auto fresh = s->exec(shell(probe));
  REQUIRE(fresh);
  CHECK_FALSE(s->last_exec_phases().warm);
  CHECK_FALSE(s->last_exec_phases().pooled);
  f.passivated("gamma", 1);
  auto other = f.activate("gamma");
  auto pooled = other->exec(shell(probe));
  REQUIRE(pooled);
  CHECK(other->last_exec_phases().pooled);
  CHECK(pooled->stdout_data == fresh->stdout_data);
  // A live session's next exec runs in the sandbox pre-started after its previous one: the
  // same again, and it sees what changed in the workspace meanwhile.
  REQUIRE(s->write_file({"src/between", "y", 0644, false, false}));
  auto warm = s->exec(shell(probe + "; cat src/between"));
  REQUIRE(warm);
  CHECK(s->last_exec_phases().warm);
  CHECK(warm->stdout_data == fresh->stdout_data + "y");
  // Passivation removes it, and the next activation rehydrates what was stored.
  auto dir = s->workspace_dir();
  REQUIRE_FALSE(s->passivate());
  CHECK_FALSE(std::filesystem::exists(dir));
  auto back = f.activate("alpha");
  auto listed = back->exec(shell("cat src/later; ls src | wc -l"));
  REQUIRE(listed);
  CHECK(listed->stdout_data == "x23\n");  // 20 + run.sh + later + between
}

TEST_CASE("a command missing in a pre-started sandbox fails with 127 and a message", "[sandbox][pool][bad-input]") {
  pool_fixture f;
  if (!f.pool) {
    WARN("triplane-sandbox-exec not found: no pre-started sandboxes to test");
    return;
  }
  f.passivated("beta", 1);
  auto s = f.activate("beta");
  exec_request req;
  req.argv = {"no-such-binary-xyz"};
  auto r = s->exec(req);
  REQUIRE(r);
  CHECK(s->last_exec_phases().pooled);
  CHECK(r->exit_code == 127);
  CHECK(r->stderr_data.find("no-such-binary-xyz") != std::string::npos);
  auto bad_cwd = f.activate("beta-2");
  exec_request in_missing_dir;
  in_missing_dir.argv = {"true"};
  in_missing_dir.cwd = "nowhere";
  CHECK_FALSE(bad_cwd->exec(in_missing_dir));  // refused before anything starts
}

TEST_CASE("a pre-started sandbox enforces the exec's limits and timeout as a fresh one does",
          "[sandbox][pool][bad-input]") {
  exec_limits profile;
  profile.memory_bytes = 1ull << 30;
  profile.max_processes = 1000;
  pool_fixture f(profile, 3);
  if (!f.pool) {
    WARN("triplane-sandbox-exec not found: no pre-started sandboxes to test");
    return;
  }
  SECTION("memory") {
    f.passivated("mem", 1);
    auto s = f.activate("mem");
    exec_request req;
    req.argv = {"python3", "-c", "x = bytearray(400 * 1024 * 1024); print('allocated')"};
    req.limits.memory_bytes = 64 << 20;
    auto r = s->exec(req);
    REQUIRE(r);
    INFO(r->stdout_data << r->stderr_data << r->message);
    CHECK(s->last_exec_phases().pooled);
    CHECK(r->enforced.memory != limit_mechanism::none);
    CHECK(r->stdout_data.find("allocated") == std::string::npos);
    CHECK(r->exit_code != 0);
    if (f.cgroups->mechanism() != limit_mechanism::none) CHECK(r->enforced.memory != limit_mechanism::rlimit);
  }
  SECTION("processes") {
    f.passivated("pids", 1);
    auto s = f.activate("pids");
    exec_request req;
    req.shell = "for i in $(seq 40); do sleep 2 & done; wait";
    req.limits.max_processes = 8;
    req.timeout_ms = 5000;
    auto r = s->exec(req);
    REQUIRE(r);
    INFO(r->stdout_data << r->stderr_data << r->message);
    CHECK(s->last_exec_phases().pooled);
    if (f.cgroups->mechanism() != limit_mechanism::none) {
      CHECK(r->enforced.processes != limit_mechanism::none);
      CHECK(r->stderr_data.find("fork") != std::string::npos);
    }
  }
  SECTION("file size") {
    f.passivated("fsize", 1);
    auto s = f.activate("fsize");
    exec_request req;
    req.shell = "head -c 2000000 /dev/zero > big; wc -c < big";
    req.limits.max_file_bytes = 100000;
    auto r = s->exec(req);
    REQUIRE(r);
    CHECK(s->last_exec_phases().pooled);
    CHECK(r->enforced.file_size == limit_mechanism::rlimit);
    CHECK(r->stdout_data == "100000\n");
  }
  SECTION("timeout") {
    f.passivated("slow", 1);
    auto s = f.activate("slow");
    exec_request req;
    req.shell = "trap '' TERM; sleep 30";
    req.timeout_ms = 300;
    auto start = std::chrono::steady_clock::now();
    auto r = s->exec(req);
    REQUIRE(r);
    CHECK(s->last_exec_phases().pooled);
    CHECK(r->timed_out);
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
  }
}

TEST_CASE("execs the pool cannot serve start their own sandbox", "[sandbox][pool]") {
  pool_fixture f({}, 1);
  if (!f.pool) {
    WARN("triplane-sandbox-exec not found: no pre-started sandboxes to test");
    return;
  }
  SECTION("loopback network") {
    f.passivated("net", 1);
    auto s = f.activate("net");
    session_settings settings;
    settings.network = network_policy::loopback;
    REQUIRE(s->configure(settings));
    auto r = s->exec(shell("ls src | wc -l"));
    REQUIRE(r);
    CHECK_FALSE(s->last_exec_phases().pooled);
    CHECK(r->stdout_data == "2\n");
  }
  SECTION("limits needing a cgroup the pool did not join") {
    if (f.cgroups->mechanism() != limit_mechanism::cgroup_v1) return;  // v2 joins one group anyway
    f.passivated("limited", 1);
    auto s = f.activate("limited");
    exec_request req;
    req.shell = "ls src | wc -l";
    req.limits.memory_bytes = 256 << 20;
    auto r = s->exec(req);
    REQUIRE(r);
    CHECK_FALSE(s->last_exec_phases().pooled);
    CHECK(r->enforced.memory == limit_mechanism::cgroup_v1);
    CHECK(r->stdout_data == "2\n");
  }
  SECTION("an empty pool") {
    f.passivated("one", 1);
    f.passivated("two", 1);
    auto a = f.activate("one");
    auto b = f.activate("two");
    REQUIRE(a->exec(shell("true")));
    REQUIRE(b->exec(shell("true")));  // the pool of one may not have refilled yet: either way it runs
    auto r = b->exec(shell("ls src | wc -l"));
    REQUIRE(r);
    CHECK(r->stdout_data == "2\n");
  }
}

TEST_CASE("after a write past the quota resets the workspace, the next exec sees and keeps the "
          "restored files rather than running in the sandbox kept ready on the removed directory",
          "[sandbox][pool][session][bad-input]") {
  pool_fixture f({}, 1);
  if (!f.pool) {
    WARN("triplane-sandbox-exec not found: no pre-started sandboxes to test");
    return;
  }
  auto s = f.activate("reset");
  session_settings settings;
  settings.workspace_quota_bytes = 1 << 20;
  REQUIRE(s->configure(settings));
  REQUIRE(s->write_file({"keep.txt", "keep", 0644, false, false}));
  REQUIRE(s->exec(shell("true")));
  REQUIRE(s->exec(shell("true")));  // from the second exec on, the next one's sandbox is kept ready
  REQUIRE(s->write_file({"a.bin", std::string(600000, 'a'), 0644, false, false}));
  auto over = s->write_file({"b.bin", std::string(600000, 'b'), 0644, false, false});
  REQUIRE_FALSE(over);
  CHECK(code_of(over.error()) == errc::limit_exceeded);
  auto r = s->exec(shell("cat keep.txt; ls; echo made > out.txt"));
  REQUIRE(r);
  INFO(r->stdout_data << r->stderr_data);
  CHECK(r->stdout_data == "keepa.bin\nkeep.txt\n");
  auto out = s->read_file({"out.txt", 0, 0});
  REQUIRE(out);
  CHECK(out->data == "made\n");
  REQUIRE_FALSE(s->passivate());
  auto back = f.activate("reset");
  auto kept = back->read_file({"out.txt", 0, 0});
  REQUIRE(kept);
  CHECK(kept->data == "made\n");
}
