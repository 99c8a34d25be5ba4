// A Triplane node's core: the actor system, the state store under the data directory, the
// virtual-actor directory and the top-level supervision tree. Front ends (the RPC server) and
// planes (sessions, inference) attach to it.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <caf/fwd.hpp>
#include <functional>

#include "triplane/runtime/directory.hpp"
#include "triplane/runtime/error.hpp"
#include "triplane/runtime/node_config.hpp"
#include "triplane/runtime/supervisor.hpp"
#include "triplane/runtime/virtual_actor.hpp"

namespace triplane::runtime {

class node {
public:
  /// What a plane adds to a node: actor kinds for the directory, and supervised children of the
  /// node's root supervisor (after the directory, e.g. an inference supervisor). Factories of
  /// kinds may capture what they need (e.g. the node's database, see database()).
  struct plane {
    std::vector<kind_spec> kinds;
    std::vector<child_spec> children;
  };

  /// Opens the database at `options.data_dir`/state (created if missing) with the state store's
  /// column families plus `column_families`, starts the actor system from `config`, then the
  /// root supervisor `triplane.node` (one_for_one) whose first child is the directory with every
  /// plane's kinds (a kind's idle timeout defaults to options.idle_timeout when zero), followed
  /// by the planes' children. `make_planes` runs once the database is open.
  /// Errors: io_error when the database cannot be opened (e.g. another node holds its lock),
  /// invalid_argument for bad kinds or children, and a child's start error.
  static expected<std::unique_ptr<node>> start(
    node_config& config, const node_options& options, std::vector<std::string> column_families = {},
    std::function<expected<std::vector<plane>>(node&)> make_planes = nullptr);

  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  caf::actor_system& system();
  storage::database& database();
  storage::state_store& store();

  /// The directory as it is now (it is recreated if its supervisor restarts it).
  directory actors() const;

  /// A stable handle that passes every message to the current directory's route() (see
  /// directory.hpp for its protocol) in the sender's context, without a hop of its own: hand it
  /// to front ends, it survives directory restarts. While the directory restarts, and after
  /// shutdown, requests are answered with errc::unavailable (retry).
  caf::actor directory_proxy() const;

  /// The root supervisor (`triplane.node`).
  caf::actor root_supervisor() const;
  const node_options& options() const;

  /// The RPC port once a front end reported it (listen_port of the options until then).
  uint16_t listen_port() const;
  void set_listen_port(uint16_t port);

  /// The supervision tree as indented text (also logged at start).
  std::string supervision_tree(std::chrono::milliseconds timeout = std::chrono::seconds{2}) const;

  /// Passivates every live actor (pinned ones included) within `deadline`, stops the actors and
  /// flushes the store. Returns how many actors were passivated. Idempotent.
  expected<uint64_t> shutdown(std::chrono::milliseconds deadline);

private:
  node();
  struct impl;
  std::unique_ptr<impl> impl_;
};

} // namespace triplane::runtime
