// Sandbox sessions: exec latency beside its floors (plain fork/exec, bare bwrap), first exec on a
// passivated session (rehydration), fork, passivation throughput, dedup on disk.
// Usage: sandbox_bench [--json FILE] [--quick] [--dir DIR]
#include <algorithm>
#include <cstring>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <spawn.h>
#include <string>
#include <sys/wait.h>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include "session/cgroup_limits.hpp"
#include "session/sandbox_pool.hpp"
#include "session/sandbox_process.hpp"
#include "session/session_core.hpp"
#include "session/session_store.hpp"
#include "triplane/storage/database.hpp"

extern char** environ;

using namespace triplane;
using namespace triplane::actors;
using namespace triplane::actors::session;
using clk = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

struct series {
  std::vector<double> us;
  double pct(double p) const {
    if (us.empty()) return 0;
    auto v = us;
    std::sort(v.begin(), v.end());
    size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * static_cast<double>(v.size())));
    return v[i];
  }
};

double since_us(clk::time_point t) {
  return std::chrono::duration<double, std::micro>(clk::now() - t).count();
}

void die(const std::string& what, const caf::error& e) {
  std::fprintf(stderr, "%s: %s\n", what.c_str(), describe(e).c_str());
  std::exit(1);
}

template <class T>
T must(expected<T> x, const std::string& what) {
  if (!x) die(what, x.error());
  return std::move(*x);
}

void must(const caf::error& e, const std::string& what) {
  if (e) die(what, e);
}

double spawn_and_wait(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  auto t = clk::now();
  pid_t pid;
  if (posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) != 0) return -1;
  int status = 0;
  waitpid(pid, &status, 0);
  return since_us(t);
}

std::string random_bytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v = rng();
    std::memcpy(s.data() + i, &v, std::min<size_t>(8, n - i));
  }
  return s;
}

uint64_t dir_bytes(const fs::path& p) {
  uint64_t n = 0;
  for (auto& e : fs::recursive_directory_iterator(p))
    if (e.is_regular_file()) n += e.file_size();
  return n;
}

/// Creates `n` files of `bytes` each in a fresh directory `dir` (open, write, close), removes
/// them again, returns the creation time: the filesystem's floor for materialization.
double create_files(const std::string& dir, int n, size_t bytes) {
  std::string data(bytes, 'x');
  fs::create_directories(dir);
  auto t = clk::now();
  for (int i = 0; i < n; ++i) {
    std::string path = dir + "/f" + std::to_string(i);
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 || ::write(fd, data.data(), data.size()) != static_cast<ssize_t>(data.size())) std::exit(3);
    ::close(fd);
  }
  double us = since_us(t);
  fs::remove_all(dir);
  return us;
}

struct row {
  std::string name;
  double p50 = 0, p99 = 0;
  std::string unit = "us";
  std::string note;
};

} // namespace

int main(int argc, char** argv) {
  std::string json_path;
  bool quick = false;
  std::string base_dir = "/tmp";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) json_path = argv[++i];
    else if (a == "--quick") quick = true;
    else if (a == "--dir" && i + 1 < argc) base_dir = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--json FILE] [--quick] [--dir DIR]\n", argv[0]);
      return 2;
    }
  }
  const int exec_n = quick ? 50 : 300;
  const int rehydrate_n = quick ? 20 : 100;
  const int fork_n = quick ? 5 : 20;
  const int passivate_n = quick ? 20 : 100;
  const int forks_disk = quick ? 100 : 1000;

  fs::path base = fs::path(base_dir) / ("tp-sandbox-bench-" + std::to_string(getpid()));
  fs::create_directories(base);
  storage::database_options opts;
  opts.path = (base / "db").string();
  opts.column_families = session_store::column_families();
  auto db = must(storage::database::open(opts), "open database");
  auto store = must(session_store::open(*db, storage::durability::process_crash), "open store");
  auto cgroups = cgroup_host::detect();
  auto sandbox = must(sandbox_config::detect(cgroups.get(), (base / "stage").string()), "sandbox");
  node_resources node;
  node.store = store.get();
  node.sandbox = &sandbox;
  node.workspaces_dir = (base / "ws").string();
  node.max_workspace_bytes = 1ull << 30;
  std::mt19937_64 rng(42);
  std::vector<row> rows;

  // 1. exec of `true` beside its floors, interleaved so that noise hits all three alike.
  {
    series plain, bare, session_exec, limited_exec, warm_exec, warm_limited_exec;
    std::vector<std::string> bwrap_args = {sandbox.bwrap_path, "--unshare-all", "--die-with-parent",
                                           "--new-session", "--ro-bind", "/usr", "/usr"};
    for (auto& [target, link] : sandbox.symlinks) bwrap_args.insert(bwrap_args.end(), {"--symlink", target, link});
    bwrap_args.insert(bwrap_args.end(), {"--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--", "/bin/true"});
    auto s = must(session_core::activate(node, "exec-bench"), "activate");
    exec_request req;
    req.argv = {"true"};
    must(s->exec(req), "warm-up exec");
    // The same with a memory and a process limit: a cgroup join per controller on v1, one group on v2.
    auto limited = must(session_core::activate(node, "exec-bench-limited"), "activate");
    session_settings with_limits;
    with_limits.default_limits.memory_bytes = 4ull << 30;
    with_limits.default_limits.max_processes = 1024;
    must(limited->configure(with_limits), "configure");
    must(limited->exec(req), "warm-up exec");
    // The same two on a node with a sandbox pool (as `triplane serve` runs, its profile the
    // limits above): a live session then keeps the next exec's sandbox pre-started.
    exec_limits profile = with_limits.default_limits;
    auto pool = must(sandbox_pool::create(sandbox, (base / "ws" / ".pool").string(), profile, 2), "sandbox pool");
    node_resources pooled_node = node;
    pooled_node.pool = pool.get();
    auto w = must(session_core::activate(pooled_node, "exec-bench-warm"), "activate");
    must(w->exec(req), "warm-up exec");
    auto w_limited = must(session_core::activate(pooled_node, "exec-bench-warm-limited"), "activate");
    must(w_limited->configure(with_limits), "configure");
    must(w_limited->exec(req), "warm-up exec");
    int warm_runs = 0, warm_limited_runs = 0;
    for (int i = 0; i < exec_n; ++i) {
      plain.us.push_back(spawn_and_wait({"/bin/true"}));
      bare.us.push_back(spawn_and_wait(bwrap_args));
      auto t = clk::now();
      auto r = must(s->exec(req), "exec");
      session_exec.us.push_back(since_us(t));
      auto t3 = clk::now();
      must(limited->exec(req), "exec with limits");
      limited_exec.us.push_back(since_us(t3));
      auto t4 = clk::now();
      must(w->exec(req), "exec, pre-started");
      warm_exec.us.push_back(since_us(t4));
      warm_runs += w->last_exec_phases().warm ? 1 : 0;
      auto t5 = clk::now();
      must(w_limited->exec(req), "exec with limits, pre-started");
      warm_limited_exec.us.push_back(since_us(t5));
      warm_limited_runs += w_limited->last_exec_phases().warm ? 1 : 0;
      if (r.exit_code != 0) die("exec true", make_error(errc::internal, "exit " + std::to_string(r.exit_code)));
    }
    rows.push_back({"fork/exec of true (floor)", plain.pct(50), plain.pct(99), "us", ""});
    rows.push_back({"bare bwrap --unshare-all true", bare.pct(50), bare.pct(99), "us", "minimal mounts"});
    rows.push_back({"session exec of true", session_exec.pct(50), session_exec.pct(99), "us",
                    "x" + std::to_string(session_exec.pct(50) / bare.pct(50)).substr(0, 4) + " bare bwrap"});
    rows.push_back({"session exec of true, memory+pids limits", limited_exec.pct(50), limited_exec.pct(99), "us",
                    "x" + std::to_string(limited_exec.pct(50) / bare.pct(50)).substr(0, 4) + " bare bwrap"});
    rows.push_back({"session exec of true, next sandbox pre-started", warm_exec.pct(50), warm_exec.pct(99), "us",
                    "x" + std::to_string(warm_exec.pct(50) / bare.pct(50)).substr(0, 4) + " bare bwrap; " +
                      std::to_string(warm_runs) + "/" + std::to_string(exec_n) + " pre-started"});
    rows.push_back({"  same, memory+pids limits", warm_limited_exec.pct(50), warm_limited_exec.pct(99), "us",
                    "x" + std::to_string(warm_limited_exec.pct(50) / bare.pct(50)).substr(0, 4) + " bare bwrap; " +
                      std::to_string(warm_limited_runs) + "/" + std::to_string(exec_n) + " pre-started"});
  }

  // 2. first exec on a passivated session holding 100 files / 1 MiB (lazy: activation loads
  //    the record only; the first exec materializes the workspace). Each round: the session is
  //    activated, runs `true` under bwrap, checks that all 100 files are there, and is passivated
  //    again (workspace removed, state only in RocksDB). Through a pre-started sandbox (the
  //    node's default) and with a sandbox started for the exec, interleaved with the peers
  //    (bare bwrap, plain fork/exec) so that noise hits all alike. Workspaces on the data disk
  //    (--dir) and on tmpfs (/dev/shm): the workspace is only a cache of RocksDB.
  std::vector<std::pair<std::string, std::string>> roots = {{"disk", (base / "ws").string()}};
  if (fs::exists("/dev/shm")) roots.emplace_back("tmpfs", "/dev/shm/tp-sandbox-bench-ws-" + std::to_string(getpid()));
  {
    std::vector<std::string> bwrap_args = {sandbox.bwrap_path, "--unshare-all", "--die-with-parent",
                                           "--new-session", "--ro-bind", "/usr", "/usr"};
    for (auto& [target, link] : sandbox.symlinks) bwrap_args.insert(bwrap_args.end(), {"--symlink", target, link});
    bwrap_args.insert(bwrap_args.end(), {"--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--", "/bin/true"});
    for (const auto& [label, root] : roots) {
      node.workspaces_dir = root;
      auto pool = must(sandbox_pool::create(sandbox, root + "/.pool", node.defaults.default_limits, 2),
                       "sandbox pool");
      {
        auto s = must(session_core::activate(node, "rehydrate"), "activate");
        for (int i = 0; i < 100; ++i)
          must(s->write_file({"src/f" + std::to_string(i) + ".txt", random_bytes(rng, 10486), 0644, true, false}),
               "write");
        must(s->passivate(), "passivate");
      }
      series pooled, fresh, activation, prepare, materialize, run, verify, sync, raw_get, bare, plain, create;
      int pool_hits = 0;
      exec_request req;
      // `true` would not show that the files are there; the shell's builtins keep it as cheap.
      req.shell = "set -- src/*.txt; [ $# -eq 100 ] && [ -s src/f99.txt ]";
      auto first_exec = [&](bool use_pool, series& total) {
        node.pool = use_pool ? pool.get() : nullptr;
        if (use_pool) pool->wait_ready(2, 2000);  // steady state: the pool refills between rounds
        auto t = clk::now();
        auto core = must(session_core::activate(node, "rehydrate"), "activate");
        double act = since_us(t);
        auto r = must(core->exec(req), "first exec");
        total.us.push_back(since_us(t));
        if (!r.exited || r.exit_code != 0)
          die("first exec", make_error(errc::internal, "the command did not see the 100 files: " + r.stderr_data));
        if (use_pool) {
          const auto& ph = core->last_exec_phases();
          pool_hits += ph.pooled ? 1 : 0;
          activation.us.push_back(act);
          prepare.us.push_back(static_cast<double>(ph.prepare_us + ph.spawn_us));
          materialize.us.push_back(static_cast<double>(ph.materialize_us));
          run.us.push_back(static_cast<double>(ph.run_us));
          verify.us.push_back(static_cast<double>(ph.verify_us));
          sync.us.push_back(static_cast<double>(ph.sync_us));
        }
        must(core->passivate(), "passivate");
        if (fs::exists(core->workspace_dir())) die("passivate", make_error(errc::internal, "workspace left behind"));
      };
      for (int i = 0; i < rehydrate_n; ++i) {
        first_exec(true, pooled);
        first_exec(false, fresh);
        bare.us.push_back(spawn_and_wait(bwrap_args));
        plain.us.push_back(spawn_and_wait({"/bin/true"}));
        create.us.push_back(create_files(root + "/.peer", 100, 10486));
        auto g = clk::now();
        must(db->get_raw(*db->column("sandbox.sessions"), "rehydrate"), "raw get");
        raw_get.us.push_back(since_us(g));
      }
      node.pool = nullptr;
      pool.reset();
      const std::string target = "target p99 < 25 ms: ";
      rows.push_back({"first exec, passivated 100 files/1 MiB (" + label + ")", pooled.pct(50), pooled.pct(99), "us",
                      target + (pooled.pct(99) < 25000 ? "met" : "MISSED") + "; pre-started sandbox, " +
                          std::to_string(pool_hits) + "/" + std::to_string(rehydrate_n) + " from the pool"});
      rows.push_back({"  of which activation (record load)", activation.pct(50), activation.pct(99), "us", "lazy part"});
      rows.push_back({"  of which taking the sandbox", prepare.pct(50), prepare.pct(99), "us", "assign the command"});
      rows.push_back({"  of which materialization", materialize.pct(50), materialize.pct(99), "us", "100 files"});
      rows.push_back({"  of which command (release to exit)", run.pct(50), run.pct(99), "us", "sh: glob + test"});
      rows.push_back({"    SHA-256 check of the chunks", verify.pct(50), verify.pct(99), "us", "beside the command, part of it"});
      rows.push_back({"  of which sync + store", sync.pct(50), sync.pct(99), "us", "change scan, record write"});
      rows.push_back({"  same, sandbox started for the exec", fresh.pct(50), fresh.pct(99), "us",
                      target + (fresh.pct(99) < 25000 ? "met" : "MISSED") + "; bwrap setup overlaps materialization"});
      rows.push_back({"  bare bwrap --unshare-all true (peer)", bare.pct(50), bare.pct(99), "us", "same loop"});
      rows.push_back({"  fork/exec of true (peer)", plain.pct(50), plain.pct(99), "us", "same loop"});
      rows.push_back({"  create+write 100 files, 1 MiB (peer)", create.pct(50), create.pct(99), "us",
                      "same filesystem, one thread, no hashing"});
      rows.push_back({"  bare RocksDB get of the record (floor)", raw_get.pct(50), raw_get.pct(99), "us", ""});
      // The node's default limits (memory + processes, as session_host_options sets them): a
      // pre-started sandbox joined their cgroups ahead of time; a fresh one joins them per exec.
      if (label == "tmpfs") {
        session_settings saved = node.defaults;
        node.defaults.default_limits.memory_bytes = 4ull << 30;
        node.defaults.default_limits.max_processes = 1024;
        auto limited_pool = must(sandbox_pool::create(sandbox, root + "/.pool-limited",
                                                      node.defaults.default_limits, 2),
                                 "sandbox pool");
        series lim_pooled, lim_fresh;
        for (int i = 0; i < rehydrate_n; ++i)
          for (bool use_pool : {true, false}) {
            node.pool = use_pool ? limited_pool.get() : nullptr;
            if (use_pool) limited_pool->wait_ready(2, 2000);
            auto t = clk::now();
            auto core = must(session_core::activate(node, "rehydrate"), "activate");
            auto r = must(core->exec(req), "first exec with limits");
            (use_pool ? lim_pooled : lim_fresh).us.push_back(since_us(t));
            if (r.exit_code != 0 || r.enforced.memory == limit_mechanism::none)
              die("first exec with limits", make_error(errc::internal, "failed or unlimited: " + r.stderr_data));
            must(core->passivate(), "passivate");
          }
        node.pool = nullptr;
        limited_pool.reset();
        node.defaults = saved;
        rows.push_back({"  same, node default limits (memory+pids)", lim_pooled.pct(50), lim_pooled.pct(99), "us",
                        target + (lim_pooled.pct(99) < 25000 ? "met" : "MISSED") + "; cgroups joined ahead of time"});
        rows.push_back({"  same, node default limits, sandbox started for it", lim_fresh.pct(50), lim_fresh.pct(99),
                        "us", "cgroup joins on the path"});
        fs::remove_all(root);
      }
    }
  }
  node.workspaces_dir = (base / "ws").string();

  // 3. fork of a 1,000-file / 10 MiB session; 5. bytes on disk for forks each changed by one file.
  {
    auto s = must(session_core::activate(node, "base"), "activate");
    for (int i = 0; i < 1000; ++i)
      must(s->write_file({"d" + std::to_string(i % 10) + "/f" + std::to_string(i), random_bytes(rng, 10486),
                          0644, true, false}),
           "write");
    must(s->persist(), "persist");
    series fork_us;
    for (int i = 0; i < fork_n; ++i) {
      auto t = clk::now();
      must(s->fork("fork-timing-" + std::to_string(i)), "fork");
      fork_us.us.push_back(since_us(t));
    }
    rows.push_back({"fork of 1,000 files / 10 MiB", fork_us.pct(50), fork_us.pct(99), "us", "no content copied"});
    for (int i = 0; i < fork_n; ++i) {
      auto f = must(session_core::activate(node, "fork-timing-" + std::to_string(i)), "activate fork");
      must(f->destroy(), "destroy fork");
    }

    // Passivation throughput: sessions with 100 files / 1 MiB, materialized, nothing pending,
    // and the same with one changed file each (sync + store).
    std::vector<std::unique_ptr<session_core>> live;
    for (int i = 0; i < passivate_n; ++i) {
      must(s->fork("pass-" + std::to_string(i)), "fork");
      auto c = must(session_core::activate(node, "pass-" + std::to_string(i)), "activate");
      must(c->stat_file(""), "materialize");
      must(c->write_file({"changed.txt", random_bytes(rng, 4096), 0644, false, false}), "write");
      live.push_back(std::move(c));
    }
    auto t = clk::now();
    for (auto& c : live) must(c->passivate(), "passivate");
    double secs = since_us(t) / 1e6;
    rows.push_back({"passivation, 1,000 files/10 MiB each", static_cast<double>(passivate_n) / secs, 0,
                    "sessions/s", "workspace removal + record check"});
    live.clear();

    // Dedup: forks of the base, each with one 10 KiB file changed, stored the way a session
    // stores the sync after an exec that changed one file (store level: no workspace I/O, so
    // 1,000 of them fit in a benchmark run).
    must(db->flush(), "flush");
    uint64_t before = dir_bytes(base / "db");
    auto t2 = clk::now();
    for (int i = 0; i < forks_disk; ++i) {
      std::string id = "disk-" + std::to_string(i);
      must(s->fork(id), "fork");
      auto rec = must(store->load(id), "load fork");
      auto previous = rec->files;
      auto bytes = random_bytes(rng, 10486);
      auto hash = sha256(bytes);
      auto& entry = rec->files.at("d0/f0");
      entry.chunks = {hash};
      entry.size = bytes.size();
      must(store->save(*rec, &previous, {{hash, bytes}}), "save changed fork");
    }
    double disk_secs = since_us(t2) / 1e6;
    must(db->flush(), "flush");
    uint64_t after = dir_bytes(base / "db");
    auto st = must(store->stats(), "stats");
    double naive = static_cast<double>(forks_disk) * 10.0 * 1048576.0;
    rows.push_back({"disk: " + std::to_string(forks_disk) + " forks of 10 MiB, 1 file changed",
                    static_cast<double>(after - before) / 1048576.0, naive / 1048576.0, "MiB",
                    "p50 col = growth, p99 col = full copies; chunks " + std::to_string(st.chunks) +
                        ", " + std::to_string(disk_secs).substr(0, 5) + " s"});
  }

  std::printf("%-46s %12s %12s  %-10s %s\n", "measure", "p50", "p99", "unit", "note");
  for (const auto& r : rows)
    std::printf("%-46s %12.1f %12.1f  %-10s %s\n", r.name.c_str(), r.p50, r.p99, r.unit.c_str(), r.note.c_str());
  std::printf("limits: %s\n", cgroups->mechanism() == limit_mechanism::cgroup_v1   ? "cgroup v1"
                              : cgroups->mechanism() == limit_mechanism::cgroup_v2 ? "cgroup v2"
                                                                                    : "rlimits");
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << "{\n  \"benchmark\": \"sandbox\",\n  \"rows\": [\n";
    for (size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i];
      out << "    {\"name\": \"" << r.name << "\", \"p50\": " << r.p50 << ", \"p99\": " << r.p99
          << ", \"unit\": \"" << r.unit << "\", \"note\": \"" << r.note << "\"}"
          << (i + 1 < rows.size() ? ",\n" : "\n");
    }
    out << "  ]\n}\n";
  }
  store.reset();
  db.reset();
  fs::remove_all(base);
  return 0;
}
