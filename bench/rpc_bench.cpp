// RPC benchmark against the REAL node, run in this process: the runtime directory, sandbox
// sessions (RocksDB, bubblewrap) and an inference worker (tiny Llama fixture, CPU), exactly as
// `triplane serve` builds them, with the real RPC server in front. A raw Cap'n Proto client on
// its own thread talks to it over loopback TCP. Each RPC figure has its local peer in the same
// run: session kv get over RPC with 1, 16 and 256 calls in flight beside the same get as a
// local CAF request to the directory (and an RPC that no actor serves, the Cap'n Proto floor);
// exec output streamed over RPC beside the same streaming exec to a local sink actor and a raw
// loopback TCP copy; generated tokens streamed over RPC beside the same generation to a local
// sink actor.
//
//   rpc_bench [--json FILE] [--quick] [--model DIR]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <caf/all.hpp>
#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <spdlog/spdlog.h>

#include "api.capnp.h"
#include "coalescing_stream.hpp"  // rpc/src: the server's own transport, reused by one client
#include "triplane/actors/inference_protocol.hpp"
#include "triplane/actors/inference_worker.hpp"
#include "triplane/actors/session_host.hpp"
#include "triplane/actors/session_protocol.hpp"
#include "triplane/actors/session_types.hpp"
#include "triplane/rpc/server.hpp"
#include "triplane/rpc/tokens.hpp"
#include "triplane/runtime/directory.hpp"
#include "triplane/runtime/node.hpp"
#include "triplane/runtime/node_config.hpp"
#include "triplane/runtime/supervisor.hpp"

namespace {

using clock_type = std::chrono::steady_clock;
namespace ss = triplane::actors;
namespace inf = triplane::actors::inference;
namespace sup = triplane::runtime::sup;

uint64_t us_since(clock_type::time_point t) {
  return static_cast<uint64_t>(
    std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now() - t).count() / 1000);
}

struct figure {
  std::string name;
  std::string transport = "-";  ///< tcp | unix (RPC rows)
  std::string client = "-";     ///< plain (Cap'n Proto's own stream) | batched (coalescing_stream)
  size_t in_flight = 0;
  double calls_per_s = 0, p50_us = 0, p99_us = 0;
  double cpu_us_per_call = 0;  ///< process CPU (all threads, user+sys): robust to a busy host
  std::map<std::string, double> cpu_us_per_call_by_thread;  ///< the same, by thread name
};

/// CPU time (user+sys, µs) of this process's threads, summed by thread name: where the CPU of
/// a row went. Names: "bench-client" (this main thread), "triplane-rpc" (the server's kj
/// thread), CAF's scheduler workers and other CAF/RocksDB threads under their own names.
std::map<std::string, double> cpu_by_thread() {
  std::map<std::string, double> out;
  static const double us_per_tick = 1e6 / static_cast<double>(sysconf(_SC_CLK_TCK));
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    std::ifstream in{e.path() / "stat"};
    std::string line;
    if (!std::getline(in, line)) continue;
    auto open = line.find('(');
    auto close = line.rfind(')');
    if (open == std::string::npos || close == std::string::npos) continue;
    auto name = line.substr(open + 1, close - open - 1);
    std::istringstream rest{line.substr(close + 2)};
    std::string field;
    double utime = 0, stime = 0;
    for (int i = 3; i <= 15 && rest >> field; ++i) {  // fields 14, 15: utime, stime
      if (i == 14) utime = std::stod(field);
      if (i == 15) stime = std::stod(field);
    }
    out[name] += (utime + stime) * us_per_tick;
  }
  return out;
}

double process_cpu_us() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto us = [](const timeval& t) { return t.tv_sec * 1e6 + t.tv_usec; };
  return us(ru.ru_utime) + us(ru.ru_stime);
}

figure summarize(std::string name, size_t in_flight, std::vector<uint64_t> lat, double seconds) {
  std::sort(lat.begin(), lat.end());
  figure f;
  f.name = std::move(name);
  f.in_flight = in_flight;
  f.calls_per_s = static_cast<double>(lat.size()) / seconds;
  f.p50_us = static_cast<double>(lat[lat.size() / 2]);
  f.p99_us = static_cast<double>(lat[lat.size() * 99 / 100]);
  return f;
}

// ---- local actor baseline -------------------------------------------------------------------

struct local_run {
  std::vector<uint64_t> latencies;
};
using done_atom = caf::atom_constant<caf::atom("bench_done")>;

void local_issue(caf::event_based_actor* self, caf::actor dir, std::shared_ptr<size_t> left,
                 std::shared_ptr<local_run> run, std::shared_ptr<size_t> outstanding,
                 caf::actor report) {
  if (*left == 0) {
    if (--*outstanding == 0) self->send(report, done_atom::value);
    return;
  }
  --*left;
  auto t0 = clock_type::now();
  self->request(dir, std::chrono::seconds(10), triplane::runtime::call_atom::value,
                std::string("session"), std::string("bench/s"),
                caf::make_message(ss::kv_get_atom::value, std::string("key")))
    .then([=](ss::kv_value&) {
      run->latencies.push_back(us_since(t0));
      local_issue(self, dir, left, run, outstanding, report);
    });
}

figure bench_local(caf::actor_system& sys, caf::actor dir, size_t in_flight, size_t calls) {
  auto run = std::make_shared<local_run>();
  run->latencies.reserve(calls);
  caf::scoped_actor self{sys};
  auto threads0 = cpu_by_thread();
  auto cpu0 = process_cpu_us();
  auto t0 = clock_type::now();
  auto left = std::make_shared<size_t>(calls);
  auto outstanding = std::make_shared<size_t>(in_flight);
  caf::actor report = self;
  sys.spawn([=](caf::event_based_actor* a) {
    for (size_t i = 0; i < in_flight; ++i) local_issue(a, dir, left, run, outstanding, report);
  });
  self->receive([](done_atom) {});
  double seconds = static_cast<double>(us_since(t0)) / 1e6;
  auto f = summarize("local actor request", in_flight, run->latencies, seconds);
  f.cpu_us_per_call = (process_cpu_us() - cpu0) / static_cast<double>(calls);
  for (const auto& [name, us] : cpu_by_thread()) {
    auto delta = (us - threads0[name]) / static_cast<double>(calls);
    if (delta > 0) f.cpu_us_per_call_by_thread[name] = delta;
  }
  return f;
}

// ---- RPC --------------------------------------------------------------------------------------

struct rpc_driver {
  triplane::api::Session::Client session;
  triplane::api::Bootstrap::Client floor;  ///< protocolVersion, which no actor serves
  bool use_floor = false;
  size_t left = 0;
  std::vector<uint64_t> latencies;

  kj::Promise<void> next() {
    if (left == 0) return kj::READY_NOW;
    --left;
    auto t0 = clock_type::now();
    auto done = [this, t0]() {
      latencies.push_back(us_since(t0));
      return next();
    };
    // Size hints (both rows alike): without one a request message starts with an 8 KiB
    // zeroed segment.
    if (use_floor)
      return floor.protocolVersionRequest(capnp::MessageSize{4, 0}).send().then(
        [done](auto&&) { return done(); });
    auto req = session.kvGetRequest(capnp::MessageSize{8, 0});
    req.setKey("key");
    return req.send().then([done](auto&&) { return done(); });
  }
};

figure bench_rpc(kj::AsyncIoContext& io, triplane::api::Session::Client session,
                 size_t in_flight, size_t calls,
                 kj::Maybe<triplane::api::Bootstrap::Client> floor = nullptr) {
  // Labels are set by the caller (bench_client).
  bool is_floor = floor != nullptr;
  triplane::api::Bootstrap::Client floor_cap{nullptr};
  KJ_IF_MAYBE(f, floor) { floor_cap = *f; }
  rpc_driver d{session, floor_cap, is_floor, calls, {}};
  d.latencies.reserve(calls);
  auto threads0 = cpu_by_thread();
  auto cpu0 = process_cpu_us();
  auto t0 = clock_type::now();
  kj::Vector<kj::Promise<void>> all;
  for (size_t i = 0; i < in_flight; ++i) all.add(d.next());
  kj::joinPromises(all.releaseAsArray()).wait(io.waitScope);
  double seconds = static_cast<double>(us_since(t0)) / 1e6;
  auto f = summarize(is_floor ? "RPC floor (no actor)" : "RPC Session.kvGet", in_flight,
                     d.latencies, seconds);
  f.cpu_us_per_call = (process_cpu_us() - cpu0) / static_cast<double>(calls);
  for (const auto& [name, us] : cpu_by_thread()) {
    auto delta = (us - threads0[name]) / static_cast<double>(calls);
    if (delta > 0) f.cpu_us_per_call_by_thread[name] = delta;
  }
  return f;
}

/// One client connection of the benchmark: over TCP or a Unix-domain socket, through Cap'n
/// Proto's own stream ("plain": two reads and one writev per message, as any 0.9.2 client) or
/// through triplane's coalescing_stream ("batched": what the server itself uses).
struct bench_client {
  std::string transport, client;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<capnp::TwoPartyClient> rpc;
  triplane::api::Bootstrap::Client boot{nullptr};
  triplane::api::Tenant::Client tenant{nullptr};
  triplane::api::Session::Client session{nullptr};

  static std::unique_ptr<bench_client> open(kj::AsyncIoContext& io, const std::string& address,
                                            std::string transport, bool batched,
                                            const std::string& token) {
    auto c = std::make_unique<bench_client>();
    c->transport = std::move(transport);
    c->client = batched ? "batched" : "plain";
    auto addr = io.provider->getNetwork().parseAddress(address).wait(io.waitScope);
    c->stream = addr->connect().wait(io.waitScope);
    if (batched)
      c->stream = kj::heap<triplane::rpc::detail::coalescing_stream>(kj::mv(c->stream));
    c->rpc = kj::heap<capnp::TwoPartyClient>(*c->stream);
    c->boot = c->rpc->bootstrap().castAs<triplane::api::Bootstrap>();
    auto auth = c->boot.authenticateRequest();
    auth.setToken(token);
    c->tenant = auth.send().getTenant();
    auto open = c->tenant.sessionRequest();
    open.setId("s");
    open.setCreate(true);
    c->session = open.send().wait(io.waitScope).getSession();
    return c;
  }

  figure run(kj::AsyncIoContext& io, size_t in_flight, size_t calls, bool floor) {
    auto f = floor ? bench_rpc(io, session, in_flight, calls,
                               kj::Maybe<triplane::api::Bootstrap::Client>(boot))
                   : bench_rpc(io, session, in_flight, calls);
    f.transport = transport;
    f.client = client;
    return f;
  }
};

class counting_sink final : public triplane::api::OutputSink::Server {
public:
  explicit counting_sink(uint64_t& bytes) : bytes_(bytes) {}
  kj::Promise<void> write(WriteContext ctx) override {
    bytes_ += ctx.getParams().getChunk().size();
    return kj::READY_NOW;
  }
  kj::Promise<void> done(DoneContext) override { return kj::READY_NOW; }

private:
  uint64_t& bytes_;
};

double bench_stream(kj::AsyncIoContext& io, triplane::api::Session::Client session,
                    uint64_t total) {
  uint64_t bytes = 0;
  auto req = session.execRequest();
  req.initRequest().setShell("yes 0123456789abcdef0123456789abcdef | head -c " + std::to_string(total));
  req.getRequest().setOutputCapBytes(total);
  req.setSink(kj::heap<counting_sink>(bytes));
  auto t0 = clock_type::now();
  req.send().wait(io.waitScope);
  double seconds = static_cast<double>(us_since(t0)) / 1e6;
  if (bytes != total) std::fprintf(stderr, "stream lost bytes: %llu\n",
                                   static_cast<unsigned long long>(bytes));
  return static_cast<double>(bytes) / seconds / 1e6;
}

/// The same streaming exec, to a local sink actor (no RPC): the session's own throughput.
double bench_stream_local(caf::actor_system& sys, caf::actor dir, const std::string& full_id,
                          uint64_t total) {
  auto bytes = std::make_shared<std::atomic<uint64_t>>(0);
  auto sink = sys.spawn([bytes](caf::event_based_actor*) -> caf::behavior {
    return {[bytes](ss::exec_chunk_atom, const ss::exec_chunk& c) { *bytes += c.data.size(); }};
  });
  ss::exec_request req;
  req.shell = "yes 0123456789abcdef0123456789abcdef | head -c " + std::to_string(total);
  req.limits.stdout_cap_bytes = total;
  caf::scoped_actor self{sys};
  auto t0 = clock_type::now();
  self->request(dir, std::chrono::seconds(120), triplane::runtime::call_atom::value,
                std::string("session"), full_id,
                caf::make_message(ss::exec_stream_atom::value, req, sink))
    .receive([](ss::exec_result&) {},
             [](caf::error& e) { std::fprintf(stderr, "local exec: %s\n", caf::to_string(e).c_str()); });
  double seconds = static_cast<double>(us_since(t0)) / 1e6;
  caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
  return static_cast<double>(bytes->load()) / seconds / 1e6;
}

class counting_token_sink final : public triplane::api::TokenSink::Server {
public:
  explicit counting_token_sink(uint64_t& n) : n_(n) {}
  kj::Promise<void> tokens(TokensContext ctx) override {
    n_ += ctx.getParams().getIds().size();
    return kj::READY_NOW;
  }
  kj::Promise<void> done(DoneContext) override { return kj::READY_NOW; }

private:
  uint64_t& n_;
};

/// Generated tokens per second over RPC (streamed to a sink), one request.
double bench_tokens(kj::AsyncIoContext& io, triplane::api::Inference::Client inference,
                    uint32_t n) {
  uint64_t got = 0;
  auto req = inference.generateRequest();
  auto r = req.initRequest();
  auto prompt = r.initPromptTokens(3);
  prompt.set(0, 1);
  prompt.set(1, 2);
  prompt.set(2, 3);
  r.setMaxTokens(n);
  req.setSink(kj::heap<counting_token_sink>(got));
  auto t0 = clock_type::now();
  req.send().wait(io.waitScope);
  double seconds = static_cast<double>(us_since(t0)) / 1e6;
  return static_cast<double>(got) / seconds;
}

/// The same generation sent to the worker locally (through the same supervisor routes).
double bench_tokens_local(caf::actor_system& sys, caf::actor root, uint32_t n) {
  caf::scoped_actor self{sys};
  inf::generate_request req;
  req.prompt = {1, 2, 3};
  req.max_new_tokens = n;
  req.sink = self;
  auto msg = caf::make_message(sup::route_atom::value, std::string("inference"),
                               caf::make_message(sup::route_atom::value, std::string("worker-0"),
                                                 caf::make_message(req)));
  auto t0 = clock_type::now();
  self->send(root, msg);
  uint64_t got = 0;
  bool done = false;
  while (!done) {
    self->receive([](inf::generate_accepted&) {},
                  [&](inf::token_event&) { ++got; },
                  [&](inf::generation_finished&) { done = true; },
                  [&](caf::error& e) {
                    std::fprintf(stderr, "local generate: %s\n", caf::to_string(e).c_str());
                    done = true;
                  });
  }
  double seconds = static_cast<double>(us_since(t0)) / 1e6;
  return static_cast<double>(got) / seconds;
}

/// The ceiling for streaming: a plain loopback TCP copy of the same bytes.
double bench_raw_tcp(uint64_t total, uint64_t chunk_size) {
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(ls, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(ls, reinterpret_cast<sockaddr*>(&addr), &len);
  listen(ls, 1);
  std::thread writer([&] {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    std::string buf(chunk_size, 'x');
    for (uint64_t sent = 0; sent < total;) {
      auto w = write(fd, buf.data(), buf.size());
      if (w <= 0) break;
      sent += static_cast<uint64_t>(w);
    }
    close(fd);
  });
  int fd = accept(ls, nullptr, nullptr);
  auto t0 = clock_type::now();
  std::string buf(chunk_size, '\0');
  uint64_t got = 0;
  for (;;) {
    auto r = read(fd, buf.data(), buf.size());
    if (r <= 0) break;
    got += static_cast<uint64_t>(r);
  }
  double seconds = static_cast<double>(us_since(t0)) / 1e6;
  writer.join();
  close(fd);
  close(ls);
  return static_cast<double>(got) / seconds / 1e6;
}

} // namespace

int main(int argc, char** argv) {
  std::string json_path;
  bool quick = false;
  bool kv_only = false;  // skip the streaming figures (profiling the call path)
  std::vector<std::string> transports{"tcp", "unix"};
  std::vector<std::string> clients{"plain", "batched"};
  size_t calls_at_depth = 100000;
  auto split = [](const std::string& list) {
    std::vector<std::string> out;
    for (size_t at = 0; at <= list.size();) {
      auto comma = list.find(',', at);
      if (comma == std::string::npos) comma = list.size();
      if (comma > at) out.push_back(list.substr(at, comma - at));
      at = comma + 1;
    }
    return out;
  };
  std::string model = std::string(TRIPLANE_FIXTURES_DIR) + "/llama/tiny-llama-f32";
  std::string backend_name = "cpu";  // of the inference worker that streams the tokens
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) json_path = argv[++i];
    else if (a == "--quick") quick = true;
    else if (a == "--kv-only") kv_only = true;
    else if (a == "--transports" && i + 1 < argc) transports = split(argv[++i]);
    else if (a == "--clients" && i + 1 < argc) clients = split(argv[++i]);
    else if (a == "--calls" && i + 1 < argc) calls_at_depth = std::stoul(argv[++i]);
    else if (a == "--model" && i + 1 < argc) model = argv[++i];
    else if (a == "--backend" && i + 1 < argc && (std::string(argv[i + 1]) == "cpu" || std::string(argv[i + 1]) == "cuda"))
      backend_name = argv[++i];
    else {
      std::fprintf(stderr,
                   "usage: rpc_bench [--json FILE] [--quick] [--kv-only] [--model DIR] [--backend cpu|cuda]\n"
                   "                 [--transports tcp,unix] [--clients plain,batched] [--calls N]\n"
                   "  --transports  RPC transports to measure kv get over (default both)\n"
                   "  --clients     plain: the client uses Cap'n Proto 0.9.2's stream as is;\n"
                   "                batched: the client uses the server's coalescing_stream\n"
                   "  --calls       calls per row at 16 and 256 in flight (default 100000)\n");
      return 2;
    }
  }
  spdlog::set_level(spdlog::level::warn);
  pthread_setname_np(pthread_self(), "bench-client");
  std::string data_dir = (std::filesystem::temp_directory_path() / "rpc-bench-XXXXXX").string();
  if (!mkdtemp(data_dir.data())) return 1;

  // The node as `triplane serve` builds it (apps/triplane/serve.cpp).
  triplane::runtime::node_config config;
  config.set("scheduler.max-threads", 2);
  triplane::actors::add_session_message_types(config);
  triplane::runtime::register_supervision_types(config);
  inf::register_inference_types(config);
  triplane::runtime::node_options options;
  options.data_dir = data_dir;
  options.listen_port = 0;
  std::unique_ptr<triplane::actors::session_host> sessions;
  auto make_planes = [&](triplane::runtime::node& n)
    -> triplane::expected<std::vector<triplane::runtime::node::plane>> {
    triplane::actors::session_host_options so;
    so.workspaces_dir = data_dir + "/workspaces";
    auto host = triplane::actors::session_host::create(n.database(), so);
    if (!host) return std::move(host.error());
    sessions = std::move(*host);
    triplane::runtime::node::plane session_plane;
    session_plane.kinds.push_back(sessions->kind());
    std::vector<triplane::runtime::node::plane> planes{std::move(session_plane)};
    triplane::gpu::backend_options backend;
    backend.kind = backend_name == "cuda" ? triplane::gpu::backend_kind::cuda : triplane::gpu::backend_kind::cpu;
    auto child = inf::worker_child_spec("worker-0", model, backend, inf::worker_options{});
    if (!child) return std::move(child.error());
    triplane::runtime::supervisor_spec spec;
    spec.flags.name = "inference";
    spec.children.push_back(std::move(*child));
    triplane::runtime::node::plane inference_plane;
    inference_plane.children.push_back(triplane::runtime::supervisor_child("inference", std::move(spec)));
    planes.push_back(std::move(inference_plane));
    return planes;
  };
  auto node = triplane::runtime::node::start(config, options,
                                             triplane::actors::session_host::column_families(),
                                             make_planes);
  if (!node) {
    std::fprintf(stderr, "node: %s\n", triplane::describe(node.error()).c_str());
    return 1;
  }
  auto& sys = (*node)->system();
  auto dir = (*node)->directory_proxy();

  auto token = triplane::rpc::generate_token();
  triplane::rpc::server_options opts;
  opts.port = 0;
  opts.unix_path = data_dir + "/rpc.sock";
  opts.tokens.push_back(*triplane::rpc::make_token_record("bench", triplane::rpc::role::tenant,
                                                         token));
  opts.limits.max_concurrent_calls_per_tenant = 1024;
  opts.inference = (*node)->root_supervisor();
  opts.inference_route = {"inference", "worker-0"};
  auto server = triplane::rpc::rpc_server::start(opts, sys, dir);
  if (!server) {
    std::fprintf(stderr, "server: %s\n", triplane::describe(server.error()).c_str());
    return 1;
  }

  std::vector<figure> figures;
  double stream_mb_s = 0, stream_local_mb_s = 0, raw_mb_s = 0;
  std::string stream_error;
  double tok_s = 0, tok_local_s = 0;
  uint64_t stream_total = quick ? (16u << 20) : (64u << 20);
  uint32_t gen_tokens = quick ? 200 : 1000;
  {
    auto io = kj::setupAsyncIo();
    auto tcp_address = "127.0.0.1:" + std::to_string((*server)->port());
    auto stream = io.provider->getNetwork().parseAddress(tcp_address).wait(io.waitScope)
                    ->connect().wait(io.waitScope);
    capnp::TwoPartyClient rpc(*stream);
    auto boot = rpc.bootstrap().castAs<triplane::api::Bootstrap>();
    auto auth = boot.authenticateRequest();
    auth.setToken(token);
    auto tenant = auth.send().getTenant();
    auto open = tenant.sessionRequest();
    open.setId("s");
    open.setCreate(true);
    auto session = open.send().wait(io.waitScope).getSession();
    auto put = session.kvPutRequest();
    put.setKey("key");
    put.setValue(kj::heapArray<kj::byte>(64).asPtr());
    put.send().wait(io.waitScope);

    // One connection per (transport, client) pair, all open at once, measured in turns.
    std::vector<std::unique_ptr<bench_client>> rpc_clients;
    for (const auto& t : transports)
      for (const auto& c : clients) {
        if ((t != "tcp" && t != "unix") || (c != "plain" && c != "batched")) {
          std::fprintf(stderr, "unknown transport '%s' or client '%s'\n", t.c_str(), c.c_str());
          return 2;
        }
        auto address = t == "tcp" ? tcp_address : "unix:" + opts.unix_path;
        rpc_clients.push_back(bench_client::open(io, address, t, c == "batched", token));
      }

    size_t scale = quick ? 10 : 1;
    for (auto& c : rpc_clients) c->run(io, 16, 5000 / scale, false);  // warm-up
    bench_local(sys, dir, 16, 5000 / scale);
    for (size_t n : {size_t{1}, size_t{16}, size_t{256}}) {
      size_t calls = (n == 1 ? calls_at_depth / 10 : calls_at_depth) / scale;
      figures.push_back(bench_local(sys, dir, n, calls));
      for (auto& c : rpc_clients) {
        figures.push_back(c->run(io, n, calls, true));
        figures.push_back(c->run(io, n, calls, false));
      }
    }
    if (!kv_only) {
      // The session has no output credit: a client slower than the command overflows the
      // node's exec output buffer (limit_exceeded). Report it instead of aborting the run.
      try {
        stream_mb_s = bench_stream(io, session, stream_total);
      } catch (kj::Exception& e) {
        stream_error = e.getDescription().cStr();
        stream_mb_s = -1;
      }
      stream_local_mb_s = bench_stream_local(sys, dir, "bench/s", stream_total);
      raw_mb_s = bench_raw_tcp(stream_total, 64 * 1024);

      auto inference = tenant.inferenceRequest().send().getInference();
      bench_tokens(io, inference, 16);  // warm-up
      tok_s = bench_tokens(io, inference, gen_tokens);
      tok_local_s = bench_tokens_local(sys, (*node)->root_supervisor(), gen_tokens);
    }
  }
  (*server)->stop(std::chrono::milliseconds(1000));
  server->reset();
  (void)(*node)->shutdown(std::chrono::seconds(10));
  node->reset();
  std::error_code ignored;
  std::filesystem::remove_all(data_dir, ignored);

  std::printf("%-22s %-9s %-8s %9s %12s %10s %10s %12s\n", "path", "transport", "client",
              "in flight", "calls/s", "p50 us", "p99 us", "CPU us/call");
  for (const auto& f : figures)
    std::printf("%-22s %-9s %-8s %9zu %12.0f %10.1f %10.1f %12.1f\n", f.name.c_str(),
                f.transport.c_str(), f.client.c_str(), f.in_flight, f.calls_per_s, f.p50_us,
                f.p99_us, f.cpu_us_per_call);
  std::printf("(client and server share this process: CPU us/call covers both ends)\n");
  std::printf("\nCPU us per call by thread (rows at 256 in flight; 10 ms tick resolution):\n");
  for (const auto& f : figures) {
    if (f.in_flight != 256 || f.cpu_us_per_call_by_thread.empty()) continue;
    std::printf("  %-22s %-5s %-8s", f.name.c_str(), f.transport.c_str(), f.client.c_str());
    for (const auto& [name, us] : f.cpu_us_per_call_by_thread)
      if (us >= 0.05) std::printf("  %s %.1f", name.c_str(), us);
    std::printf("\n");
  }
  std::printf("\nexec output streaming (%llu MiB, sandboxed `yes | head`): RPC %.1f MB/s; same exec "
              "to a local sink actor %.1f MB/s; raw loopback TCP copy %.1f MB/s\n",
              static_cast<unsigned long long>(stream_total >> 20), stream_mb_s,
              stream_local_mb_s, raw_mb_s);
  if (!stream_error.empty())
    std::printf("exec output streaming over RPC FAILED (reported as -1): %s\n", stream_error.c_str());
  std::printf("generated-token streaming (%u tokens, %s, %s backend): RPC %.0f tok/s; same "
              "request to a local sink actor %.0f tok/s\n",
              gen_tokens, std::filesystem::path(model).filename().c_str(), backend_name.c_str(), tok_s,
              tok_local_s);

  if (!json_path.empty()) {
    std::ofstream out{json_path};
    out << "{\n  \"kv_get\": [\n";
    for (size_t i = 0; i < figures.size(); ++i) {
      const auto& f = figures[i];
      out << "    {\"path\": \"" << f.name << "\", \"transport\": \"" << f.transport
          << "\", \"client\": \"" << f.client << "\", \"in_flight\": " << f.in_flight
          << ", \"calls_per_s\": " << f.calls_per_s << ", \"p50_us\": " << f.p50_us
          << ", \"p99_us\": " << f.p99_us << ", \"cpu_us_per_call\": " << f.cpu_us_per_call
          << ", \"cpu_us_per_call_by_thread\": {";
      bool first = true;
      for (const auto& [name, us] : f.cpu_us_per_call_by_thread) {
        out << (first ? "" : ", ") << "\"" << name << "\": " << us;
        first = false;
      }
      out << "}"
          << "}" << (i + 1 < figures.size() ? "," : "") << "\n";
    }
    out << "  ],\n  \"exec_stream_mb_s\": " << stream_mb_s
        << ",\n  \"exec_stream_local_mb_s\": " << stream_local_mb_s
        << ",\n  \"raw_tcp_loopback_mb_s\": " << raw_mb_s
        << ",\n  \"token_stream_tok_s\": " << tok_s
        << ",\n  \"token_local_tok_s\": " << tok_local_s << "\n}\n";
  }
  return 0;
}
