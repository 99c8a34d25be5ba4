// Construction and rendering of triplane::errc errors.
#include "triplane/runtime/error.hpp"

#include <caf/message.hpp>
#include <caf/sec.hpp>

namespace triplane {

caf::error make_error(errc code, std::string message) {
  return caf::error{static_cast<uint8_t>(code), error_category,
                    caf::make_message(std::move(message))};
}

errc code_of(const caf::error& err) {
  if (!err) return errc::ok;
  if (err.category() != error_category) return errc::internal;
  return static_cast<errc>(err.code());
}

const char* to_string(errc code) {
  switch (code) {
    case errc::ok: return "ok";
    case errc::not_found: return "not_found";
    case errc::already_exists: return "already_exists";
    case errc::permission_denied: return "permission_denied";
    case errc::invalid_argument: return "invalid_argument";
    case errc::limit_exceeded: return "limit_exceeded";
    case errc::timeout: return "timeout";
    case errc::overloaded: return "overloaded";
    case errc::corrupted: return "corrupted";
    case errc::stale_epoch: return "stale_epoch";
    case errc::io_error: return "io_error";
    case errc::unavailable: return "unavailable";
    case errc::internal: return "internal";
    case errc::cancelled: return "cancelled";
  }
  return "unknown";
}

std::string describe(const caf::error& err) {
  if (!err) return "ok";
  if (err.category() == error_category) {
    std::string out = to_string(static_cast<errc>(err.code()));
    const auto& ctx = err.context();
    if (ctx.size() == 1 && ctx.match_element<std::string>(0)) {
      out += ": ";
      out += ctx.get_as<std::string>(0);
    }
    return out;
  }
  if (err.category() == caf::atom("system")) {
    std::string out = "caf: ";
    out += caf::to_string(static_cast<caf::sec>(err.code()));
    if (!err.context().empty()) {
      out += " ";
      out += caf::to_string(err.context());
    }
    return out;
  }
  return caf::to_string(err);
}

} // namespace triplane
