// triplane-generate: the `triplane generate` command as a standalone program (until the main
// `triplane` executable dispatches to run_generate_command).
#include <iostream>

#include "triplane/gpu/generate.hpp"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return triplane::gpu::run_generate_command(args, std::cout, std::cerr);
}
