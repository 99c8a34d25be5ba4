// The capabilities of schemas/api.capnp: Bootstrap, Tenant, Session, Inference, Admin. Each
// method validates its input, then forwards to CAF actors through server_core.
#include <algorithm>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>

#include <sys/stat.h>

#include <spdlog/spdlog.h>

#include "api.capnp.h"
#include "server_core.hpp"
#include "triplane/actors/inference_protocol.hpp"
#include "triplane/actors/session_protocol.hpp"
#include "triplane/runtime/supervisor.hpp"


namespace triplane::rpc::detail {
namespace actors = triplane::actors;
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
    bridge(sys, t), timer(t) {}

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
      auto why = wire::make_exception(errc::unavailable,
                                      "the node is shutting down; the call was cancelled");
      canceler_.cancel(why);
      bridge.fail_drainable(why);
    }
    return left;
  });
}

namespace {
std::string scoped_id(const std::string& tenant, const std::string& id);
} // namespace

std::shared_ptr<tenant_state> server_core::tenant_for(const token_record& rec) {
  auto& slot = tenants_[rec.tenant];
  if (!slot) {
    slot = std::make_shared<tenant_state>();
    slot->name = rec.tenant;
    slot->scope_prefix = scoped_id(rec.tenant, "");
  }
  // Shared by all tokens of the tenant: limits count the tenant, not the token. The role is
  // the token's and travels with the Tenant capability.
  return slot;
}

// ------------------------------------------------------------------------------------------
// Stored sessions per tenant (limits::max_stored_sessions_per_tenant)
//
// The count is not kept in storage: the store keys sessions by the scoped id and knows nothing
// of tenants. It is counted once per tenant and process, by a scan of the tenant's records
// through the session catalog (O(sessions of the tenant), at the tenant's first create, fork or
// destroy), and from then on kept by this server: +1 for each create or fork that stored a new
// session, -1 for each destroy. That is exact because
//  - all of it runs on the RPC thread (the kj event loop): check-and-reserve is one
//    synchronous step, so concurrent creates cannot overshoot: each holds a reserved slot
//    (stored_reserved) from its check until its outcome;
//  - this server is the only writer of the node's session records (one node per data
//    directory, one RPC server per node), and every RPC path that stores a new record is a
//    create (Tenant.session with create=true on an id without record) or a fork;
//  - the calls that open, create, fork onto or destroy one id take turns (id_turn): a create
//    learns from the session whether it stored the record (the store also refuses a fork onto
//    a stored id), and an open never hands out a capability after a destroy of the id that
//    started later (that capability would store the id again by writing to it, uncounted;
//    session_incarnation makes the capabilities opened before the destroy stale);
//  - a destroy waits for the count (count_stored()), so no destroy is in flight while the
//    tenant is counted and none is missed or counted twice.
// A node restart counts again from storage.

id_turn::id_turn(std::shared_ptr<tenant_state> t, std::string full_id)
  : tenant_(std::move(t)), full_id_(std::move(full_id)), ticket_(++tenant_->turn_tickets) {
  auto paf = kj::newPromiseAndFulfiller<void>();
  done_ = kj::mv(paf.fulfiller);
  auto& slot = tenant_->turns[full_id_];
  if (slot.ticket != 0) before_ = slot.done.addBranch();
  slot.ticket = ticket_;
  slot.done = paf.promise.fork();
}

id_turn::~id_turn() {
  done_->fulfill();
  auto found = tenant_->turns.find(full_id_);
  if (found != tenant_->turns.end() && found->second.ticket == ticket_)
    tenant_->turns.erase(found);
}

kj::Promise<void> server_core::count_stored(const std::shared_ptr<tenant_state>& tenant) {
  if (!opts.session_catalog || tenant->stored_sessions) return kj::READY_NOW;
  if (!tenant->stored_counting) {
    // tenant_state outlives the promise: server_core keeps every tenant, and destroys them
    // (with this promise) before the bridge.
    auto* t = tenant.get();
    tenant->stored_counting = true;
    tenant->stored_counted =
      bridge
        .ask<uint64_t>(opts.session_catalog,
                       caf::make_message(actors::count_sessions_atom::value, t->scope_prefix),
                       opts.limits.call_deadline)
        .then(
          [t](uint64_t n) {
            t->stored_counting = false;
            t->stored_sessions = n;
            spdlog::debug("rpc: tenant '{}' has {} stored sessions", t->name, n);
          },
          [t](kj::Exception&& e) {
            t->stored_counting = false;  // the next call counts again
            kj::throwFatalException(wire::make_exception(
              wire::code_of(e) == errc::timeout ? errc::unavailable : wire::code_of(e),
              "cannot count the stored sessions of tenant '" + t->name
                + "': " + e.getDescription().cStr()));
          })
        .fork();
  }
  return tenant->stored_counted.addBranch();
}

kj::Own<stored_session_slot> server_core::reserve_stored_session(
  const std::shared_ptr<tenant_state>& tenant) {
  auto limit = opts.limits.max_stored_sessions_per_tenant;
  if (tenant->stored_sessions && *tenant->stored_sessions + tenant->stored_reserved >= limit)
    wire::fail(errc::limit_exceeded,
               "tenant '" + tenant->name + "' has " + std::to_string(*tenant->stored_sessions)
                 + " stored sessions" + (tenant->stored_reserved > 0
                                           ? " and " + std::to_string(tenant->stored_reserved)
                                               + " being created"
                                           : std::string())
                 + " (limit " + std::to_string(limit)
                 + "); destroy sessions it no longer needs (Session.destroy, `triplane-cli "
                   "session rm ID`; listSessions lists them) to make room");
  return kj::heap<stored_session_slot>(tenant);
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

/// Most ids one Tenant.listSessions answer carries (200 bytes each at most: 200 KB).
constexpr uint32_t max_listed_page = 1000;

/// A prefix of session ids, or an id to list after: empty, or what checked_id() accepts.
std::string checked_id_prefix(capnp::Text::Reader text, const char* what) {
  if (text.size() == 0) return {};
  return checked_id(text, what);
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

/// The size of a small result struct holding `payload_bytes` of text or data, for
/// getResults(): Cap'n Proto 0.9.2 starts a reply without a hint with a 1024-word (8 KiB) zeroed
/// segment, a malloc and a memset per call that a few-word reply does not need.
capnp::MessageSize result_size(size_t payload_bytes) {
  return {8 + (payload_bytes + 7) / 8, 0};
}

/// Room for the Return message around an answer's payload (header, payload struct, pointers).
constexpr uint64_t answer_framing_bytes = 1024;

capnp::Data::Reader as_data(const std::string& s) {
  return {reinterpret_cast<const kj::byte*>(s.data()), s.size()};
}

std::string from_data(capnp::Data::Reader d) {
  return {reinterpret_cast<const char*>(d.begin()), d.size()};
}

/// A failure of a sink the client provided (OutputSink, TokenSink) is the client's problem, not
/// a malformed call: it becomes a triplane `cancelled` error naming `what`, so that run() does
/// not close the connection for it.
kj::Promise<void> sink_failures(kj::Promise<void> p, const char* what) {
  return p.catch_([what](kj::Exception&& e) -> kj::Promise<void> {
    if (std::string_view(e.getDescription().cStr()).find("triplane:") != std::string_view::npos)
      return kj::mv(e);
    return wire::make_exception(errc::cancelled, std::string("the client's ") + what
                                                   + " failed: " + e.getDescription().cStr());
  });
}

// ------------------------------------------------------------------------------------------
// Exec output. A streaming exec is flow-controlled end to end (actors::exec_stream_atom with a
// window, see session_protocol.hpp): the session sends its chunks to a relay actor, which queues
// them here; the RPC thread drains the queue into the client's sink (`OutputSink.write`,
// `-> stream` flow control) and, as each write completes on the kj side (the stream's window
// has room again), grants its size back to the session as credit through the relay. The
// session stops reading the command's pipes while it has no credit, so a slow client slows the
// command (it blocks in write()) instead of having it killed, and the queue never holds more
// than the window (max_exec_output_buffer). A client that never reads holds its command until
// the exec's timeout or the call's deadline, or until it disconnects (then the exec is
// cancelled): node memory stays bounded by the window either way. The overflow check below is
// only a safety net against a session that would ignore credit.
using exec_grant_atom = caf::atom_constant<caf::atom("rpc_grant")>;
using exec_drop_atom = caf::atom_constant<caf::atom("rpc_drop")>;

struct exec_channel {
  explicit exec_channel(uint64_t cap) : max_bytes(cap) {}

  void push(actors::output_stream stream, std::string bytes) {
    std::lock_guard<std::mutex> lock{mu};
    if (overflow) return;
    queued_bytes += bytes.size();
    if (queued_bytes > max_bytes) {
      overflow = true;
      chunks.clear();
      if (interrupt) interrupt->fulfill();
    } else {
      chunks.emplace_back(stream, std::move(bytes));
    }
    wake_locked();
  }
  void finish(actors::exec_result r) {
    std::lock_guard<std::mutex> lock{mu};
    result = std::move(r);
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
  std::deque<std::pair<actors::output_stream, std::string>> chunks;
  uint64_t queued_bytes = 0;
  bool overflow = false;
  std::optional<actors::exec_result> result;
  std::optional<caf::error> error;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter;
  /// Fulfilled on overflow or failure: stops a send to the client that is stuck on flow
  /// control (a client that does not read would otherwise hold the call forever).
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> interrupt;
};

using channel_ptr = std::shared_ptr<exec_channel>;

/// Issues the exec request (streaming, flow-controlled by `window`, when the client gave a sink)
/// and receives its chunks. Every chunk is enqueued in this actor's mailbox before the session
/// sends its reply, so the reply is handled after the last chunk. Takes from the RPC thread
/// `(exec_grant_atom, bytes)`: credit, passed on to the session (the chunks' sender); and
/// `(exec_drop_atom)`: the call is gone, cancel the exec unless the session answered it, stop.
caf::behavior exec_relay(caf::event_based_actor* self, channel_ptr ch, caf::actor directory,
                         std::string full_id, actors::exec_request req, bool streamed,
                         uint64_t window, milliseconds timeout) {
  auto me = caf::actor_cast<caf::actor>(self);
  auto msg = streamed
               ? caf::make_message(actors::exec_stream_atom::value, std::move(req), me, window)
               : caf::make_message(actors::exec_atom::value, std::move(req));
  struct relay_state {
    caf::actor session;     ///< the chunks' sender: where credit goes
    bool answered = false;  ///< the session replied (result or error): nothing to cancel
  };
  auto st = std::make_shared<relay_state>();
  self->request(directory, caf::duration{timeout}, runtime::call_atom::value,
                std::string("session"), full_id, std::move(msg))
    .then(
      [ch, st](actors::exec_result& r) {
        st->answered = true;
        ch->finish(std::move(r));
      },
      [ch, st](caf::error& e) {
        // A reply timeout is ours, not the session's: the exec may still be queued or running.
        st->answered = e != caf::sec::request_timeout;
        ch->fail(std::move(e));
      });
  return {
    [self, ch, st](actors::exec_chunk_atom, actors::exec_chunk& c) {
      if (!st->session) st->session = caf::actor_cast<caf::actor>(self->current_sender());
      ch->push(c.stream, std::move(c.data));
    },
    [self, st](exec_grant_atom, uint64_t bytes) {
      if (st->session) self->send(st->session, actors::exec_credit_atom::value, bytes);
    },
    [self, st, directory, full_id](exec_drop_atom) {
      // Keyed by this relay (the exec's requester) and sent along the request's own path, so
      // it cannot overtake the request: a queued exec is removed, a running one killed, and
      // another call's exec in the same session is never touched.
      if (!st->answered)
        self->send(directory, runtime::call_atom::value, std::string("session"), full_id,
                   caf::make_message(actors::exec_cancel_atom::value, self->address()));
      self->quit();
    },
  };
}

/// Ends the relay with the call (exec_drop_atom): the exec is cancelled unless the session
/// already answered it.
struct exec_guard {
  explicit exec_guard(caf::actor r) : relay(std::move(r)) {}
  ~exec_guard() { caf::anon_send(relay, exec_drop_atom::value); }
  caf::actor relay;
};

/// POSIX mode bits including the file type, as api.capnp's FileEntry.mode documents.
uint32_t posix_mode(const actors::file_entry& e) {
  switch (e.type) {
    case actors::file_type::regular: return S_IFREG | e.mode;
    case actors::file_type::directory: return S_IFDIR | e.mode;
    case actors::file_type::symlink: return S_IFLNK | e.mode;
    default: return e.mode;
  }
}

// ------------------------------------------------------------------------------------------
// Session: each method is one message of actors/session_protocol.hpp.

class session_impl final : public api::Session::Server {
public:
  session_impl(server_core& core, std::shared_ptr<tenant_state> tenant,
               std::shared_ptr<connection_state> conn, std::string id, std::string full_id)
    : core_(core), tenant_(std::move(tenant)), conn_(std::move(conn)), id_(std::move(id)),
      full_id_(std::move(full_id)), incarnation_(tenant_->incarnation_of(full_id_)) {
    ++tenant_->open_sessions;
  }
  ~session_impl() noexcept(false) {
    --tenant_->open_sessions;
    incarnation_.reset();
    tenant_->forget_if_unused(full_id_);
  }

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
      actors::exec_request req;
      if (r.getArgv().size() > 4096) wire::fail(errc::invalid_argument, "argv has > 4096 entries");
      for (auto a : r.getArgv()) req.argv.push_back(checked_text(a, 1 << 20, "argv entry"));
      auto shell = checked_text(r.getShell(), 1 << 20, "shell");
      // api.capnp: the shell line is used when argv is empty (the session wants exactly one).
      if (req.argv.empty()) req.shell = std::move(shell);
      if (req.argv.empty() && req.shell.empty())
        wire::fail(errc::invalid_argument, "exec needs argv or shell");
      req.stdin_data = from_data(r.getStdin());
      if (r.getEnv().size() > 4096) wire::fail(errc::invalid_argument, "env has > 4096 entries");
      for (auto e : r.getEnv()) {
        auto name = checked_text(e.getName(), 4096, "env name");
        if (name.empty() || name.find('=') != std::string::npos)
          wire::fail(errc::invalid_argument, "env name '" + name + "' is empty or holds '='");
        req.env[std::move(name)] = checked_text(e.getValue(), 1 << 20, "env value");
      }
      req.cwd = checked_text(r.getCwd(), 4096, "cwd");
      req.timeout_ms = static_cast<uint64_t>(timeout.count());
      auto cap = r.getOutputCapBytes();
      if (cap > core_.opts.limits.max_exec_output_cap)
        wire::fail(errc::invalid_argument,
                   "outputCapBytes " + std::to_string(cap) + " is above this node's maximum of "
                     + std::to_string(core_.opts.limits.max_exec_output_cap));
      req.limits.stdout_cap_bytes = req.limits.stderr_cap_bytes = cap;
      bool has_sink = params.hasSink();
      auto sink = params.getSink();
      const auto window = core_.opts.limits.max_exec_output_buffer;
      auto ch = std::make_shared<exec_channel>(window);
      auto relay = core_.bridge.system().spawn(exec_relay, ch, core_.directory, full_id_,
                                               std::move(req), has_sink, window, deadline);
      auto guard = kj::heap<exec_guard>(relay);
      auto state = kj::heap<exec_output>();
      {
        auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
        std::lock_guard<std::mutex> lock{ch->mu};
        ch->interrupt = kj::mv(paf.fulfiller);
        if (ch->overflow || ch->error) ch->interrupt->fulfill();
        state->interrupted = paf.promise.fork();
      }
      state->has_sink = has_sink;
      if (has_sink) state->sink = sink;
      state->relay = relay;
      auto* st = state.get();
      auto max_unstreamed = core_.opts.limits.max_unstreamed_output;
      return pump(ch, *st).then([ctx, st, max_unstreamed]() mutable {
        auto res = ctx.getResults().initResult();
        const auto& r = *st->result;
        res.setExitCode(r.exited ? r.exit_code : -1);
        res.setSignal(r.exited ? 0 : r.term_signal);
        bool truncated = r.stdout_truncated || r.stderr_truncated;
        if (!st->has_sink) {
          auto out_n = std::min<uint64_t>(r.stdout_data.size(), max_unstreamed);
          auto err_n = std::min<uint64_t>(r.stderr_data.size(), max_unstreamed - out_n);
          truncated = truncated || out_n < r.stdout_data.size() || err_n < r.stderr_data.size();
          res.setStdout(as_data(r.stdout_data.substr(0, out_n)));
          res.setStderr(as_data(r.stderr_data.substr(0, err_n)));
        }
        res.setTruncated(truncated);
        res.setDurationUs(r.duration_us);
        res.setCpuUs(r.cpu_user_us + r.cpu_system_us);
        res.setPeakMemoryBytes(r.peak_memory_bytes);
      }).attach(kj::mv(guard), kj::mv(state));
    });
  }

  kj::Promise<void> readFile(ReadFileContext ctx) override {
    return run_one_ask("Session.readFile", [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      actors::file_read_request req;
      req.path = checked_text(p.getPath(), 4096, "path");
      req.offset = p.getOffset();
      req.length = p.getLength();
      // One answer is one message: Cap'n Proto would refuse to send a larger one with an
      // internal error (the session allows reads up to its own limit, which may be as large).
      auto message_bytes = core_.opts.reader.traversal_limit_words * 8;
      auto max_bytes = message_bytes > answer_framing_bytes ? message_bytes - answer_framing_bytes
                                                            : 0;
      return ask<actors::file_data>(caf::make_message(actors::file_read_atom::value, req))
        .then([ctx, max_bytes, path = req.path](actors::file_data&& d) mutable {
          if (d.data.size() > max_bytes)
            wire::fail(errc::limit_exceeded,
                       "reading " + std::to_string(d.data.size()) + " bytes of '" + path
                         + "' at once is more than one answer carries ("
                         + std::to_string(max_bytes) + " bytes); read a range (offset, length)");
          ctx.getResults().setData(as_data(d.data));
        });
    });
  }

  kj::Promise<void> writeFile(WriteFileContext ctx) override {
    return run_one_ask("Session.writeFile", [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      actors::file_write_request req;
      req.path = checked_text(p.getPath(), 4096, "path");
      req.data = from_data(p.getData());
      req.mode = p.getExecutable() ? 0755 : 0644;
      req.create_parents = p.getMakeParents();
      return ask<actors::file_entry>(caf::make_message(actors::file_write_atom::value,
                                                       std::move(req)))
        .ignoreResult();
    });
  }

  kj::Promise<void> listFiles(ListFilesContext ctx) override {
    return run_one_ask("Session.listFiles", [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      actors::file_list_request req;
      req.path = checked_text(p.getPath(), 4096, "path");
      req.recursive = p.getRecursive();
      // Paths inside a workspace may be longer than PATH_MAX (a tree built one name at a time).
      auto after = checked_text(p.getAfter(), 1 << 20, "after");
      const uint32_t limit = p.getLimit();
      // As for readFile: one answer is one message, and Cap'n Proto would fail a larger one with
      // `internal`. A workspace can hold enough (long) names for that.
      auto message_bytes = core_.opts.reader.traversal_limit_words * 8;
      auto max_bytes = message_bytes > answer_framing_bytes ? message_bytes - answer_framing_bytes
                                                            : 0;
      return ask<std::vector<actors::file_entry>>(
               caf::make_message(actors::file_list_atom::value, req))
        .then([ctx, max_bytes, req, after = std::move(after),
               limit](std::vector<actors::file_entry>&& entries) mutable {
          // The session answers sorted by path: a page starts after `after`.
          auto first = after.empty()
                         ? entries.begin()
                         : std::upper_bound(entries.begin(), entries.end(), after,
                                            [](const std::string& a, const actors::file_entry& e) {
                                              return a < e.path;
                                            });
          // Encoded List(FileEntry): a tag word, 3 words per entry (size, mode, the path
          // pointer), each path's bytes and NUL in whole words; and one word more per entry, for
          // the far pointer a text gets when it lands in another segment than its entry.
          uint64_t bytes = 8;
          auto last = first;
          while (last != entries.end() && (limit == 0 || last - first < limit)) {
            auto entry_bytes = 32 + (last->path.size() + 1 + 7) / 8 * 8;
            if (bytes + entry_bytes > max_bytes) break;
            bytes += entry_bytes;
            ++last;
          }
          const bool more = last != entries.end();
          if (more && (limit == 0 || last == first))
            wire::fail(errc::limit_exceeded,
                       "the " + std::string(req.recursive ? "recursive " : "") + "listing of '"
                         + req.path + "' has " + std::to_string(entries.end() - first)
                         + " entries, more than one answer carries (" + std::to_string(max_bytes)
                         + " bytes); ask for it in pages (limit > 0, then after = the last path)");
          // One segment of the right size: no far pointers, no 8 KiB first segment to outgrow.
          auto results = ctx.getResults(capnp::MessageSize{bytes / 8 + 8, 0});
          auto out = results.initEntries(static_cast<unsigned>(last - first));
          unsigned i = 0;
          for (auto it = first; it != last; ++it, ++i) {
            out[i].setPath(it->path);
            out[i].setSize(it->size);
            out[i].setMode(posix_mode(*it));
          }
          results.setMore(more);
        });
    });
  }

  kj::Promise<void> removeFile(RemoveFileContext ctx) override {
    return run_one_ask("Session.removeFile", [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      actors::remove_request req;
      req.path = checked_text(p.getPath(), 4096, "path");
      req.recursive = p.getRecursive();
      return ask<uint64_t>(caf::make_message(actors::remove_atom::value, req)).ignoreResult();
    });
  }

  kj::Promise<void> kvGet(KvGetContext ctx) override {
    return run_one_ask("Session.kvGet", [this, ctx]() mutable {
      check_params(ctx);
      auto key = checked_text(ctx.getParams().getKey(), 4096, "key");
      return ask<actors::kv_value>(caf::make_message(actors::kv_get_atom::value, key))
        .then([ctx](actors::kv_value&& v) mutable {
          // A size hint: without one the reply message starts with an 8 KiB zeroed segment.
          auto res = ctx.getResults(result_size(v.value.size()));
          res.setFound(v.found);
          if (v.found) res.setValue(as_data(v.value));
        });
    });
  }

  kj::Promise<void> kvPut(KvPutContext ctx) override {
    return run_one_ask("Session.kvPut", [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      auto key = checked_text(p.getKey(), 4096, "key");
      if (key.empty()) wire::fail(errc::invalid_argument, "key is empty");
      return ask<bool>(caf::make_message(actors::kv_put_atom::value, key,
                                         from_data(p.getValue())))
        .ignoreResult();
    });
  }

  kj::Promise<void> kvDelete(KvDeleteContext ctx) override {
    return run_one_ask("Session.kvDelete", [this, ctx]() mutable {
      check_params(ctx);
      auto key = checked_text(ctx.getParams().getKey(), 4096, "key");
      return ask<bool>(caf::make_message(actors::kv_delete_atom::value, key))
        .then([ctx](bool existed) mutable { ctx.getResults().setExisted(existed); });
    });
  }

  kj::Promise<void> kvList(KvListContext ctx) override {
    return run_one_ask("Session.kvList", [this, ctx]() mutable {
      check_params(ctx);
      auto prefix = checked_text(ctx.getParams().getPrefix(), 4096, "prefix");
      return ask<std::vector<actors::kv_entry>>(
               caf::make_message(actors::kv_list_atom::value, prefix))
        .then([ctx](std::vector<actors::kv_entry>&& entries) mutable {
          auto out = ctx.getResults().initKeys(static_cast<unsigned>(entries.size()));
          for (size_t i = 0; i < entries.size(); ++i)
            out.set(static_cast<unsigned>(i), entries[i].key);
        });
    });
  }

  kj::Promise<void> fork(ForkContext ctx) override {
    return run("Session.fork", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      auto new_id = checked_id(ctx.getParams().getNewId(), "newId");
      check_session_limit(*tenant_, core_);
      // The new id is scoped like every id: a fork stays inside the tenant.
      auto new_full = scoped_id(tenant_->name, new_id);
      // A new stored session: it takes its turn on the new id and a slot of the tenant's
      // stored sessions (see "Stored sessions per tenant" above).
      auto turn = kj::heap<id_turn>(tenant_, new_full);
      auto ready = turn->ready();
      return ready.then([this]() { return core_.count_stored(tenant_); })
        .then([this, new_full]() {
          auto slot = core_.reserve_stored_session(tenant_);
          return ask<actors::session_info>(caf::make_message(actors::fork_atom::value, new_full))
            .then([slot = kj::mv(slot)](actors::session_info&&) mutable { slot->commit(); });
        })
        .then([this, ctx, new_id, new_full]() mutable {
          check_session_limit(*tenant_, core_);
          ctx.getResults().setSession(kj::heap<session_impl>(core_, tenant_, conn_, new_id, new_full));
        })
        .attach(kj::mv(turn));
    });
  }

  kj::Promise<void> destroy(DestroyContext ctx) override {
    return run("Session.destroy", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      // In its turn on the id, and once the tenant's stored sessions are counted (see "Stored
      // sessions per tenant" above); then one less.
      using phase = session_incarnation::phase;
      auto incarnation = incarnation_;
      auto tenant = tenant_;
      auto turn = kj::heap<id_turn>(tenant_, full_id_);
      auto ready = turn->ready();
      return ready
        .then([this, incarnation, tenant]() {
          // A destroy through another capability of this incarnation went first.
          if (incarnation->state != phase::live)
            wire::fail(errc::not_found, "session '" + id_ + "' was destroyed meanwhile");
          // Until the session answers, this id's other capabilities are refused (their calls
          // would reach the session on either side of its destroy); afterwards they are stale.
          incarnation->state = phase::destroying;
          return core_.count_stored(tenant_)
            .then([this]() { return ask<bool>(caf::make_message(actors::destroy_atom::value)); })
            .then([incarnation, tenant](bool) {
                    incarnation->state = phase::destroyed;
                    if (tenant->stored_sessions && *tenant->stored_sessions > 0)
                      --*tenant->stored_sessions;
                  },
                  [incarnation](kj::Exception&& e) {
                    incarnation->state = phase::live;
                    kj::throwFatalException(kj::mv(e));
                  });
        })
        .attach(kj::mv(turn));
    });
  }

  kj::Promise<void> info(InfoContext ctx) override {
    return run("Session.info", deadline(), [this, ctx]() mutable {
      check_params(ctx);
      // session_info has no kv count: it is counted from kv_list (bounded by the session's
      // max_kv_bytes).
      return ask<actors::session_info>(caf::make_message(actors::info_atom::value))
        .then([this](actors::session_info&& i) {
          return ask<std::vector<actors::kv_entry>>(
                   caf::make_message(actors::kv_list_atom::value, std::string()))
            .then([i = std::move(i)](std::vector<actors::kv_entry>&& kv) mutable {
              return std::make_pair(std::move(i), kv.size());
            });
        })
        .then([this, ctx](std::pair<actors::session_info, size_t>&& both) mutable {
          const auto& i = both.first;
          auto out = ctx.getResults().initInfo();
          out.setId(id_);  // never the scoped id: the tenant prefix is the server's business
          out.setCreatedUnixMs(i.created_unix_ms);
          out.setLastUsedUnixMs(i.last_used_unix_ms);
          out.setFileCount(i.file_count);
          out.setKvCount(both.second);
          out.setExecCount(i.history.size());
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
    caf::actor relay;  ///< takes the credit granted as writes complete
    std::optional<actors::exec_result> result;
    kj::ForkedPromise<void> interrupted = nullptr;
  };

  milliseconds deadline() const { return core_.opts.limits.call_deadline; }

  template <class Body>
  kj::Promise<void> run(const char* method, milliseconds deadline, Body&& body) {
    return core_.run(method, tenant_, deadline, if_not_destroyed(kj::fwd<Body>(body)), false,
                     conn_);
  }

  /// run() for a body that is one ask() (whose timeout is the call's deadline) and what it does
  /// with the answer: the hot path of the small calls, with one deadline timer instead of two.
  template <class Body>
  kj::Promise<void> run_one_ask(const char* method, Body&& body) {
    return core_.run(method, tenant_, deadline(), if_not_destroyed(kj::fwd<Body>(body)), false,
                     conn_, deadline_by::its_request);
  }

  /// `body`, run only while this capability's session has not been destroyed (through this
  /// capability or another): a stale capability must not start a new session under the id.
  template <class Body>
  auto if_not_destroyed(Body&& body) {
    return [this, body = kj::fwd<Body>(body)]() mutable {
      using phase = session_incarnation::phase;
      if (incarnation_->state == phase::destroyed)
        wire::fail(errc::not_found, "session '" + id_
                                      + "' was destroyed; open it again with create=true to "
                                        "start a new one");
      if (incarnation_->state == phase::destroying)
        wire::fail(errc::unavailable, "session '" + id_ + "' is being destroyed");
      return body();
    };
  }

  template <class Reply>
  kj::Promise<Reply> ask(caf::message inner) {
    return core_.ask_session<Reply>(*tenant_, full_id_, std::move(inner), deadline());
  }

  /// Moves queued output to the client's sink until the session's reply has come and the queue
  /// is empty (the reply is handled after the last chunk, see exec_relay).
  kj::Promise<void> pump(channel_ptr ch, exec_output& st) {
    std::deque<std::pair<actors::output_stream, std::string>> batch;
    {
      std::lock_guard<std::mutex> lock{ch->mu};
      if (ch->error) return unscoped(wire::from_caf(*ch->error), tenant_->scope_prefix);
      if (ch->overflow)
        return wire::make_exception(
          errc::limit_exceeded,
          "the session sent more exec output than its credit (more than "
            + std::to_string(ch->max_bytes) + " bytes queued); the command was killed");
      batch.swap(ch->chunks);
      ch->queued_bytes = 0;
      if (batch.empty()) {
        if (ch->result) {
          st.result = std::move(ch->result);
          if (!st.has_sink) return kj::READY_NOW;
          // Completes after every write was handled by the client's sink.
          return sink_failures(st.sink.doneRequest().send().ignoreResult(), "output sink")
            .exclusiveJoin(
              st.interrupted.addBranch().then([this, ch, &st]() { return pump(ch, st); }));
        }
        auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
        ch->waiter = kj::mv(paf.fulfiller);
        return paf.promise.then([this, ch, &st]() { return pump(ch, st); });
      }
    }
    if (!st.has_sink) return pump(ch, st);  // not streamed: the result carries the output
    return sink_failures(send_batch(std::move(batch), st), "output sink")
      .exclusiveJoin(st.interrupted.addBranch())
      .then([this, ch, &st]() { return pump(ch, st); });
  }

  kj::Promise<void> send_batch(std::deque<std::pair<actors::output_stream, std::string>> batch,
                               exec_output& st) {
    if (batch.empty()) return kj::READY_NOW;
    auto req = st.sink.writeRequest();
    req.setStream(batch.front().first == actors::output_stream::err ? api::OutputStream::STDERR
                                                                    : api::OutputStream::STDOUT);
    req.setChunk(as_data(batch.front().second));
    uint64_t bytes = batch.front().second.size();
    batch.pop_front();
    // A streaming send resolves when the flow-control window has room, not on delivery: then
    // the session may send that much more.
    return req.send().then([this, b = std::move(batch), &st, bytes]() mutable {
      caf::anon_send(st.relay, exec_grant_atom::value, bytes);
      return send_batch(std::move(b), st);
    });
  }

  server_core& core_;
  std::shared_ptr<tenant_state> tenant_;
  std::shared_ptr<connection_state> conn_;
  std::string id_;       ///< as the tenant named it
  std::string full_id_;  ///< tenant-scoped directory id
  std::shared_ptr<session_incarnation> incarnation_;  ///< shared with the id's other capabilities
};

// ------------------------------------------------------------------------------------------
// Inference: the messages of actors/inference_protocol.hpp, to the worker given in
// server_options (through its supervisor's routes when inference_route is set).

namespace inf = triplane::actors::inference;

/// `inner` addressed along `route` (server_options::inference_route).
caf::message routed(const std::vector<std::string>& route, caf::message inner) {
  for (auto it = route.rbegin(); it != route.rend(); ++it)
    inner = caf::make_message(runtime::sup::route_atom::value, *it, std::move(inner));
  return inner;
}
caf::message routed(const server_options& opts, caf::message inner) {
  return routed(opts.inference_route, std::move(inner));
}

const char* finish_reason_name(inf::finish_reason r) {
  switch (r) {
    case inf::finish_reason::length: return "length";
    case inf::finish_reason::stop: return "stop";
    case inf::finish_reason::cancelled: return "cancelled";
    case inf::finish_reason::error: return "error";
  }
  return "error";
}

/// Tokens of one generation on their way from the worker (relay actor) to the RPC thread. A
/// generation is bounded by max_new_tokens (<= the model's context), so the queue is too.
struct token_channel {
  void accept(uint64_t id) {
    std::lock_guard<std::mutex> lock{mu};
    request_id = id;
    accepted = true;
  }
  void push(int32_t token) {
    std::lock_guard<std::mutex> lock{mu};
    tokens.push_back(token);
    wake_locked();
  }
  void finish(inf::generation_finished f) {
    std::lock_guard<std::mutex> lock{mu};
    finished = std::move(f);
    wake_locked();
  }
  void fail(caf::error e) {
    std::lock_guard<std::mutex> lock{mu};
    error = std::move(e);
    wake_locked();
  }
  void wake_locked() {
    if (waiter) {
      waiter->fulfill();
      waiter = nullptr;
    }
  }

  std::mutex mu;
  bool accepted = false;
  uint64_t request_id = 0;
  std::vector<int32_t> tokens;
  std::optional<inf::generation_finished> finished;
  std::optional<caf::error> error;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter;
};

using token_channel_ptr = std::shared_ptr<token_channel>;

/// The generation's sink: sends the request (with itself as sink) and receives its stream.
caf::behavior generate_relay(caf::event_based_actor* self, token_channel_ptr ch,
                             caf::actor worker, std::vector<std::string> route,
                             inf::generate_request req, milliseconds timeout) {
  req.sink = caf::actor_cast<caf::actor>(self);
  self->request(worker, caf::duration{timeout}, routed(route, caf::make_message(std::move(req))))
    .then([ch](inf::generate_accepted& a) { ch->accept(a.request_id); },
          [ch](caf::error& e) { ch->fail(std::move(e)); });
  return {
    [ch](inf::token_event& e) { ch->push(e.token); },
    [ch](inf::generation_finished& f) { ch->finish(std::move(f)); },
  };
}

/// Cancels the generation unless it finished (explicitly, and by stopping the relay, which the
/// worker monitors as the sink: that also covers a request not yet accepted).
struct generate_guard {
  generate_guard(server_core& c, token_channel_ptr chan, caf::actor r)
    : core(c), ch(std::move(chan)), relay(std::move(r)) {}
  ~generate_guard() {
    if (!completed) {
      std::lock_guard<std::mutex> lock{ch->mu};
      if (ch->accepted && !ch->finished)
        caf::anon_send(core.opts.inference,
                       routed(core.opts, caf::make_message(inf::cancel_atom::value,
                                                           ch->request_id)));
    }
    caf::anon_send_exit(relay, caf::exit_reason::user_shutdown);
  }
  server_core& core;
  token_channel_ptr ch;
  caf::actor relay;
  bool completed = false;
};

class inference_impl final : public api::Inference::Server {
public:
  inference_impl(server_core& core, std::shared_ptr<tenant_state> tenant,
                 std::shared_ptr<connection_state> conn)
    : core_(core), tenant_(std::move(tenant)), conn_(std::move(conn)) {}

  kj::Promise<void> generate(GenerateContext ctx) override {
    auto deadline = core_.opts.limits.generate_deadline;
    return core_.run("Inference.generate", tenant_, deadline, [this, ctx, deadline]() mutable {
      check_params(ctx);
      check_available();
      auto params = ctx.getParams();
      auto r = params.getRequest();
      auto req = std::make_shared<inf::generate_request>();
      auto prompt = r.getPromptTokens();
      if (prompt.size() == 0) {
        if (r.getPrompt().size() > 0)
          wire::fail(errc::invalid_argument,
                     "this node has no tokenizer: give the prompt as promptTokens");
        wire::fail(errc::invalid_argument, "promptTokens is empty");
      }
      if (prompt.size() > (1u << 20))
        wire::fail(errc::invalid_argument, "promptTokens has more than 1048576 entries");
      for (auto t : prompt) req->prompt.push_back(checked_token(t, "promptTokens"));
      auto stops = r.getStopTokens();
      if (stops.size() > 1024)
        wire::fail(errc::invalid_argument, "stopTokens has more than 1024 entries");
      for (auto t : stops) req->stop_tokens.push_back(checked_token(t, "stopTokens"));
      req->max_new_tokens = r.getMaxTokens() == 0 ? 16 : r.getMaxTokens();
      // api.capnp: <= 0 is greedy (the sampler takes only >= 0); NaN stays and is refused.
      auto temperature = r.getTemperature();
      req->sampling.temperature = temperature < 0.0f ? 0.0f : temperature;
      req->sampling.top_k = r.getTopK();
      req->sampling.top_p = r.getTopP() == 0.0f ? 1.0f : r.getTopP();
      req->sampling.seed = r.getSeed();
      auto model = checked_text(r.getModel(), 4096, "model");
      bool has_sink = params.hasSink();
      auto sink = params.getSink();
      kj::Promise<void> checked = kj::READY_NOW;
      if (!model.empty())
        checked = ask_info().then([model](inf::model_info&& info) {
          if (info.name != model)
            wire::fail(errc::not_found, "this node serves model '" + info.name + "', not '"
                                          + model + "'");
        });
      return checked.then([this, ctx, req, has_sink, sink, deadline]() mutable {
        auto ch = std::make_shared<token_channel>();
        auto relay = core_.bridge.system().spawn(generate_relay, ch, core_.opts.inference,
                                                 core_.opts.inference_route, *req, deadline);
        auto guard = kj::heap<generate_guard>(core_, ch, relay);
        auto state = kj::heap<generate_output>();
        state->has_sink = has_sink;
        if (has_sink) state->sink = sink;
        auto* st = state.get();
        auto* g = guard.get();
        return pump(ch, *st).then([ctx, st, g]() mutable {
          g->completed = true;
          const auto& f = *st->finished;
          auto res = ctx.getResults().initResult();
          res.setPromptTokens(static_cast<uint32_t>(f.prompt_tokens));
          res.setGeneratedTokens(static_cast<uint32_t>(f.generated_tokens));
          res.setFinishReason(finish_reason_name(f.reason));
          res.setDurationUs(static_cast<uint64_t>(std::max<int64_t>(0, f.total_us)));
          res.setTimeToFirstTokenUs(f.time_to_first_token_us);
          if (!st->has_sink) {
            auto out = res.initTokens(static_cast<unsigned>(st->tokens.size()));
            for (size_t i = 0; i < st->tokens.size(); ++i)
              out.set(static_cast<unsigned>(i), static_cast<uint32_t>(st->tokens[i]));
          }
        }).attach(kj::mv(guard), kj::mv(state));
      });
    }, false, conn_);
  }

  kj::Promise<void> listModels(ListModelsContext ctx) override {
    return core_.run("Inference.listModels", tenant_, core_.opts.limits.call_deadline,
                     [this, ctx]() mutable {
      check_available();
      return ask_info().then([ctx](inf::model_info&& i) mutable {
        auto list = ctx.getResults().initModels(1);
        auto m = list[0];
        m.setName(i.name);
        // Embeddings and head (untied assumed), attention (q, o full; k, v by kv heads), MLP.
        auto h = static_cast<uint64_t>(std::max<int64_t>(0, i.hidden_size));
        auto kv = static_cast<uint64_t>(std::max<int64_t>(0, i.num_kv_heads * i.head_dim));
        auto per_layer = 2 * h * h + 2 * h * kv
                         + 3 * h * static_cast<uint64_t>(std::max<int64_t>(0, i.intermediate_size))
                         + 2 * h;
        m.setParameters(2 * static_cast<uint64_t>(std::max<int64_t>(0, i.vocab_size)) * h
                        + static_cast<uint64_t>(std::max<int64_t>(0, i.num_layers)) * per_layer
                        + h);
        m.setContextLength(static_cast<uint32_t>(std::max<int64_t>(0, i.max_position_embeddings)));
        m.setBackend(i.backend);
        m.setVocabSize(static_cast<uint32_t>(std::max<int64_t>(0, i.vocab_size)));
      });
    }, false, conn_);
  }

private:
  struct generate_output {
    bool has_sink = false;
    api::TokenSink::Client sink{nullptr};
    std::vector<int32_t> tokens;  ///< without a sink: everything, for the result
    std::optional<inf::generation_finished> finished;
  };

  void check_available() const {
    if (!core_.opts.inference)
      wire::fail(errc::unavailable, "inference is not available on this node (no model served)");
  }

  static int32_t checked_token(uint32_t t, const char* what) {
    if (t > static_cast<uint32_t>(std::numeric_limits<int32_t>::max()))
      wire::fail(errc::invalid_argument, std::string(what) + " holds token id "
                                           + std::to_string(t) + ", above 2^31-1");
    return static_cast<int32_t>(t);
  }

  kj::Promise<inf::model_info> ask_info() {
    return core_.bridge.ask<inf::model_info>(
      core_.opts.inference, routed(core_.opts, caf::make_message(inf::info_atom::value)),
      core_.opts.limits.call_deadline);
  }

  kj::Promise<void> pump(token_channel_ptr ch, generate_output& st) {
    std::vector<int32_t> batch;
    {
      std::lock_guard<std::mutex> lock{ch->mu};
      if (ch->error) return wire::from_caf(*ch->error);
      batch.swap(ch->tokens);
      if (batch.empty()) {
        if (ch->finished) {
          st.finished = ch->finished;
          const auto& f = *st.finished;
          if (f.reason == inf::finish_reason::error)
            return wire::make_exception(f.error_code == errc::ok ? errc::internal : f.error_code,
                                        "generation failed: " + f.error_message);
          if (!st.has_sink) return kj::READY_NOW;
          return sink_failures(st.sink.doneRequest().send().ignoreResult(), "token sink");
        }
        auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
        ch->waiter = kj::mv(paf.fulfiller);
        return paf.promise.then([this, ch, &st]() { return pump(ch, st); });
      }
    }
    if (!st.has_sink) {
      st.tokens.insert(st.tokens.end(), batch.begin(), batch.end());
      return pump(ch, st);
    }
    auto req = st.sink.tokensRequest();
    auto ids = req.initIds(static_cast<unsigned>(batch.size()));
    for (size_t i = 0; i < batch.size(); ++i)
      ids.set(static_cast<unsigned>(i), static_cast<uint32_t>(batch[i]));
    // A streaming send resolves when the flow-control window has room, not on delivery.
    return sink_failures(req.send(), "token sink").then([this, ch, &st]() {
      return pump(ch, st);
    });
  }

  server_core& core_;
  std::shared_ptr<tenant_state> tenant_;
  std::shared_ptr<connection_state> conn_;
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

  kj::Promise<void> inferenceStats(InferenceStatsContext ctx) override {
    return core_.run("Admin.inferenceStats", tenant_, deadline(), [this, ctx]() mutable {
      if (!core_.opts.inference)
        wire::fail(errc::unavailable, "inference is not available on this node (no model served)");
      return core_.bridge
        .ask<inf::worker_stats>(core_.opts.inference,
                                routed(core_.opts, caf::make_message(inf::stats_atom::value)),
                                deadline())
        .then([ctx](inf::worker_stats&& s) mutable {
          auto out = ctx.getResults().initStats();
          out.setRunning(s.running);
          out.setQueued(s.queued);
          out.setTokensGenerated(s.tokens_generated);
          out.setPromptTokensProcessed(s.prompt_tokens_processed);
          out.setSteps(s.steps);
          out.setRequestsAccepted(s.requests_accepted);
          out.setRequestsRejected(s.requests_rejected);
          out.setRequestsCompleted(s.requests_completed);
          out.setRequestsCancelled(s.requests_cancelled);
          out.setRequestsFailed(s.requests_failed);
          out.setPreemptions(s.preemptions);
          out.setKvBlocksFree(s.kv_blocks_free);
          out.setKvBlocksTotal(s.kv_blocks_total);
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
      bool create = p.getCreate();
      auto deadline = core_.opts.limits.call_deadline;
      // Takes its turn on the id, so that the `stored` flag it reads stays true until it holds
      // its capability (see "Stored sessions per tenant" above).
      auto turn = kj::heap<id_turn>(tenant_, full);
      auto ready = turn->ready();
      // Sessions exist implicitly in the session kind; "exists" is its info's `stored` flag.
      // create=true on a session that has no stored state stores it at once (a configure with
      // its current, default settings), so a later create=false finds it.
      return ready
        .then([this, full, deadline]() {
          return core_.ask_session<actors::session_info>(
            *tenant_, full, caf::make_message(actors::info_atom::value), deadline);
        })
        .then([this, id, full, create, deadline](actors::session_info&& info) -> kj::Promise<void> {
          if (info.stored) return kj::READY_NOW;
          if (!create)
            wire::fail(errc::not_found,
                       "session '" + id + "' does not exist (open it with create=true)");
          return core_.count_stored(tenant_).then(
            [this, full, deadline, settings = std::move(info.settings)]() mutable {
              // A new stored session: refused at the tenant's limit, else counted once stored.
              auto slot = core_.reserve_stored_session(tenant_);
              return core_
                .ask_session<actors::session_info>(
                  *tenant_, full, caf::make_message(actors::configure_atom::value, settings),
                  deadline)
                .then([slot = kj::mv(slot)](actors::session_info&&) mutable { slot->commit(); });
            });
        })
        .then([this, ctx, id, full]() mutable {
          session_impl::check_session_limit(*tenant_, core_);
          ctx.getResults().setSession(kj::heap<session_impl>(core_, tenant_, conn_, id, full));
        })
        .attach(kj::mv(turn));
    }, false, conn_);
  }

  kj::Promise<void> listSessions(ListSessionsContext ctx) override {
    return core_.run("Tenant.listSessions", tenant_, core_.opts.limits.call_deadline,
                     [this, ctx]() mutable {
      check_params(ctx);
      auto p = ctx.getParams();
      auto prefix = checked_id_prefix(p.getPrefix(), "prefix");
      auto after = checked_id_prefix(p.getAfter(), "after");
      uint32_t limit = p.getLimit() == 0 ? max_listed_page : std::min(p.getLimit(), max_listed_page);
      if (!core_.opts.session_catalog)
        wire::fail(errc::unavailable, "this node does not list sessions (no session catalog)");
      // Both in the tenant's scope: the catalog sees only keys that begin with its prefix, and
      // the tenant's part of a key never holds its '/' (scoped_id), so no prefix or `after` a
      // client sends reaches beyond its own sessions. One id more than asked says whether more
      // follow.
      const auto& scope = tenant_->scope_prefix;
      auto full_after = after.empty() ? std::string() : scope + after;
      return core_
        .bridge.ask<std::vector<std::string>>(
          core_.opts.session_catalog,
          caf::make_message(actors::list_sessions_atom::value, scope + prefix,
                            std::move(full_after), limit + 1),
          core_.opts.limits.call_deadline,
          [scope](kj::Exception&& e) { return unscoped(e, scope); })
        .then([ctx, scope, limit](std::vector<std::string>&& ids) mutable {
          bool more = ids.size() > limit;
          if (more) ids.resize(limit);
          // Each id: a list pointer, its bytes and a NUL, rounded up to words.
          size_t bytes = 0;
          for (const auto& id : ids) bytes += id.size() + 16;
          auto res = ctx.getResults(result_size(bytes));
          res.setMore(more);
          auto out = res.initIds(static_cast<unsigned>(ids.size()));
          for (size_t i = 0; i < ids.size(); ++i) {
            const auto& id = ids[i];
            if (id.compare(0, scope.size(), scope) != 0)
              wire::fail(errc::internal, "the session catalog answered an id outside the tenant");
            out.set(static_cast<unsigned>(i), kj::StringPtr(id.c_str() + scope.size()));
          }
        });
    }, false, conn_);
  }

  kj::Promise<void> inference(InferenceContext ctx) override {
    ctx.getResults().setInference(kj::heap<inference_impl>(core_, tenant_, conn_));
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
    try {
      check_params(ctx);
      (void)ctx.getParams().getToken();  // a token that is not text is a malformed call
    } catch (kj::Exception& e) {
      core_.metrics.record("Bootstrap.authenticate", 0, errc::invalid_argument);
      close_on_malformed(conn_, e);
      throw;
    }
    // Attempts pipelined on one connection are checked one after another, each no sooner than
    // the wait a failure of the attempts before it earns, and none beyond the connection's
    // budget: sending many guesses at once gains nothing over sending them in turn.
    auto max = core_.opts.limits.auth_failures_before_close;
    auto earlier = conn_->auth_failures + conn_->auth_unchecked;
    if (earlier >= max) {
      ++core_.metrics.auth_failures;
      core_.metrics.record("Bootstrap.authenticate", 0, errc::permission_denied);
      wire::fail(errc::permission_denied,
                 "too many authentication attempts on this connection (limit "
                   + std::to_string(max) + "); not checked");
    }
    auto now = core_.timer.now();
    auto turn = std::max(now, conn_->next_auth_check);
    conn_->next_auth_check = turn + failure_delay_ms(earlier + 1) * kj::MILLISECONDS;
    if (turn == now) return check_token(ctx);
    ++conn_->auth_unchecked;
    auto waiting = kj::heap<unchecked_attempt>(conn_);
    auto* w = waiting.get();
    return core_.timer.atTime(turn)
      .then([this, ctx, w]() mutable {
        w->checked();
        return check_token(ctx);
      })
      .attach(kj::mv(waiting));
  }

  kj::Promise<void> protocolVersion(ProtocolVersionContext ctx) override {
    ctx.getResults(result_size(0)).setVersion(1);
    return kj::READY_NOW;
  }

private:
  /// An authenticate call waiting for its turn: counted in connection_state::auth_unchecked
  /// until checked or dropped (the client cancelled it).
  struct unchecked_attempt {
    explicit unchecked_attempt(std::shared_ptr<connection_state> c) : conn(std::move(c)) {}
    ~unchecked_attempt() { checked(); }
    void checked() {
      if (counted) --conn->auth_unchecked;
      counted = false;
    }
    std::shared_ptr<connection_state> conn;
    bool counted = true;
  };

  /// The wait before answering the `failures`-th failure of a connection: doubled per failure,
  /// capped.
  int64_t failure_delay_ms(uint32_t failures) const {
    auto base = core_.opts.limits.auth_failure_delay.count();
    return std::min<int64_t>(base << std::min<uint32_t>(failures - 1, 8), 5000);
  }

  kj::Promise<void> check_token(AuthenticateContext ctx) {
    auto token = ctx.getParams().getToken();
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
    auto delay = failure_delay_ms(failures);
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

  server_core& core_;
  std::shared_ptr<connection_state> conn_;
};

} // namespace

capnp::Capability::Client server_core::make_bootstrap(std::shared_ptr<connection_state> conn) {
  return kj::heap<bootstrap_impl>(*this, std::move(conn));
}

} // namespace triplane::rpc::detail
