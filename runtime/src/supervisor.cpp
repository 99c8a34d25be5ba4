// The supervisor actor: child life cycles, restart strategies, intensity, backoff, tree view.
//
// All stops are asynchronous and serialised through one "stop operation" at a time (a restart's
// sibling stops, a terminate_child, or the final shutdown): children are stopped one by one in
// reverse order, each with user_shutdown and then, after its shutdown timeout, kill. Failures
// that arrive while an operation runs are queued and handled in arrival order afterwards, the
// way an OTP supervisor handles one 'EXIT' at a time.
//
// Children are monitored, not linked: in CAF 0.17 an actor that receives an exit_msg unlinks from
// its source, so after our own send_exit no link would report the child's end, and a linked child
// killed by anyone else would kill us (exit_reason::kill cannot be trapped). Instead, a functor
// attached to the supervisor sends its exit reason to every child still alive when the supervisor
// ends without stopping them (killed, or a bug), so no child outlives its supervisor.
#include "triplane/runtime/supervisor.hpp"

#include <algorithm>
#include <deque>
#include <exception>
#include <utility>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

namespace triplane::runtime {

namespace {

using namespace std::chrono;

// Internal timer messages (to self); tokens make stale timers harmless.
using shutdown_timeout_atom = caf::atom_constant<caf::atom("sup_stopto")>;
using backoff_done_atom = caf::atom_constant<caf::atom("sup_backof")>;

struct child_record {
  child_spec spec;
  caf::actor handle;
  child_status status = child_status::stopped;
  uint64_t restarts = 0;
  uint64_t incarnation = 0;     // bumped on every start; queued failures of older ones are stale
  uint64_t backoff_token = 0;   // which backoff timer starts this child
  bool failure_pending = false; // a failure of this incarnation waits in the queue
};

// A child's exit that may need a restart, or a terminate_child request, in arrival order.
struct pending_event {
  enum class what { failure, terminate } kind = what::failure;
  std::string id;
  uint64_t incarnation = 0;
  caf::error reason;
  caf::response_promise promise;  // terminate only
};

enum class stop_purpose { none, restart, terminate, shutdown };

struct stop_operation {
  stop_purpose purpose = stop_purpose::none;
  std::deque<std::string> to_stop;  // in stop order (reverse declaration order)
  std::string current;              // being stopped now; empty when none
  uint64_t timer_token = 0;
  std::vector<std::string> to_start;  // restart: started in declaration order afterwards
  milliseconds delay{0};              // restart: backoff before the start
  caf::response_promise promise;      // terminate: answered when done
  std::string terminated_id;          // terminate: its record is removed if temporary
  caf::error quit_reason;             // shutdown: the supervisor's exit reason
  std::vector<std::string> remove_after;  // restart: temporary siblings, removed once stopped
};

struct supervisor_state {
  supervisor_flags flags;
  std::vector<child_record> children;
  std::deque<steady_clock::time_point> restart_times;  // within flags.period
  std::deque<pending_event> pending;
  stop_operation op;
  uint64_t next_token = 1;
  bool shutting_down = false;
  bool pumping = false;
  // The children that are alive, shared with the functor that stops them should the supervisor
  // end abruptly. Strong handles: CAF 0.17 terminates an unreferenced actor at once (with
  // exit_reason::unreachable), so the functor must keep them referenced until it has told them.
  std::shared_ptr<std::vector<caf::actor>> alive = std::make_shared<std::vector<caf::actor>>();
  static inline const char* name = "triplane.supervisor";
};

using sup_actor = caf::stateful_actor<supervisor_state>;

caf::behavior supervisor_behavior(sup_actor* self, supervisor_spec spec);

spdlog::logger& log_of(sup_actor* self) {
  auto& lg = self->state.flags.logger;
  return lg ? *lg : *spdlog::default_logger_raw();
}

std::string describe_reason(const caf::error& reason) {
  if (!reason) return "normal";
  if (reason.category() == caf::atom("exit"))
    return "exit_reason::" + caf::to_string(static_cast<caf::exit_reason>(reason.code()));
  return describe(reason);
}

bool is_abnormal(const caf::error& reason) {
  return reason && !(reason == caf::exit_reason::user_shutdown);
}

child_record* find_child(sup_actor* self, const std::string& id) {
  for (auto& rec : self->state.children)
    if (rec.spec.id == id) return &rec;
  return nullptr;
}

child_record* find_child(sup_actor* self, const caf::actor_addr& addr) {
  for (auto& rec : self->state.children)
    if (rec.handle && rec.handle.address() == addr) return &rec;
  return nullptr;
}

void remove_child(sup_actor* self, const std::string& id) {
  auto& cs = self->state.children;
  cs.erase(std::remove_if(cs.begin(), cs.end(),
                          [&id](const child_record& rec) { return rec.spec.id == id; }),
           cs.end());
}

// Runs the factory and monitors the child. On failure only the incarnation has changed.
caf::error start_child_now(sup_actor* self, child_record& rec) {
  ++rec.incarnation;
  rec.failure_pending = false;
  caf::actor child;
  try {
    child = rec.spec.start(self);
  } catch (const std::exception& e) {
    return make_error(errc::unavailable,
                      "child '" + rec.spec.id + "' failed to start: factory threw: " + e.what());
  } catch (...) {
    return make_error(errc::unavailable,
                      "child '" + rec.spec.id + "' failed to start: factory threw");
  }
  if (!child)
    return make_error(errc::unavailable,
                      "child '" + rec.spec.id + "' failed to start: factory returned no actor");
  rec.handle = std::move(child);
  rec.status = child_status::running;
  self->unlink_from(rec.handle);  // a link made by the factory would turn its exit into ours
  self->monitor(rec.handle);
  self->state.alive->push_back(rec.handle);
  return caf::none;
}

void pump(sup_actor* self);
void advance(sup_actor* self);

void queue_failure(sup_actor* self, child_record& rec, caf::error reason) {
  rec.failure_pending = true;
  pending_event ev;
  ev.kind = pending_event::what::failure;
  ev.id = rec.spec.id;
  ev.incarnation = rec.incarnation;
  ev.reason = std::move(reason);
  self->state.pending.push_back(std::move(ev));
}

// Starts every child waiting for backoff timer `token`, in declaration order.
void start_restarting(sup_actor* self, uint64_t token) {
  auto& st = self->state;
  if (st.shutting_down) return;
  for (auto& rec : st.children) {
    if (rec.status != child_status::restarting || rec.backoff_token != token) continue;
    if (auto err = start_child_now(self, rec)) {
      rec.status = child_status::stopped;
      log_of(self).error("supervisor '{}': restart of child '{}' failed: {}", st.flags.name,
                         rec.spec.id, describe_reason(err));
      queue_failure(self, rec, std::move(err));
    } else {
      log_of(self).info("supervisor '{}': restarted child '{}' (restart {})", st.flags.name,
                        rec.spec.id, rec.restarts);
    }
  }
  pump(self);
}

void finish_operation(sup_actor* self) {
  auto& st = self->state;
  auto op = std::move(st.op);
  st.op = stop_operation{};
  switch (op.purpose) {
    case stop_purpose::none:
      break;
    case stop_purpose::restart: {
      for (auto& id : op.remove_after)
        if (auto* rec = find_child(self, id); rec && !rec->handle) remove_child(self, id);
      auto token = st.next_token++;
      for (auto& id : op.to_start)
        if (auto* rec = find_child(self, id); rec && !rec->handle) {
          rec->status = child_status::restarting;
          rec->backoff_token = token;
        }
      if (op.delay.count() == 0) {
        start_restarting(self, token);
      } else {
        self->delayed_send(self, op.delay, backoff_done_atom::value, token);
      }
      break;
    }
    case stop_purpose::terminate:
      if (auto* rec = find_child(self, op.terminated_id);
          rec && rec->spec.restart == restart_type::temporary)
        remove_child(self, op.terminated_id);
      op.promise.deliver(caf::ok_atom::value);
      break;
    case stop_purpose::shutdown:
      log_of(self).info("supervisor '{}': all children stopped, exiting: {}", st.flags.name,
                        describe_reason(op.quit_reason));
      self->quit(std::move(op.quit_reason));
      return;  // state is gone after quit
  }
  pump(self);
}

// Stops the next child of the current operation, or finishes the operation.
void advance(sup_actor* self) {
  auto& st = self->state;
  auto& op = st.op;
  while (!op.to_stop.empty()) {
    auto* rec = find_child(self, op.to_stop.front());
    if (rec == nullptr || !rec->handle) {
      op.to_stop.pop_front();
      continue;
    }
    op.current = rec->spec.id;
    op.timer_token = st.next_token++;
    rec->status = child_status::stopping;
    auto timeout = rec->spec.shutdown_timeout;
    if (timeout.count() <= 0) {
      self->send_exit(rec->handle, caf::exit_reason::kill);
    } else {
      self->send_exit(rec->handle, caf::exit_reason::user_shutdown);
      if (timeout != infinite_shutdown)
        self->delayed_send(self, timeout, shutdown_timeout_atom::value, op.timer_token);
    }
    return;  // continued by the child's down_msg
  }
  op.current.clear();
  finish_operation(self);
}

void begin_operation(sup_actor* self, stop_operation op) {
  self->state.op = std::move(op);
  advance(self);
}

// Every child with a handle, in reverse declaration order.
std::deque<std::string> all_running_reversed(sup_actor* self) {
  std::deque<std::string> out;
  for (auto i = self->state.children.rbegin(); i != self->state.children.rend(); ++i)
    if (i->handle) out.push_back(i->spec.id);
  return out;
}

void begin_shutdown(sup_actor* self, caf::error reason) {
  auto& st = self->state;
  if (st.shutting_down) return;
  st.shutting_down = true;
  log_of(self).info("supervisor '{}': shutting down ({})", st.flags.name, describe_reason(reason));
  auto unavailable = [&st] {
    return make_error(errc::unavailable, "supervisor '" + st.flags.name + "' is shutting down");
  };
  for (auto& ev : st.pending)
    if (ev.kind == pending_event::what::terminate) ev.promise.deliver(unavailable());
  st.pending.clear();
  if (st.op.purpose == stop_purpose::terminate) st.op.promise.deliver(unavailable());
  for (auto& rec : st.children)
    if (rec.status == child_status::restarting) rec.status = child_status::stopped;
  stop_operation op;
  op.purpose = stop_purpose::shutdown;
  op.to_stop = all_running_reversed(self);
  op.quit_reason = std::move(reason);
  begin_operation(self, std::move(op));
}

milliseconds backoff_for(const supervisor_flags& flags, size_t k) {
  if (flags.backoff_base.count() <= 0 || k == 0) return milliseconds{0};
  auto delay = flags.backoff_base;
  for (size_t i = 1; i < k && delay < flags.backoff_cap; ++i) delay *= 2;
  return std::min(delay, flags.backoff_cap);
}

void handle_failure(sup_actor* self, pending_event ev) {
  auto& st = self->state;
  auto* rec = find_child(self, ev.id);
  if (rec == nullptr || rec->incarnation != ev.incarnation || rec->handle || !rec->failure_pending)
    return;  // absorbed by a group restart, terminated or deleted meanwhile
  rec->failure_pending = false;
  bool restart = rec->spec.restart == restart_type::permanent
                 || (rec->spec.restart == restart_type::transient && is_abnormal(ev.reason));
  if (!restart) {
    rec->status = child_status::stopped;
    if (rec->spec.restart == restart_type::temporary) remove_child(self, ev.id);
    return;
  }
  auto now = steady_clock::now();
  while (!st.restart_times.empty() && now - st.restart_times.front() > st.flags.period)
    st.restart_times.pop_front();
  if (st.restart_times.size() >= st.flags.max_restarts) {
    auto reason = make_error(
      errc::limit_exceeded,
      "supervisor '" + st.flags.name + "' reached max restart intensity ("
        + std::to_string(st.flags.max_restarts) + " restarts in "
        + std::to_string(st.flags.period.count()) + " ms); child '" + ev.id
        + "' failed again: " + describe_reason(ev.reason));
    log_of(self).error("{}", describe(reason));
    begin_shutdown(self, std::move(reason));
    return;
  }
  st.restart_times.push_back(now);
  auto delay = backoff_for(st.flags, st.restart_times.size());
  // The restart group, in declaration order: the failed child and, by strategy, the siblings
  // that are running, restarting, or whose own failure is still queued.
  stop_operation op;
  op.purpose = stop_purpose::restart;
  op.delay = delay;
  bool after_failed = false;
  std::vector<std::string> stop_in_order;
  for (auto& c : st.children) {
    bool is_failed = c.spec.id == ev.id;
    bool live = c.handle || c.status == child_status::restarting || c.failure_pending;
    bool member = is_failed
                  || (live && st.flags.strategy == restart_strategy::one_for_all)
                  || (live && after_failed && st.flags.strategy == restart_strategy::rest_for_one);
    after_failed = after_failed || is_failed;
    if (!member) continue;
    if (!is_failed) {
      ++c.incarnation;  // a queued failure of this sibling is absorbed by this restart
      c.failure_pending = false;
      if (c.status == child_status::restarting) c.status = child_status::stopped;
      if (c.handle) stop_in_order.push_back(c.spec.id);
    }
    if (c.spec.restart == restart_type::temporary) continue;  // stopped, never restarted
    ++c.restarts;
    op.to_start.push_back(c.spec.id);
  }
  for (auto i = stop_in_order.rbegin(); i != stop_in_order.rend(); ++i) op.to_stop.push_back(*i);
  for (auto& id : op.to_stop)
    if (auto* c = find_child(self, id); c && c->spec.restart == restart_type::temporary)
      op.remove_after.push_back(id);
  log_of(self).warn("supervisor '{}': restarting {} child(ren) after '{}' failed ({}, backoff {} ms)",
                    st.flags.name, op.to_start.size(), ev.id, to_string(st.flags.strategy),
                    delay.count());
  begin_operation(self, std::move(op));
}

void handle_terminate(sup_actor* self, pending_event ev) {
  auto* rec = find_child(self, ev.id);
  if (rec == nullptr) {
    ev.promise.deliver(make_error(errc::not_found, "no child '" + ev.id + "'"));
    return;
  }
  ++rec->incarnation;  // a queued failure no longer restarts it
  rec->failure_pending = false;
  if (!rec->handle) {
    rec->status = child_status::stopped;
    if (rec->spec.restart == restart_type::temporary) remove_child(self, ev.id);
    ev.promise.deliver(caf::ok_atom::value);
    return;
  }
  stop_operation op;
  op.purpose = stop_purpose::terminate;
  op.to_stop.push_back(ev.id);
  op.terminated_id = ev.id;
  op.promise = std::move(ev.promise);
  begin_operation(self, std::move(op));
}

// Handles queued events while no stop operation runs.
void pump(sup_actor* self) {
  auto& st = self->state;
  if (st.pumping) return;
  st.pumping = true;
  while (!st.shutting_down && st.op.purpose == stop_purpose::none && !st.pending.empty()) {
    auto ev = std::move(st.pending.front());
    st.pending.pop_front();
    if (ev.kind == pending_event::what::failure)
      handle_failure(self, std::move(ev));
    else
      handle_terminate(self, std::move(ev));
  }
  st.pumping = false;
}

// An exit_msg is never a child's (children are monitored): it asks us to stop.
void on_exit_msg(sup_actor* self, caf::exit_msg& em) {
  if (em.reason) begin_shutdown(self, std::move(em.reason));
}

void on_down_msg(sup_actor* self, caf::down_msg& dm) {
  auto& st = self->state;
  auto& alive = *st.alive;
  alive.erase(std::remove_if(alive.begin(), alive.end(),
                             [&dm](const caf::actor& a) { return a.address() == dm.source; }),
              alive.end());
  auto* rec = find_child(self, dm.source);
  if (rec == nullptr) return;
  rec->handle = nullptr;
  bool expected = rec->status == child_status::stopping;
  rec->status = child_status::stopped;
  if (expected) {
    log_of(self).info("supervisor '{}': child '{}' stopped: {}", st.flags.name, rec->spec.id,
                      describe_reason(dm.reason));
    if (st.op.current == rec->spec.id) {
      st.op.to_stop.pop_front();
      st.op.current.clear();
      advance(self);
    }
    return;
  }
  if (is_abnormal(dm.reason))
    log_of(self).error("supervisor '{}': child '{}' failed: {}", st.flags.name, rec->spec.id,
                       describe_reason(dm.reason));
  else
    log_of(self).info("supervisor '{}': child '{}' exited: {}", st.flags.name, rec->spec.id,
                      describe_reason(dm.reason));
  if (st.shutting_down) {
    if (rec->spec.restart == restart_type::temporary) remove_child(self, rec->spec.id);
    return;
  }
  queue_failure(self, *rec, std::move(dm.reason));
  pump(self);
}

void on_shutdown_timeout(sup_actor* self, uint64_t token) {
  auto& st = self->state;
  if (token != st.op.timer_token || st.op.current.empty()) return;
  auto* rec = find_child(self, st.op.current);
  if (rec == nullptr || !rec->handle) return;
  log_of(self).warn("supervisor '{}': child '{}' did not stop within {} ms, killing it",
                    st.flags.name, rec->spec.id, rec->spec.shutdown_timeout.count());
  self->send_exit(rec->handle, caf::exit_reason::kill);
}

child_info info_of(const child_record& rec) {
  child_info out;
  out.id = rec.spec.id;
  out.handle = rec.handle;
  out.restart = rec.spec.restart;
  out.kind = rec.spec.kind;
  out.status = rec.status;
  out.restarts = rec.restarts;
  return out;
}

// Fan-in of the subtree requests of one tree view.
struct tree_collector {
  tree_node root;
  size_t outstanding = 0;
  caf::typed_response_promise<tree_node> promise;
  void done_one() {
    if (--outstanding == 0) promise.deliver(std::move(root));
  }
};

// Answers within `budget`: child supervisors get three quarters of it for their own subtree, so
// that an unresponsive grandchild is noted by its parent instead of hiding the whole subtree.
caf::result<tree_node> tree_view(sup_actor* self, milliseconds budget) {
  auto& st = self->state;
  auto collector = std::make_shared<tree_collector>();
  auto& root = collector->root;
  root.name = st.flags.name;
  root.kind = child_kind::supervisor;
  root.status = st.shutting_down ? child_status::stopping : child_status::running;
  std::vector<std::pair<size_t, caf::actor>> asks;
  for (auto& rec : st.children) {
    tree_node node;
    node.name = rec.spec.id;
    node.kind = rec.spec.kind;
    node.status = rec.status;
    node.restarts = rec.restarts;
    if (rec.spec.kind == child_kind::supervisor && rec.status == child_status::running)
      asks.emplace_back(root.children.size(), rec.handle);
    root.children.push_back(std::move(node));
  }
  if (asks.empty()) return std::move(root);
  collector->outstanding = asks.size();
  collector->promise = self->make_response_promise<tree_node>();
  for (auto& [index, handle] : asks) {
    auto i = index;
    self->request(handle, budget, sup::tree_atom::value, int64_t{budget.count() * 3 / 4})
      .then(
        [collector, i](tree_node& sub) {
          collector->root.children[i].children = std::move(sub.children);
          if (!sub.note.empty()) collector->root.children[i].note = std::move(sub.note);
          collector->done_one();
        },
        [collector, i](caf::error& err) {
          collector->root.children[i].note = "no subtree: " + describe_reason(err);
          collector->done_one();
        });
  }
  return collector->promise;
}

caf::error check_child_spec(const child_spec& c) {
  if (c.id.empty()) return make_error(errc::invalid_argument, "child spec has an empty id");
  if (!c.start)
    return make_error(errc::invalid_argument, "child '" + c.id + "' has no factory");
  if (c.shutdown_timeout.count() < 0)
    return make_error(errc::invalid_argument,
                      "child '" + c.id + "' has a negative shutdown timeout");
  return caf::none;
}

caf::behavior supervisor_behavior(sup_actor* self, supervisor_spec spec) {
  auto& st = self->state;
  st.flags = std::move(spec.flags);
  self->set_exit_handler([self](caf::exit_msg& em) { on_exit_msg(self, em); });
  self->set_down_handler([self](caf::down_msg& dm) { on_down_msg(self, dm); });
  // Runs only if the supervisor ends with children alive (killed, or a bug). kill becomes
  // user_shutdown so that child supervisors, which trap exits, still stop their own children.
  self->attach_functor([alive = st.alive, me = self->address()](const caf::error& reason) {
    caf::error why = reason;
    if (!why || why == caf::exit_reason::kill) why = caf::exit_reason::user_shutdown;
    for (auto& child : *alive) caf::anon_send(child, caf::exit_msg{me, why});
    alive->clear();
  });
  for (auto& c : spec.children) {
    child_record rec;
    rec.spec = std::move(c);
    st.children.push_back(std::move(rec));
  }
  for (auto& rec : st.children) {
    if (auto err = start_child_now(self, rec)) {
      log_of(self).error("supervisor '{}': {}", st.flags.name, describe(err));
      begin_shutdown(self, make_error(errc::unavailable, "supervisor '" + st.flags.name
                                                           + "' could not start: " + describe(err)));
      break;
    }
  }
  return {
    [self](sup::route_atom, const std::string& id, caf::message& msg) -> caf::result<caf::message> {
      auto* rec = find_child(self, id);
      if (rec == nullptr) return make_error(errc::not_found, "no child '" + id + "'");
      if (rec->status != child_status::running)
        return make_error(errc::unavailable,
                          "child '" + id + "' is " + to_string(rec->status) + ", retry later");
      return self->delegate(rec->handle, std::move(msg));
    },
    [self](sup::lookup_atom, const std::string& id) -> caf::result<caf::actor> {
      auto* rec = find_child(self, id);
      if (rec == nullptr) return make_error(errc::not_found, "no child '" + id + "'");
      if (rec->status != child_status::running)
        return make_error(errc::unavailable, "child '" + id + "' is " + to_string(rec->status));
      return rec->handle;
    },
    [self](sup::start_child_atom, child_spec& c) -> caf::result<caf::actor> {
      auto& st = self->state;
      if (auto err = check_child_spec(c)) return err;
      if (st.shutting_down)
        return make_error(errc::unavailable, "supervisor '" + st.flags.name + "' is shutting down");
      if (find_child(self, c.id) != nullptr)
        return make_error(errc::already_exists, "child '" + c.id + "' already exists");
      child_record rec;
      rec.spec = std::move(c);
      if (auto err = start_child_now(self, rec)) return err;
      st.children.push_back(std::move(rec));
      return st.children.back().handle;
    },
    [self](sup::terminate_child_atom, const std::string& id) -> caf::response_promise {
      auto& st = self->state;
      auto promise = self->make_response_promise();
      if (st.shutting_down)
        promise.deliver(
          make_error(errc::unavailable, "supervisor '" + st.flags.name + "' is shutting down"));
      else if (find_child(self, id) == nullptr)
        promise.deliver(make_error(errc::not_found, "no child '" + id + "'"));
      if (promise.pending()) {
        pending_event ev;
        ev.kind = pending_event::what::terminate;
        ev.id = id;
        ev.promise = promise;
        st.pending.push_back(std::move(ev));
        pump(self);
      }
      return promise;
    },
    [self](sup::restart_child_atom, const std::string& id) -> caf::result<caf::actor> {
      auto& st = self->state;
      if (st.shutting_down)
        return make_error(errc::unavailable, "supervisor '" + st.flags.name + "' is shutting down");
      auto* rec = find_child(self, id);
      if (rec == nullptr) return make_error(errc::not_found, "no child '" + id + "'");
      if (rec->handle)
        return make_error(errc::invalid_argument,
                          "child '" + id + "' is " + to_string(rec->status));
      if (auto err = start_child_now(self, *rec)) {
        rec->status = child_status::stopped;
        return err;
      }
      return rec->handle;
    },
    [self](sup::delete_child_atom, const std::string& id) -> caf::result<caf::ok_atom> {
      auto* rec = find_child(self, id);
      if (rec == nullptr) return make_error(errc::not_found, "no child '" + id + "'");
      if (rec->status != child_status::stopped || rec->failure_pending)
        return make_error(errc::invalid_argument, "child '" + id + "' is "
                                                    + to_string(rec->status)
                                                    + ", terminate it first");
      remove_child(self, id);
      return caf::ok_atom::value;
    },
    [self](sup::which_children_atom) {
      std::vector<child_info> out;
      for (auto& rec : self->state.children) out.push_back(info_of(rec));
      return out;
    },
    [self](sup::tree_atom) { return tree_view(self, self->state.flags.tree_timeout); },
    [self](sup::tree_atom, int64_t budget_ms) {
      return tree_view(self, std::min(self->state.flags.tree_timeout,
                                      milliseconds{std::max<int64_t>(budget_ms, 1)}));
    },
    [self](shutdown_timeout_atom, uint64_t token) { on_shutdown_timeout(self, token); },
    [self](backoff_done_atom, uint64_t token) { start_restarting(self, token); },
  };
}

} // namespace

caf::error validate(const supervisor_spec& spec) {
  const auto& f = spec.flags;
  if (f.name.empty()) return make_error(errc::invalid_argument, "supervisor name is empty");
  auto where = "supervisor '" + f.name + "': ";
  if (f.period.count() <= 0)
    return make_error(errc::invalid_argument, where + "restart period must be positive");
  if (f.backoff_base.count() < 0 || f.backoff_cap < f.backoff_base)
    return make_error(errc::invalid_argument,
                      where + "backoff needs 0 <= backoff_base <= backoff_cap");
  if (f.tree_timeout.count() <= 0)
    return make_error(errc::invalid_argument, where + "tree_timeout must be positive");
  for (size_t i = 0; i < spec.children.size(); ++i) {
    if (auto err = check_child_spec(spec.children[i]))
      return make_error(errc::invalid_argument, where + describe(err));
    for (size_t j = 0; j < i; ++j)
      if (spec.children[j].id == spec.children[i].id)
        return make_error(errc::invalid_argument,
                          where + "duplicate child id '" + spec.children[i].id + "'");
  }
  return caf::none;
}

expected<caf::actor> spawn_supervisor(caf::actor_system& sys, supervisor_spec spec) {
  if (auto err = validate(spec)) return err;
  return sys.spawn(supervisor_behavior, std::move(spec));
}

child_spec supervisor_child(std::string id, supervisor_spec spec, restart_type restart,
                            std::chrono::milliseconds shutdown_timeout) {
  child_spec out;
  out.id = std::move(id);
  out.restart = restart;
  out.shutdown_timeout = shutdown_timeout;
  out.kind = child_kind::supervisor;
  out.start = [spec = std::move(spec)](caf::local_actor* parent) -> caf::actor {
    if (auto err = validate(spec)) throw std::invalid_argument(describe(err));
    return parent->spawn(supervisor_behavior, spec);
  };
  return out;
}

expected<tree_node> fetch_tree(caf::actor_system& sys, const caf::actor& supervisor,
                               std::chrono::milliseconds timeout) {
  if (!supervisor) return make_error(errc::invalid_argument, "fetch_tree: invalid handle");
  caf::scoped_actor self{sys};
  expected<tree_node> out{make_error(errc::internal, "fetch_tree: no reply")};
  self->request(supervisor, timeout, sup::tree_atom::value)
    .receive([&out](tree_node& root) { out = std::move(root); },
             [&out](caf::error& err) { out = std::move(err); });
  return out;
}

namespace {

void render_into(const tree_node& node, size_t depth, std::string& out) {
  out.append(depth * 2, ' ');
  out += node.name;
  out += " (";
  out += to_string(node.kind);
  out += ", ";
  out += to_string(node.status);
  if (node.restarts > 0) out += ", restarts " + std::to_string(node.restarts);
  out += ")";
  if (!node.note.empty()) out += " [" + node.note + "]";
  out += "\n";
  for (auto& child : node.children) render_into(child, depth + 1, out);
}

} // namespace

std::string render_tree(const tree_node& root) {
  std::string out;
  render_into(root, 0, out);
  return out;
}

void register_supervision_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<child_info>("triplane.child_info");
  cfg.add_message_type<tree_node>("triplane.tree_node");
}

const char* to_string(restart_strategy x) {
  switch (x) {
    case restart_strategy::one_for_one: return "one_for_one";
    case restart_strategy::one_for_all: return "one_for_all";
    case restart_strategy::rest_for_one: return "rest_for_one";
  }
  return "unknown";
}

const char* to_string(restart_type x) {
  switch (x) {
    case restart_type::permanent: return "permanent";
    case restart_type::transient: return "transient";
    case restart_type::temporary: return "temporary";
  }
  return "unknown";
}

const char* to_string(child_kind x) {
  switch (x) {
    case child_kind::worker: return "worker";
    case child_kind::supervisor: return "supervisor";
  }
  return "unknown";
}

const char* to_string(child_status x) {
  switch (x) {
    case child_status::running: return "running";
    case child_status::restarting: return "restarting";
    case child_status::stopping: return "stopping";
    case child_status::stopped: return "stopped";
  }
  return "unknown";
}

} // namespace triplane::runtime
