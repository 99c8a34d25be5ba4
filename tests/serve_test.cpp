// End to end: the `triplane serve` executable starts, reports its address and tree, refuses bad
// options, refuses a second node on the same data directory, and stops cleanly on SIGTERM/SIGINT.
#include <catch2/catch.hpp>

#include <csignal>
#include <filesystem>
#include <algorithm>
#include <fstream>

#include "child_process.hpp"

using namespace std::chrono_literals;
using triplane::testing::child_process;

namespace {

std::string fresh_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("triplane-serve-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  return dir.string();
}

} // namespace

TEST_CASE("serve starts on embedded defaults and stops cleanly on SIGTERM and SIGINT", "[serve]") {
  auto sig = GENERATE(SIGTERM, SIGINT);
  INFO("signal " << sig);
  auto dir = fresh_dir("clean" + std::to_string(sig));
  child_process node({TRIPLANE_BINARY, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0"});
  REQUIRE(node.wait_for_output("triplane: serving on", 20s));
  node.signal(sig);
  CHECK(node.wait(20s) == 0);
  CHECK(node.err().find("supervision tree") != std::string::npos);
  CHECK(node.err().find("stopped cleanly") != std::string::npos);
  CHECK(std::filesystem::exists(std::filesystem::path(dir) / "state" / "CURRENT"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("serve logs how it limits commands, and refuses a cgroup-parent it cannot use", "[serve]") {
  auto dir = fresh_dir("cgroup-parent");
  {
    child_process node({TRIPLANE_BINARY, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0"});
    REQUIRE(node.wait_for_output("triplane: serving on", 20s));
    CHECK(node.err().find("session host: command limits by ") != std::string::npos);
    node.signal(SIGTERM);
    CHECK(node.wait(20s) == 0);
  }
  // Not a cgroup v2 directory: no start (commands would silently run without the limits the
  // operator set up).
  child_process node({TRIPLANE_BINARY, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0",
                      "--triplane.cgroup-parent=\"" + dir + "\""});
  CHECK(node.wait(20s) != 0);
  CHECK(node.err().find("is not a cgroup v2 directory") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("serve keeps workspaces where workspaces-dir says, one node per directory", "[serve]") {
  auto dir = fresh_dir("ws-a");
  auto other = fresh_dir("ws-b");
  auto workspaces = fresh_dir("ws-shared");
  child_process node({TRIPLANE_BINARY, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0",
                      "--triplane.workspaces-dir=" + workspaces});
  REQUIRE(node.wait_for_output("triplane: serving on", 20s));
  CHECK(std::filesystem::exists(std::filesystem::path(workspaces) / ".lock"));
  CHECK_FALSE(std::filesystem::exists(std::filesystem::path(dir) / "workspaces"));
  // Another node (its own data directory) on the same workspaces directory is refused.
  child_process second({TRIPLANE_BINARY, "serve", "--data-dir", other, "--listen", "127.0.0.1:0",
                        "--triplane.workspaces-dir=" + workspaces});
  CHECK(second.wait(20s) != 0);
  CHECK(second.err().find("in use by another node") != std::string::npos);
  node.signal(SIGTERM);
  CHECK(node.wait(20s) == 0);
  for (auto& d : {dir, other, workspaces}) std::filesystem::remove_all(d);
}

TEST_CASE("serve writes JSON lines when asked", "[serve]") {
  auto dir = fresh_dir("json");
  child_process node({TRIPLANE_BINARY, "serve", "--data-dir=" + dir, "--listen=127.0.0.1:0", "--log-format", "json"});
  REQUIRE(node.wait_for_output("serving on", 20s));
  node.signal(SIGTERM);
  REQUIRE(node.wait(20s) == 0);
  std::istringstream lines(node.err());
  std::string line;
  int objects = 0;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    INFO(line);
    CHECK(line.front() == '{');
    CHECK(line.back() == '}');
    CHECK(line.find("\"level\":") != std::string::npos);
    ++objects;
  }
  CHECK(objects >= 3);
  std::filesystem::remove_all(dir);
}

TEST_CASE("serve reads a config file and flags override it", "[serve]") {
  auto dir = fresh_dir("config");
  std::filesystem::create_directories(dir);
  auto ini = dir + "/node.ini";
  std::ofstream(ini) << "[triplane]\ndata-dir=\"" << dir << "/from-file\"\nlisten=\"127.0.0.1:0\"\nlog-level=\"debug\"\n";
  {
    child_process node({TRIPLANE_BINARY, "serve", "--config", ini});
    REQUIRE(node.wait_for_output("serving on", 20s));
    node.signal(SIGTERM);
    REQUIRE(node.wait(20s) == 0);
    CHECK(std::filesystem::exists(dir + "/from-file/state/CURRENT"));
  }
  {
    child_process node({TRIPLANE_BINARY, "serve", "--config", ini, "--data-dir", dir + "/from-flag"});
    REQUIRE(node.wait_for_output("serving on", 20s));
    node.signal(SIGTERM);
    REQUIRE(node.wait(20s) == 0);
    CHECK(std::filesystem::exists(dir + "/from-flag/state/CURRENT"));
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("serve rejects bad options and config with a clear message", "[serve]") {
  struct bad_case {
    std::vector<std::string> args;
    std::string expected;
  };
  auto c = GENERATE(values<bad_case>({
    {{"--bogus"}, "unknown option '--bogus'"},
    {{"--listen", "nohostport"}, "invalid address 'nohostport'"},
    {{"--listen", "127.0.0.1:99999"}, "above 65535"},
    {{"--listen-unix", "/tmp/" + std::string(120, 's')}, "is longer than 107 bytes"},
    {{"--log-level", "loud"}, "unknown log level 'loud'"},
    {{"--log-format", "xml"}, "unknown log format 'xml'"},
    {{"--data-dir"}, "--data-dir needs a value"},
    {{"--config", "/nonexistent/node.ini"}, "cannot read config file"},
    {{"--triplane.durability=\"sometimes\""}, "unknown durability"},
    {{"--triplane.rpc-max-calls=0"}, "rpc-max-calls must be between 1 and 1000000"},
    {{"--triplane.rpc-max-sessions=0"}, "rpc-max-sessions must be between 1 and 1000000"},
    {{"--triplane.rpc-max-stored-sessions=0"},
     "rpc-max-stored-sessions must be between 1 and 100000000"},
    {{"--triplane.rpc-call-deadline=0s"}, "rpc-call-deadline must be positive"},
    {{"--triplane.rpc-exec-output-buffer=100"}, "rpc-exec-output-buffer must be at least 65536"},
    {{"--triplane.cgroup-parent=\"sys/fs/cgroup/x\""}, "cgroup-parent must be an absolute path"},
  }));
  INFO(c.expected);
  std::vector<std::string> argv{TRIPLANE_BINARY, "serve"};
  argv.insert(argv.end(), c.args.begin(), c.args.end());
  child_process node(argv);
  CHECK(node.wait(20s) == 2);
  CHECK(node.err().find(c.expected) != std::string::npos);
}

TEST_CASE("serve --help documents every option", "[serve]") {
  child_process node({TRIPLANE_BINARY, "serve", "--help"});
  REQUIRE(node.wait(20s) == 0);
  for (auto opt : {"--config", "--data-dir", "--listen", "--listen-unix", "workspaces-dir", "--log-level", "--log-format", "durability",
                   "max-live", "idle-timeout", "shutdown-timeout", "max-threads", "rpc-max-calls",
                   "rpc-max-sessions", "rpc-max-stored-sessions", "rpc-call-deadline",
                   "rpc-exec-output-buffer", "cgroup-parent"})
    CHECK(node.out().find(opt) != std::string::npos);
}

TEST_CASE("a second node on the same data directory is refused while the first runs", "[serve]") {
  auto dir = fresh_dir("lock");
  child_process first({TRIPLANE_BINARY, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0"});
  REQUIRE(first.wait_for_output("serving on", 20s));
  child_process second({TRIPLANE_BINARY, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0"});
  CHECK(second.wait(20s) == 1);
  CHECK(second.err().find("lock") != std::string::npos);
  first.signal(SIGTERM);
  CHECK(first.wait(20s) == 0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("triplane generate runs the engine and prints the generated ids", "[generate]") {
  std::string model = std::string{TRIPLANE_FIXTURES_DIR} + "/llama/tiny-llama-f32";
  child_process gen({TRIPLANE_BINARY, "generate", "--model", model, "--tokens", "1,2,3", "--max-new-tokens", "5"});
  REQUIRE(gen.wait(60s) == 0);
  auto line = gen.out().substr(0, gen.out().find('\n'));
  CHECK(std::count(line.begin(), line.end(), ',') == 4);
  child_process bad({TRIPLANE_BINARY, "generate", "--model", "/nonexistent", "--tokens", "1"});
  CHECK(bad.wait(60s) != 0);
  CHECK(bad.err().find("/nonexistent") != std::string::npos);
}
