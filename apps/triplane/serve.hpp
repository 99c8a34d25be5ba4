// `triplane serve`: runs a node until SIGINT/SIGTERM.
#pragma once

#include <string>
#include <vector>

namespace triplane::app {

/// Runs the node with `args` (after "serve"); returns the process exit code.
int run_serve(const std::vector<std::string>& args);

} // namespace triplane::app
