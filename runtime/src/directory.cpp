// The virtual-actor directory: shard actors that route (kind, id) messages to activations,
// activate on demand, passivate idle or least-recently-used ones, and supervise them.
//
// Protocol between a shard and the activation it hosts (one CAF actor per live id):
//   shard -> host  (call_atom, kind, id, msg) the caller's message itself, forwarded without
//                                             copying; the host replies to the caller
//   shard -> host  (go_atom, force)          passivate now (unless pinned and !force)
//   host  -> shard (refuse_atom)             pinned, or its state could not be stored: stays live
//   host  -> shard (ask_atom)                please passivate me (failed activation or handler)
// The shard stops routing to a host before it sends go_atom and buffers what arrives meanwhile;
// because CAF keeps per-sender order, go_atom reaches the host after every message the shard
// routed to it, so no message is lost or reordered across a passivation.
#include "triplane/runtime/directory.hpp"

#include <atomic>
#include <mutex>
#include <unordered_map>

#include <caf/all.hpp>
#include <caf/detail/invoke_result_visitor.hpp>
#include <spdlog/spdlog.h>

#include "triplane/runtime/error.hpp"
#include "reject_request.hpp"

namespace triplane::runtime {
namespace {

using go_atom = caf::atom_constant<caf::atom("tp_go")>;
using refuse_atom = caf::atom_constant<caf::atom("tp_refuse")>;
using ask_atom = caf::atom_constant<caf::atom("tp_ask")>;
using sweep_atom = caf::atom_constant<caf::atom("tp_sweep")>;

using clock_type = std::chrono::steady_clock;

constexpr size_t max_kind_bytes = 255;
constexpr size_t max_id_bytes = 4096;

/// A kind as the runtime uses it: the developer's spec plus resolved defaults.
struct kind_runtime {
  kind_spec spec;
  storage::durability durability;
};

using kind_table = std::unordered_map<std::string, std::shared_ptr<const kind_runtime>>;

// -- the activation host --------------------------------------------------------------------

/// Captures what a user handler returned, so the host can persist before the reply leaves.
class reply_capture final : public caf::detail::invoke_result_visitor {
public:
  enum class outcome : uint8_t { nothing, value, failure, delegated };
  outcome what = outcome::nothing;
  caf::message value;
  caf::error failure;

  void operator()() override { what = outcome::delegated; }
  void operator()(caf::error& x) override {
    what = outcome::failure;
    failure = std::move(x);
  }
  void operator()(caf::message& x) override {
    what = outcome::value;
    value = std::move(x);
  }
  void operator()(const caf::none_t&) override {
    what = outcome::value;
    value = caf::message{};
  }
};

struct host_state : activation_context {
  static inline const char* name = "triplane.activation";

  caf::stateful_actor<host_state>* host = nullptr;
  const kind_runtime* kind_info = nullptr;
  std::string actor_id;
  storage::state_store* store = nullptr;
  caf::actor shard;
  uint64_t activation_epoch = 0;
  std::unique_ptr<virtual_actor> user;
  caf::behavior user_behavior;
  caf::error activation_error;  ///< set when the activation failed: every call gets it
  uint32_t pins = 0;
  bool changed_in_handler = false;
  bool unsaved_changes = false;
  bool broken = false;  ///< a handler failed: state may be inconsistent; never persisted again

  // -- activation_context --
  const std::string& kind() const override { return kind_info->spec.name; }
  const std::string& id() const override { return actor_id; }
  uint64_t epoch() const override { return activation_epoch; }
  caf::event_based_actor* self() override { return host; }
  void mark_changed() override {
    changed_in_handler = true;
    unsaved_changes = true;
  }
  void pin() override { ++pins; }
  void release_pin() override {
    if (pins > 0) --pins;
  }
  caf::error persist_now() override {
    if (broken) return make_error(errc::unavailable, describe_self() + " is restarting after a failure");
    auto bytes = user->snapshot();
    if (!bytes) return std::move(bytes.error());
    auto version = store->save(storage::actor_key{kind_info->spec.name, actor_id}, activation_epoch,
                               user->schema_version(), *bytes, kind_info->durability);
    if (!version) return std::move(version.error());
    unsaved_changes = false;
    return caf::none;
  }

  std::string describe_self() const { return kind_info->spec.name + " '" + actor_id + "'"; }

  /// Marks the activation unusable and asks the shard to stop it; later calls are answered
  /// with an error until it is stopped, and the next activation reloads persisted state.
  void fail(const std::string& why) {
    spdlog::error("actor {} failed: {}", describe_self(), why);
    broken = true;
    host->send(shard, ask_atom::value);
  }

  /// Runs a user handler on `msg`; catches whatever it throws.
  reply_capture invoke_user(caf::message& msg) {
    reply_capture capture;
    changed_in_handler = false;
    try {
      auto matched = user_behavior(capture, msg);
      if (matched == caf::match_case::no_match) {
        capture.what = reply_capture::outcome::failure;
        capture.failure = make_error(errc::invalid_argument,
                                     describe_self() + " does not understand the message " +
                                       caf::to_string(msg));
      }
    } catch (const std::exception& e) {
      fail(std::string{"handler threw: "} + e.what());
      capture.what = reply_capture::outcome::failure;
      capture.failure = make_error(errc::internal, describe_self() + " failed: " + e.what());
    } catch (...) {
      fail("handler threw a non-std exception");
      capture.what = reply_capture::outcome::failure;
      capture.failure = make_error(errc::internal, describe_self() + " failed");
    }
    return capture;
  }
};

caf::result<caf::message> to_result(reply_capture& capture) {
  switch (capture.what) {
    case reply_capture::outcome::value: return std::move(capture.value);
    case reply_capture::outcome::failure: return std::move(capture.failure);
    case reply_capture::outcome::delegated: return caf::delegated<caf::message>{};
    case reply_capture::outcome::nothing: break;
  }
  return caf::message{};
}

/// Loads the activation: epoch, stored state, user object. Sets activation_error on failure.
void activate(host_state& st) {
  storage::actor_key key{st.kind_info->spec.name, st.actor_id};
  auto epoch = st.store->begin_activation(key);
  if (!epoch) {
    st.activation_error = std::move(epoch.error());
    return;
  }
  st.activation_epoch = *epoch;
  auto stored = st.store->load(key);
  if (!stored) {
    st.activation_error = std::move(stored.error());
    return;
  }
  try {
    st.user = st.kind_info->spec.factory(st.actor_id);
    if (!st.user) {
      st.activation_error = make_error(errc::internal, "the factory of kind '" +
                                                         st.kind_info->spec.name + "' returned null");
      return;
    }
    if (auto err = st.user->restore(st, *stored)) {
      st.activation_error = std::move(err);
      return;
    }
    st.user_behavior = st.user->make_behavior(st);
  } catch (const std::exception& e) {
    st.activation_error = make_error(errc::internal, "activating " + st.describe_self() +
                                                       " threw: " + e.what());
  }
}

caf::behavior activation_host(caf::stateful_actor<host_state>* self, const kind_runtime* kind,
                              std::string id, storage::state_store* store, caf::actor shard) {
  auto& st = self->state;
  st.host = self;
  st.kind_info = kind;
  st.actor_id = std::move(id);
  st.store = store;
  st.shard = std::move(shard);
  // The shard supervises its activations: they stop when it stops (it monitors them too).
  self->monitor(st.shard);
  self->set_down_handler([self](caf::down_msg& msg) {
    if (msg.source == self->state.shard) self->quit(msg.reason);
  });
  activate(st);
  if (st.activation_error) {
    spdlog::warn("activation of {} failed: {}", st.describe_self(), describe(st.activation_error));
    self->send(st.shard, ask_atom::value);
  }
  // An error arriving as a plain message (typically the failed reply to a plain send, which CAF
  // sends back as a message) would stop the actor under CAF's default handler and lose its
  // unsaved state; it is logged instead. Handlers that care use request().then(..., on_error).
  self->set_error_handler([self](caf::error& err) {
    spdlog::warn("actor {} ignored an error message: {}", self->state.describe_self(), describe(err));
  });
  // Messages sent to the activation directly (its own timers, replies it asked for through
  // send) reach the user's handlers too, but do not count as use: only routed calls do.
  self->set_default_handler([self](caf::scheduled_actor*, caf::message_view& view)
                              -> caf::result<caf::message> {
    auto& st = self->state;
    if (st.activation_error || st.broken) return caf::message{};
    auto msg = view.move_content_to_message();
    auto capture = st.invoke_user(msg);
    return to_result(capture);
  });
  return {
    [self](call_atom, const std::string&, const std::string&, caf::message& payload) -> caf::result<caf::message> {
      auto& st = self->state;
      if (st.activation_error) return st.activation_error;
      if (st.broken)
        return make_error(errc::unavailable, st.describe_self() + " is restarting after a failure; retry");
      auto capture = st.invoke_user(payload);
      if (st.changed_in_handler && !st.broken &&
          st.kind_info->spec.when == persistence::every_change) {
        if (auto err = st.persist_now()) {
          st.fail("persisting a change failed: " + describe(err));
          return make_error(code_of(err) == errc::stale_epoch ? errc::stale_epoch : errc::io_error,
                            "the change to " + st.describe_self() + " was not stored: " + describe(err));
        }
      }
      return to_result(capture);
    },
    [self](go_atom, bool force) {
      auto& st = self->state;
      if (!force && st.pins > 0 && !st.broken && !st.activation_error) {
        self->send(st.shard, refuse_atom::value);
        return;
      }
      if (!st.activation_error && !st.broken) {
        if (st.unsaved_changes) {
          if (auto err = st.persist_now()) {
            // Passivating now would drop the only copy of the changes. Unless the node is
            // shutting down or another activation owns the id (its epoch fenced this one out),
            // stay live: the shard puts the id back in use order, so the next attempt comes
            // after another idle timeout (or at the live cap's next eviction).
            if (!force && code_of(err) != errc::stale_epoch) {
              spdlog::error("passivating {}: state not stored, so it stays live and passivation is retried "
                            "later: {}", st.describe_self(), describe(err));
              self->send(st.shard, refuse_atom::value);
              return;
            }
            spdlog::error("passivating {}: state not stored, unsaved changes lost ({}): {}", st.describe_self(),
                          force ? "the node is shutting down" : "another activation owns it", describe(err));
          }
        }
        try {
          st.user->on_passivate();
        } catch (const std::exception& e) {
          spdlog::error("passivating {}: on_passivate threw: {}", st.describe_self(), e.what());
        }
      }
      self->quit();
    },
  };
}

// -- the shard --------------------------------------------------------------------------------

/// What only a passivating entry needs; allocated on demand to keep idle entries small.
struct pending_work {
  std::vector<std::pair<caf::response_promise, caf::message>> buffered;  ///< whole call messages
  std::vector<caf::response_promise> passivation_waiters;
};

struct entry {
  /// absent: no activation (a router counted calls for it that the shard has not handled yet);
  /// live: an activation runs; passivating: go_atom sent, calls are buffered until it stops.
  enum class phase : uint8_t { absent, live, passivating };
  const kind_runtime* kind = nullptr;  ///< null while absent and not yet validated
  const std::string* key = nullptr;    ///< the map's own key (stable: node-based map)
  caf::actor host;
  phase state = phase::absent;
  bool in_lru = false;
  /// Calls a router put into the shard's mailbox for this id that the shard has not handled
  /// yet. While non-zero, routers must not deliver to the host directly either: a later call
  /// could overtake an earlier one still waiting in the shard's mailbox.
  uint32_t at_shard = 0;
  entry* lru_newer = nullptr;  ///< intrusive LRU links (no allocation per entry)
  entry* lru_older = nullptr;
  clock_type::time_point last_routed;
  std::unique_ptr<pending_work> pending;

  pending_work& work() {
    if (!pending) pending = std::make_unique<pending_work>();
    return *pending;
  }
};

/// Live entries ordered by last use; intrusive, O(1) touch and removal.
class lru_order {
public:
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  entry* oldest() const { return oldest_; }

  void push_newest(entry& e) {
    e.lru_older = newest_;
    e.lru_newer = nullptr;
    if (newest_) newest_->lru_newer = &e;
    newest_ = &e;
    if (!oldest_) oldest_ = &e;
    e.in_lru = true;
    ++size_;
  }

  void remove(entry& e) {
    if (!e.in_lru) return;
    if (e.lru_newer) e.lru_newer->lru_older = e.lru_older; else newest_ = e.lru_older;
    if (e.lru_older) e.lru_older->lru_newer = e.lru_newer; else oldest_ = e.lru_newer;
    e.lru_newer = e.lru_older = nullptr;
    e.in_lru = false;
    --size_;
  }

private:
  entry* newest_ = nullptr;
  entry* oldest_ = nullptr;
  size_t size_ = 0;
};

void append_key(std::string& key, const std::string& kind, const std::string& id) {
  key.reserve(kind.size() + 1 + id.size());
  key += kind;
  key += '\0';  // kind names contain no NUL (checked at start), so the split is unambiguous
  key += id;
}

std::string make_key(const std::string& kind, const std::string& id) {
  std::string key;
  append_key(key, kind, id);
  return key;
}

/// One shard's entries and LRU order. The shard actor owns the decisions (activate, passivate,
/// evict); routers, running on callers' threads, read it to deliver calls for live ids straight
/// to the activation and update last use. Everything here is guarded by `mutex`; nobody blocks
/// or sends a message that could wait on another lock while holding it (CAF's enqueue does not).
struct shard_table {
  std::mutex mutex;
  std::unordered_map<std::string, entry> entries;
  lru_order lru;  ///< only live entries
};

/// Requires the table's mutex.
void touch(shard_table& table, entry& e) {
  e.last_routed = clock_type::now();
  table.lru.remove(e);
  table.lru.push_newest(e);
}

struct shard_state {
  static inline const char* name = "triplane.directory_shard";

  std::shared_ptr<const kind_table> kinds;
  storage::state_store* store = nullptr;
  directory_options options;
  size_t max_live = 0;
  std::chrono::milliseconds min_idle{0};
  std::shared_ptr<shard_table> table;
  std::unordered_map<caf::actor_addr, entry*> by_host;
  directory_stats stats;
  bool draining = false;
  std::vector<caf::response_promise> drain_waiters;
  uint64_t drained = 0;

  ~shard_state() {
    // A stopped shard's activations stop with it; routers that still hold the table then find
    // no entries and queue calls to the dead shard, which bounces them to their senders.
    if (!table) return;
    std::lock_guard<std::mutex> guard{table->mutex};
    table->lru = lru_order{};
    table->entries.clear();
  }
};

using shard_actor = caf::stateful_actor<shard_state>;

// The functions below that take a shard_actor* require the shard's table mutex.

void start_passivation(shard_actor* self, entry& e, bool force) {
  auto& st = self->state;
  if (e.state == entry::phase::absent) return;
  st.table->lru.remove(e);
  if (e.state == entry::phase::passivating && !force) return;
  // From here routers queue calls for this id at the shard, which buffers them; go_atom leaves
  // after every call already delivered to the host, so the host handles those first.
  e.state = entry::phase::passivating;
  self->send(e.host, go_atom::value, force);
}

void spawn_host(shard_actor* self, entry& e, const std::string& id) {
  auto& st = self->state;
  e.host = self->spawn(activation_host, e.kind, id, st.store, caf::actor{self});
  self->monitor(e.host);
  st.by_host.emplace(e.host.address(), &e);
  e.state = entry::phase::live;
  ++st.stats.activations;
  ++st.stats.live;
}

/// Passivates least-recently-used live activations while the shard is over its cap.
void enforce_cap(shard_actor* self) {
  auto& lru = self->state.table->lru;
  while (lru.size() > self->state.max_live && !lru.empty()) start_passivation(self, *lru.oldest(), false);
}

void sweep_idle(shard_actor* self) {
  auto& st = self->state;
  auto now = clock_type::now();
  std::vector<entry*> idle_entries;
  for (entry* e = st.table->lru.oldest(); e != nullptr; e = e->lru_newer) {
    auto idle = now - e->last_routed;
    if (idle < st.min_idle) break;  // ordered by last use: the rest are younger
    if (idle >= e->kind->spec.idle_timeout) idle_entries.push_back(e);
  }
  for (entry* e : idle_entries) start_passivation(self, *e, false);
}

caf::error validate_call(const shard_state& st, const std::string& kind, const std::string& id) {
  if (st.draining) return make_error(errc::unavailable, "the node is shutting down");
  if (st.kinds->find(kind) == st.kinds->end())
    return make_error(errc::not_found, "unknown actor kind '" + kind + "'");
  if (id.empty()) return make_error(errc::invalid_argument, "actor id is empty (kind '" + kind + "')");
  if (id.size() > max_id_bytes)
    return make_error(errc::invalid_argument, "actor id of kind '" + kind + "' is " +
                                                std::to_string(id.size()) + " bytes; the limit is " +
                                                std::to_string(max_id_bytes));
  if (!st.options.owner->is_local(kind, id))
    return make_error(errc::unavailable, kind + " '" + id + "' is owned by another node");
  return caf::none;
}

/// Drops an entry without activation once no counted call for it is left in the mailbox.
void forget_if_unused(shard_state& st, std::unordered_map<std::string, entry>::iterator pos) {
  if (pos->second.state == entry::phase::absent && pos->second.at_shard == 0) st.table->entries.erase(pos);
}

void finish_drain_if_done(shard_state& st) {
  // Done when no activation is left (absent entries only wait for their queued calls).
  if (!st.draining || !st.by_host.empty()) return;
  for (auto& rp : st.drain_waiters) rp.deliver(st.drained);
  st.drain_waiters.clear();
}

caf::behavior directory_shard(shard_actor* self, std::shared_ptr<const kind_table> kinds,
                              storage::state_store* store, directory_options options,
                              size_t max_live, std::shared_ptr<shard_table> table) {
  auto& st = self->state;
  st.kinds = std::move(kinds);
  st.store = store;
  st.options = std::move(options);
  st.max_live = std::max<size_t>(1, max_live);
  st.table = std::move(table);
  st.min_idle = std::chrono::milliseconds::max();
  for (auto& [name, kind] : *st.kinds) st.min_idle = std::min(st.min_idle, kind->spec.idle_timeout);

  self->set_down_handler([self](caf::down_msg& msg) {
    auto& st = self->state;
    auto found = st.by_host.find(msg.source);
    if (found == st.by_host.end()) return;
    std::lock_guard<std::mutex> guard{st.table->mutex};
    entry& e = *found->second;
    st.by_host.erase(found);
    --st.stats.live;
    if (msg.reason && msg.reason != caf::exit_reason::user_shutdown) {
      ++st.stats.failures;
      spdlog::error("activation of {} '{}' stopped abnormally: {}", e.kind->spec.name,
                    e.key->substr(e.kind->spec.name.size() + 1), describe(msg.reason));
    } else {
      ++st.stats.passivations;
      ++st.drained;
    }
    st.table->lru.remove(e);
    auto pending = std::move(e.pending);
    if (pending)
      for (auto& rp : pending->passivation_waiters) rp.deliver(true);
    if (pending && !pending->buffered.empty() && !st.draining) {
      // Calls arrived while it passivated: activate again and hand them over in order.
      auto id = e.key->substr(e.kind->spec.name.size() + 1);
      spawn_host(self, e, id);
      touch(*st.table, e);
      for (auto& [rp, call] : pending->buffered) rp.delegate(e.host, std::move(call));
      enforce_cap(self);
      return;
    }
    if (pending)
      for (auto& [rp, payload] : pending->buffered)
        rp.deliver(make_error(errc::unavailable, "the node is shutting down"));
    e.host = nullptr;
    e.state = entry::phase::absent;
    forget_if_unused(st, st.table->entries.find(*e.key));
    finish_drain_if_done(st);
  });
  self->delayed_send(self, st.options.idle_check_granularity, sweep_atom::value);

  return {
    // Calls reach the shard only through a router, which counted them in at_shard.
    [self](call_atom, const std::string& kind, const std::string& id,
           const caf::message&) -> caf::result<caf::message> {
      auto& st = self->state;
      std::lock_guard<std::mutex> guard{st.table->mutex};
      // The router created the entry; try_emplace only finds it (one key, one lookup).
      auto pos = st.table->entries.try_emplace(make_key(kind, id)).first;
      entry& e = pos->second;
      if (e.at_shard > 0) --e.at_shard;
      if (e.state == entry::phase::absent) {
        if (auto err = validate_call(st, kind, id)) {
          forget_if_unused(st, pos);
          return err;
        }
        e.kind = st.kinds->at(kind).get();
        e.key = &pos->first;
        spawn_host(self, e, id);
        touch(*st.table, e);
        enforce_cap(self);
      } else if (st.draining) {
        return make_error(errc::unavailable, "the node is shutting down");
      } else if (e.state == entry::phase::live) {
        touch(*st.table, e);
      }
      // Forward the caller's message as it is (same tuple, no copy).
      auto call = self->current_mailbox_element()->move_content_to_message();
      if (e.state == entry::phase::passivating) {
        auto rp = self->make_response_promise();
        e.work().buffered.emplace_back(rp, std::move(call));
        return rp;
      }
      return self->delegate(e.host, std::move(call));
    },
    [self](passivate_atom, const std::string& kind, const std::string& id) -> caf::result<bool> {
      auto& st = self->state;
      std::lock_guard<std::mutex> guard{st.table->mutex};
      auto found = st.table->entries.find(make_key(kind, id));
      if (found == st.table->entries.end() || found->second.state == entry::phase::absent) return false;
      auto rp = self->make_response_promise<bool>();
      found->second.work().passivation_waiters.emplace_back(rp);
      start_passivation(self, found->second, false);
      return rp;
    },
    [self](passivate_atom) -> caf::result<uint64_t> {
      auto& st = self->state;
      std::lock_guard<std::mutex> guard{st.table->mutex};
      st.draining = true;
      st.drained = 0;
      auto rp = self->make_response_promise<uint64_t>();
      st.drain_waiters.emplace_back(rp);
      for (auto& [key, e] : st.table->entries) start_passivation(self, e, true);
      finish_drain_if_done(st);
      return rp;
    },
    [self](stats_atom) { return self->state.stats; },
    [self](refuse_atom) {
      auto& st = self->state;
      auto found = st.by_host.find(caf::actor_cast<caf::actor_addr>(self->current_sender()));
      if (found == st.by_host.end()) return;
      std::lock_guard<std::mutex> guard{st.table->mutex};
      entry& e = *found->second;
      if (st.draining) {
        start_passivation(self, e, true);
        return;
      }
      e.state = entry::phase::live;
      touch(*st.table, e);
      auto pending = std::move(e.pending);
      if (!pending) return;
      for (auto& rp : pending->passivation_waiters) rp.deliver(false);
      for (auto& [rp, call] : pending->buffered) rp.delegate(e.host, std::move(call));
    },
    [self](ask_atom) {
      auto& st = self->state;
      auto found = st.by_host.find(caf::actor_cast<caf::actor_addr>(self->current_sender()));
      if (found == st.by_host.end()) return;
      std::lock_guard<std::mutex> guard{st.table->mutex};
      start_passivation(self, *found->second, true);
    },
    [self](sweep_atom) {
      {
        std::lock_guard<std::mutex> guard{self->state.table->mutex};
        sweep_idle(self);
      }
      self->delayed_send(self, self->state.options.idle_check_granularity, sweep_atom::value);
    },
  };
}

size_t shard_index(const std::string& kind, const std::string& id, size_t shards) {
  auto h = std::hash<std::string>{}(kind) * 31 + std::hash<std::string>{}(id);
  return h % shards;
}

// -- the router -----------------------------------------------------------------------------

/// The handle callers send calls to: not an actor with a mailbox but a function run in the
/// sender's context when a message is enqueued (like CAF's actor_pool). A call for a live id
/// with nothing of it waiting at the shard goes straight into the activation's mailbox: one
/// delivery, as with a plain actor. Any other call goes into the shard's mailbox, counted in
/// the entry's at_shard so later calls follow it there and per-sender order holds. Messages
/// other than calls go to the front actor; when the directory has stopped they are bounced to
/// their senders with errc::unavailable.
class directory_router final : public caf::monitorable_actor {
public:
  directory_router(caf::actor_config& cfg, std::vector<caf::actor> shards,
                   std::vector<std::shared_ptr<shard_table>> tables)
      : caf::monitorable_actor(cfg), shards_(std::move(shards)), tables_(std::move(tables)) {}

  const char* name() const override { return "triplane.directory_router"; }

  /// Called once by directory::start before the router is handed out. When the front stops
  /// (the directory stopped or failed), the router bounces everything with errc::unavailable.
  void bind_front(const caf::actor& front) {
    front_ = front.address();
    caf::actor_addr self_addr = address();
    front->attach_functor([self_addr] {
      if (auto self = caf::actor_cast<caf::strong_actor_ptr>(self_addr))
        static_cast<directory_router*>(caf::actor_cast<caf::abstract_actor*>(self))->mark_stopped();
    });
  }

  void mark_stopped() { stopped_.store(true, std::memory_order_release); }

  void enqueue(caf::mailbox_element_ptr what, caf::execution_unit* context) override {
    if (stopped_.load(std::memory_order_acquire)) {
      reject_request(what, make_error(errc::unavailable, "the actor directory has stopped; retry"), context);
      return;
    }
    auto& content = what->content();
    if (content.match_elements<call_atom, std::string, std::string, caf::message>()) {
      route_call(content.get_as<std::string>(1), content.get_as<std::string>(2), what, context);
      return;
    }
    if (auto front = caf::actor_cast<caf::strong_actor_ptr>(front_)) {
      front->enqueue(std::move(what), context);
      return;
    }
    reject_request(what, make_error(errc::unavailable, "the actor directory has stopped; retry"), context);
  }

private:
  void route_call(const std::string& kind, const std::string& id, caf::mailbox_element_ptr& what,
                  caf::execution_unit* context) {
    size_t index = shard_index(kind, id, shards_.size());
    auto& table = *tables_[index];
    thread_local std::string key;  // reused: no allocation per call
    key.clear();
    append_key(key, kind, id);
    std::lock_guard<std::mutex> guard{table.mutex};
    auto pos = table.entries.find(key);
    if (pos == table.entries.end()) {
      pos = table.entries.try_emplace(key).first;
    } else if (pos->second.state == entry::phase::live && pos->second.at_shard == 0) {
      touch(table, pos->second);
      pos->second.host->enqueue(std::move(what), context);
      return;
    }
    ++pos->second.at_shard;
    shards_[index]->enqueue(std::move(what), context);
  }

  std::vector<caf::actor> shards_;
  std::vector<std::shared_ptr<shard_table>> tables_;
  caf::actor_addr front_;  ///< weak: the front holds the router
  std::atomic<bool> stopped_{false};
};

directory_router& router_of(const caf::actor& router) {
  return *static_cast<directory_router*>(caf::actor_cast<caf::abstract_actor*>(router));
}

// -- the front ------------------------------------------------------------------------------

struct front_state {
  static inline const char* name = "triplane.directory";
  std::vector<caf::actor> shards;
  caf::actor router;
};

/// Asks every shard for a value and delivers the sum through `rp`.
template <class Atom, class Value, class Add>
void fan_out(caf::stateful_actor<front_state>* self, caf::typed_response_promise<Value> rp,
             Atom atom, Add add) {
  auto remaining = std::make_shared<size_t>(self->state.shards.size());
  auto total = std::make_shared<Value>();
  for (auto& shard : self->state.shards) {
    self->request(shard, caf::infinite, atom).then(
      [rp, remaining, total, add](Value& part) mutable {
        add(*total, part);
        if (--*remaining == 0) rp.deliver(*total);
      },
      [rp](caf::error& err) mutable { rp.deliver(std::move(err)); });
  }
}

caf::behavior directory_front(caf::stateful_actor<front_state>* self, std::vector<caf::actor> shards,
                              caf::actor router) {
  self->state.shards = std::move(shards);
  self->state.router = std::move(router);
  for (auto& shard : self->state.shards) self->link_to(shard);
  return {
    [self](call_atom, const std::string&, const std::string&, const caf::message&) {
      return self->delegate(self->state.router, self->current_mailbox_element()->move_content_to_message());
    },
    [self](passivate_atom atom, const std::string& kind, const std::string& id) {
      auto& shards = self->state.shards;
      return self->delegate(shards[shard_index(kind, id, shards.size())], atom, kind, id);
    },
    [self](passivate_atom atom) -> caf::result<uint64_t> {
      auto rp = self->make_response_promise<uint64_t>();
      fan_out(self, rp, atom, [](uint64_t& total, uint64_t part) { total += part; });
      return rp;
    },
    [self](stats_atom atom) -> caf::result<directory_stats> {
      auto rp = self->make_response_promise<directory_stats>();
      fan_out(self, rp, atom, [](directory_stats& total, const directory_stats& part) {
        total.live += part.live;
        total.activations += part.activations;
        total.passivations += part.passivations;
        total.failures += part.failures;
      });
      return rp;
    },
  };
}

caf::error validate_kinds(const std::vector<kind_spec>& kinds) {
  std::unordered_map<std::string, int> seen;
  for (auto& kind : kinds) {
    if (kind.name.empty()) return make_error(errc::invalid_argument, "an actor kind has an empty name");
    if (kind.name.size() > max_kind_bytes)
      return make_error(errc::invalid_argument, "actor kind name '" + kind.name.substr(0, 40) +
                                                  "...' is longer than 255 bytes");
    if (kind.name.find('\0') != std::string::npos)
      return make_error(errc::invalid_argument, "actor kind name contains a NUL byte");
    if (!kind.factory)
      return make_error(errc::invalid_argument, "actor kind '" + kind.name + "' has no factory");
    if (kind.idle_timeout.count() <= 0)
      return make_error(errc::invalid_argument, "actor kind '" + kind.name + "' has a non-positive idle timeout");
    if (++seen[kind.name] > 1)
      return make_error(errc::invalid_argument, "actor kind '" + kind.name + "' is declared twice");
  }
  return caf::none;
}

} // namespace

const caf::actor& directory::route(const std::string&, const std::string&) const { return router_; }

expected<directory> directory::start(caf::actor_system& system, storage::state_store& store,
                                      std::vector<kind_spec> kinds, directory_options options) {
  if (auto err = validate_kinds(kinds)) return err;
  if (!options.owner) options.owner = std::make_shared<local_placement>();
  if (options.idle_check_granularity.count() <= 0) options.idle_check_granularity = std::chrono::milliseconds{1000};
  auto table = std::make_shared<kind_table>();
  for (auto& kind : kinds) {
    auto level = kind.durability.value_or(options.default_durability);
    auto name = kind.name;
    table->emplace(std::move(name), std::make_shared<const kind_runtime>(kind_runtime{std::move(kind), level}));
  }
  size_t shard_count = options.shards;
  if (shard_count == 0) shard_count = std::max<size_t>(1, system.scheduler().num_workers());
  size_t per_shard = (options.max_live + shard_count - 1) / shard_count;
  directory result;
  std::vector<std::shared_ptr<shard_table>> tables;
  for (size_t i = 0; i < shard_count; ++i) {
    tables.push_back(std::make_shared<shard_table>());
    result.shards_.push_back(system.spawn(directory_shard, table, &store, options, per_shard, tables.back()));
  }
  caf::actor_config router_config;
  result.router_ = caf::make_actor<directory_router, caf::actor>(system.next_actor_id(), system.node(), &system,
                                                                 router_config, result.shards_, std::move(tables));
  result.front_ = system.spawn(directory_front, result.shards_, result.router_);
  router_of(result.router_).bind_front(result.front_);
  return result;
}

expected<uint64_t> directory::drain(caf::actor_system& system, std::chrono::milliseconds deadline) const {
  if (!front_) return uint64_t{0};
  caf::scoped_actor self{system};
  expected<uint64_t> result = make_error(errc::timeout, "passivating every actor took longer than " +
                                                          std::to_string(deadline.count()) + " ms");
  self->request(front_, deadline, passivate_atom::value)
    .receive([&](uint64_t count) { result = count; },
             [&](caf::error& err) {
               if (err != caf::sec::request_timeout) result = std::move(err);
             });
  return result;
}

expected<uint64_t> directory::stop(caf::actor_system& system, std::chrono::milliseconds deadline) {
  if (!front_) return uint64_t{0};
  auto result = drain(system, deadline);
  router_of(router_).mark_stopped();
  caf::scoped_actor self{system};
  for (auto& shard : shards_) self->send_exit(shard, caf::exit_reason::user_shutdown);
  self->send_exit(front_, caf::exit_reason::user_shutdown);
  front_ = nullptr;
  router_ = nullptr;
  shards_.clear();
  return result;
}

} // namespace triplane::runtime
