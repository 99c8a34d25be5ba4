// triplane-cli and the C++ example client run as real processes against the real node
// (`triplane serve` as a separate process; commands run in bubblewrap sandboxes).
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

#include <sys/wait.h>
#include <unistd.h>

#include "support/serve_process.hpp"

using triplane::test::node_process;

namespace {

struct run_result {
  int status = -1;
  std::string out;  // stdout and stderr together
};

/// Runs `command` through the shell with the node's endpoint and `token` in the environment.
run_result run(const node_process& node, const std::string& token, const std::string& command) {
  std::string full = "export TRIPLANE_ENDPOINT=" + node.endpoint() + " TRIPLANE_TOKEN=" + token
                     + "; ( " + command + " ) 2>&1";
  run_result r;
  FILE* p = popen(full.c_str(), "r");
  REQUIRE(p);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

const std::string cli = TRIPLANE_CLI;

} // namespace

TEST_CASE("triplane-cli streams exec output and exits with the command's exit code", "[rpc][cli]") {
  node_process node;
  const auto& token = node.tokens().alice;
  auto r = run(node, token, cli + " session exec work --create -- echo hi there");
  CHECK(r.status == 0);
  CHECK(r.out == "hi there\n");
  r = run(node, token, cli + " session exec work -- sh -c 'echo partial; exit 7'");
  CHECK(r.status == 7);
  CHECK(r.out == "partial\n");
  r = run(node, token, cli + " session exec work --shell 'echo $((6 * 7)) >&2'");
  CHECK(r.status == 0);
  CHECK(r.out == "42\n");
}

TEST_CASE("triplane-cli moves files and kv entries in and out of a session", "[rpc][cli]") {
  node_process node;
  const auto& token = node.tokens().alice;
  auto r = run(node, token, "printf 'line one\\nline two\\n' | " + cli
                              + " session put notes --create docs/a.txt");
  REQUIRE(r.status == 0);
  r = run(node, token, cli + " session cat notes docs/a.txt");
  CHECK(r.status == 0);
  CHECK(r.out == "line one\nline two\n");
  r = run(node, token, cli + " session ls notes");
  CHECK(r.status == 0);
  CHECK(r.out.rfind("040755 ", 0) == 0);  // a directory, and nothing below it
  CHECK(r.out.find(" docs\n") != std::string::npos);
  CHECK(r.out.find("docs/a.txt") == std::string::npos);
  r = run(node, token, cli + " session ls notes --recursive");
  CHECK(r.status == 0);
  INFO(r.out);
  CHECK(r.out.find("         18 docs/a.txt\n") != std::string::npos);
  r = run(node, token, cli + " session kv notes put colour blue");
  CHECK(r.status == 0);
  r = run(node, token, cli + " session kv notes get colour");
  CHECK(r.out == "blue\n");
  r = run(node, token, cli + " session fork notes notes2");
  CHECK(r.status == 0);
  r = run(node, token, cli + " session cat notes2 docs/a.txt");
  CHECK(r.out == "line one\nline two\n");
  r = run(node, token, cli + " session rm notes2");
  CHECK(r.status == 0);
  r = run(node, token, cli + " session info notes2");
  CHECK(r.status == 1);
}

TEST_CASE("triplane-cli lists the tenant's stored sessions, all or by prefix",
          "[rpc][cli][list]") {
  node_process node;
  const auto& token = node.tokens().alice;
  auto r = run(node, token, cli + " session info web --create > /dev/null && " + cli
                              + " session info api --create > /dev/null && " + cli
                              + " session info web-2 --create > /dev/null");
  REQUIRE(r.status == 0);
  r = run(node, token, cli + " session list");
  CHECK(r.status == 0);
  CHECK(r.out == "api\nweb\nweb-2\n");
  r = run(node, token, cli + " session list web");
  CHECK(r.status == 0);
  CHECK(r.out == "web\nweb-2\n");
  r = run(node, token, cli + " session list --limit 2");
  CHECK(r.status == 0);
  CHECK(r.out == "api\nweb\n");
  r = run(node, token, cli + " session list nothing-here");
  CHECK(r.status == 0);
  CHECK(r.out.empty());
  // Another tenant sees none of them.
  r = run(node, node.tokens().bob, cli + " session list");
  CHECK(r.status == 0);
  CHECK(r.out.empty());
  r = run(node, token, cli + " session list 'a b'");
  CHECK(r.status == 1);
  CHECK(r.out.find("error: invalid_argument: prefix") != std::string::npos);
  r = run(node, token, cli + " session list --limit 0");
  CHECK(r.status == 2);
  r = run(node, token, cli + " session list a b");
  CHECK(r.status == 2);
  r = run(node, token, cli + " session list --create");
  CHECK(r.status == 2);
  CHECK(r.out.find("unknown option --create") != std::string::npos);
  r = run(node, token, cli + " --help");
  CHECK(r.out.find("session list [PREFIX]") != std::string::npos);
}

TEST_CASE("triplane-cli prints human-readable errors and exits 1 or 2", "[rpc][cli]") {
  node_process node;
  auto r = run(node, "wrong-token", cli + " session ls x");
  CHECK(r.status == 1);
  CHECK(r.out.find("error: permission_denied: invalid token") != std::string::npos);
  r = run(node, node.tokens().alice, cli + " session cat missing f");
  CHECK(r.status == 1);
  CHECK(r.out.find("error: not_found: session 'missing' does not exist") != std::string::npos);
  r = run(node, node.tokens().alice, cli + " stats");
  CHECK(r.status == 1);
  CHECK(r.out.find("permission_denied") != std::string::npos);
  r = run(node, node.tokens().ops, cli + " stats");
  CHECK(r.status == 0);
  CHECK(r.out.find("open connections") != std::string::npos);
  r = run(node, node.tokens().alice, cli + " generate --tokens 1,2,3");
  CHECK(r.status == 1);
  CHECK(r.out.find("error: unavailable: inference is not available") != std::string::npos);
  // The node answered: no hint that it might be unreachable.
  CHECK(r.out.find("is the node running") == std::string::npos);
  r = run(node, node.tokens().alice, cli + " generate hello");
  CHECK(r.status == 2);
  r = run(node, node.tokens().alice, cli + " frobnicate");
  CHECK(r.status == 2);
  r = run(node, node.tokens().alice, cli + " session exec x --timeout-ms notanumber -- true");
  CHECK(r.status == 2);
  r = run(node, node.tokens().alice, "TRIPLANE_ENDPOINT=127.0.0.1:1 " + cli + " session ls x");
  CHECK(r.status == 1);
  CHECK(r.out.find("error: unavailable") != std::string::npos);
  CHECK(r.out.find("is the node running and reachable?") != std::string::npos);
  // A mistyped command is named as such, not hidden behind a connection error or a missing token.
  r = run(node, node.tokens().alice, "TRIPLANE_ENDPOINT=127.0.0.1:1 " + cli + " sesion ls x");
  CHECK(r.status == 2);
  CHECK(r.out.find("unknown command 'sesion'") != std::string::npos);
  r = run(node, "", cli + " frobnicate");
  CHECK(r.status == 2);
  CHECK(r.out.find("unknown command 'frobnicate'") != std::string::npos);
  // So is every other usage error: the arguments are checked before the node is needed.
  for (std::string bad : {" session exec x", " session cat x", " session get x",
                          " session kv x frob", " session kv x put onlykey", " session fork x",
                          " session frob x", " session exec x --timeout-ms soon -- true",
                          " session list --limit 0", " generate --tokens 1 --max-tokens -1",
                          " generate", " stats extra", " models extra"}) {
    INFO(bad);
    r = run(node, node.tokens().alice, "TRIPLANE_ENDPOINT=127.0.0.1:1 " + cli + bad);
    CHECK(r.status == 2);
    CHECK(r.out.find("unavailable") == std::string::npos);
  }
}

TEST_CASE("triplane-cli refuses numeric options it cannot represent instead of wrapping or "
          "truncating them", "[rpc][cli]") {
  node_process node;
  const auto& token = node.tokens().alice;
  // Each would otherwise reach the node as a different number than the one typed: "-1" wraps
  // to 4294967295 ms, 2^32 to 0 (the node's default), "5s" is read as 5.
  for (std::string bad : {"-1", "4294967296", "5s", "", "0x10", " 7"}) {
    INFO("--timeout-ms '" << bad << "'");
    auto r = run(node, token, cli + " session exec work --create --timeout-ms '" + bad
                                + "' -- echo it-ran");
    CHECK(r.status == 2);
    CHECK(r.out.find("--timeout-ms") != std::string::npos);
    CHECK(r.out.find("it-ran") == std::string::npos);
  }
  auto ok = run(node, token,
                cli + " session exec work --create --timeout-ms 4294967295 -- echo it-ran");
  CHECK(ok.status == 0);
  CHECK(ok.out == "it-ran\n");
  for (std::string bad : {"--max-tokens -1", "--max-tokens 4294967296", "--top-k -3",
                          "--seed -1", "--seed 18446744073709551616", "--temperature 0.5x",
                          "--top-p ''"}) {
    INFO(bad);
    auto r = run(node, token, cli + " generate --tokens 1,2 " + bad);
    CHECK(r.status == 2);
    CHECK(r.out.find(bad.substr(0, bad.find(' '))) != std::string::npos);
  }
}

TEST_CASE("triplane-cli fails with a message when it cannot write what it read", "[rpc][cli]") {
  node_process node;
  const auto& token = node.tokens().alice;
  auto r = run(node, token, "echo payload | " + cli + " session put box --create f.txt");
  REQUIRE(r.status == 0);
  if (access("/dev/full", W_OK) != 0) {
    WARN("SKIP: no writable /dev/full on this machine");
    return;
  }
  // /dev/full: every write fails with ENOSPC, as on a full disk.
  for (std::string command : {" session get box f.txt /dev/full",
                              " session cat box f.txt >/dev/full", " session ls box >/dev/full"}) {
    INFO(command);
    r = run(node, token, cli + command);
    CHECK(r.status == 1);
    CHECK(r.out.find("cannot write") != std::string::npos);
  }
  r = run(node, token, cli + " session get box f.txt /dev/null");
  CHECK(r.status == 0);
}

TEST_CASE("triplane-cli refuses a file too large for one call with limit_exceeded and says why",
          "[rpc][cli]") {
  node_process node;
  const auto& token = node.tokens().alice;
  // 70 MB: more than one Cap'n Proto message carries (64 MiB on both ends).
  auto r = run(node, token, "head -c 70000000 /dev/zero | " + cli + " session put box --create big");
  INFO(r.out);
  CHECK(r.status == 1);
  CHECK(r.out.find("error: limit_exceeded:") != std::string::npos);
  CHECK(r.out.find("64 MiB") != std::string::npos);
  // The connection and the session are fine: a smaller file goes through.
  r = run(node, token, "head -c 1000000 /dev/zero | " + cli + " session put box --create small");
  CHECK(r.status == 0);
}

TEST_CASE("the C++ example client runs against a live node", "[rpc][example]") {
  node_process node;
  auto r = run(node, node.tokens().bob, TRIPLANE_EXAMPLE_CLIENT);
  INFO(r.out);
  CHECK(r.status == 0);
  CHECK(r.out.find("connected as tenant bob") != std::string::npos);
  CHECK(r.out.find("output: hello world") != std::string::npos);
}
