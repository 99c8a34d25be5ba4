// The capabilities of schemas/api.capnp: Bootstrap, Tenant, Session, Inference, Admin. Each
// method validates its input, then forwards to CAF actors through server_core.
#include <algorithm>
#include <deque>
#include <mutex>
#include <optional>

#include <spdlog/spdlog.h>

#include "api.capnp.h"
#include "server_core.hpp"
#include "triplane/rpc/session_calls.hpp"


namespace triplane::rpc::detail {
namespace sc = session_calls;
using std::chrono::milliseconds;

// ------------------------------------------------------------------------------------------
// server_core

call_slot::call_slot(server_core& core, const char* method, std::shared_ptr<tenant_state> tenant,
                     bool counted)
  : core_(core), method_(method), tenant_(std::move(tenant)), counted_(counted),
    start_(std::chrono::steady_clock::now()) {
  if (counted_) {
    ++tenant_->in_flight;
    ++core_.in_flight;
  }
}

call_slot::~call_slot() {
  // Destroyed unfinished: the client cancelled the call or disconnected.
  if (!finished_) finish(errc::cancelled);
  if (counted_) {
    --tenant_->in_flight;
    core_.call_done(true);
  }
}

void call_slot::finish(errc outcome) {
  if (finished_) return;
  finished_ = true;
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(
              std::chrono::steady_clock::now() - start_).count();
  core_.metrics.record(method_, static_cast<uint64_t>(us), outcome);
}

server_core::server_core(server_options o, caf::actor_system& sys, caf::actor dir,
                         kj::Timer& t)
  : opts(std::move(o)), directory(std::move(dir)),
    bridge(sys, std::max<size_t>(1, sys.scheduler().num_workers())), timer(t) {}

void server_core::call_done(bool counted) {
  if (!counted) return;
  --in_flight;
  if (in_flight == 0) {
    for (auto& w : idle_waiters_) w->fulfill();
    idle_waiters_.clear();
  }
}

kj::Promise<size_t> server_core::drain(milliseconds deadline) {
  draining = true;
  kj::Promise<void> idle = kj::READY_NOW;
  if (in_flight > 0) {
    auto paf = kj::newPromiseAndFulfiller<void>();
    idle_waiters_.push_back(kj::mv(paf.fulfiller));
    idle = kj::mv(paf.promise);
  }
  auto ms = static_cast<int64_t>(deadline.count());
  return idle.exclusiveJoin(timer.afterDelay(ms * kj::MILLISECONDS)).then([this]() -> size_t {
    auto left = static_cast<size_t>(in_flight);
    if (left > 0) {
      spdlog::warn("rpc: drain deadline passed; cancelling {} calls", left);
      canceler_.cancel(wire::make_exception(errc::unavailable,
                                            "the node is shutting down; the call was cancelled"));
    }
    return left;
  });
}

std::shared_ptr<tenant_state> server_core::tenant_for(const token_record& rec) {
  auto& slot = tenants_[rec.tenant];
  if (!slot) {
    slot = std::make_shared<tenant_state>();
    slot->name = rec.tenant;
  }
  // Shared by all tokens of the tenant: limits count the tenant, not the token. The role is
  // the token's and travels with the Tenant capability.
  return slot;
}

void close_on_malformed(const std::shared_ptr<connection_state>& conn, const kj::Exception& e) {
  if (!conn || !conn->close) return;
  std::string_view d{e.getDescription().cStr()};
  if (d.find("triplane:") != std::string_view::npos) return;
  if (e.getType() != kj::Exception::Type::FAILED) return;
  spdlog::warn("rpc: closing connection from {}: malformed call: {}", conn->peer, d);
  conn->close->fulfill();
  conn->close = nullptr;
}

kj::Exception unscoped(const kj::Exception& e, const std::string& scope_prefix) {
  std::string d = e.getDescription().cStr();
  for (auto at = d.find(scope_prefix); at != std::string::npos; at = d.find(scope_prefix, at))
    d.erase(at, scope_prefix.size());
  return kj::Exception(e.getType(), e.getFile(), e.getLine(), kj::str(d.c_str()));
}

namespace {

// ------------------------------------------------------------------------------------------
// Input validation and id scoping

/// Walks the whole parameter struct once: enforces the reader's nesting and traversal limits on
/// all of it (not only the fields a method reads) and rejects pointers of the wrong kind.
/// Also lets the RPC system cancel the call when the caller cancels it or disconnects (off by
/// default in Cap'n Proto 0.9): our promises release their work through guards.
template <class Context>
void check_params(Context& ctx) {
  ctx.allowCancellation();
  (void)ctx.getParams().totalSize();
}

std::string checked_id(capnp::Text::Reader text, const char* what) {
  std::string id{text.cStr(), text.size()};
  if (id.empty() || id.size() > 200)
    wire::fail(errc::invalid_argument, std::string(what) + " must be 1..200 bytes, got "
                                         + std::to_string(id.size()));
  for (unsigned char c : id)
    if (c < 0x21 || c > 0x7e)
      wire::fail(errc::invalid_argument,
                 std::string(what) + " may hold only printable ASCII without spaces");
  return id;
}

std::string checked_text(capnp::Text::Reader text, size_t max, const char* what) {
  if (text.size() > max)
    wire::fail(errc::invalid_argument, std::string(what) + " is longer than "
                                         + std::to_string(max) + " bytes");
  std::string s{text.cStr(), text.size()};
  if (s.find('\0') != std::string::npos)
    wire::fail(errc::invalid_argument, std::string(what) + " contains a NUL byte");
  return s;
}

/// The directory id of a tenant's session: "<escaped tenant>/<id>". The tenant part is
/// percent-escaped (so it never holds a '/'), hence the first '/' always ends it and no id a
/// client sends can name another tenant's session.
std::string scoped_id(const std::string& tenant, const std::string& id) {
  static const char digits[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : tenant) {
    if (isalnum(c) || c == '.' || c == '_' || c == '-') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += digits[c >> 4];
      out += digits[c & 15];
    }
  }
  out += '/';
  out += id;
  return out;
}

capnp::Data::Reader as_data(const std::string& s) {
  return {reinterpret_cast<const kj::byte*>(s.data()), s.size()};
}

std::string from_data(capnp::Data::Reader d) {
  return {reinterpret_cast<const char*>(d.begin()), d.size()};
}

// ------------------------------------------------------------------------------------------
// Exec output: pushed by the session to a relay actor, queued here, drained by the RPC thread.

struct exec_channel {
  exec_channel(uint64_t cap, uint64_t mark) : max_bytes(cap), watermark(mark) {}

  /// Queues a chunk; true when the producer may go on at once (below the watermark), else the
  /// RPC thread sends the relay drained_atom once it has taken the queue.
  bool push(uint8_t stream, std::string bytes) {
    std::lock_guard<std::mutex> lock{mu};
    ++received;
    if (overflow) return true;
    queued_bytes += bytes.size();
    if (queued_bytes > max_bytes) {
      overflow = true;
      chunks.clear();
      if (interrupt) interrupt->fulfill();
    } else {
      chunks.emplace_back(stream, std::move(bytes));
    }
    wake_locked();
    if (queued_bytes < watermark) return true;
    producer_waiting = true;
    return false;
  }
  void finish(sc::exec_result r) {
    std::lock_guard<std::mutex> lock{mu};
    result = r;
    wake_locked();
  }
  void fail(caf::error e) {
    std::lock_guard<std::mutex> lock{mu};
    error = std::move(e);
    wake_locked();
    if (interrupt) interrupt->fulfill();
  }
  void wake_locked() {
    if (waiter) {
      waiter->fulfill();
      waiter = nullptr;
    }
  }

  std::mutex mu;
  const uint64_t max_bytes;
  const uint64_t watermark;
  bool producer_waiting = false;
  caf::actor relay;  ///< set once, before the first pump
  std::deque<std::pair<uint8_t, std::string>> chunks;
  uint64_t queued_bytes = 0;
  uint64_t received = 0;
  bool overflow = false;
  std::optional<sc::exec_result> result;
  std::optional<caf::error> error;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter;
  /// Fulfilled on overflow or failure: stops a send to the client that is stuck on flow
  /// control (a client that does not read would otherwise hold the call forever).
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> interrupt;
};

using channel_ptr = std::shared_ptr<exec_channel>;

using drained_atom = caf::atom_constant<caf::atom("rpc_drain")>;
using held_credits = std::vector<caf::response_promise>;

/// Issues the exec request and receives its output chunks (so the session can push them).
/// Answers each chunk (credit) at once while less than `watermark` bytes wait for the client,
/// else when the RPC thread reports that it drained the queue (drained_atom).
caf::behavior exec_relay(caf::event_based_actor* self, channel_ptr ch, caf::actor directory,
                         std::string full_id, sc::exec_request req, uint64_t call_id,
                         milliseconds timeout) {
  auto me = caf::actor_cast<caf::actor>(self);
  self->request(directory, caf::duration{timeout}, runtime::call_atom::value,
                std::string("session"), std::move(full_id),
                caf::make_message(sc::exec_atom::value, std::move(req), me, call_id))
    .then([ch](sc::exec_result& r) { ch->finish(r); },
          [ch](caf::error& e) { ch->fail(std::move(e)); });
  auto held = std::make_shared<held_credits>();
  return {
    [self, ch, call_id, held](sc::chunk_atom, uint64_t id, uint8_t stream,
                              std::string& bytes) -> caf::result<bool> {
      if (id != call_id) return false;
      if (ch->push(stream, std::move(bytes))) return true;
      held->push_back(self->make_response_promise());
      return caf::delegated<bool>{};
    },
    [held](drained_atom) {
      for (auto& rp : *held) rp.deliver(true);
      held->clear();
    },
  };
}

/// Kills the exec (session cancel message) unless it completed, and stops the relay actor.
struct exec_guard {
  exec_guard(server_core& c, std::string id, uint64_t call, caf::actor r)
    : core(c), full_id(std::move(id)), call_id(call), relay(std::move(r)) {}
  ~exec_guard() {
    if (!completed)
      caf::anon_send(core.directory, runtime::call_atom::value, std::string("session"), full_id,
                     caf::make_message(sc::cancel_atom::value, call_id));
    caf::anon_send_exit(relay, caf::exit_reason::user_shutdown);
  }
  server_core& core;
  std::string full_id;
  uint64_t call_id;
  caf::actor relay;
  bool completed = false;
};

// ------------------------------------------------------------------------------------------
// Session

class session_impl final : public api::Session::Server {
public:
  session_impl(server_core& core, std::shared_ptr<tenant_state> tenant,
               std::shared_ptr<connection_state> conn, std::string id, std::string full_id)
    : core_(core), tenant_(std::move(tenant)), conn_(std::move(conn)), id_(std::move(id)),
      full_id_(std::move(full_id)) {
    ++tenant_->open_sessions;
  }
  ~session_impl() noexcept(false) { --tenant_->open_sessions; }

  kj::Promise<void> exec(ExecContext ctx) override {
    auto p = ctx.getParams();
    auto req_reader = p.getRequest();
    auto timeout = milliseconds(req_reader.getTimeoutMs());
    if (timeout.count() == 0) timeout = core_.opts.limits.exec_default_timeout;
    timeout = std::min(timeout, core_.opts.limits.exec_max_timeout);
    // The session enforces `timeout`; the RPC deadline leaves it room to report.
    auto deadline = timeout + milliseconds(5000);
    return run("Session.exec", deadline, [this, ctx, timeout, deadline]() mutable {
      check_params(ctx);
      auto params = ctx.getParams();
      auto r = params.getRequest();
      sc::exec_request req;
      if (r.getArgv().size() > 4096) wire::fail(errc::invalid_argument, "argv has > 4096 entries");
      for (auto a : r.getArgv()) req.argv.push_back(checked_text(a, 1 << 20, "argv entry"));
      req.shell = checked_text(r.getShell(), 1 << 20, "shell");
      if (req.argv.empty() && req.shell.empty())
        wire::fail(errc::invalid_argument, "exec needs argv or shell");
      req.stdin_data = from_data(r.getStdin());
      if (r.getEnv().size() > 4096) wire::fail(errc::invalid_argument, "env has > 4096 entries");
      for (auto e : r.getEnv()) {
        auto name = checked_text(e.getName(), 4096, "env name");
        if (name.empty() || name.find('=') != std::string::npos)
          wire::fail(errc::invalid_argument, "env name '" + name + "' is empty or holds '='");
        req.env.emplace_back(std::move(name), checked_text(e.getValue(), 1 << 20, "env value"));
      }
      req.cwd = checked_text(r.getCwd(), 4096, "cwd");
      req.timeout_ms = static_cast<uint32_t>(timeout.count());
      bool has_sink = params.hasSink();
      auto sink = params.getSink();
      auto call_id = core_.next_call_id++;
      auto ch = std::make_shared<exec_channel>(core_.opts.limits.max_exec_output_buffer,
                                               core_.opts.limits.exec_output_watermark);
      auto relay = core_.bridge.system().spawn(exec_relay, ch, core_.directory, full_id_,
                                               std::move(req), call_id, deadline);
      auto guard = kj::heap<exec_guard>(core_, full_id_, call_id, relay);
      auto state = kj::heap<exec_output>();
      {
        auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
        std::lock_guard<std::mutex> lock{ch->mu};
        ch->interrupt = kj::mv(paf.fulfiller);
        ch->relay = relay;
        if (ch->overflow || ch->error) ch->interrupt->fulfill();
        state->interrupted = paf.promise.fork();
      }
      state->has_sink = has_sink;
      if (has_sink) state->sink = sink;
      auto* st = state.get();
      auto* g = guard.get();
      return pump(ch, *st).then([ctx, st, g]() mutable {
        g->completed = true;
        auto res = ctx.getResults().initResult();
        const auto& r = *st->result;
        res.setExitCode(r.exit_code);
        res.setSignal(r.signal);
        res.setTruncated(r.truncated || st->truncated);
        res.setDurationUs(r.duration_us);
        res.setCpuUs(r.cpu_us);
        res.setPeakMemoryBytes(r.peak_memory_bytes);
        if (!st->has_sink) {
          res.setStdout(as_data(st->out));
          res.setStderr(as_data(st->err));
        }
      }).attach(kj::mv(guard), kj::mv(state));
    });
  }

  kj::Promise<void> readFile(ReadFileContext ctx) override {
    return run("Session.readFile", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      auto path = checked_text(p.getPath(), 4096, "path");
      return ask<std::string>(caf::make_message(sc::read_atom::value, path, p.getOffset(),
                                                p.getLength()))
        .then([ctx](std::string&& data) mutable { ctx.getResults().setData(as_data(data)); });
    });
  }

  kj::Promise<void> writeFile(WriteFileContext ctx) override {
    return run("Session.writeFile", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      auto path = checked_text(p.getPath(), 4096, "path");
      return ask<bool>(caf::make_message(sc::write_atom::value, path, from_data(p.getData()),
                                         p.getMakeParents(), p.getExecutable()))
        .ignoreResult();
    });
  }

  kj::Promise<void> listFiles(ListFilesContext ctx) override {
    return run("Session.listFiles", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      auto path = checked_text(p.getPath(), 4096, "path");
      return ask<std::vector<sc::file_entry>>(
               caf::make_message(sc::list_atom::value, path, p.getRecursive()))
        .then([ctx](std::vector<sc::file_entry>&& entries) mutable {
          auto out = ctx.getResults().initEntries(static_cast<unsigned>(entries.size()));
          for (size_t i = 0; i < entries.size(); ++i) {
            out[i].setPath(entries[i].path);
            out[i].setSize(entries[i].size);
            out[i].setMode(entries[i].mode);
          }
        });
    });
  }

  kj::Promise<void> removeFile(RemoveFileContext ctx) override {
    return run("Session.removeFile", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      auto path = checked_text(p.getPath(), 4096, "path");
      return ask<bool>(caf::make_message(sc::remove_atom::value, path, p.getRecursive()))
        .ignoreResult();
    });
  }

  kj::Promise<void> kvGet(KvGetContext ctx) override {
    return run("Session.kvGet", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto key = checked_text(ctx.getParams().getKey(), 4096, "key");
      return ask<caf::optional<std::string>>(caf::make_message(sc::kv_get_atom::value, key))
        .then([ctx](caf::optional<std::string>&& value) mutable {
          auto res = ctx.getResults();
          res.setFound(static_cast<bool>(value));
          if (value) res.setValue(as_data(*value));
        });
    });
  }

  kj::Promise<void> kvPut(KvPutContext ctx) override {
    return run("Session.kvPut", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      auto key = checked_text(p.getKey(), 4096, "key");
      if (key.empty()) wire::fail(errc::invalid_argument, "key is empty");
      return ask<bool>(caf::make_message(sc::kv_put_atom::value, key, from_data(p.getValue())))
        .ignoreResult();
    });
  }

  kj::Promise<void> kvDelete(KvDeleteContext ctx) override {
    return run("Session.kvDelete", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto key = checked_text(ctx.getParams().getKey(), 4096, "key");
      return ask<bool>(caf::make_message(sc::kv_delete_atom::value, key))
        .then([ctx](bool existed) mutable { ctx.getResults().setExisted(existed); });
    });
  }

  kj::Promise<void> kvList(KvListContext ctx) override {
    return run("Session.kvList", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto prefix = checked_text(ctx.getParams().getPrefix(), 4096, "prefix");
      return ask<std::vector<std::string>>(caf::make_message(sc::kv_list_atom::value, prefix))
        .then([ctx](std::vector<std::string>&& keys) mutable {
          auto out = ctx.getResults().initKeys(static_cast<unsigned>(keys.size()));
          for (size_t i = 0; i < keys.size(); ++i) out.set(static_cast<unsigned>(i), keys[i]);
        });
    });
  }

  kj::Promise<void> fork(ForkContext ctx) override {
    return run("Session.fork", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto new_id = checked_id(ctx.getParams().getNewId(), "newId");
      check_session_limit(*tenant_, core_);
      auto new_full = scoped_id(tenant_->name, new_id);
      return ask<bool>(caf::make_message(sc::fork_atom::value, new_full))
        .then([this, ctx, new_id, new_full](bool) mutable {
          check_session_limit(*tenant_, core_);
          ctx.getResults().setSession(kj::heap<session_impl>(core_, tenant_, conn_, new_id, new_full));
        });
    });
  }

  kj::Promise<void> destroy(DestroyContext ctx) override {
    return run("Session.destroy", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      return ask<bool>(caf::make_message(sc::destroy_atom::value)).ignoreResult();
    });
  }

  kj::Promise<void> info(InfoContext ctx) override {
    return run("Session.info", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      return ask<sc::session_info>(caf::make_message(sc::info_atom::value))
        .then([this, ctx](sc::session_info&& i) mutable {
          auto out = ctx.getResults().initInfo();
          out.setId(id_);  // never the scoped id: the tenant prefix is the server's business
          out.setCreatedUnixMs(i.created_unix_ms);
          out.setLastUsedUnixMs(i.last_used_unix_ms);
          out.setFileCount(i.file_count);
          out.setKvCount(i.kv_count);
          out.setExecCount(i.exec_count);
        });
    });
  }

  static void check_session_limit(const tenant_state& t, const server_core& core) {
    if (t.open_sessions >= core.opts.limits.max_open_sessions_per_tenant)
      wire::fail(errc::limit_exceeded,
                 "tenant '" + t.name + "' holds " + std::to_string(t.open_sessions)
                   + " open sessions (limit "
                   + std::to_string(core.opts.limits.max_open_sessions_per_tenant)
                   + "); release some first");
  }

private:
  struct exec_output {
    bool has_sink = false;
    api::OutputSink::Client sink{nullptr};
    std::string out, err;
    bool truncated = false;
    std::optional<sc::exec_result> result;
    uint64_t delivered = 0;
    kj::ForkedPromise<void> interrupted = nullptr;
  };

  milliseconds deadline() const { return core_.opts.limits.call_deadline; }

  template <class Body>
  kj::Promise<void> run(const char* method, milliseconds deadline, Body&& body) {
    return core_.run(method, tenant_, deadline, kj::fwd<Body>(body), false, conn_);
  }

  template <class Reply>
  kj::Promise<Reply> ask(caf::message inner) {
    return core_.ask_session<Reply>(full_id_, std::move(inner), deadline());
  }

  /// Moves queued output to the client's sink (or the result buffers) until the session's
  /// reply has come and every chunk it counted has been delivered.
  kj::Promise<void> pump(channel_ptr ch, exec_output& st) {
    std::deque<std::pair<uint8_t, std::string>> batch;
    {
      std::lock_guard<std::mutex> lock{ch->mu};
      if (ch->error) return wire::from_caf(*ch->error);
      if (ch->overflow)
        return wire::make_exception(
          errc::limit_exceeded,
          "the client did not read exec output fast enough (more than "
            + std::to_string(ch->max_bytes) + " bytes queued); the command was killed");
      batch.swap(ch->chunks);
      ch->queued_bytes = 0;
      if (ch->producer_waiting) {
        ch->producer_waiting = false;
        caf::anon_send(ch->relay, drained_atom::value);
      }
      if (batch.empty()) {
        if (ch->result && st.delivered >= ch->result->chunks) {
          st.result = ch->result;
          if (!st.has_sink) return kj::READY_NOW;
          // Completes after every write was handled by the client's sink.
          return sink_failures(st.sink.doneRequest().send().ignoreResult()).exclusiveJoin(
            st.interrupted.addBranch().then([this, ch, &st]() { return pump(ch, st); }));
        }
        auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
        ch->waiter = kj::mv(paf.fulfiller);
        return paf.promise.then([this, ch, &st]() { return pump(ch, st); });
      }
    }
    st.delivered += batch.size();
    if (!st.has_sink) {
      for (auto& [stream, bytes] : batch) {
        auto& buf = stream == 0 ? st.out : st.err;
        auto room = core_.opts.limits.max_unstreamed_output - std::min<uint64_t>(
                      core_.opts.limits.max_unstreamed_output, st.out.size() + st.err.size());
        if (bytes.size() > room) st.truncated = true;
        buf.append(bytes, 0, std::min<size_t>(bytes.size(), room));
      }
      return pump(ch, st);
    }
    return sink_failures(send_batch(std::move(batch), st))
      .exclusiveJoin(st.interrupted.addBranch())
      .then([this, ch, &st]() { return pump(ch, st); });
  }

  /// A failure of the client's own sink is the client's problem, not a malformed call: it
  /// becomes a triplane error (so the connection is not closed for it).
  static kj::Promise<void> sink_failures(kj::Promise<void> p) {
    return p.catch_([](kj::Exception&& e) -> kj::Promise<void> {
      if (std::string_view(e.getDescription().cStr()).find("triplane:") != std::string_view::npos)
        return kj::mv(e);
      return wire::make_exception(errc::cancelled,
                                  std::string("the client's output sink failed: ")
                                    + e.getDescription().cStr());
    });
  }

  kj::Promise<void> send_batch(std::deque<std::pair<uint8_t, std::string>> batch,
                               exec_output& st) {
    if (batch.empty()) return kj::READY_NOW;
    auto req = st.sink.writeRequest();
    req.setStream(batch.front().first == 0 ? api::OutputStream::STDOUT
                                           : api::OutputStream::STDERR);
    req.setChunk(as_data(batch.front().second));
    batch.pop_front();
    // A streaming send resolves when the flow-control window has room, not on delivery.
    return req.send().then([this, b = std::move(batch), &st]() mutable {
      return send_batch(std::move(b), st);
    });
  }

  server_core& core_;
  std::shared_ptr<tenant_state> tenant_;
  std::shared_ptr<connection_state> conn_;
  std::string id_;       ///< as the tenant named it
  std::string full_id_;  ///< tenant-scoped directory id
};

// ------------------------------------------------------------------------------------------
// Inference: the inference plane had no actor protocol when this was written.

class inference_impl final : public api::Inference::Server {
public:
  inference_impl(server_core& core, std::shared_ptr<tenant_state> tenant)
    : core_(core), tenant_(std::move(tenant)) {}

  kj::Promise<void> generate(GenerateContext) override {
    return core_.run("Inference.generate", tenant_, core_.opts.limits.call_deadline, []() {
      return kj::Promise<void>(wire::make_exception(
        errc::unavailable, "inference is not available on this node yet"));
    });
  }
  kj::Promise<void> listModels(ListModelsContext) override {
    return core_.run("Inference.listModels", tenant_, core_.opts.limits.call_deadline, []() {
      return kj::Promise<void>(wire::make_exception(
        errc::unavailable, "inference is not available on this node yet"));
    });
  }

private:
  server_core& core_;
  std::shared_ptr<tenant_state> tenant_;
};

// ------------------------------------------------------------------------------------------
// Admin

class admin_impl final : public api::Admin::Server {
public:
  admin_impl(server_core& core, std::shared_ptr<tenant_state> tenant)
    : core_(core), tenant_(std::move(tenant)) {}

  kj::Promise<void> nodeStats(NodeStatsContext ctx) override {
    return core_.run("Admin.nodeStats", tenant_, deadline(), [this, ctx]() mutable {
      return core_.bridge
        .ask<runtime::directory_stats>(core_.directory,
                                       caf::make_message(runtime::stats_atom::value), deadline())
        .then([this, ctx](runtime::directory_stats&& s) mutable {
          auto out = ctx.getResults().initStats();
          out.setLiveActors(s.live);
          out.setPassivatedTotal(s.passivations);
          out.setActivationsTotal(s.activations);
          out.setFailuresTotal(s.failures);
          out.setOpenConnections(core_.metrics.open_connections);
          out.setDraining(core_.draining);
        });
    }, true);
  }

  kj::Promise<void> supervisionTree(SupervisionTreeContext ctx) override {
    return core_.run("Admin.supervisionTree", tenant_, deadline(), [this, ctx]() mutable {
      if (!core_.opts.describe_supervision)
        wire::fail(errc::unavailable, "this node does not publish its supervision tree");
      ctx.getResults().setText(core_.opts.describe_supervision());
      return kj::Promise<void>(kj::READY_NOW);
    }, true);
  }

  kj::Promise<void> drain(DrainContext ctx) override {
    auto ms = milliseconds(ctx.getParams().getDeadlineMs());
    return core_.run("Admin.drain", tenant_, ms + deadline(), [this, ctx, ms]() mutable {
      spdlog::info("rpc: drain requested by tenant '{}' ({} ms)", tenant_->name, ms.count());
      return core_.drain(ms).then([ctx](size_t cancelled) mutable {
        ctx.getResults().setCancelled(static_cast<uint32_t>(cancelled));
      });
    }, true);
  }

  kj::Promise<void> rpcMetrics(RpcMetricsContext ctx) override {
    return core_.run("Admin.rpcMetrics", tenant_, deadline(), [this, ctx]() mutable {
      auto out = ctx.getResults().initMetrics();
      auto methods = core_.metrics.summarize();
      auto list = out.initMethods(static_cast<unsigned>(methods.size()));
      for (size_t i = 0; i < methods.size(); ++i) {
        auto m = list[static_cast<unsigned>(i)];
        m.setMethod(methods[i].method);
        m.setCalls(methods[i].calls);
        m.setErrors(methods[i].errors);
        m.setP50Us(methods[i].p50_us);
        m.setP90Us(methods[i].p90_us);
        m.setP99Us(methods[i].p99_us);
        m.setMaxUs(methods[i].max_us);
      }
      auto errors = core_.metrics.errors();
      auto elist = out.initErrors(static_cast<unsigned>(errors.size()));
      for (size_t i = 0; i < errors.size(); ++i) {
        elist[static_cast<unsigned>(i)].setCode(errors[i].first);
        elist[static_cast<unsigned>(i)].setCount(errors[i].second);
      }
      out.setOpenConnections(core_.metrics.open_connections);
      out.setConnectionsTotal(core_.metrics.connections_total);
      out.setAuthFailures(core_.metrics.auth_failures);
      return kj::Promise<void>(kj::READY_NOW);
    }, true);
  }

private:
  milliseconds deadline() const { return core_.opts.limits.call_deadline; }
  server_core& core_;
  std::shared_ptr<tenant_state> tenant_;
};

// ------------------------------------------------------------------------------------------
// Tenant

class tenant_impl final : public api::Tenant::Server {
public:
  tenant_impl(server_core& core, std::shared_ptr<tenant_state> tenant, role who,
              std::shared_ptr<connection_state> conn)
    : core_(core), tenant_(std::move(tenant)), who_(who), conn_(std::move(conn)) {}

  kj::Promise<void> session(SessionContext ctx) override {
    return core_.run("Tenant.session", tenant_, core_.opts.limits.call_deadline,
                     [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      auto id = checked_id(p.getId(), "session id");
      session_impl::check_session_limit(*tenant_, core_);
      auto full = scoped_id(tenant_->name, id);
      return core_
        .ask_session<sc::session_info>(full, caf::make_message(sc::open_atom::value,
                                                                p.getCreate()),
                                       core_.opts.limits.call_deadline)
        .then([this, ctx, id, full](sc::session_info&&) mutable {
          session_impl::check_session_limit(*tenant_, core_);
          ctx.getResults().setSession(kj::heap<session_impl>(core_, tenant_, conn_, id, full));
        });
    }, false, conn_);
  }

  kj::Promise<void> inference(InferenceContext ctx) override {
    ctx.getResults().setInference(kj::heap<inference_impl>(core_, tenant_));
    return kj::READY_NOW;
  }

  kj::Promise<void> admin(AdminContext ctx) override {
    if (who_ != role::admin) {
      core_.metrics.record("Tenant.admin", 0, errc::permission_denied);
      wire::fail(errc::permission_denied, "the token of tenant '" + tenant_->name
                                            + "' does not have the admin role");
    }
    ctx.getResults().setAdmin(kj::heap<admin_impl>(core_, tenant_));
    return kj::READY_NOW;
  }

private:
  server_core& core_;
  std::shared_ptr<tenant_state> tenant_;
  role who_;
  std::shared_ptr<connection_state> conn_;
};

// ------------------------------------------------------------------------------------------
// Bootstrap

class bootstrap_impl final : public api::Bootstrap::Server {
public:
  bootstrap_impl(server_core& core, std::shared_ptr<connection_state> conn)
    : core_(core), conn_(std::move(conn)) {}

  kj::Promise<void> authenticate(AuthenticateContext ctx) override {
    capnp::Text::Reader token;
    try {
      check_params(ctx);
      token = ctx.getParams().getToken();
    } catch (kj::Exception& e) {
      core_.metrics.record("Bootstrap.authenticate", 0, errc::invalid_argument);
      close_on_malformed(conn_, e);
      throw;
    }
    const token_record* rec = nullptr;
    if (token.size() <= 1024) rec = match_token(core_.opts.tokens, {token.cStr(), token.size()});
    if (rec) {
      conn_->authenticated = true;
      auto res = ctx.getResults();
      res.setTenant(kj::heap<tenant_impl>(core_, core_.tenant_for(*rec), rec->who, conn_));
      res.setName(rec->tenant);
      res.setRole(rec->who == role::admin ? api::Role::ADMIN : api::Role::TENANT);
      core_.metrics.record("Bootstrap.authenticate", 0, errc::ok);
      return kj::READY_NOW;
    }
    auto failures = ++conn_->auth_failures;
    ++core_.metrics.auth_failures;
    core_.metrics.record("Bootstrap.authenticate", 0, errc::permission_denied);
    spdlog::warn("rpc: failed authenticate from {} (failure {} on this connection)", conn_->peer,
                 failures);
    // Slow down guessing: each failure on a connection doubles the wait (capped), and the
    // connection is closed after too many.
    auto base = core_.opts.limits.auth_failure_delay.count();
    auto delay = std::min<int64_t>(base << std::min<uint32_t>(failures - 1, 8), 5000);
    auto conn = conn_;
    auto max = core_.opts.limits.auth_failures_before_close;
    return core_.timer.afterDelay(delay * kj::MILLISECONDS).then([conn, failures, max]() {
      if (failures >= max && conn->close) {
        spdlog::warn("rpc: closing connection from {} after {} failed authentications",
                     conn->peer, failures);
        conn->close->fulfill();
      }
      wire::fail(errc::permission_denied, "invalid token");
    });
  }

  kj::Promise<void> protocolVersion(ProtocolVersionContext ctx) override {
    ctx.getResults().setVersion(1);
    return kj::READY_NOW;
  }

private:
  server_core& core_;
  std::shared_ptr<connection_state> conn_;
};

} // namespace

capnp::Capability::Client server_core::make_bootstrap(std::shared_ptr<connection_state> conn) {
  return kj::heap<bootstrap_impl>(*this, std::move(conn));
}

} // namespace triplane::rpc::detail
