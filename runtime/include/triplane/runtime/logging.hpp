// Process-wide logging through spdlog: text or JSON lines on stderr.
#pragma once

#include <string>

#include "triplane/runtime/error.hpp"

namespace triplane::runtime {

/// Configures spdlog's default logger: level (trace|debug|info|warn|error|critical|off) and
/// format ("text" or "json": one object per line with time, level, thread, msg). Errors:
/// invalid_argument naming the bad value; the logger is unchanged then.
caf::error setup_logging(const std::string& level, const std::string& format);

/// Escapes `text` for use inside a JSON string literal.
std::string json_escape(const std::string& text);

} // namespace triplane::runtime
