// The session virtual actor. Its handlers run on a CAF scheduler thread and forward: every
// operation runs on the session's worker, a detached actor (its own thread), because exec and
// disk work block; only reads of the kv memory are answered in place while the worker is idle.
// The worker starts with the first operation and stops after worker_idle_timeout without one:
// an idle live session holds no thread. The session stays pinned while an operation or
// background process runs, so the directory never passivates it mid-operation.
#include "triplane/actors/session_host.hpp"

#include <cerrno>
#include <cstring>
#include <filesystem>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "session/cgroup_limits.hpp"
#include "session/fd_guard.hpp"
#include "session/sandbox_process.hpp"
#include "session/session_core.hpp"
#include "session/session_store.hpp"

namespace triplane::actors {

using bg_done_atom = caf::atom_constant<caf::atom("ss_bgdone")>;
using worker_idle_atom = caf::atom_constant<caf::atom("ss_wkidle")>;

struct session_host::impl {
  /// An exclusive flock held while the host lives: one node per workspaces directory (it
  /// removes and recreates what is in there, e.g. its pre-started sandboxes' directories).
  session::fd_guard workspaces_lock;  ///< first member: released last
  std::unique_ptr<session::cgroup_host> cgroups;
  session::sandbox_config sandbox;
  std::unique_ptr<session::sandbox_pool> pool;  ///< nullptr when sandboxes cannot be pre-started
  std::unique_ptr<session::session_store> store;
  session::node_resources node;
  session_host_options options;
};

namespace {

using core_ptr = std::shared_ptr<session::session_core>;

template <class T>
caf::result<T> to_result(expected<T>&& x) {
  if (x) return std::move(*x);
  return std::move(x.error());
}

struct worker_state {
  core_ptr core;
  caf::actor_addr session;  ///< weak: background threads notify it when a process ends
  static inline const char* name = "session_worker";
};

caf::behavior session_worker(caf::stateful_actor<worker_state>* self, core_ptr core,
                             caf::actor_addr session) {
  self->state.core = std::move(core);
  self->state.session = std::move(session);
  // The sandbox kept ready for the next exec dies with this thread (it started it): reap it.
  self->attach_functor([core = self->state.core] { core->drop_warm_sandbox(); });
  auto& c = *self->state.core;
  return {
    [&c](exec_atom, const exec_request& req, uint64_t ticket) {
      return to_result(c.exec(req, nullptr, nullptr, ticket));
    },
    [self, &c](exec_stream_atom, const exec_request& req, const caf::actor& sink, uint64_t window,
               uint64_t ticket) -> caf::result<exec_result> {
      std::shared_ptr<session::output_credit> credit;
      if (window > 0) {
        auto made = session::output_credit::create(window);
        if (!made) return std::move(made.error());
        credit = std::move(*made);
      }
      // Chunks go out as sent by the session, so the sink knows where to send its credit.
      auto from = caf::actor_cast<caf::actor>(self->state.session);
      uint64_t seq = 0;
      auto r = c.exec(
        req,
        [&](output_stream which, std::string_view data) {
          exec_chunk chunk{seq++, which, std::string(data)};
          if (from) caf::send_as(from, sink, exec_chunk_atom::value, std::move(chunk));
          else self->send(sink, exec_chunk_atom::value, std::move(chunk));
        },
        std::move(credit), ticket);
      return to_result(std::move(r));
    },
    [self, &c](bg_start_atom, const exec_request& req) {
      auto addr = self->state.session;
      return to_result(c.bg_start(req, [addr](uint64_t id) {
        if (auto s = caf::actor_cast<caf::actor>(addr)) caf::anon_send(s, bg_done_atom::value, id);
      }));
    },
    [&c](bg_poll_atom, uint64_t id) { return to_result(c.bg_poll(id)); },
    [&c](bg_wait_atom, uint64_t id, uint64_t timeout_ms) { return to_result(c.bg_wait(id, timeout_ms)); },
    [&c](bg_signal_atom, uint64_t id, int32_t sig) { return to_result(c.bg_signal(id, sig)); },
    [&c](bg_list_atom) { return c.bg_list(); },
    [&c](file_write_atom, const file_write_request& r) { return to_result(c.write_file(r)); },
    [&c](file_read_atom, const file_read_request& r) { return to_result(c.read_file(r)); },
    [&c](file_list_atom, const file_list_request& r) { return to_result(c.list_files(r)); },
    [&c](file_stat_atom, const std::string& p) { return to_result(c.stat_file(p)); },
    [&c](mkdir_atom, const mkdir_request& r) { return to_result(c.make_directory(r)); },
    [&c](remove_atom, const remove_request& r) { return to_result(c.remove_file(r)); },
    [&c](move_atom, const move_request& r) { return to_result(c.move_file(r)); },
    [&c](tar_out_atom, const std::string& dir) { return to_result(c.tar_out(dir)); },
    [&c](tar_in_atom, const tar_in_request& r) { return to_result(c.tar_in(r)); },
    [&c](kv_get_atom, const std::string& k) { return c.kv_get(k); },
    [&c](kv_put_atom, const std::string& k, const std::string& v) -> caf::result<bool> {
      auto r = c.kv_put(k, v);
      if (!r) return std::move(r.error());
      if (auto err = c.persist()) return err;
      return *r;
    },
    [&c](kv_delete_atom, const std::string& k) -> caf::result<bool> {
      bool existed = c.kv_delete(k);
      if (auto err = c.persist()) return err;
      return existed;
    },
    [&c](kv_list_atom, const std::string& prefix) { return c.kv_list(prefix); },
    [&c](env_set_atom, const std::map<std::string, std::string>& set,
         const std::vector<std::string>& unset) -> caf::result<session_info> {
      auto r = c.set_env(set, unset);
      if (!r) return std::move(r.error());
      if (auto err = c.persist()) return err;
      return std::move(*r);
    },
    [&c](cwd_set_atom, const std::string& dir) -> caf::result<session_info> {
      auto r = c.set_cwd(dir);
      if (!r) return std::move(r.error());
      if (auto err = c.persist()) return err;
      return std::move(*r);
    },
    [&c](configure_atom, const session_settings& s) -> caf::result<session_info> {
      auto r = c.configure(s);
      if (!r) return std::move(r.error());
      if (auto err = c.persist()) return err;
      return std::move(*r);
    },
    [&c](fork_atom, const std::string& new_id) { return to_result(c.fork(new_id)); },
    [&c](destroy_atom) -> caf::result<bool> {
      if (auto err = c.destroy()) return err;
      return true;
    },
    [&c](info_atom) { return c.info(); },
  };
}

/// The execs a session has handed to its worker and not yet seen answered (queued or running),
/// by ticket. Lives on the session actor's thread only.
struct exec_registry {
  struct entry {
    caf::actor_addr requester;  ///< who sent the exec request
    caf::actor_addr sink;       ///< streaming execs: where chunks go (and credit comes from)
  };
  uint64_t next_ticket = 1;
  std::map<uint64_t, entry> pending;
};

/// The session's worker, started on demand and stopped when idle. Lives on the session actor's
/// thread only.
struct worker_slot {
  caf::actor worker;
  uint64_t in_flight = 0;   ///< operations handed to the worker and not answered yet
  uint64_t generation = 0;  ///< bumped whenever in_flight drops to 0: names the idle check
};

class session_actor final : public runtime::virtual_actor {
public:
  session_actor(session_host::impl& host, std::string id) : host_(host), id_(std::move(id)) {}

  ~session_actor() override { stop_worker(); }

  caf::error restore(runtime::activation_context&,
                     const std::optional<storage::stored_state>&) override {
    // The record lives in the sandbox column families (so manifest and chunk reference counts
    // change in one batch); the runtime's own record only marks that the session exists.
    auto core = session::session_core::activate(host_.node, id_);
    if (!core) return core.error();
    core_ = core_ptr(std::move(*core));
    return {};
  }

  caf::behavior make_behavior(runtime::activation_context& ctx) override {
    auto* self = ctx.self();
    auto* c = &ctx;
    auto slot = slot_;
    // The worker for one more operation: started if there is none (one thread per busy session).
    auto acquire = [self, slot, core = core_]() -> caf::actor {
      if (!slot->worker) slot->worker = self->spawn<caf::detached>(session_worker, core, self->address());
      ++slot->in_flight;
      return slot->worker;
    };
    // An operation was answered; the last one starts the idle clock.
    auto release = [self, slot, idle = host_.options.worker_idle_timeout] {
      if (--slot->in_flight == 0) self->delayed_send(self, idle, worker_idle_atom::value, ++slot->generation);
    };
    // Forwards one request to the worker, pinning the session until the reply.
    auto forward = [self, c, acquire, release](auto tag, auto&&... xs) {
      using reply = typename decltype(tag)::type;
      auto rp = self->make_response_promise<reply>();
      c->pin();
      self->request(acquire(), caf::infinite, std::forward<decltype(xs)>(xs)...)
        .then(
          [c, rp, release](reply& r) mutable {
            release();
            c->release_pin();
            rp.deliver(std::move(r));
          },
          [c, rp, release](caf::error& e) mutable {
            release();
            c->release_pin();
            rp.deliver(std::move(e));
          });
      return rp;
    };
    // Execs carry a ticket to the worker, so that one still queued there can be cancelled.
    auto execs = std::make_shared<exec_registry>();
    auto forward_exec = [self, c, acquire, release, execs](caf::actor_addr sink, auto&&... xs) {
      // Before make_response_promise: it takes the sender out of the current message.
      auto requester = caf::actor_cast<caf::actor_addr>(self->current_sender());
      auto rp = self->make_response_promise<exec_result>();
      auto ticket = execs->next_ticket++;
      execs->pending.emplace(ticket, exec_registry::entry{std::move(requester), std::move(sink)});
      c->pin();
      self->request(acquire(), caf::infinite, std::forward<decltype(xs)>(xs)..., ticket)
        .then(
          [c, rp, execs, ticket, release](exec_result& r) mutable {
            execs->pending.erase(ticket);
            release();
            c->release_pin();
            rp.deliver(std::move(r));
          },
          [c, rp, execs, ticket, release](caf::error& e) mutable {
            execs->pending.erase(ticket);
            release();
            c->release_pin();
            rp.deliver(std::move(e));
          });
      return rp;
    };
    return {
      [=](exec_atom a, const exec_request& r) { return forward_exec(caf::actor_addr{}, a, r); },
      [=](exec_stream_atom a, const exec_request& r, const caf::actor& sink) {
        return forward_exec(sink.address(), a, r, sink, uint64_t{0});
      },
      [=](exec_stream_atom a, const exec_request& r, const caf::actor& sink,
          uint64_t window) -> caf::result<exec_result> {
        if (window == 0)
          return make_error(errc::invalid_argument, "a flow-controlled exec needs a window > 0");
        return forward_exec(sink.address(), a, r, sink, window);
      },
      // Credit from a flow-controlled exec's sink (a plain send; anyone else's is ignored).
      [=, core = core_](exec_credit_atom, uint64_t bytes) {
        auto from = caf::actor_cast<caf::actor_addr>(self->current_sender());
        for (auto& [ticket, e] : execs->pending)
          if (e.sink && e.sink == from) core->grant_exec_credit(ticket, bytes);
      },
      [=, core = core_](exec_cancel_atom, const caf::actor_addr& owner) {
        bool any = false;
        for (auto& [ticket, e] : execs->pending)
          if (owner && (e.requester == owner || e.sink == owner))
            any = core->cancel_exec(ticket) || any;
        return any;
      },
      [=](bg_start_atom a, const exec_request& r) {
        auto rp = self->make_response_promise<bg_status>();
        c->pin();  // for the request
        c->pin();  // for the process: released by its bg_done, which is sent even when it
                   // ends before this reply arrives
        self->request(acquire(), caf::infinite, a, r)
          .then(
            [c, rp, release](bg_status& s) mutable {
              release();
              c->release_pin();
              rp.deliver(std::move(s));
            },
            [c, rp, release](caf::error& e) mutable {
              release();
              c->release_pin();
              c->release_pin();  // no process was started
              rp.deliver(std::move(e));
            });
        return rp;
      },
      [=](bg_done_atom, uint64_t) { c->release_pin(); },
      // The idle clock of the worker ran out: stop it unless an operation came meanwhile
      // (background processes do not need it: their threads belong to the core).
      [slot](worker_idle_atom, uint64_t generation) {
        if (slot->in_flight == 0 && generation == slot->generation && slot->worker) {
          caf::anon_send_exit(slot->worker, caf::exit_reason::user_shutdown);
          slot->worker = nullptr;
        }
      },
      // Answered here, not by the worker: the worker is the thread blocked in the exec.
      [core = core_](exec_cancel_atom) { return core->cancel_exec(); },
      [=](bg_poll_atom a, uint64_t id) { return forward(tag<bg_status>{}, a, id); },
      [=](bg_wait_atom a, uint64_t id, uint64_t t) { return forward(tag<bg_status>{}, a, id, t); },
      [=](bg_signal_atom a, uint64_t id, int32_t s) { return forward(tag<bg_status>{}, a, id, s); },
      [=](bg_list_atom a) { return forward(tag<std::vector<bg_status>>{}, a); },
      [=](file_write_atom a, const file_write_request& r) { return forward(tag<file_entry>{}, a, r); },
      [=](file_read_atom a, const file_read_request& r) { return forward(tag<file_data>{}, a, r); },
      [=](file_list_atom a, const file_list_request& r) { return forward(tag<std::vector<file_entry>>{}, a, r); },
      [=](file_stat_atom a, const std::string& p) { return forward(tag<file_entry>{}, a, p); },
      [=](mkdir_atom a, const mkdir_request& r) { return forward(tag<file_entry>{}, a, r); },
      [=](remove_atom a, const remove_request& r) { return forward(tag<uint64_t>{}, a, r); },
      [=](move_atom a, const move_request& r) { return forward(tag<file_entry>{}, a, r); },
      [=](tar_out_atom a, const std::string& d) { return forward(tag<std::string>{}, a, d); },
      [=](tar_in_atom a, const tar_in_request& r) { return forward(tag<uint64_t>{}, a, r); },
      // Reads of the kv memory are answered here, without the worker's thread hop, when the
      // worker has nothing queued or running: then every earlier operation has been answered
      // (so the read sees them all: order is kept) and nothing holds the state (a map lookup
      // does not block). Otherwise they queue behind the worker's operations like any other.
      [=, core = core_](kv_get_atom a, const std::string& k) -> caf::result<kv_value> {
        if (slot->in_flight == 0)
          if (auto v = core->try_kv_get(k)) return std::move(*v);
        return forward(tag<kv_value>{}, a, k);
      },
      [=](kv_put_atom a, const std::string& k, const std::string& v) { return forward(tag<bool>{}, a, k, v); },
      [=](kv_delete_atom a, const std::string& k) { return forward(tag<bool>{}, a, k); },
      [=, core = core_](kv_list_atom a, const std::string& p) -> caf::result<std::vector<kv_entry>> {
        if (slot->in_flight == 0)
          if (auto v = core->try_kv_list(p)) return std::move(*v);
        return forward(tag<std::vector<kv_entry>>{}, a, p);
      },
      [=](env_set_atom a, const std::map<std::string, std::string>& s, const std::vector<std::string>& u) {
        return forward(tag<session_info>{}, a, s, u);
      },
      [=](cwd_set_atom a, const std::string& d) { return forward(tag<session_info>{}, a, d); },
      [=](configure_atom a, const session_settings& s) { return forward(tag<session_info>{}, a, s); },
      [=](fork_atom a, const std::string& id) { return forward(tag<session_info>{}, a, id); },
      [=](destroy_atom a) { return forward(tag<bool>{}, a); },
      [=](info_atom a) { return forward(tag<session_info>{}, a); },
    };
  }

  expected<std::string> snapshot() override {
    // Only called at passivation. Idle passivation never meets a running operation (they pin);
    // shutdown passivates pinned sessions too: cancel a running exec, then wait for the
    // worker's operation to end (persist takes the core's operation lock).
    core_->cancel_exec();
    // Cheap when idle: every operation already stored its own changes.
    if (auto err = core_->persist()) return err;
    return std::string("triplane.session.v1");
  }

  uint32_t schema_version() const override { return 1; }

  void on_passivate() override {
    if (auto err = core_->passivate())
      (void)err;  // a running background process: the runtime does not passivate pinned actors
    stop_worker();
  }

private:
  template <class T>
  struct tag {
    using type = T;
  };

  void stop_worker() {
    if (slot_->worker) caf::anon_send_exit(slot_->worker, caf::exit_reason::user_shutdown);
    slot_->worker = nullptr;
  }

  session_host::impl& host_;
  std::string id_;
  core_ptr core_;
  std::shared_ptr<worker_slot> slot_ = std::make_shared<worker_slot>();
};

} // namespace

std::vector<std::string> session_host::column_families() {
  return session::session_store::column_families();
}

session_host::session_host(std::unique_ptr<impl> state) : impl_(std::move(state)) {}
session_host::~session_host() = default;

expected<std::unique_ptr<session_host>> session_host::create(storage::database& db,
                                                             session_host_options options) {
  if (options.workspaces_dir.empty())
    return make_error(errc::invalid_argument, "session host needs a workspaces directory");
  auto state = std::make_unique<impl>();
  std::error_code ec;
  std::filesystem::create_directories(options.workspaces_dir, ec);
  if (ec)
    return make_error(errc::io_error, "cannot create workspaces directory '" + options.workspaces_dir + "': " + ec.message());
  auto lock_path = options.workspaces_dir + "/.lock";
  state->workspaces_lock.fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (state->workspaces_lock.fd < 0)
    return make_error(errc::io_error, "cannot open '" + lock_path + "': " + std::strerror(errno));
  if (::flock(state->workspaces_lock.fd, LOCK_EX | LOCK_NB) != 0)
    return make_error(errc::unavailable, "workspaces directory '" + options.workspaces_dir +
                                           "' is in use by another node (give each node its own)");
  if (auto n = session::kill_orphaned_sandboxes(options.workspaces_dir))
    spdlog::warn("session host: killed {} sandbox processes an earlier run on '{}' left behind",
                 n, options.workspaces_dir);
  state->cgroups = session::cgroup_host::detect(options.cgroup_parent);
  if (!options.cgroup_parent.empty() && state->cgroups->mechanism() == limit_mechanism::none)
    return make_error(errc::unavailable, "session host: " + state->cgroups->describe());
  spdlog::info("session host: command limits by {}", state->cgroups->describe());
  // A dot-name cannot collide with the hex-named workspaces.
  auto sandbox = session::sandbox_config::detect(state->cgroups.get(), options.workspaces_dir + "/.sandbox-etc");
  if (!sandbox) return sandbox.error();
  state->sandbox = std::move(*sandbox);
  auto store = session::session_store::open(db, options.durability);
  if (!store) return store.error();
  state->store = std::move(*store);
  auto& n = state->node;
  n.store = state->store.get();
  n.sandbox = &state->sandbox;
  n.workspaces_dir = options.workspaces_dir;
  n.defaults = options.defaults;
  if (options.prestarted_sandboxes > 0) {
    // Without triplane-sandbox-exec every exec starts its own sandbox: slower, not wrong.
    auto pool = session::sandbox_pool::create(state->sandbox, options.workspaces_dir + "/.sandbox-pool",
                                              options.defaults.default_limits, options.prestarted_sandboxes);
    if (pool) state->pool = std::move(*pool);
    n.pool = state->pool.get();
  }
  n.history_limit = options.history_limit;
  n.max_workspace_bytes = options.max_workspace_bytes;
  n.max_workspace_entries = options.max_workspace_entries;
  n.max_kv_bytes = options.max_kv_bytes;
  n.max_tar_bytes = options.max_tar_bytes;
  state->options = std::move(options);
  return std::unique_ptr<session_host>(new session_host(std::move(state)));
}

runtime::kind_spec session_host::kind() {
  runtime::kind_spec spec;
  spec.name = "session";
  auto* state = impl_.get();
  spec.factory = [state](const std::string& id) -> std::unique_ptr<runtime::virtual_actor> {
    return std::make_unique<session_actor>(*state, id);
  };
  spec.idle_timeout = impl_->options.idle_timeout;
  spec.when = runtime::persistence::at_passivation;
  spec.durability = impl_->options.durability;
  return spec;
}

std::unique_ptr<runtime::virtual_actor> session_host::make_session(const std::string& id) {
  return std::make_unique<session_actor>(*impl_, id);
}

namespace {

caf::behavior session_catalog(caf::event_based_actor*, session::session_store* store) {
  return {
    [store](list_sessions_atom, const std::string& prefix, const std::string& after,
            uint32_t limit) -> caf::result<std::vector<std::string>> {
      if (limit == 0 || limit > max_listed_sessions)
        return make_error(errc::invalid_argument,
                          "a session list holds 1.." + std::to_string(max_listed_sessions)
                            + " ids, not " + std::to_string(limit));
      auto ids = store->list_ids(prefix, after, limit);
      if (!ids) return std::move(ids.error());
      return std::move(*ids);
    },
    [store](count_sessions_atom, const std::string& prefix) -> caf::result<uint64_t> {
      auto n = store->count_ids(prefix);
      if (!n) return std::move(n.error());
      return *n;
    },
  };
}

} // namespace

caf::actor session_host::spawn_catalog(caf::actor_system& sys) {
  return sys.spawn<caf::detached>(session_catalog, impl_->store.get());
}

limit_mechanism session_host::limits_mechanism() const {
  auto m = impl_->cgroups->mechanism();
  return m == limit_mechanism::none ? limit_mechanism::rlimit : m;
}

} // namespace triplane::actors
