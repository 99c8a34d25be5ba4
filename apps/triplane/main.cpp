// Entry point of the `triplane` executable: dispatches to its subcommands.
#include <cstdio>
#include <string>
#include <vector>

#include <iostream>

#include "serve.hpp"
#include "triplane/gpu/generate.hpp"

namespace {

const char* usage = R"(Usage: triplane COMMAND [OPTIONS]

Commands:
  serve      run a node (triplane serve --help)
  generate   run the inference engine on a model directory (triplane generate --help)
  version    print the version

Run `triplane COMMAND --help` for a command's options.
)";

} // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(usage, stderr);
    return 2;
  }
  std::string command = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  if (command == "serve") return triplane::app::run_serve(args);
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
