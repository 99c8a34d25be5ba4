// Conversion between triplane::errc and Cap'n Proto exceptions.
#include "wire_errors.hpp"

#include <caf/error.hpp>
#include <caf/sec.hpp>

namespace triplane::rpc::wire {

kj::Exception make_exception(errc code, std::string_view message) {
  auto type = kj::Exception::Type::FAILED;
  if (code == errc::overloaded || code == errc::limit_exceeded)
    type = kj::Exception::Type::OVERLOADED;
  else if (code == errc::unavailable)
    type = kj::Exception::Type::DISCONNECTED;
  return kj::Exception(type, __FILE__, __LINE__,
                       kj::str("triplane:", to_string(code), ": ",
                               kj::StringPtr(std::string(message).c_str())));
}

kj::Exception from_caf(const caf::error& err) {
  if (err.category() == error_category) {
    auto text = describe(err);  // "<code>: <message>"
    auto colon = text.find(": ");
    auto message = colon == std::string::npos ? std::string{} : text.substr(colon + 2);
    return make_exception(triplane::code_of(err), message);
  }
  if (err.category() == caf::atom("system")) {
    switch (static_cast<caf::sec>(err.code())) {
      case caf::sec::request_timeout:
        return make_exception(errc::timeout, "the actor did not answer in time");
      case caf::sec::request_receiver_down:
        return make_exception(errc::unavailable, "the actor is gone; retry");
      case caf::sec::unexpected_message:
        return make_exception(errc::internal, "the actor did not understand the call");
      default: break;
    }
  }
  return make_exception(errc::internal, describe(err));
}

void fail(errc code, std::string_view message) {
  kj::throwFatalException(make_exception(code, message));
}

errc errc_from_name(std::string_view name) {
  for (int i = 0; i <= static_cast<int>(errc::cancelled); ++i)
    if (name == to_string(static_cast<errc>(i))) return static_cast<errc>(i);
  return errc::internal;
}

namespace {
constexpr std::string_view tag = "triplane:";
}

errc code_of(const kj::Exception& e) {
  std::string_view d{e.getDescription().cStr()};
  auto at = d.find(tag);
  if (at == std::string_view::npos)
    return e.getType() == kj::Exception::Type::DISCONNECTED ? errc::unavailable : errc::internal;
  auto rest = d.substr(at + tag.size());
  return errc_from_name(rest.substr(0, rest.find(':')));
}

std::string message_of(const kj::Exception& e) {
  std::string_view d{e.getDescription().cStr()};
  auto at = d.find(tag);
  if (at == std::string_view::npos) return std::string{d};
  auto rest = d.substr(at + tag.size());
  auto colon = rest.find(": ");
  return std::string{colon == std::string_view::npos ? rest : rest.substr(colon + 2)};
}

caf::error to_caf(const kj::Exception& e) {
  return make_error(code_of(e), message_of(e));
}

} // namespace triplane::rpc::wire
