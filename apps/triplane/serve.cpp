// `triplane serve`: configuration, logging, the node's actors, and the signal-driven shutdown.
#include "serve.hpp"

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <pthread.h>
#include <sys/stat.h>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <spdlog/spdlog.h>

#include "triplane/actors/inference_protocol.hpp"
#include "triplane/actors/inference_worker.hpp"
#include "triplane/actors/session_host.hpp"
#include "triplane/actors/session_types.hpp"
#include "triplane/runtime/node.hpp"
#include "triplane/runtime/logging.hpp"
#include "triplane/runtime/node_config.hpp"
#include "triplane/rpc/server.hpp"
#include "triplane/rpc/tokens.hpp"

namespace triplane::app {
namespace {

/// The tokens the API accepts: the configured file, or DATA_DIR/tokens, created on first start
/// with an admin token and a "default" tenant token whose clear values are written once to
/// DATA_DIR/client-tokens (mode 0600) for the operator.
expected<std::vector<rpc::token_record>> load_or_create_tokens(const runtime::node_options& options) {
  if (!options.tokens_file.empty()) return rpc::load_tokens_file(options.tokens_file);
  auto dir = std::filesystem::path{options.data_dir};
  auto path = dir / "tokens";
  if (std::filesystem::exists(path)) return rpc::load_tokens_file(path.string());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  auto admin = rpc::generate_token();
  auto tenant = rpc::generate_token();
  auto admin_record = rpc::make_token_record("admin", rpc::role::admin, admin);
  if (!admin_record) return std::move(admin_record.error());
  auto tenant_record = rpc::make_token_record("default", rpc::role::tenant, tenant);
  if (!tenant_record) return std::move(tenant_record.error());
  auto clear_path = dir / "client-tokens";
  {
    // Clear tokens: readable by the owner only, written before the hashes so that a crash
    // never leaves hashes whose tokens nobody has.
    std::ofstream clear(clear_path, std::ios::trunc);
    ::chmod(clear_path.c_str(), 0600);
    clear << "# Clear API tokens of this node (keep secret). Use with TRIPLANE_TOKEN.\n"
          << "admin " << admin << "\n"
          << "default " << tenant << "\n";
    if (!clear) return make_error(errc::io_error, "cannot write " + clear_path.string());
  }
  std::ofstream hashes(path, std::ios::trunc);
  hashes << "# token <tenant> <tenant|admin> <salt-hex> <sha256-hex>\n"
         << rpc::format_token_line(*admin_record) << "\n"
         << rpc::format_token_line(*tenant_record) << "\n";
  if (!hashes) return make_error(errc::io_error, "cannot write " + path.string());
  spdlog::warn("created API tokens in {} (clear values in {}, mode 0600)", path.string(), clear_path.string());
  return std::vector<rpc::token_record>{*admin_record, *tenant_record};
}

} // namespace

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
  actors::inference::register_inference_types(config);

  // Planes that live beside the node core; declared before the node so they outlive it (the
  // node passivates their actors while stopping).
  std::unique_ptr<actors::session_host> sessions;
  auto make_planes = [&](runtime::node& n) -> expected<std::vector<runtime::node::plane>> {
    actors::session_host_options session_options;
    session_options.workspaces_dir = options->workspaces_dir;
    session_options.cgroup_parent = options->cgroup_parent;
    session_options.durability = options->durability;
    session_options.idle_timeout = options->idle_timeout;
    auto host = actors::session_host::create(n.database(), session_options);
    if (!host) return std::move(host.error());
    sessions = std::move(*host);
    runtime::node::plane session_plane;
    session_plane.kinds.push_back(sessions->kind());
    std::vector<runtime::node::plane> planes{std::move(session_plane)};
    if (!options->model_dir.empty()) {
      // The inference plane: a supervisor of one worker per GPU / tensor-parallel group.
      gpu::backend_options backend;
      backend.kind = options->inference_backend == "cuda" ? gpu::backend_kind::cuda : gpu::backend_kind::cpu;
      backend.tensor_parallel = options->tensor_parallel;
      backend.kv_cache_bytes = options->kv_cache_mb << 20;
      actors::inference::worker_options worker;
      auto child = actors::inference::worker_child_spec("worker-0", options->model_dir, backend, worker);
      if (!child) return std::move(child.error());
      runtime::supervisor_spec inference_spec;
      inference_spec.flags.name = "inference";
      inference_spec.flags.strategy = runtime::restart_strategy::one_for_one;
      inference_spec.flags.max_restarts = 5;
      inference_spec.flags.period = std::chrono::seconds{60};
      inference_spec.flags.backoff_base = std::chrono::milliseconds{500};
      inference_spec.flags.backoff_cap = std::chrono::seconds{30};
      inference_spec.children.push_back(std::move(*child));
      runtime::node::plane inference_plane;
      inference_plane.children.push_back(runtime::supervisor_child("inference", std::move(inference_spec)));
      planes.push_back(std::move(inference_plane));
    }
    return planes;
  };
  auto node = runtime::node::start(config, *options, actors::session_host::column_families(), make_planes);
  if (!node) {
    spdlog::critical("node failed to start: {}", describe(node.error()));
    return 1;
  }
  auto tokens = load_or_create_tokens(*options);
  if (!tokens) {
    spdlog::critical("API tokens: {}", describe(tokens.error()));
    return 1;
  }
  rpc::server_options server_options;
  server_options.host = options->listen_host;
  server_options.port = options->listen_port;
  server_options.unix_path = options->listen_unix;
  server_options.tokens = std::move(*tokens);
  server_options.limits.max_concurrent_calls_per_tenant = options->rpc_max_calls;
  server_options.limits.max_open_sessions_per_tenant = options->rpc_max_sessions;
  server_options.limits.max_stored_sessions_per_tenant = options->rpc_max_stored_sessions;
  // Lists and counts stored sessions for Tenant.listSessions and the stored-session limit.
  // Stopped with the server, before the node (and long before `sessions`, which it borrows).
  server_options.session_catalog = sessions->spawn_catalog((*node)->system());
  auto catalog = server_options.session_catalog;
  server_options.limits.call_deadline = options->rpc_call_deadline;
  server_options.limits.max_exec_output_buffer = options->rpc_exec_output_buffer;
  if (!options->model_dir.empty()) {
    // Through the root supervisor's routes, so that a restarted worker (or inference
    // supervisor) is reached without the RPC layer holding a stale handle.
    server_options.inference = (*node)->root_supervisor();
    server_options.inference_route = {"inference", "worker-0"};
  }
  auto* node_ptr = node->get();
  server_options.describe_supervision = [node_ptr] { return node_ptr->supervision_tree(std::chrono::milliseconds{500}); };
  auto server = rpc::rpc_server::start(std::move(server_options), (*node)->system(), (*node)->directory_proxy());
  if (!server) {
    caf::anon_send_exit(catalog, caf::exit_reason::user_shutdown);
    spdlog::critical("RPC server failed to start on {}:{}: {}", options->listen_host, options->listen_port,
                     describe(server.error()));
    return 1;
  }
  (*node)->set_listen_port((*server)->port());
  // Tests and scripts wait for this line; it names the bound address.
  std::string also_unix = options->listen_unix.empty() ? "" : " and unix:" + options->listen_unix;
  std::printf("triplane: serving on %s:%u%s (data in %s)\n", options->listen_host.c_str(),
              (*node)->listen_port(), also_unix.c_str(), options->data_dir.c_str());
  std::fflush(stdout);

  int signal_number = 0;
  sigwait(&shutdown_signals, &signal_number);
  spdlog::info("received {}: shutting down (deadline {} ms)", signal_number == SIGINT ? "SIGINT" : "SIGTERM",
               options->shutdown_timeout.count());
  // Stop taking work first: in-flight calls finish or are cancelled within the deadline.
  auto cancelled = (*server)->stop(options->shutdown_timeout / 2);
  if (cancelled > 0) spdlog::warn("cancelled {} in-flight calls at shutdown", cancelled);
  server->reset();
  // Its thread ends only once no handle is left: the actor system's shutdown waits for it.
  caf::anon_send_exit(catalog, caf::exit_reason::user_shutdown);
  catalog = nullptr;
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
