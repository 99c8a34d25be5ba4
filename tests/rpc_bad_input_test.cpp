// Hostile and broken clients against the real node (`triplane serve` as a separate process):
// raw bytes and hand-built RPC messages
// from plain TCP sockets. The node must close each bad connection, keep serving a well-behaved
// client throughout, and keep its memory bounded.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize.h>
#include <kj/async-io.h>

#include "api.capnp.h"
#include "support/host_processes.hpp"
#include "support/raw_rpc_session.hpp"
#include "support/serve_process.hpp"
#include "triplane/rpc/client.hpp"

using triplane::testing::processes_with;

using namespace std::chrono_literals;
using triplane::errc;
using triplane::client::connection;
using triplane::test::node_process;

namespace {

int raw_connect(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  return fd;
}

/// Sends all `n` bytes; false when the server hung up first (which a test may expect).
bool send_all(int fd, const void* data, size_t n) {
  auto* p = static_cast<const char*>(data);
  while (n > 0) {
    auto w = send(fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}
bool send_all(int fd, const std::string& bytes) { return send_all(fd, bytes.data(), bytes.size()); }

/// Reads and drops whatever the server sends on `fd`, on its own thread, until stop() or the
/// server closes the connection (closed()).
class answer_drain {
public:
  explicit answer_drain(int fd)
    : thread_([this, fd] {
        char buf[65536];
        while (!stop_) {
          pollfd p{fd, POLLIN, 0};
          if (poll(&p, 1, 50) <= 0) continue;
          if (recv(fd, buf, sizeof buf, 0) <= 0) {
            closed_ = true;
            return;
          }
        }
      }) {}
  ~answer_drain() { stop(); }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  bool closed() const { return closed_; }

private:
  std::atomic<bool> stop_{false}, closed_{false};
  std::thread thread_;
};

/// True when the server closes the connection within `timeout` (EOF or reset), reading and
/// discarding whatever it sends first (e.g. an Abort message).
bool closed_by_server(int fd, std::chrono::milliseconds timeout) {
  auto until = std::chrono::steady_clock::now() + timeout;
  char buf[4096];
  while (std::chrono::steady_clock::now() < until) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    auto r = recv(fd, buf, sizeof buf, 0);
    if (r <= 0) return true;
  }
  return false;
}

std::vector<uint32_t> frame_header(std::initializer_list<uint32_t> segment_words) {
  std::vector<uint32_t> h;
  h.push_back(static_cast<uint32_t>(segment_words.size() - 1));
  for (auto w : segment_words) h.push_back(w);
  if (h.size() % 2) h.push_back(0);
  return h;
}

std::string serialize(capnp::MessageBuilder& b) {
  auto words = capnp::messageToFlatArray(b);
  auto bytes = words.asBytes();
  return {reinterpret_cast<const char*>(bytes.begin()), bytes.size()};
}

std::string bootstrap_message() {
  capnp::MallocMessageBuilder b;
  b.initRoot<capnp::rpc::Message>().initBootstrap().setQuestionId(0);
  return serialize(b);
}

/// A Call of Bootstrap.authenticate on the bootstrap answer; `fill` writes the params content.
template <class Fill>
std::string authenticate_call(Fill&& fill) {
  capnp::MallocMessageBuilder b;
  auto call = b.initRoot<capnp::rpc::Message>().initCall();
  call.setQuestionId(1);
  call.initTarget().initPromisedAnswer().setQuestionId(0);
  call.setInterfaceId(capnp::typeId<triplane::api::Bootstrap>());
  call.setMethodId(0);
  fill(call.initParams().getContent());
  return serialize(b);
}

/// A Call (question `question`) of `interface_id`.`method` on the capability in pointer field 0
/// of question `on_question`'s results (field 0 of each of those results is the capability
/// this test wants: Bootstrap.authenticate -> tenant, Tenant.session -> session); `fill` writes
/// the params. With promise pipelining, a client needs no answer to send the next call.
template <class Fill>
std::string pipelined_call(uint32_t question, uint32_t on_question, uint64_t interface_id,
                           uint16_t method, Fill&& fill) {
  capnp::MallocMessageBuilder b;
  auto call = b.initRoot<capnp::rpc::Message>().initCall();
  call.setQuestionId(question);
  auto target = call.initTarget().initPromisedAnswer();
  target.setQuestionId(on_question);
  target.initTransform(1)[0].setGetPointerField(0);
  call.setInterfaceId(interface_id);
  call.setMethodId(method);
  fill(call.initParams().getContent());
  return serialize(b);
}

/// What a raw client sends to hold session `id` as question 2: a Bootstrap (question 0), an
/// authenticate call with `token` (1) and Tenant.session on its answer (2), all pipelined.
std::string authenticated_session_preamble(const std::string& token, const std::string& id,
                                           bool create) {
  std::string bytes = bootstrap_message();
  bytes += authenticate_call([&](capnp::AnyPointer::Builder p) {
    p.initAs<triplane::api::Bootstrap::AuthenticateParams>().setToken(token);
  });
  bytes += pipelined_call(2, 1, capnp::typeId<triplane::api::Tenant>(), 0,
                          [&](capnp::AnyPointer::Builder p) {
                            auto params = p.initAs<triplane::api::Tenant::SessionParams>();
                            params.setId(id);
                            params.setCreate(create);
                          });
  return bytes;
}

/// Session.kvGet(`key`) as question `question`, on the session of question 2.
std::string pipelined_kv_get(uint32_t question, const char* key) {
  return pipelined_call(question, 2, capnp::typeId<triplane::api::Session>(), 5,
                        [key](capnp::AnyPointer::Builder p) {
                          p.initAs<triplane::api::Session::KvGetParams>().setKey(key);
                        });
}

/// A well-behaved client's round trip: must succeed whatever the bad clients do.
void check_healthy(connection& c, const std::string& what) {
  INFO("healthy client after: " << what);
  auto s = c.open_session("healthy", true);
  REQUIRE(s);
  REQUIRE(s->kv_put("after", what));
  auto v = s->kv_get("after");
  REQUIRE(v);
  REQUIRE(v->has_value());
  CHECK(**v == what);
}

} // namespace

TEST_CASE("malformed frames and messages close their connection while the node keeps serving",
          "[rpc][bad-input]") {
  node_process node;
  auto good = connection::connect(node.endpoint(), node.tokens().alice);
  REQUIRE(good);
  check_healthy(**good, "start");
  auto rss_start = node.rss_kib();

  struct bad_case {
    std::string name;
    std::string bytes;
    bool half_close;  // shut down our sending side after the bytes
  };
  std::vector<bad_case> cases;
  {
    // A frame that promises 100 words and delivers 10 before the client stops sending.
    auto h = frame_header({100});
    std::string b(reinterpret_cast<const char*>(h.data()), h.size() * 4);
    b += std::string(80, '\x01');
    cases.push_back({"truncated frame", b, true});
  }
  {
    std::mt19937 rng(42);
    std::string b(4096, '\0');
    for (auto& c : b) c = static_cast<char>(rng());
    cases.push_back({"garbage bytes", b, false});
  }
  {
    // One segment claimed to be 2^31 words (16 GiB); only 4 KiB follow.
    auto h = frame_header({0x7fffffff});
    std::string b(reinterpret_cast<const char*>(h.data()), h.size() * 4);
    b += std::string(4096, '\0');
    cases.push_back({"segment table claiming 16 GiB", b, false});
  }
  {
    // A segment count far beyond what any reader accepts.
    std::vector<uint32_t> h{100000, 1, 1, 1};
    std::string b(reinterpret_cast<const char*>(h.data()), h.size() * 4);
    b += std::string(4096, '\0');
    cases.push_back({"segment table with 100001 segments", b, false});
  }
  cases.push_back({"wrong parameter struct (a list where a struct belongs)",
                   bootstrap_message() + authenticate_call([](capnp::AnyPointer::Builder c) {
                     c.initAs<capnp::List<uint64_t>>(8);
                   }),
                   false});
  cases.push_back({"wrong field type (a struct where the token text belongs)",
                   bootstrap_message() + authenticate_call([](capnp::AnyPointer::Builder c) {
                     c.initAsAnyStruct(0, 1).getPointerSection()[0].initAsAnyStruct(1, 0);
                   }),
                   false});
  cases.push_back({"parameters nested 200 deep (limit 32)",
                   bootstrap_message() + authenticate_call([](capnp::AnyPointer::Builder c) {
                     auto s = c.initAsAnyStruct(0, 1);
                     for (int i = 0; i < 200; ++i)
                       s = s.getPointerSection()[0].initAsAnyStruct(0, 1);
                   }),
                   false});
  {
    // A token list pointer whose element count (2^29 - 1 bytes) runs far past its segment.
    auto msg = authenticate_call([](capnp::AnyPointer::Builder c) {
      c.initAs<triplane::api::Bootstrap::AuthenticateParams>().setToken("0123456789abcde");
    });
    // Text of 15 chars + NUL: list pointer, element size BYTE (2), count 16.
    bool patched = false;
    for (size_t off = 8; off + 8 <= msg.size(); off += 8) {
      uint32_t lo, hi;
      std::memcpy(&lo, msg.data() + off, 4);
      std::memcpy(&hi, msg.data() + off + 4, 4);
      if ((lo & 3) == 1 && hi == ((16u << 3) | 2u)) {
        hi = (0x1fffffffu << 3) | 2u;
        std::memcpy(msg.data() + off + 4, &hi, 4);
        patched = true;
        break;
      }
    }
    REQUIRE(patched);
    cases.push_back({"a list pointer claiming 512 MiB inside a small segment",
                     bootstrap_message() + msg, false});
  }
  cases.push_back({"a 72 MiB token (message above the 64 MiB traversal limit)",
                   bootstrap_message() + authenticate_call([](capnp::AnyPointer::Builder c) {
                     auto t = c.initAs<triplane::api::Bootstrap::AuthenticateParams>()
                                .initToken(72u << 20);
                     std::memset(t.begin(), 'a', t.size());
                   }),
                   false});

  for (const auto& bc : cases) {
    INFO(bc.name);
    int fd = raw_connect(node.port());
    send_all(fd, bc.bytes.data(), bc.bytes.size());
    if (bc.half_close) shutdown(fd, SHUT_WR);
    CHECK(closed_by_server(fd, 5000ms));
    close(fd);
    REQUIRE(node.alive());
    check_healthy(**good, bc.name);
  }

  // Memory: nothing of the lies above was allocated for long (the 72 MiB message is the largest
  // thing a client can make the node hold, once, transiently).
  std::this_thread::sleep_for(300ms);
  auto rss_end = node.rss_kib();
  INFO("RSS start " << rss_start << " KiB, end " << rss_end << " KiB");
  CHECK(rss_end - rss_start < 96 * 1024);
}

namespace {

/// Forks a client that starts the shell command `command` (keeping `cap` bytes of output per
/// stream) with a sink and then never touches its socket again. Must run before this process
/// opens any connection.
pid_t start_stuck_reader(const node_process& node, const std::string& command, uint64_t cap,
                         uint32_t timeout_ms = 0) {
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child != 0) return child;
  triplane::test::raw_rpc_session raw(node.endpoint(), node.tokens().alice, "stuck", 4096);
  auto& session = raw.session;
  struct sink final : triplane::api::OutputSink::Server {
    kj::Promise<void> write(WriteContext) override { return kj::NEVER_DONE; }
  };
  auto req = session.execRequest();
  req.initRequest().setShell(command);
  req.getRequest().setOutputCapBytes(cap);
  req.getRequest().setTimeoutMs(timeout_ms);
  req.setSink(kj::heap<sink>());
  auto pending = req.send();
  // Run the loop just long enough to send the calls, then stop reading for good.
  raw.wait_ms(300);
  sleep(60);
  _exit(0);
}

/// Serves `good` for ~4 s while the stuck reader runs; returns the node's RSS growth (KiB).
long serve_beside_stuck_reader(const node_process& node, connection& good) {
  auto rss_start = node.rss_kib();
  long rss_peak = rss_start;
  for (int i = 0; i < 40; ++i) {
    check_healthy(good, "stuck reader, round " + std::to_string(i));
    rss_peak = std::max(rss_peak, node.rss_kib());
    std::this_thread::sleep_for(100ms);
  }
  INFO("RSS start " << rss_start << " KiB, peak " << rss_peak << " KiB");
  return rss_peak - rss_start;
}

/// What a well-behaved client saw while a bad one ran: each 100 ms it opens a session and writes
/// a key (counting failures) and the node's RSS is read; for `rounds` rounds, or until `done`.
struct flood_watch {
  int failed = 0;
  std::string last_error;
  long rss_peak = 0;
};
flood_watch watch_during_flood(connection& good, node_process& node, long rss_start, int rounds,
                               const std::function<bool()>& done = [] { return false; }) {
  flood_watch w;
  w.rss_peak = rss_start;
  for (int i = 0; i < rounds && !done(); ++i) {
    auto s = good.open_session("healthy", true);
    auto put = s ? s->kv_put("during", "flood") : triplane::expected<void>(s.error());
    if (!put) {
      ++w.failed;
      w.last_error = triplane::describe(put.error());
    }
    w.rss_peak = std::max(w.rss_peak, node.rss_kib());
    std::this_thread::sleep_for(100ms);
  }
  return w;
}

uint64_t errors_of(connection& ops, const std::string& code) {
  auto m = ops.metrics();
  REQUIRE(m);
  for (const auto& [c, n] : m->errors)
    if (c == code) return n;
  return 0;
}

} // namespace


TEST_CASE("a client that never reads a slow exec stream does not disturb others and its death "
          "kills the command", "[rpc][bad-input]") {
  node_process node;
  // Output trickles (well below the node's 8 MiB buffer): the call just waits for the client.
  const std::string marker = "tick" + std::to_string(getpid());
  pid_t child = start_stuck_reader(
    node, "while :; do echo " + marker + "; sleep 0.01; done", 0);
  auto good = connection::connect(node.endpoint(), node.tokens().alice);
  REQUIRE(good);
  CHECK(serve_beside_stuck_reader(node, **good) < 32 * 1024);
  CHECK(processes_with(marker) > 0);
  auto ops = connection::connect(node.endpoint(), node.tokens().ops);
  REQUIRE(ops);
  CHECK(errors_of(**ops, "limit_exceeded") == 0);
  // The stuck client goes away: the node kills its command in the session.
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    gone = processes_with(marker) == 0;
    if (!gone) std::this_thread::sleep_for(100ms);
  }
  CHECK(gone);
  check_healthy(**good, "stuck reader killed");
}

TEST_CASE("a fast exec for a client that never reads is held back by flow control with node "
          "memory bounded, and stops when the client goes away", "[rpc][bad-input][flow]") {
  node_process node({"--triplane.rpc-exec-output-buffer=4194304"});
  // 256 MiB offered, 32 MiB allowed per stream. Credit runs out after the 4 MiB window: the
  // session stops reading the pipe and the command blocks in write(); nothing is killed for
  // the buffer and the node holds about a window of output, not the caps.
  const std::string marker = "xyzzy" + std::to_string(getpid());
  pid_t child = start_stuck_reader(node, "yes " + marker + " | head -c 268435456", 32u << 20);
  auto good = connection::connect(node.endpoint(), node.tokens().alice);
  REQUIRE(good);
  CHECK(serve_beside_stuck_reader(node, **good) < 24 * 1024);
  CHECK(processes_with("yes " + marker) > 0);  // waiting on its pipe, not killed
  auto ops = connection::connect(node.endpoint(), node.tokens().ops);
  REQUIRE(ops);
  CHECK(errors_of(**ops, "limit_exceeded") == 0);
  // The client goes away: the node cancels the exec (or, at the latest, its timeout would).
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    gone = processes_with("yes " + marker) == 0;
    if (!gone) std::this_thread::sleep_for(100ms);
  }
  CHECK(gone);
  check_healthy(**good, "stuck reader killed");
}

TEST_CASE("a fast exec for a connected client that never reads is stopped by its timeout",
          "[rpc][bad-input][flow]") {
  node_process node;
  const std::string marker = "plugh" + std::to_string(getpid());
  pid_t child = start_stuck_reader(node, "yes " + marker + " | head -c 268435456", 32u << 20, 2000);
  auto good = connection::connect(node.endpoint(), node.tokens().alice);
  REQUIRE(good);
  bool started = false;
  for (int i = 0; i < 100 && !started; ++i) {
    started = processes_with("yes " + marker) > 0;
    if (!started) std::this_thread::sleep_for(50ms);
  }
  REQUIRE(started);
  // The client stays connected and never reads: the exec's 2 s timeout ends the command.
  auto start = std::chrono::steady_clock::now();
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    gone = processes_with("yes " + marker) == 0;
    if (!gone) std::this_thread::sleep_for(100ms);
  }
  CHECK(gone);
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  int status = 0;
  CHECK(waitpid(child, &status, WNOHANG) == 0);  // the client was still there all along
  check_healthy(**good, "stuck reader timed out");
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
}

TEST_CASE("a client that sends calls but never reads their replies holds bounded node memory",
          "[rpc][bad-input][flow]") {
  // 16 calls in flight per tenant: the node's memory for one connection is bounded by its
  // unsent-bytes limit plus the answers of 16 calls, whatever the client sends.
  node_process node({"--triplane.rpc-max-calls=16"});
  auto good = connection::connect(node.endpoint(), node.tokens().alice);
  REQUIRE(good);
  auto s = (*good)->open_session("bulk", true);
  REQUIRE(s);
  const std::string big(900 * 1024, 'v');  // within the session's 1 MiB of kv
  REQUIRE(s->kv_put("big", big));
  auto rss_start = node.rss_kib();

  // A raw client with a tiny receive window pipelines authenticate, Tenant.session and then
  // kvGet calls of the 900 KiB value, a few at a time (so that each finds a free call slot:
  // about 300 MB of answers a second), and never reads a byte.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  int small = 4096;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(node.port());
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  const std::string preamble = authenticated_session_preamble(node.tokens().alice, "bulk", false);
  std::atomic<bool> stop{false};
  std::atomic<uint32_t> sent{0};
  // Blocks in send() once the node stops reading: shutdown() below releases it.
  std::thread sender([&] {
    if (!send_all(fd, preamble)) return;
    for (uint32_t q = 3; q < 1000000 && !stop; ++q) {
      if (!send_all(fd, pipelined_kv_get(q, "big"))) return;
      ++sent;
      if (q % 4 == 0) std::this_thread::sleep_for(10ms);
    }
  });

  long rss_peak = rss_start;
  for (int i = 0; i < 30; ++i) {
    check_healthy(**good, "unread replies, round " + std::to_string(i));
    rss_peak = std::max(rss_peak, node.rss_kib());
    std::this_thread::sleep_for(100ms);
  }
  stop = true;
  INFO("RSS start " << rss_start << " KiB, peak " << rss_peak << " KiB; " << sent.load()
                    << " calls sent");
  CHECK(sent.load() > 100);
  CHECK(rss_peak - rss_start < 128 * 1024);
  shutdown(fd, SHUT_RDWR);
  sender.join();
  close(fd);
  check_healthy(**good, "the unread client gone");
}

TEST_CASE("an unauthenticated client that floods calls and never finishes them is cut off while "
          "others are served and node memory stays bounded", "[rpc][bad-input]") {
  node_process node;
  auto good = connection::connect(node.endpoint(), node.tokens().alice);
  REQUIRE(good);
  auto rss_start = node.rss_kib();
  // Bootstrap messages, each a new question the client never finishes (no Finish message):
  // without a bound, every one keeps an answer (and a reference to the bootstrap capability)
  // on the node. The client reads and discards the answers, so nothing waits to be written.
  int fd = raw_connect(node.port());
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> sent{0};
  answer_drain reader(fd);
  std::thread sender([&] {
    for (uint32_t round = 0; !stop; ++round) {
      std::string msgs;
      for (uint32_t q = 0; q < 4096; ++q) {
        capnp::MallocMessageBuilder b;
        b.initRoot<capnp::rpc::Message>().initBootstrap().setQuestionId(round * 4096 + q);
        msgs += serialize(b);
      }
      if (!send_all(fd, msgs)) return;
      sent += 4096;
    }
  });
  // Each call of the well-behaved client must still be answered: the flood starved them all.
  (*good)->set_call_timeout(2000ms);
  auto w = watch_during_flood(**good, node, rss_start, 10);
  const long rss_peak = w.rss_peak;
  stop = true;
  INFO("well-behaved calls that failed: " << w.failed << " (last: " << w.last_error << ")");
  CHECK(w.failed == 0);
  shutdown(fd, SHUT_RDWR);
  sender.join();
  reader.stop();
  close(fd);
  INFO("RSS start " << rss_start << " KiB, peak " << rss_peak << " KiB; " << sent.load()
                    << " bootstrap messages sent");
  CHECK(rss_peak - rss_start < 64 * 1024);
  check_healthy(**good, "bootstrap flood gone");
}

TEST_CASE("an authenticated client that never finishes its calls is cut off while others are "
          "served and node memory stays bounded", "[rpc][bad-input]") {
  node_process node;
  auto good = connection::connect(node.endpoint(), node.tokens().alice);
  REQUIRE(good);
  auto rss_start = node.rss_kib();
  // Authenticated, a session opened, then cheap kvGet calls pipelined on it, none ever
  // finished (no Finish message) while the answers are read and dropped: without a bound,
  // Cap'n Proto keeps every answer on the node.
  int fd = raw_connect(node.port());
  const std::string preamble = authenticated_session_preamble(node.tokens().alice, "unfinished", true);
  constexpr uint32_t max_questions = 200000;
  std::atomic<bool> stop{false};
  std::atomic<uint32_t> sent{0};
  answer_drain reader(fd);
  std::thread sender([&] {
    if (!send_all(fd, preamble)) return;
    for (uint32_t q = 3; q < max_questions && !stop && !reader.closed();) {
      std::string batch;
      for (uint32_t i = 0; i < 1024; ++i, ++q) batch += pipelined_kv_get(q, "k");
      if (!send_all(fd, batch)) return;
      sent += 1024;
    }
  });
  (*good)->set_call_timeout(2000ms);
  auto w = watch_during_flood(**good, node, rss_start, 100, [&] { return reader.closed(); });
  const long rss_peak = w.rss_peak;
  stop = true;
  const bool closed = reader.closed();
  shutdown(fd, SHUT_RDWR);
  sender.join();
  reader.stop();
  close(fd);
  INFO("questions sent " << sent.load() << "; RSS start " << rss_start << " KiB, peak " << rss_peak
                         << " KiB; well-behaved calls that failed: " << w.failed << " (" << w.last_error << ")");
  // Closed for its unfinished questions (4,096 by default), after it had authenticated (an
  // unauthenticated client is cut off after 64 KiB, a few hundred calls).
  CHECK(closed);
  CHECK(sent >= 4096);
  CHECK(sent < max_questions);
  CHECK(w.failed == 0);
  CHECK(rss_peak - rss_start < 64 * 1024);
  check_healthy(**good, "unfinished flood gone");
}

TEST_CASE("a thousand idle connections do not stop the node from serving", "[rpc][bad-input]") {
  rlimit lim{};
  REQUIRE(getrlimit(RLIMIT_NOFILE, &lim) == 0);
  if (lim.rlim_cur < 1200) {
    lim.rlim_cur = std::min<rlim_t>(lim.rlim_max, 4096);
    REQUIRE(setrlimit(RLIMIT_NOFILE, &lim) == 0);
  }
  REQUIRE(lim.rlim_cur >= 1200);
  node_process node;
  auto good = connection::connect(node.endpoint(), node.tokens().alice);
  REQUIRE(good);
  auto rss_start = node.rss_kib();
  std::vector<int> idle;
  for (int i = 0; i < 1000; ++i) idle.push_back(raw_connect(node.port()));
  std::this_thread::sleep_for(500ms);
  check_healthy(**good, "1000 idle connections");

  auto ops = connection::connect(node.endpoint(), node.tokens().ops);
  REQUIRE(ops);
  auto m = (*ops)->metrics();
  REQUIRE(m);
  CHECK(m->open_connections >= 1002);
  auto rss_idle = node.rss_kib();
  INFO("RSS before " << rss_start << " KiB, with 1000 idle " << rss_idle << " KiB");
  CHECK(rss_idle - rss_start < 64 * 1024);

  for (int fd : idle) close(fd);
  bool released = false;
  for (int i = 0; i < 50 && !released; ++i) {
    auto after = (*ops)->metrics();
    REQUIRE(after);
    released = after->open_connections <= 3;
    if (!released) std::this_thread::sleep_for(100ms);
  }
  CHECK(released);
  check_healthy(**good, "1000 idle connections closed");
}
