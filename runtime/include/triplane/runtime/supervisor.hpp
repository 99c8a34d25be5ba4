// Erlang/OTP-style supervision for CAF actors: a supervisor starts children from specs, restarts
// them by strategy with exponential backoff, escalates past a restart intensity, and shows its tree.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/meta/type_name.hpp>

#include "triplane/runtime/error.hpp"

namespace spdlog {
class logger;
} // namespace spdlog

namespace triplane::runtime {

/// Which siblings are restarted when one child fails (children are ordered by declaration;
/// dynamically started children come after the declared ones, in start order).
enum class restart_strategy : uint8_t {
  one_for_one = 0,   ///< only the failed child
  one_for_all = 1,   ///< every running child
  rest_for_one = 2,  ///< the failed child and every running child declared after it
};

/// When a child that exited is started again.
enum class restart_type : uint8_t {
  permanent = 0,  ///< always, whatever the exit reason
  transient = 1,  ///< only after an abnormal exit: not normal and not exit_reason::user_shutdown
  temporary = 2,  ///< never; the child is removed from the supervisor when it exits
};

/// What a child is, for the tree view (supervisors are asked for their own subtree).
enum class child_kind : uint8_t { worker = 0, supervisor = 1 };

/// Where a child is in its life cycle, as the supervisor sees it.
enum class child_status : uint8_t {
  running = 0,     ///< started; messages are routed to it
  restarting = 1,  ///< waiting for its restart backoff; routed messages get errc::unavailable
  stopping = 2,    ///< sent user_shutdown, waiting for it to exit (or to be killed)
  stopped = 3,     ///< not running and not scheduled (terminate_child, or a transient's clean exit)
};

/// Starts one child. Called by the supervisor on its own thread with itself as `parent`: spawn
/// with `parent->spawn(...)` and return the handle. The supervisor monitors the child (a link the
/// factory made is removed); should the supervisor end without stopping its children (killed with
/// exit_reason::kill), every child still alive gets an exit_msg with the supervisor's reason.
/// Throwing or returning an invalid handle fails the start (see supervisor_spec / start_child).
using child_factory = std::function<caf::actor(caf::local_actor* parent)>;

/// A shutdown timeout that never expires (Erlang's `infinity`): wait for the child however long
/// it takes. Use it for child supervisors, whose own children have finite timeouts.
constexpr std::chrono::milliseconds infinite_shutdown = std::chrono::milliseconds::max();

/// Declares one child. Copyable: the supervisor keeps it to restart the child.
struct child_spec {
  std::string id;       ///< unique among the supervisor's children, not empty
  child_factory start;  ///< must be set
  restart_type restart = restart_type::permanent;
  /// How long a graceful stop (exit_reason::user_shutdown) may take before the child is killed
  /// with exit_reason::kill. Zero kills at once; infinite_shutdown waits forever.
  std::chrono::milliseconds shutdown_timeout{5000};
  child_kind kind = child_kind::worker;
};

/// How a supervisor behaves.
struct supervisor_flags {
  std::string name = "supervisor";  ///< in logs and at the root of the tree view
  restart_strategy strategy = restart_strategy::one_for_one;
  /// Restart intensity: at most max_restarts automatic restarts within any sliding `period`.
  /// One more failure needing a restart makes the supervisor stop all its children (reverse order,
  /// their shutdown timeouts) and exit with errc::limit_exceeded ("... reached max restart
  /// intensity ..." naming the child), so that its own parent decides.
  uint32_t max_restarts = 3;
  std::chrono::milliseconds period{5000};
  /// Backoff before the k-th restart within the window: min(backoff_cap, backoff_base * 2^(k-1)).
  /// backoff_base 0 restarts immediately.
  std::chrono::milliseconds backoff_base{0};
  std::chrono::milliseconds backoff_cap{5000};
  /// The most the tree view takes to answer (see sup::tree_atom).
  std::chrono::milliseconds tree_timeout{1000};
  /// Where child exits, restarts and escalations are logged; null: spdlog's default logger.
  std::shared_ptr<spdlog::logger> logger;
};

/// A supervisor: its flags and its children in start order.
struct supervisor_spec {
  supervisor_flags flags;
  std::vector<child_spec> children;
};

/// One child as which_children reports it.
struct child_info {
  std::string id;
  caf::actor handle;  ///< the current incarnation; invalid unless status is running or stopping
  restart_type restart = restart_type::permanent;
  child_kind kind = child_kind::worker;
  child_status status = child_status::stopped;
  uint64_t restarts = 0;  ///< automatic restarts so far (restart_child does not count)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, child_info& x) {
  return f(caf::meta::type_name("triplane.child_info"), x.id, x.handle, x.restart, x.kind, x.status,
           x.restarts);
}

/// One node of the supervision tree. The root is the asked supervisor (name = its flags.name);
/// every other node is named by its child id. `note` explains an incomplete subtree, e.g. a child
/// supervisor that did not answer within tree_timeout.
struct tree_node {
  std::string name;
  child_kind kind = child_kind::worker;
  child_status status = child_status::running;
  uint64_t restarts = 0;
  std::string note;
  std::vector<tree_node> children;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, tree_node& x) {
  return f(caf::meta::type_name("triplane.tree_node"), x.name, x.kind, x.status, x.restarts, x.note,
           x.children);
}

/// The supervisor's messages. Errors are triplane errors (see error.hpp) unless stated.
namespace sup {
/// (route_atom, id, caf::message) -> whatever the child replies: `message` is delegated to the
/// child's current incarnation, which answers the original sender directly. Stable across
/// restarts. Errors: not_found (no such id); unavailable (child restarting in backoff, stopping or
/// stopped: messages are NOT buffered, the caller retries).
using route_atom = caf::atom_constant<caf::atom("sup_route")>;
/// (lookup_atom, id) -> caf::actor: the current incarnation. Errors: not_found, unavailable.
using lookup_atom = caf::atom_constant<caf::atom("sup_lookup")>;
/// (start_child_atom, child_spec) -> caf::actor: adds and starts a child after the existing ones.
/// Errors: invalid_argument (empty id, no factory), already_exists (id taken), unavailable
/// (supervisor shutting down, or the factory failed: the child is then not added).
using start_child_atom = caf::atom_constant<caf::atom("sup_start")>;
/// (terminate_child_atom, id) -> caf::ok_atom once the child has exited (graceful stop, killed
/// after its shutdown timeout). The spec stays (status stopped), except a temporary child's, which
/// is removed. A pending backoff restart is cancelled. Errors: not_found, unavailable (shutting down).
using terminate_child_atom = caf::atom_constant<caf::atom("sup_term")>;
/// (restart_child_atom, id) -> caf::actor: starts a stopped (or restarting) child now. Errors:
/// not_found, invalid_argument (child running or stopping), unavailable (factory failed or
/// shutting down).
using restart_child_atom = caf::atom_constant<caf::atom("sup_restrt")>;
/// (delete_child_atom, id) -> caf::ok_atom: removes a stopped child's spec. Errors: not_found,
/// invalid_argument (child running, stopping or restarting: terminate it first).
using delete_child_atom = caf::atom_constant<caf::atom("sup_delete")>;
/// (which_children_atom) -> std::vector<child_info>, in order.
using which_children_atom = caf::atom_constant<caf::atom("sup_which")>;
/// (tree_atom) -> tree_node: the whole tree below the supervisor, answered within tree_timeout.
/// Child supervisors are asked recursively with (tree_atom, int64_t budget_ms), three quarters of
/// the asker's budget (capped by their own tree_timeout), so a subtree that does not answer in
/// time is marked in its parent's node (tree_node::note) and the rest of the tree still arrives.
using tree_atom = caf::atom_constant<caf::atom("sup_tree")>;
} // namespace sup

/// The spec's own mistakes: an empty name, empty or duplicate child ids, missing factories,
/// negative shutdown timeouts, a period or tree_timeout that is not positive, backoff_cap below
/// backoff_base. errc::invalid_argument naming the culprit, or none. (max_restarts 0 is valid:
/// the first failure needing a restart escalates.)
caf::error validate(const supervisor_spec& spec);

/// Spawns a top-level supervisor, which starts the children in order. If a child fails to
/// start, the supervisor stops the ones already started (reverse order) and exits with
/// errc::unavailable naming the child. Stop it with exit_reason::user_shutdown (send_exit): it
/// stops its children in reverse order within their shutdown timeouts, then exits with that
/// reason (any other non-normal exit reason sent to it does the same, with that reason). Keep the
/// handle while it should run: CAF 0.17 ends an actor nobody references (exit_reason::unreachable).
/// Errors: validate()'s.
expected<caf::actor> spawn_supervisor(caf::actor_system& sys, supervisor_spec spec);

/// A child spec whose child is a supervisor (kind supervisor), so trees nest. An invalid `spec`
/// makes the factory fail, i.e. the start fails with validate()'s reason.
child_spec supervisor_child(std::string id, supervisor_spec spec,
                            restart_type restart = restart_type::permanent,
                            std::chrono::milliseconds shutdown_timeout = infinite_shutdown);

/// Asks `supervisor` for its tree, blocking the calling (non-actor) thread up to `timeout`.
/// Errors: the request's (sec::request_timeout, sec::request_receiver_down).
expected<tree_node> fetch_tree(caf::actor_system& sys, const caf::actor& supervisor,
                               std::chrono::milliseconds timeout);

/// Indented text, one node per line, two spaces per level:
///   "name (supervisor, running)" / "  child (worker, restarting, restarts 2)".
std::string render_tree(const tree_node& root);

/// Registers child_info and tree_node (and their vectors) under their names, so that the tree
/// and which_children can cross the network. Call on every node's config.
void register_supervision_types(caf::actor_system_config& cfg);

const char* to_string(restart_strategy x);
const char* to_string(restart_type x);
const char* to_string(child_kind x);
const char* to_string(child_status x);

} // namespace triplane::runtime

// child_spec carries a std::function: it travels in local messages (start_child) only.
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(triplane::runtime::child_spec)
