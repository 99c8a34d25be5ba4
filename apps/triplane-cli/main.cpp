// triplane-cli: a command-line client for a Triplane node (uses triplane::client).
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "triplane/rpc/client.hpp"
#include "triplane/rpc/tokens.hpp"

namespace {

const char* usage_text = R"(usage: triplane-cli [--endpoint HOST:PORT|unix:PATH] [--token TOKEN] COMMAND ...

The endpoint and token default to $TRIPLANE_ENDPOINT (else 127.0.0.1:7400) and
$TRIPLANE_TOKEN. unix:PATH reaches a node started with `--listen-unix PATH` on this
host.

Session commands (add --create to create the session when it does not exist):
  session list [PREFIX] [--limit N]     the tenant's stored sessions (ids beginning with
                                        PREFIX), one per line in byte order; all of them, or
                                        the first N; opens none of them
  session exec ID [--create] [--timeout-ms N] [--cwd DIR] [--env NAME=VALUE]...
                  (-- PROGRAM ARGS... | --shell 'COMMAND LINE')
        runs a command; output streams live; exits with the command's exit code
        (128+N when killed by signal N)
  session ls ID [PATH] [--recursive]    list files
  session cat ID PATH                   print a file
  session put ID PATH [LOCAL_FILE]      upload LOCAL_FILE (default: stdin) to PATH
  session get ID PATH [LOCAL_FILE]      download PATH to LOCAL_FILE (default: stdout)
  session kv ID get KEY | put KEY VALUE | del KEY | ls [PREFIX]
  session fork ID NEW_ID                copy a session
  session rm ID                         destroy a session
  session info ID
Other commands:
  generate --tokens ID,ID,... [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]
           [--seed S] [--stop ID,...] [--model NAME]
        stream generated token ids (comma-separated; the node has no tokenizer)
  models                                the served model(s)
  stats                                 node stats, RPC metrics, inference worker counters
                                        (admin token)
  hash-token TENANT tenant|admin [TOKEN]
        prints a tokens-file line for TOKEN (a fresh random token when omitted, shown on
        stderr)

Exit status: the command's for `session exec`; 0 on success; 1 when the node answered with an
error (printed as "error: <code>: <message>"); 2 on a usage error.
)";

int usage(const std::string& why) {
  std::cerr << "triplane-cli: " << why << "\n\n" << usage_text;
  return 2;
}

/// Prints `err` (with `hint` when its code is `hint_for`) and returns the exit status 1.
int fail(const caf::error& err, triplane::errc hint_for = triplane::errc::ok, const char* hint = nullptr) {
  auto code = triplane::code_of(err);
  std::cerr << "error: " << triplane::describe(err);
  if (hint != nullptr && code == hint_for) std::cerr << " (" << hint << ")";
  if (code == triplane::errc::permission_denied) std::cerr << " (check TRIPLANE_TOKEN / --token)";
  std::cerr << "\n";
  return 1;
}

/// A failure to reach the node, or to open a session.
int fail_connect(const caf::error& err) {
  return fail(err, triplane::errc::unavailable, "is the node running and reachable?");
}
int fail_open(const caf::error& err) {
  return fail(err, triplane::errc::not_found, "use --create to create a session");
}

/// `text` as an unsigned decimal number of at most `max`; nullopt for anything else (a sign,
/// spaces, a suffix, hex, an empty string, a larger value): std::stoul would wrap "-1" and read
/// "5s" as 5, and a cast would cut 2^32 to 0, so the node would get another number than typed.
std::optional<uint64_t> parse_unsigned(const std::string& text, uint64_t max) {
  if (text.empty() || text.size() > 20) return std::nullopt;
  if (text.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  uint64_t v = 0;
  for (char c : text) {
    auto digit = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - digit) / 10) return std::nullopt;
    v = v * 10 + digit;
  }
  if (v > max) return std::nullopt;
  return v;
}

/// `text` as a whole floating-point number (the node validates its range); nullopt when
/// something is left over ("0.5x") or nothing is there.
std::optional<float> parse_float(const std::string& text) {
  if (text.empty() || std::isspace(static_cast<unsigned char>(text[0]))) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  float v = std::strtof(text.c_str(), &end);
  if (errno == ERANGE || end != text.c_str() + text.size()) return std::nullopt;
  return v;
}

struct args_view {
  std::vector<std::string> rest;
  size_t i = 0;
  bool empty() const { return i >= rest.size(); }
  std::string next() { return i < rest.size() ? rest[i++] : std::string{}; }
  const std::string& peek() const { return rest[i]; }
};

/// The node's connection, made at the first get(): every usage error is found (exit 2) before
/// the node is needed.
class lazy_connection {
public:
  lazy_connection(std::string endpoint, std::string token)
      : endpoint_(std::move(endpoint)), token_(std::move(token)) {}
  triplane::expected<triplane::client::connection*> get() {
    if (!conn_) {
      auto c = triplane::client::connection::connect(endpoint_, token_);
      if (!c) return c.error();
      conn_ = std::move(*c);
    }
    return conn_.get();
  }

private:
  std::string endpoint_, token_;
  std::unique_ptr<triplane::client::connection> conn_;
};

std::string read_all(std::istream& in) {
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

/// `session list [PREFIX] [--limit N]`: pages through the tenant's stored sessions.
int run_session_list(lazy_connection& lazy, args_view& a) {
  std::string prefix;
  std::optional<uint64_t> limit;
  bool have_prefix = false;
  while (!a.empty()) {
    auto x = a.next();
    if (x == "--limit") {
      limit = parse_unsigned(a.next(), UINT32_MAX);
      if (!limit || *limit == 0) return usage("--limit wants a number of sessions, 1.." + std::to_string(UINT32_MAX));
    } else if (x.rfind("--", 0) == 0) {
      return usage("session list: unknown option " + x);
    } else if (!have_prefix) {
      prefix = x;
      have_prefix = true;
    } else {
      return usage("session list [PREFIX] [--limit N]: unexpected argument '" + x + "'");
    }
  }
  auto conn = lazy.get();
  if (!conn) return fail_connect(conn.error());
  uint64_t printed = 0;
  std::string after;
  for (;;) {
    uint32_t page_size = 0;  // the node's page size
    if (limit) page_size = static_cast<uint32_t>(std::min<uint64_t>(*limit - printed, 1000));
    auto page = (*conn)->list_sessions(prefix, after, page_size);
    if (!page) return fail(page.error());
    for (const auto& id : page->ids) std::cout << id << "\n";
    printed += page->ids.size();
    if (!page->more || page->ids.empty() || (limit && printed >= *limit)) return 0;
    after = page->ids.back();
  }
}

int run_session(lazy_connection& lazy, args_view& a) {
  auto verb = a.next();
  if (verb == "list") return run_session_list(lazy, a);
  auto id = a.next();
  if (verb.empty() || id.empty()) return usage("session needs a verb and an id");
  // Options shared by the verbs; positional arguments are collected in order.
  bool create = false, recursive = false;
  triplane::client::exec_options exec;
  std::vector<std::string> pos;
  while (!a.empty()) {
    auto x = a.next();
    if (x == "--create") create = true;
    else if (x == "--recursive" || x == "-r") recursive = true;
    else if (x == "--timeout-ms") {
      auto ms = parse_unsigned(a.next(), UINT32_MAX);
      if (!ms)
        return usage("--timeout-ms wants a number of milliseconds, 0.." + std::to_string(UINT32_MAX));
      exec.timeout_ms = static_cast<uint32_t>(*ms);
    }
    else if (x == "--cwd") exec.cwd = a.next();
    else if (x == "--shell") exec.shell = a.next();
    else if (x == "--env") {
      auto kv = a.next();
      auto eq = kv.find('=');
      if (eq == std::string::npos || eq == 0) return usage("--env wants NAME=VALUE");
      exec.env.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
    } else if (x == "--") {
      while (!a.empty()) exec.argv.push_back(a.next());
    } else pos.push_back(x);
  }
  // Everything the verb needs is checked before the node is asked anything.
  static const std::set<std::string> verbs{"exec", "ls", "cat", "get", "put", "kv", "fork", "rm", "info"};
  if (!verbs.count(verb)) return usage("unknown session verb '" + verb + "'");
  if (verb == "exec" && exec.argv.empty() && exec.shell.empty())
    return usage("session exec needs -- PROGRAM ARGS... or --shell 'COMMAND'");
  if ((verb == "cat" || verb == "get" || verb == "put") && pos.empty())
    return usage("session " + verb + " needs a PATH");
  if (verb == "fork" && pos.empty()) return usage("session fork needs NEW_ID");
  if (verb == "kv") {
    const std::string op = pos.empty() ? "" : pos[0];
    bool fits = (op == "get" && pos.size() == 2) || (op == "put" && pos.size() == 3) ||
                (op == "del" && pos.size() == 2) || (op == "ls" && pos.size() <= 2);
    if (!fits) return usage("session kv: get KEY | put KEY VALUE | del KEY | ls [PREFIX]");
  }
  std::string put_data;
  if (verb == "put") {
    if (pos.size() > 1 && pos[1] != "-") {
      std::ifstream in{pos[1], std::ios::binary};
      if (!in) return usage("cannot read '" + pos[1] + "'");
      put_data = read_all(in);
    } else {
      put_data = read_all(std::cin);
    }
  }

  auto conn = lazy.get();
  if (!conn) return fail_connect(conn.error());
  auto s = (*conn)->open_session(id, create);
  if (!s) return fail_open(s.error());

  if (verb == "exec") {
    auto r = s->exec(exec, [](triplane::client::output_stream st, std::string_view chunk) {
      auto* f = st == triplane::client::output_stream::out ? stdout : stderr;
      fwrite(chunk.data(), 1, chunk.size(), f);
      fflush(f);
    });
    if (!r) return fail(r.error());
    if (r->truncated) std::cerr << "triplane-cli: output was truncated by the session's cap\n";
    if (r->signal != 0) return 128 + r->signal;
    return r->exit_code;
  }
  if (verb == "ls") {
    auto files = s->list_files(pos.empty() ? "" : pos[0], recursive);
    if (!files) return fail(files.error());
    for (const auto& f : *files)
      std::printf("%06o %10llu %s\n", f.mode, static_cast<unsigned long long>(f.size),
                  f.path.c_str());
    return 0;
  }
  if (verb == "cat" || verb == "get") {
    auto data = s->read_file(pos[0]);
    if (!data) return fail(data.error());
    if (verb == "get" && pos.size() > 1) {
      std::ofstream out{pos[1], std::ios::binary};
      if (!out) return usage("cannot write '" + pos[1] + "'");
      out << *data;
      out.close();
      if (!out) {
        std::cerr << "error: cannot write '" << pos[1] << "': " << std::strerror(errno) << "\n";
        return 1;
      }
    } else {
      fwrite(data->data(), 1, data->size(), stdout);
    }
    return 0;
  }
  if (verb == "put") {
    auto r = s->write_file(pos[0], put_data, true);
    return r ? 0 : fail(r.error());
  }
  if (verb == "kv") {
    const auto& op = pos[0];
    if (op == "get") {
      auto v = s->kv_get(pos[1]);
      if (!v) return fail(v.error());
      if (!*v) {
        std::cerr << "error: not_found: no key '" << pos[1] << "'\n";
        return 1;
      }
      std::cout << **v << "\n";
      return 0;
    }
    if (op == "put") {
      auto r = s->kv_put(pos[1], pos[2]);
      return r ? 0 : fail(r.error());
    }
    if (op == "del") {
      auto r = s->kv_delete(pos[1]);
      return r ? 0 : fail(r.error());
    }
    auto keys = s->kv_list(pos.size() > 1 ? pos[1] : "");  // ls
    if (!keys) return fail(keys.error());
    for (const auto& k : *keys) std::cout << k << "\n";
    return 0;
  }
  if (verb == "fork") {
    auto f = s->fork(pos[0]);
    return f ? 0 : fail(f.error());
  }
  if (verb == "rm") {
    auto r = s->destroy();
    return r ? 0 : fail(r.error());
  }
  if (verb == "info") {
    auto i = s->info();
    if (!i) return fail(i.error());
    std::cout << "id " << i->id << "\ncreated_unix_ms " << i->created_unix_ms
              << "\nlast_used_unix_ms " << i->last_used_unix_ms << "\nfiles " << i->file_count
              << "\nkv " << i->kv_count << "\nexecs " << i->exec_count << "\n";
    return 0;
  }
  return usage("unknown session verb '" + verb + "'");  // (checked above)
}

int run_stats(lazy_connection& lazy) {
  auto c = lazy.get();
  if (!c) return fail_connect(c.error());
  auto& conn = **c;
  auto st = conn.stats();
  if (!st) return fail(st.error());
  std::cout << "live actors        " << st->live_actors << "\n"
            << "activations total  " << st->activations_total << "\n"
            << "passivations total " << st->passivated_total << "\n"
            << "failures total     " << st->failures_total << "\n"
            << "open connections   " << st->open_connections << "\n"
            << "draining           " << (st->draining ? "yes" : "no") << "\n";
  auto m = conn.metrics();
  if (!m) return fail(m.error());
  std::printf("\n%-24s %10s %8s %9s %9s %9s %9s\n", "method", "calls", "errors", "p50 us",
              "p90 us", "p99 us", "max us");
  for (const auto& x : m->methods)
    std::printf("%-24s %10llu %8llu %9llu %9llu %9llu %9llu\n", x.method.c_str(),
                static_cast<unsigned long long>(x.calls),
                static_cast<unsigned long long>(x.errors),
                static_cast<unsigned long long>(x.p50_us),
                static_cast<unsigned long long>(x.p90_us),
                static_cast<unsigned long long>(x.p99_us),
                static_cast<unsigned long long>(x.max_us));
  std::cout << "\nerrors:";
  for (const auto& [code, n] : m->errors) std::cout << " " << code << "=" << n;
  std::cout << "\nconnections total " << m->connections_total << ", auth failures "
            << m->auth_failures << "\n";
  // Only on nodes that serve a model (unavailable otherwise: then nothing is printed).
  if (auto inf = conn.inference_stats()) {
    std::cout << "\ninference: running " << inf->running << ", queued " << inf->queued
              << ", tokens generated " << inf->tokens_generated << ", requests accepted "
              << inf->requests_accepted << ", completed " << inf->requests_completed
              << ", cancelled " << inf->requests_cancelled << ", rejected "
              << inf->requests_rejected << ", failed " << inf->requests_failed
              << ", preemptions " << inf->preemptions << ", KV blocks free "
              << inf->kv_blocks_free << "/" << inf->kv_blocks_total << "\n";
  }
  return 0;
}

int run(int argc, char** argv) {
  const char* env_endpoint = std::getenv("TRIPLANE_ENDPOINT");
  const char* env_token = std::getenv("TRIPLANE_TOKEN");
  std::string endpoint = env_endpoint ? env_endpoint : "127.0.0.1:7400";
  std::string token = env_token ? env_token : "";
  args_view a;
  for (int i = 1; i < argc; ++i) a.rest.emplace_back(argv[i]);
  while (!a.empty() && a.peek().rfind("--", 0) == 0) {
    auto x = a.next();
    if (x == "--endpoint") endpoint = a.next();
    else if (x == "--token") token = a.next();
    else if (x == "--help") {
      std::cout << usage_text;
      return 0;
    } else return usage("unknown option " + x);
  }
  if (a.empty()) return usage("no command");
  auto cmd = a.next();

  if (cmd == "hash-token") {
    auto tenant = a.next();
    auto role_name = a.next();
    auto clear = a.next();
    if (tenant.empty() || (role_name != "tenant" && role_name != "admin"))
      return usage("hash-token TENANT tenant|admin [TOKEN]");
    if (clear.empty()) {
      clear = triplane::rpc::generate_token();
      std::cerr << "token: " << clear << "\n";
    }
    auto rec = triplane::rpc::make_token_record(
      tenant, role_name == "admin" ? triplane::rpc::role::admin : triplane::rpc::role::tenant,
      clear);
    if (!rec) return fail(rec.error());
    std::cout << triplane::rpc::format_token_line(*rec) << "\n";
    return 0;
  }

  // A mistyped command is a usage error, also when the node cannot be reached.
  if (cmd != "session" && cmd != "stats" && cmd != "generate" && cmd != "models")
    return usage("unknown command '" + cmd + "'");
  if (token.empty()) return usage("no token: pass --token or set TRIPLANE_TOKEN");
  lazy_connection conn{endpoint, token};

  if (cmd == "session") return run_session(conn, a);
  if (cmd == "stats") {
    if (!a.empty()) return usage("stats takes no arguments");
    return run_stats(conn);
  }
  if (cmd == "generate") {
    triplane::client::generate_options g;
    auto ids = [](const std::string& text, std::vector<uint32_t>& out) {
      std::stringstream in{text};
      std::string part;
      while (std::getline(in, part, ',')) {
        if (part.empty() || part.find_first_not_of("0123456789") != std::string::npos ||
            part.size() > 10)
          return false;
        auto v = std::stoull(part);
        if (v > UINT32_MAX) return false;
        out.push_back(static_cast<uint32_t>(v));
      }
      return !out.empty();
    };
    auto bad_number = [](const std::string& option, const std::string& value) {
      return usage("generate: " + option + " has a bad value '" + value + "'");
    };
    while (!a.empty()) {
      auto x = a.next();
      if (x == "--model") {
        g.model = a.next();
      } else if (x == "--max-tokens" || x == "--top-k") {
        auto value = a.next();
        auto n = parse_unsigned(value, UINT32_MAX);
        if (!n) return bad_number(x, value);
        (x == "--max-tokens" ? g.max_tokens : g.top_k) = static_cast<uint32_t>(*n);
      } else if (x == "--seed") {
        auto value = a.next();
        auto n = parse_unsigned(value, UINT64_MAX);
        if (!n) return bad_number(x, value);
        g.seed = *n;
      } else if (x == "--temperature" || x == "--top-p") {
        auto value = a.next();
        auto f = parse_float(value);
        if (!f) return bad_number(x, value);
        (x == "--temperature" ? g.temperature : g.top_p) = *f;
      } else if (x == "--stop") {
        if (!ids(a.next(), g.stop_tokens)) return usage("--stop wants ID,ID,...");
      } else if (x == "--tokens") {
        if (!ids(a.next(), g.prompt_tokens)) return usage("--tokens wants ID,ID,...");
      } else {
        return usage("generate: unexpected argument '" + x
                     + "' (the prompt is --tokens ID,ID,...)");
      }
    }
    if (g.prompt_tokens.empty()) return usage("generate needs --tokens ID,ID,...");
    auto c = conn.get();
    if (!c) return fail_connect(c.error());
    bool first = true;
    auto r = (*c)->generate(g, [&first](const std::vector<uint32_t>& tokens) {
      for (auto t : tokens) {
        std::printf("%s%u", first ? "" : ",", t);
        first = false;
      }
      std::fflush(stdout);
    });
    if (!r) return fail(r.error());
    std::printf("\n");
    std::fprintf(stderr, "%u prompt tokens, %u generated, finish: %s, %.1f ms\n", r->prompt_tokens,
                 r->generated_tokens, r->finish_reason.c_str(), r->duration_us / 1000.0);
    return 0;
  }
  if (cmd == "models") {
    if (!a.empty()) return usage("models takes no arguments");
    auto c = conn.get();
    if (!c) return fail_connect(c.error());
    auto r = (*c)->list_models();
    if (!r) return fail(r.error());
    for (const auto& m : *r)
      std::printf("%s backend=%s parameters=%llu context=%u vocab=%u\n", m.name.c_str(),
                  m.backend.c_str(), static_cast<unsigned long long>(m.parameters),
                  m.context_length, m.vocab_size);
    return 0;
  }
  return usage("unknown command '" + cmd + "'");
}

/// `status`, unless what went to stdout could not all be written (a full disk, a closed
/// file): then 1 with a message, since the caller would otherwise take lost data for success.
int checked_stdout(int status) {
  std::cout.flush();
  if (std::fflush(stdout) == 0 && !std::ferror(stdout) && std::cout.good()) return status;
  std::cerr << "error: cannot write the output: " << std::strerror(errno) << "\n";
  return status == 0 ? 1 : status;
}

} // namespace

int main(int argc, char** argv) {
  try {
    return checked_stdout(run(argc, argv));
  } catch (const std::exception& e) {  // e.g. a number option that is not a number
    return usage(std::string("bad arguments: ") + e.what());
  }
}
