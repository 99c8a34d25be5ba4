// `triplane serve`: configuration, logging, the node's actors, and the signal-driven shutdown.
#include "serve.hpp"

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <pthread.h>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <spdlog/spdlog.h>

#include "triplane/actors/session_host.hpp"
#include "triplane/actors/session_types.hpp"
#include "triplane/runtime/node.hpp"
#include "triplane/runtime/logging.hpp"
#include "triplane/runtime/node_config.hpp"

namespace triplane::app {

int run_serve(const std::vector<std::string>& args) {
  runtime::node_config config;
  if (auto err = config.parse_serve_args(args)) {
    std::fprintf(stderr, "triplane serve: %s\n", describe(err).c_str());
    return 2;
  }
  if (config.help_requested) {
    std::fputs(runtime::node_config::serve_help().c_str(), stdout);
    return 0;
  }
  auto options = config.options();
  if (!options) {
    std::fprintf(stderr, "triplane serve: %s\n", describe(options.error()).c_str());
    return 2;
  }
  if (auto err = runtime::setup_logging(options->log_level, options->log_format)) {
    std::fprintf(stderr, "triplane serve: %s\n", describe(err).c_str());
    return 2;
  }

  // Block the shutdown signals in every thread (threads inherit the mask), then wait for them
  // in this one: no async-signal-safety concerns, and no CAF thread ever sees them.
  sigset_t shutdown_signals;
  sigemptyset(&shutdown_signals);
  sigaddset(&shutdown_signals, SIGINT);
  sigaddset(&shutdown_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &shutdown_signals, nullptr);

  actors::add_session_message_types(config);
  runtime::register_supervision_types(config);

  // Planes that live beside the node core; declared before the node so they outlive it (the
  // node passivates their actors while stopping).
  std::unique_ptr<actors::session_host> sessions;
  auto make_planes = [&](runtime::node& n) -> expected<std::vector<runtime::node::plane>> {
    actors::session_host_options session_options;
    session_options.workspaces_dir = (std::filesystem::path{options->data_dir} / "workspaces").string();
    session_options.durability = options->durability;
    session_options.idle_timeout = options->idle_timeout;
    auto host = actors::session_host::create(n.database(), session_options);
    if (!host) return std::move(host.error());
    sessions = std::move(*host);
    runtime::node::plane session_plane;
    session_plane.kinds.push_back(sessions->kind());
    return std::vector<runtime::node::plane>{std::move(session_plane)};
  };
  auto node = runtime::node::start(config, *options, actors::session_host::column_families(), make_planes);
  if (!node) {
    spdlog::critical("node failed to start: {}", describe(node.error()));
    return 1;
  }
  // Tests and scripts wait for this line; it names the bound address.
  std::printf("triplane: serving on %s:%u (data in %s)\n", options->listen_host.c_str(),
              (*node)->listen_port(), options->data_dir.c_str());
  std::fflush(stdout);

  int signal_number = 0;
  sigwait(&shutdown_signals, &signal_number);
  spdlog::info("received {}: shutting down (deadline {} ms)", signal_number == SIGINT ? "SIGINT" : "SIGTERM",
               options->shutdown_timeout.count());
  auto drained = (*node)->shutdown(options->shutdown_timeout);
  node->reset();
  if (!drained) {
    spdlog::error("shutdown incomplete: {}", describe(drained.error()));
    return 1;
  }
  spdlog::info("stopped cleanly: {} actors passivated", *drained);
  return 0;
}

} // namespace triplane::app
