// How triplane errors travel in Cap'n Proto: an exception whose description contains
// "triplane:<code>: <message>" (see schemas/api.capnp). Shared by the server and the client.
#pragma once

#include <string>
#include <string_view>

#include <kj/exception.h>

#include "triplane/runtime/error.hpp"

namespace triplane::rpc::wire {

/// A kj exception carrying `code` and `message`; OVERLOADED for overloaded/limit_exceeded,
/// DISCONNECTED for unavailable, FAILED otherwise.
kj::Exception make_exception(errc code, std::string_view message);

/// The exception for a CAF error: ours keep their code; CAF's own become timeout
/// (request_timeout), unavailable (receiver down) or internal.
kj::Exception from_caf(const caf::error& err);

/// Throws make_exception(code, message).
[[noreturn]] void fail(errc code, std::string_view message);

/// The code named after "triplane:" in an exception description; errc::internal when absent
/// (an RPC-level failure), unavailable for a DISCONNECTED exception without a code.
errc code_of(const kj::Exception& e);

/// The person-readable part: the message after "triplane:<code>: ", else the description.
std::string message_of(const kj::Exception& e);

/// caf::error with the code and message of a kj exception (for the client library).
caf::error to_caf(const kj::Exception& e);

/// errc from its snake_case name; internal for an unknown name.
errc errc_from_name(std::string_view name);

} // namespace triplane::rpc::wire
