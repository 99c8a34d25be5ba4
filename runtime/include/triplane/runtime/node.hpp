// A Triplane node's core: the actor system, the state store under the data directory, the
// virtual-actor directory and the top-level supervision tree. Front ends (the RPC server) and
// planes (sessions, inference) attach to it.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <caf/fwd.hpp>

#include "triplane/runtime/directory.hpp"
#include "triplane/runtime/error.hpp"
#include "triplane/runtime/node_config.hpp"
#include "triplane/runtime/virtual_actor.hpp"

namespace triplane::runtime {

class node {
public:
  /// Opens the store at `options.data_dir`/state (created if missing), starts the actor system
  /// from `config` and the directory with `kinds` (each kind's idle timeout defaults to
  /// options.idle_timeout when it is zero). Errors: io_error when the store cannot be opened
  /// (e.g. another node holds its lock), invalid_argument for bad kinds.
  static expected<std::unique_ptr<node>> start(node_config& config, const node_options& options,
                                               std::vector<kind_spec> kinds = {});

  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  caf::actor_system& system();
  storage::state_store& store();
  const directory& actors() const;
  const node_options& options() const;

  /// The RPC port once a front end reported it (listen_port of the options until then).
  uint16_t listen_port() const;
  void set_listen_port(uint16_t port);

  /// The supervision tree as indented text (also logged at start).
  std::string supervision_tree() const;

  /// Passivates every live actor (pinned ones included) within `deadline`, stops the actors and
  /// flushes the store. Returns how many actors were passivated. Idempotent.
  expected<uint64_t> shutdown(std::chrono::milliseconds deadline);

private:
  node();
  struct impl;
  std::unique_ptr<impl> impl_;
};

} // namespace triplane::runtime
