// Parsing and validation of `triplane serve` options through CAF's config machinery.
#include "triplane/runtime/node_config.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <caf/all.hpp>

namespace triplane::runtime {
namespace {

/// Flags of our own that take a value, mapped to their CAF config keys.
struct flag_mapping {
  const char* flag;
  const char* key;
};
constexpr flag_mapping serve_flags[] = {
  {"--data-dir", "triplane.data-dir"},
  {"--listen", "triplane.listen"},
  {"--listen-unix", "triplane.listen-unix"},
  {"--log-level", "triplane.log-level"},
  {"--log-format", "triplane.log-format"},
  {"--tokens", "triplane.tokens-file"},
  {"--model", "triplane.model"},
};

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

/// CAF reads string options as string literals in INI syntax; quote plain CLI values so that
/// paths with dots, colons or slashes survive.
std::string quote(const std::string& value) {
  std::string out = "\"";
  for (char c : value) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  out += '"';
  return out;
}

} // namespace

node_config::node_config() {
  opt_group{custom_options_, "triplane"}
    .add(data_dir_, "data-dir", "directory for RocksDB and sandbox workspaces")
    .add(listen_, "listen", "RPC API address HOST:PORT (port 0 picks a free port)")
    .add(listen_unix_, "listen-unix", "also serve the RPC API on this Unix-domain socket path")
    .add(log_level_, "log-level", "trace|debug|info|warn|error|critical|off")
    .add(log_format_, "log-format", "text|json (JSON lines)")
    .add(durability_, "durability", "process-crash (WAL, no fsync) | power-loss (fsync)")
    .add(max_live_, "max-live", "live virtual actors per node before LRU passivation")
    .add(idle_timeout_, "idle-timeout", "default idle time before an actor passivates")
    .add(shutdown_timeout_, "shutdown-timeout", "deadline for draining at SIGINT/SIGTERM")
    .add(tokens_file_, "tokens-file", "API tokens file (default DATA_DIR/tokens, created if missing)")
    .add(workspaces_dir_, "workspaces-dir", "sandbox workspaces, a cache of the store (default DATA_DIR/workspaces)")
    .add(cgroup_parent_, "cgroup-parent", "cgroup v2 directory delegated to the node for its commands' groups")
    .add(model_dir_, "model", "Llama model directory served by the inference plane (none: no inference)")
    .add(inference_backend_, "inference-backend", "cpu|cuda")
    .add(tensor_parallel_, "tensor-parallel", "ranks of the inference worker's tensor-parallel group")
    .add(kv_cache_mb_, "kv-cache-mb", "KV-cache budget per rank in MiB")
    .add(rpc_max_calls_, "rpc-max-calls", "RPC calls in flight per tenant (beyond: overloaded)")
    .add(rpc_max_sessions_, "rpc-max-sessions", "RPC Session capabilities held per tenant")
    .add(rpc_max_stored_sessions_, "rpc-max-stored-sessions",
         "sessions a tenant may have stored (beyond, creating one is limit_exceeded)")
    .add(rpc_call_deadline_, "rpc-call-deadline", "deadline of an RPC call (not exec/generate)")
    .add(rpc_exec_output_buffer_, "rpc-exec-output-buffer",
         "flow-control window of a streamed exec: bytes of output held for a slow RPC client; "
         "the command then waits on its pipe");
  // A node on a small machine should not spin up more scheduler threads than cores.
  set("scheduler.max-threads", std::max(2u, std::thread::hardware_concurrency()));
  set("logger.verbosity", caf::atom("quiet"));
}

std::string node_config::serve_help() {
  return R"(Usage: triplane serve [OPTIONS]

Starts a Triplane node: the virtual-actor runtime, its RocksDB store and the RPC API.
SIGINT or SIGTERM shut it down cleanly (stop accepting work, drain within the shutdown
timeout, passivate every live actor, close the store, exit 0).

Options (flags override the config file; `--opt value` and `--opt=value` both work):
  --config FILE          read settings from FILE (CAF's INI format, see below)
  --data-dir DIR         state directory (default ./data); RocksDB lives in DIR/state
  --listen HOST:PORT     RPC API address (default 127.0.0.1:7400; port 0 = any free port)
  --listen-unix PATH     also serve the RPC API on a Unix-domain socket at PATH, for clients
                         on this host (they connect to unix:PATH); a stale socket there is
                         replaced, any other file refuses the start; removed at shutdown
  --tokens FILE          API tokens (salted hashes; see `triplane token --help`). Default:
                         DATA_DIR/tokens, created on first start with an admin token and a
                         token of tenant "default", whose clear values go to
                         DATA_DIR/client-tokens (mode 0600)
  --model DIR            serve this Hugging Face Llama directory (config.json + safetensors)
                         with a supervised inference worker; none by default
  --log-level LEVEL      trace, debug, info (default), warn, error, critical or off
  --log-format FORMAT    text (default) or json (one JSON object per line on stderr)
  --triplane.KEY=VALUE   any key of the [triplane] section below
  --scheduler.max-threads=N   CAF worker threads (default: number of cores, at least 2)
  -h, --help             print this text

Config file keys ([triplane] section; CAF's own sections such as [scheduler] also work):
  data-dir="./data"          listen="127.0.0.1:7400"     listen-unix="" (none)
  log-level="info"           log-format="text"
  durability="process-crash" (WAL without fsync; survives a killed process) or
             "power-loss"    (fsync before acknowledging; survives losing the page cache)
  max-live=100000            live virtual actors before least-recently-used passivation
  idle-timeout=30s           default idle time before an actor passivates
  shutdown-timeout=10s       drain deadline at SIGINT/SIGTERM
  tokens-file="node.tokens"  API tokens file (see --tokens)
  model="/models/llama"      see --model
  inference-backend="cpu"    cpu or cuda (cuda needs a CUDA build and a GPU)
  tensor-parallel=1          ranks of the inference worker (CUDA: GPUs 0..N-1)
  kv-cache-mb=256            KV-cache budget per rank
  workspaces-dir=""          sandbox workspaces (default DATA_DIR/workspaces): a cache of the
                             store, deleted and rebuilt freely; a tmpfs makes the first exec
                             after a session wakes cheaper (100 files: 1.5 ms vs 3-23 ms on ext4)
  cgroup-parent=""           a cgroup v2 directory delegated to the node (no processes in it):
                             each command's group is made there. Default: the node's own group
                             when the node is alone in it (it moves into a leaf child), else
                             cgroup v1, else rlimits (no process limit). The log says which.
  rpc-max-calls=512          RPC calls in flight per tenant; beyond: `overloaded`
  rpc-max-sessions=1024      Session capabilities a tenant holds at once; beyond:
                             `limit_exceeded`
  rpc-max-stored-sessions=100000  sessions a tenant has stored (created, not destroyed);
                             creating or forking one more is `limit_exceeded` until the
                             tenant destroys one
  rpc-call-deadline=10s      deadline of one RPC call (exec and generate have their own)
  rpc-exec-output-buffer=8388608  flow-control window of a streamed exec: the most output held
                             for a client that reads slower than the command writes; the
                             command then waits on its pipe (until the client reads, its
                             timeout, or a disconnect cancels it)
)";
}

caf::error node_config::parse_serve_args(const std::vector<std::string>& args) {
  std::vector<std::string> caf_args;
  std::string config_path;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto& arg = args[i];
    if (arg == "-h" || arg == "--help") {
      help_requested = true;
      return caf::none;
    }
    auto take_value = [&](const std::string& flag, std::string& out) -> caf::error {
      if (arg == flag) {
        if (i + 1 >= args.size() || starts_with(args[i + 1], "--"))
          return make_error(errc::invalid_argument, flag + " needs a value");
        out = args[++i];
      } else {
        out = arg.substr(flag.size() + 1);
      }
      if (out.empty()) return make_error(errc::invalid_argument, flag + " needs a non-empty value");
      return caf::none;
    };
    auto matches = [&](const char* flag) {
      std::string f = flag;
      return arg == f || starts_with(arg, f + "=");
    };
    if (matches("--config")) {
      if (auto err = take_value("--config", config_path)) return err;
      continue;
    }
    bool mapped = false;
    for (auto& m : serve_flags) {
      if (matches(m.flag)) {
        std::string value;
        if (auto err = take_value(m.flag, value)) return err;
        caf_args.push_back(std::string{"--"} + m.key + "=" + quote(value));
        mapped = true;
        break;
      }
    }
    if (mapped) continue;
    if (starts_with(arg, "--") && arg.find('.') != std::string::npos && arg.find('=') != std::string::npos) {
      caf_args.push_back(arg);
      continue;
    }
    return make_error(errc::invalid_argument, "unknown option '" + arg + "' (see triplane serve --help)");
  }
  std::stringstream ini;
  if (!config_path.empty()) {
    std::ifstream file(config_path);
    if (!file) return make_error(errc::not_found, "cannot read config file '" + config_path + "'");
    ini << file.rdbuf();
    config_file_ = config_path;
  }
  if (auto err = parse(caf_args, ini))
    return make_error(errc::invalid_argument,
                      "invalid configuration" +
                        (config_path.empty() ? std::string{} : " in '" + config_path + "'") + ": " +
                        caf::to_string(err));
  if (!remainder.empty())
    return make_error(errc::invalid_argument, "unknown option '" + remainder.front() + "'");
  return caf::none;
}

caf::error parse_host_port(const std::string& text, std::string& host, uint16_t& port) {
  auto bad = [&](const std::string& why) {
    return make_error(errc::invalid_argument, "invalid address '" + text + "': " + why + " (expected HOST:PORT)");
  };
  auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) return bad("no host or port");
  std::string h = text.substr(0, colon);
  std::string p = text.substr(colon + 1);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  if (h.empty()) return bad("empty host");
  if (p.empty() || p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos)
    return bad("port is not a number");
  auto value = std::stoul(p);
  if (value > 65535) return bad("port is above 65535");
  host = h;
  port = static_cast<uint16_t>(value);
  return caf::none;
}

expected<node_options> node_config::options() const {
  node_options out;
  if (data_dir_.empty()) return make_error(errc::invalid_argument, "data-dir is empty");
  out.data_dir = data_dir_;
  if (auto err = parse_host_port(listen_, out.listen_host, out.listen_port)) return err;
  if (listen_unix_.size() >= 108)  // sockaddr_un::sun_path, NUL included
    return make_error(errc::invalid_argument, "listen-unix path '" + listen_unix_ + "' is longer than 107 bytes");
  if (listen_unix_.find('\0') != std::string::npos)
    return make_error(errc::invalid_argument, "listen-unix path contains a NUL byte");
  out.listen_unix = listen_unix_;
  static const char* levels[] = {"trace", "debug", "info", "warn", "error", "critical", "off"};
  if (std::find(std::begin(levels), std::end(levels), log_level_) == std::end(levels))
    return make_error(errc::invalid_argument, "unknown log level '" + log_level_ +
                                                "' (use trace, debug, info, warn, error, critical or off)");
  out.log_level = log_level_;
  if (log_format_ != "text" && log_format_ != "json")
    return make_error(errc::invalid_argument, "unknown log format '" + log_format_ + "' (use text or json)");
  out.log_format = log_format_;
  if (durability_ == "process-crash")
    out.durability = storage::durability::process_crash;
  else if (durability_ == "power-loss")
    out.durability = storage::durability::power_loss;
  else
    return make_error(errc::invalid_argument, "unknown durability '" + durability_ +
                                                "' (use process-crash or power-loss)");
  if (max_live_ == 0) return make_error(errc::invalid_argument, "max-live must be at least 1");
  out.max_live_actors = max_live_;
  out.idle_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(idle_timeout_);
  if (out.idle_timeout.count() <= 0) return make_error(errc::invalid_argument, "idle-timeout must be positive");
  out.shutdown_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(shutdown_timeout_);
  if (out.shutdown_timeout.count() <= 0)
    return make_error(errc::invalid_argument, "shutdown-timeout must be positive");
  out.config_file = config_file_;
  out.tokens_file = tokens_file_;
  out.model_dir = model_dir_;
  if (!cgroup_parent_.empty() && cgroup_parent_.front() != '/')
    return make_error(errc::invalid_argument, "cgroup-parent must be an absolute path (e.g. /sys/fs/cgroup/triplane)");
  out.cgroup_parent = cgroup_parent_;
  out.workspaces_dir = workspaces_dir_.empty() ? (std::filesystem::path{data_dir_} / "workspaces").string()
                                               : workspaces_dir_;
  if (inference_backend_ != "cpu" && inference_backend_ != "cuda")
    return make_error(errc::invalid_argument, "unknown inference-backend '" + inference_backend_ + "' (use cpu or cuda)");
  out.inference_backend = inference_backend_;
  if (tensor_parallel_ < 1 || tensor_parallel_ > 64)
    return make_error(errc::invalid_argument, "tensor-parallel must be between 1 and 64");
  out.tensor_parallel = tensor_parallel_;
  if (kv_cache_mb_ < 1) return make_error(errc::invalid_argument, "kv-cache-mb must be at least 1");
  out.kv_cache_mb = kv_cache_mb_;
  if (rpc_max_calls_ < 1 || rpc_max_calls_ > 1000000)
    return make_error(errc::invalid_argument, "rpc-max-calls must be between 1 and 1000000");
  out.rpc_max_calls = static_cast<uint32_t>(rpc_max_calls_);
  if (rpc_max_sessions_ < 1 || rpc_max_sessions_ > 1000000)
    return make_error(errc::invalid_argument, "rpc-max-sessions must be between 1 and 1000000");
  out.rpc_max_sessions = static_cast<uint32_t>(rpc_max_sessions_);
  if (rpc_max_stored_sessions_ < 1 || rpc_max_stored_sessions_ > 100000000)
    return make_error(errc::invalid_argument,
                      "rpc-max-stored-sessions must be between 1 and 100000000");
  out.rpc_max_stored_sessions = static_cast<uint32_t>(rpc_max_stored_sessions_);
  out.rpc_call_deadline = std::chrono::duration_cast<std::chrono::milliseconds>(rpc_call_deadline_);
  if (out.rpc_call_deadline.count() <= 0)
    return make_error(errc::invalid_argument, "rpc-call-deadline must be positive");
  if (rpc_exec_output_buffer_ < 65536)
    return make_error(errc::invalid_argument, "rpc-exec-output-buffer must be at least 65536");
  out.rpc_exec_output_buffer = rpc_exec_output_buffer_;
  return out;
}

} // namespace triplane::runtime
