// Entry point of the `triplane` executable: dispatches to its subcommands.
#include <cstdio>
#include <string>
#include <vector>

#include <iostream>

#include "serve.hpp"
#include "triplane/gpu/generate.hpp"
#include "triplane/rpc/tokens.hpp"

namespace {

const char* usage = R"(Usage: triplane COMMAND [OPTIONS]

Commands:
  serve      run a node (triplane serve --help)
  generate   run the inference engine on a model directory (triplane generate --help)
  token      make an API token for a tenant (triplane token --help)
  version    print the version

Run `triplane COMMAND --help` for a command's options.
)";

const char* token_usage = R"(Usage: triplane token --tenant NAME [--role tenant|admin]

Makes a fresh API token. Prints two lines: the clear token (give it to the client, e.g. as
TRIPLANE_TOKEN) and the record to append to the node's tokens file (it holds only a salted
SHA-256 hash of the token).
)";

int run_token(const std::vector<std::string>& args) {
  std::string tenant;
  auto who = triplane::rpc::role::tenant;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--help" || args[i] == "-h") {
      std::fputs(token_usage, stdout);
      return 0;
    }
    if (i + 1 >= args.size()) {
      std::fprintf(stderr, "triplane token: %s needs a value\n\n%s", args[i].c_str(), token_usage);
      return 2;
    }
    if (args[i] == "--tenant") {
      tenant = args[++i];
    } else if (args[i] == "--role") {
      auto r = args[++i];
      if (r == "admin") who = triplane::rpc::role::admin;
      else if (r == "tenant") who = triplane::rpc::role::tenant;
      else {
        std::fprintf(stderr, "triplane token: unknown role '%s' (use tenant or admin)\n", r.c_str());
        return 2;
      }
    } else {
      std::fprintf(stderr, "triplane token: unknown option '%s'\n\n%s", args[i].c_str(), token_usage);
      return 2;
    }
  }
  if (tenant.empty()) {
    std::fprintf(stderr, "triplane token: --tenant is required\n\n%s", token_usage);
    return 2;
  }
  auto token = triplane::rpc::generate_token();
  auto record = triplane::rpc::make_token_record(tenant, who, token);
  if (!record) {
    std::fprintf(stderr, "triplane token: %s\n", triplane::describe(record.error()).c_str());
    return 2;
  }
  std::printf("%s\n%s\n", token.c_str(), triplane::rpc::format_token_line(*record).c_str());
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(usage, stderr);
    return 2;
  }
  std::string command = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  if (command == "serve") return triplane::app::run_serve(args);
  if (command == "token") return run_token(args);
  if (command == "generate") return triplane::gpu::run_generate_command(args, std::cout, std::cerr);
  if (command == "version" || command == "--version") {
    std::puts("triplane 0.1.0");
    return 0;
  }
  if (command == "help" || command == "--help" || command == "-h") {
    std::fputs(usage, stdout);
    return 0;
  }
  std::fprintf(stderr, "triplane: unknown command '%s'\n\n%s", command.c_str(), usage);
  return 2;
}
