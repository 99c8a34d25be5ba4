// triplane::client: synchronous wrappers over the generated Cap'n Proto client stubs.
#include "triplane/rpc/client.hpp"

#include <capnp/rpc-twoparty.h>
#include <iterator>
#include <kj/async-io.h>

#include "api.capnp.h"
#include "coalescing_stream.hpp"
#include "wire_errors.hpp"

namespace triplane::client {

namespace {

/// The longest a node runs an exec without a timeout of its own or a generation, by default
/// (rpc::limits::exec_max_timeout and generate_deadline): the node answers those calls by then
/// itself, so the client waits that long beyond its per-call timeout instead of cancelling them.
constexpr std::chrono::milliseconds longest_node_bound{600000};

/// kj allows one event loop per thread: connections made on one thread share it.
struct thread_loop {
  kj::AsyncIoContext io = kj::setupAsyncIo();
};

std::shared_ptr<thread_loop> loop_of_this_thread() {
  thread_local std::weak_ptr<thread_loop> current;
  if (auto l = current.lock()) return l;
  auto l = std::make_shared<thread_loop>();
  current = l;
  return l;
}

} // namespace

struct connection::impl {
  // Declared first so that it is destroyed last: everything below lives on this loop.
  std::shared_ptr<thread_loop> loop = loop_of_this_thread();
  kj::AsyncIoContext& io = loop->io;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<capnp::TwoPartyClient> rpc;
  api::Tenant::Client tenant{nullptr};
  std::string tenant_name;
  bool admin = false;
  std::chrono::milliseconds timeout{60000};

  /// Waits for `p`, bounded by `t`; kj exceptions become triplane errors.
  template <class T>
  expected<T> wait(kj::Promise<T> p, std::chrono::milliseconds t) {
    try {
      auto bounded = p.exclusiveJoin(
        io.provider->getTimer().afterDelay(t.count() * kj::MILLISECONDS).then([t]() -> T {
          kj::throwFatalException(rpc::wire::make_exception(
            errc::timeout, "no answer within " + std::to_string(t.count()) + " ms"));
        }));
      return bounded.wait(io.waitScope);
    } catch (kj::Exception& e) {
      return rpc::wire::to_caf(e);
    }
  }
  template <class T>
  expected<T> wait(kj::Promise<T> p) {
    return wait(kj::mv(p), timeout);
  }
};

struct session::state {
  // Declared first so that it is destroyed last: the capability below lives on this loop.
  std::shared_ptr<thread_loop> loop;
  /// A handle does not keep its connection open: once the connection is closed, calls fail.
  std::weak_ptr<connection::impl> conn;
  api::Session::Client cap;
};

namespace {

capnp::Data::Reader as_data(std::string_view s) {
  return {reinterpret_cast<const kj::byte*>(s.data()), s.size()};
}

std::string from_data(capnp::Data::Reader d) {
  return {reinterpret_cast<const char*>(d.begin()), d.size()};
}

class callback_sink final : public api::OutputSink::Server {
public:
  explicit callback_sink(output_callback cb) : cb_(std::move(cb)) {}
  kj::Promise<void> write(WriteContext ctx) override {
    auto p = ctx.getParams();
    auto chunk = p.getChunk();
    cb_(p.getStream() == api::OutputStream::STDOUT ? output_stream::out : output_stream::err,
        std::string_view(reinterpret_cast<const char*>(chunk.begin()), chunk.size()));
    return kj::READY_NOW;
  }
  kj::Promise<void> done(DoneContext) override { return kj::READY_NOW; }

private:
  output_callback cb_;
};

class token_sink final : public api::TokenSink::Server {
public:
  explicit token_sink(std::function<void(const std::vector<uint32_t>&)> cb) : cb_(std::move(cb)) {}
  kj::Promise<void> tokens(TokensContext ctx) override {
    std::vector<uint32_t> ids;
    for (auto id : ctx.getParams().getIds()) ids.push_back(id);
    cb_(ids);
    return kj::READY_NOW;
  }
  kj::Promise<void> done(DoneContext) override { return kj::READY_NOW; }

private:
  std::function<void(const std::vector<uint32_t>&)> cb_;
};

/// Cap'n Proto's default limit on one message (ReaderOptions::traversalLimitInWords), which a
/// node's reader_limits keep by default: a larger request would be refused by the sending side
/// with an internal error that does not say what to do.
constexpr uint64_t max_message_words = 8u << 20;

/// limit_exceeded when `req` (a request about to be sent) is too large for one message.
template <class Request>
caf::error check_message_size(Request& req, const char* what) {
  auto words = req.asReader().totalSize().wordCount;
  if (words + 64 <= max_message_words) return caf::none;  // 64 words: the call's framing
  return make_error(errc::limit_exceeded,
                    std::string(what) + " takes " + std::to_string(words * 8)
                      + " bytes; one call carries at most 64 MiB: send less per call");
}

caf::error connection_closed(const std::string& id) {
  return make_error(errc::unavailable, "session '" + id
                                         + "': its connection was closed; connect again");
}

} // namespace

// ------------------------------------------------------------------------------------------
// connection

connection::connection(std::unique_ptr<impl> i) : impl_(std::move(i)) {}
connection::~connection() = default;

expected<std::unique_ptr<connection>> connection::connect(const std::string& endpoint,
                                                          const std::string& token,
                                                          std::chrono::milliseconds timeout) {
  std::unique_ptr<impl> c;
  try {
    c = std::make_unique<impl>();
  } catch (kj::Exception& e) {
    return make_error(errc::internal, std::string("cannot set up an event loop on this thread: ")
                                        + e.getDescription().cStr());
  }
  auto addr = c->wait(c->io.provider->getNetwork().parseAddress(endpoint), timeout);
  if (!addr)
    return make_error(errc::invalid_argument,
                      "bad endpoint '" + endpoint + "': " + describe(addr.error()));
  auto stream = c->wait((*addr)->connect(), timeout);
  if (!stream)
    return make_error(errc::unavailable,
                      "cannot connect to " + endpoint + ": " + describe(stream.error()));
  // Buffered reads: one syscall per reply instead of two.
  c->stream = kj::heap<rpc::detail::coalescing_stream>(kj::mv(*stream));
  c->rpc = kj::heap<capnp::TwoPartyClient>(*c->stream);
  auto boot = c->rpc->bootstrap().castAs<api::Bootstrap>();
  auto req = boot.authenticateRequest();
  req.setToken(token);
  auto res = c->wait(req.send().then([&c](capnp::Response<api::Bootstrap::AuthenticateResults>&& r) {
    c->tenant = r.getTenant();
    c->tenant_name = r.getName();
    c->admin = r.getRole() == api::Role::ADMIN;
    return true;
  }), timeout);
  if (!res) return res.error();
  return std::unique_ptr<connection>(new connection(std::move(c)));
}

const std::string& connection::tenant() const { return impl_->tenant_name; }
bool connection::is_admin() const { return impl_->admin; }
void connection::set_call_timeout(std::chrono::milliseconds t) { impl_->timeout = t; }

expected<session> connection::open_session(const std::string& id, bool create) {
  auto req = impl_->tenant.sessionRequest();
  req.setId(id);
  req.setCreate(create);
  auto cap = impl_->wait(req.send().then([](capnp::Response<api::Tenant::SessionResults>&& r) {
    return r.getSession();
  }));
  if (!cap) return cap.error();
  return session(
    std::make_shared<session::state>(session::state{impl_->loop, impl_, kj::mv(*cap)}), id);
}

expected<session_page> connection::list_sessions(const std::string& prefix,
                                                 const std::string& after, uint32_t limit) {
  auto req = impl_->tenant.listSessionsRequest();
  req.setPrefix(prefix);
  req.setAfter(after);
  req.setLimit(limit);
  return impl_->wait(
    req.send().then([](capnp::Response<api::Tenant::ListSessionsResults>&& r) {
      session_page page;
      for (auto id : r.getIds()) page.ids.emplace_back(id.cStr(), id.size());
      page.more = r.getMore();
      return page;
    }));
}

expected<generate_result> connection::generate(
  const generate_options& opts, std::function<void(const std::vector<uint32_t>&)> on_tokens) {
  auto inf = impl_->tenant.inferenceRequest().send().getInference();
  auto req = inf.generateRequest();
  auto r = req.initRequest();
  r.setModel(opts.model);
  auto prompt = r.initPromptTokens(static_cast<unsigned>(opts.prompt_tokens.size()));
  for (size_t i = 0; i < opts.prompt_tokens.size(); ++i)
    prompt.set(static_cast<unsigned>(i), opts.prompt_tokens[i]);
  auto stops = r.initStopTokens(static_cast<unsigned>(opts.stop_tokens.size()));
  for (size_t i = 0; i < opts.stop_tokens.size(); ++i)
    stops.set(static_cast<unsigned>(i), opts.stop_tokens[i]);
  r.setMaxTokens(opts.max_tokens);
  r.setTemperature(opts.temperature);
  r.setTopP(opts.top_p);
  r.setTopK(opts.top_k);
  r.setSeed(opts.seed);
  if (on_tokens) req.setSink(kj::heap<token_sink>(std::move(on_tokens)));
  // A generation may run as long as the node's generate deadline, not the per-call timeout.
  return impl_->wait(req.send().then(
    [](capnp::Response<api::Inference::GenerateResults>&& res) {
      auto g = res.getResult();
      generate_result out;
      for (auto id : g.getTokens()) out.tokens.push_back(id);
      out.prompt_tokens = g.getPromptTokens();
      out.generated_tokens = g.getGeneratedTokens();
      out.finish_reason = g.getFinishReason().cStr();
      out.duration_us = g.getDurationUs();
      out.time_to_first_token_us = g.getTimeToFirstTokenUs();
      return out;
    }), impl_->timeout + longest_node_bound);
}

expected<std::vector<model_info>> connection::list_models() {
  auto inf = impl_->tenant.inferenceRequest().send().getInference();
  return impl_->wait(inf.listModelsRequest().send().then(
    [](capnp::Response<api::Inference::ListModelsResults>&& res) {
      std::vector<model_info> out;
      for (auto m : res.getModels()) {
        model_info i;
        i.name = m.getName().cStr();
        i.backend = m.getBackend().cStr();
        i.parameters = m.getParameters();
        i.context_length = m.getContextLength();
        i.vocab_size = m.getVocabSize();
        out.push_back(std::move(i));
      }
      return out;
    }));
}

expected<node_stats> connection::stats() {
  auto admin = impl_->tenant.adminRequest().send().getAdmin();
  return impl_->wait(admin.nodeStatsRequest().send().then(
    [](capnp::Response<api::Admin::NodeStatsResults>&& res) {
      auto s = res.getStats();
      node_stats out;
      out.live_actors = s.getLiveActors();
      out.passivated_total = s.getPassivatedTotal();
      out.activations_total = s.getActivationsTotal();
      out.failures_total = s.getFailuresTotal();
      out.open_connections = s.getOpenConnections();
      out.draining = s.getDraining();
      return out;
    }));
}

expected<inference_worker_stats> connection::inference_stats() {
  auto admin = impl_->tenant.adminRequest().send().getAdmin();
  return impl_->wait(admin.inferenceStatsRequest().send().then(
    [](capnp::Response<api::Admin::InferenceStatsResults>&& res) {
      auto s = res.getStats();
      inference_worker_stats out;
      out.running = s.getRunning();
      out.queued = s.getQueued();
      out.kv_blocks_free = s.getKvBlocksFree();
      out.kv_blocks_total = s.getKvBlocksTotal();
      out.tokens_generated = s.getTokensGenerated();
      out.prompt_tokens_processed = s.getPromptTokensProcessed();
      out.steps = s.getSteps();
      out.requests_accepted = s.getRequestsAccepted();
      out.requests_rejected = s.getRequestsRejected();
      out.requests_completed = s.getRequestsCompleted();
      out.requests_cancelled = s.getRequestsCancelled();
      out.requests_failed = s.getRequestsFailed();
      out.preemptions = s.getPreemptions();
      return out;
    }));
}

expected<rpc_metrics> connection::metrics() {
  auto admin = impl_->tenant.adminRequest().send().getAdmin();
  return impl_->wait(admin.rpcMetricsRequest().send().then(
    [](capnp::Response<api::Admin::RpcMetricsResults>&& res) {
      auto m = res.getMetrics();
      rpc_metrics out;
      for (auto x : m.getMethods())
        out.methods.push_back({x.getMethod().cStr(), x.getCalls(), x.getErrors(), x.getP50Us(),
                               x.getP90Us(), x.getP99Us(), x.getMaxUs()});
      for (auto e : m.getErrors()) out.errors.emplace_back(e.getCode().cStr(), e.getCount());
      out.open_connections = m.getOpenConnections();
      out.connections_total = m.getConnectionsTotal();
      out.auth_failures = m.getAuthFailures();
      return out;
    }));
}

expected<std::string> connection::supervision_tree() {
  auto admin = impl_->tenant.adminRequest().send().getAdmin();
  return impl_->wait(admin.supervisionTreeRequest().send().then(
    [](capnp::Response<api::Admin::SupervisionTreeResults>&& res) {
      return std::string(res.getText().cStr());
    }));
}

expected<uint32_t> connection::drain(std::chrono::milliseconds deadline) {
  auto admin = impl_->tenant.adminRequest().send().getAdmin();
  auto req = admin.drainRequest();
  req.setDeadlineMs(static_cast<uint32_t>(deadline.count()));
  return impl_->wait(req.send().then([](capnp::Response<api::Admin::DrainResults>&& res) {
    return res.getCancelled();
  }), impl_->timeout + deadline);
}

// ------------------------------------------------------------------------------------------
// session

expected<exec_result> session::exec(const exec_options& opts, output_callback on_output) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.execRequest();
  auto r = req.initRequest();
  auto argv = r.initArgv(static_cast<unsigned>(opts.argv.size()));
  for (size_t i = 0; i < opts.argv.size(); ++i) argv.set(static_cast<unsigned>(i), opts.argv[i]);
  r.setShell(opts.shell);
  r.setStdin(as_data(opts.stdin_data));
  auto env = r.initEnv(static_cast<unsigned>(opts.env.size()));
  for (size_t i = 0; i < opts.env.size(); ++i) {
    env[static_cast<unsigned>(i)].setName(opts.env[i].first);
    env[static_cast<unsigned>(i)].setValue(opts.env[i].second);
  }
  r.setCwd(opts.cwd);
  r.setTimeoutMs(opts.timeout_ms);
  r.setOutputCapBytes(opts.output_cap_bytes);
  if (auto err = check_message_size(req, "the exec request (argv, env, stdin)")) return err;
  bool streaming = static_cast<bool>(on_output);
  if (streaming) req.setSink(kj::heap<callback_sink>(std::move(on_output)));
  // The node ends the command at its timeout; one without a timeout at the node's default,
  // which the client does not know: allow the longest a node takes by default.
  auto command = opts.timeout_ms ? std::chrono::milliseconds(opts.timeout_ms) : longest_node_bound;
  auto limit = c->timeout + command;
  return c->wait(
    req.send().then([](capnp::Response<api::Session::ExecResults>&& res) {
      auto x = res.getResult();
      exec_result out;
      out.exit_code = x.getExitCode();
      out.signal = x.getSignal();
      out.truncated = x.getTruncated();
      out.duration_us = x.getDurationUs();
      out.cpu_us = x.getCpuUs();
      out.peak_memory_bytes = x.getPeakMemoryBytes();
      out.stdout_data = from_data(x.getStdout());
      out.stderr_data = from_data(x.getStderr());
      return out;
    }),
    limit);
}

expected<std::string> session::read_file(const std::string& path, uint64_t offset,
                                         uint64_t length) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.readFileRequest();
  req.setPath(path);
  req.setOffset(offset);
  req.setLength(length);
  return c->wait(req.send().then(
    [](capnp::Response<api::Session::ReadFileResults>&& res) { return from_data(res.getData()); }));
}

expected<void> session::write_file(const std::string& path, std::string_view data,
                                   bool make_parents, bool executable) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.writeFileRequest();
  req.setPath(path);
  req.setData(as_data(data));
  req.setMakeParents(make_parents);
  req.setExecutable(executable);
  if (auto err = check_message_size(req, "the file")) return err;
  auto r = c->wait(req.send().ignoreResult().then([] { return true; }));
  if (!r) return r.error();
  return {};
}

expected<file_page> session::list_files_page(const std::string& path, bool recursive,
                                             const std::string& after, uint32_t limit) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.listFilesRequest();
  req.setPath(path);
  req.setRecursive(recursive);
  req.setAfter(after);
  req.setLimit(limit);
  return c->wait(req.send().then(
    [](capnp::Response<api::Session::ListFilesResults>&& res) {
      file_page page;
      // Read the list once: every read counts against the message's traversal limit.
      auto entries = res.getEntries();
      page.entries.reserve(entries.size());
      for (auto e : entries) page.entries.push_back({e.getPath().cStr(), e.getSize(), e.getMode()});
      page.more = res.getMore();
      return page;
    }));
}

expected<std::vector<file_entry>> session::list_files(const std::string& path, bool recursive) {
  // Pages of up to 16,384 entries: a few MiB even with long paths, well inside one message.
  constexpr uint32_t page_entries = 16384;
  std::vector<file_entry> out;
  std::string after;
  for (;;) {
    auto page = list_files_page(path, recursive, after, page_entries);
    if (!page) return page.error();
    // A node from before pagination ignores the limit and answers everything, without `more`.
    if (page->entries.empty()) return out;
    after = page->entries.back().path;
    const bool more = page->more;
    out.insert(out.end(), std::make_move_iterator(page->entries.begin()),
               std::make_move_iterator(page->entries.end()));
    if (!more) return out;
  }
}

expected<void> session::remove_file(const std::string& path, bool recursive) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.removeFileRequest();
  req.setPath(path);
  req.setRecursive(recursive);
  auto r = c->wait(req.send().ignoreResult().then([] { return true; }));
  if (!r) return r.error();
  return {};
}

expected<std::optional<std::string>> session::kv_get(const std::string& key) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.kvGetRequest();
  req.setKey(key);
  return c->wait(req.send().then(
    [](capnp::Response<api::Session::KvGetResults>&& res) -> std::optional<std::string> {
      if (!res.getFound()) return std::nullopt;
      return from_data(res.getValue());
    }));
}

expected<void> session::kv_put(const std::string& key, std::string_view value) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.kvPutRequest();
  req.setKey(key);
  req.setValue(as_data(value));
  if (auto err = check_message_size(req, "the value")) return err;
  auto r = c->wait(req.send().ignoreResult().then([] { return true; }));
  if (!r) return r.error();
  return {};
}

expected<bool> session::kv_delete(const std::string& key) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.kvDeleteRequest();
  req.setKey(key);
  return c->wait(req.send().then(
    [](capnp::Response<api::Session::KvDeleteResults>&& res) { return res.getExisted(); }));
}

expected<std::vector<std::string>> session::kv_list(const std::string& prefix) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.kvListRequest();
  req.setPrefix(prefix);
  return c->wait(req.send().then(
    [](capnp::Response<api::Session::KvListResults>&& res) {
      std::vector<std::string> out;
      for (auto k : res.getKeys()) out.emplace_back(k.cStr(), k.size());
      return out;
    }));
}

expected<session> session::fork(const std::string& new_id) {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto req = state_->cap.forkRequest();
  req.setNewId(new_id);
  auto cap = c->wait(req.send().then(
    [](capnp::Response<api::Session::ForkResults>&& res) { return res.getSession(); }));
  if (!cap) return cap.error();
  return session(std::make_shared<state>(state{c->loop, c, kj::mv(*cap)}), new_id);
}

expected<void> session::destroy() {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  auto r = c->wait(
    state_->cap.destroyRequest().send().ignoreResult().then([] { return true; }));
  if (!r) return r.error();
  return {};
}

expected<session_info> session::info() {
  auto c = state_->conn.lock();
  if (!c) return connection_closed(id_);
  return c->wait(state_->cap.infoRequest().send().then(
    [](capnp::Response<api::Session::InfoResults>&& res) {
      auto i = res.getInfo();
      session_info out;
      out.id = i.getId().cStr();
      out.created_unix_ms = i.getCreatedUnixMs();
      out.last_used_unix_ms = i.getLastUsedUnixMs();
      out.file_count = i.getFileCount();
      out.kv_count = i.getKvCount();
      out.exec_count = i.getExecCount();
      return out;
    }));
}

} // namespace triplane::client
