// Triplane's error vocabulary: one enum for every layer, carried in a caf::error so that failures
// travel between actors and nodes as values. Light header: include it anywhere.
#pragma once

#include <cstdint>
#include <string>

#include <caf/atom.hpp>
#include <caf/error.hpp>
#include <caf/expected.hpp>

namespace triplane {

/// What went wrong, in terms a caller can act on. The numeric values travel on the wire:
/// never renumber, only append.
enum class errc : uint8_t {
  ok = 0,
  not_found = 1,          ///< the named object does not exist
  already_exists = 2,     ///< create asked for an object that exists
  permission_denied = 3,  ///< the caller may not do this
  invalid_argument = 4,   ///< the request itself is malformed
  limit_exceeded = 5,     ///< a configured quota or cap would be exceeded
  timeout = 6,            ///< a deadline passed
  overloaded = 7,         ///< no capacity now; retry later
  corrupted = 8,          ///< stored data failed validation
  stale_epoch = 9,        ///< a write from an activation that is no longer the owner
  io_error = 10,          ///< the OS or the storage engine failed
  unavailable = 11,       ///< the component is shutting down or not started
  internal = 12,          ///< a bug: the message says what invariant broke
  cancelled = 13,         ///< the caller or shutdown cancelled the work
};

/// The category atom under which triplane errors live inside caf::error.
constexpr caf::atom_value error_category = caf::atom("triplane");

/// A caf::error with our code and a message a person can act on.
caf::error make_error(errc code, std::string message);

/// The code of `err` when it is one of ours; errc::internal for foreign errors, ok for none.
errc code_of(const caf::error& err);

/// "not_found", "stale_epoch", ...
const char* to_string(errc code);

/// Human-readable text of any caf::error: "not_found: session 'a' does not exist" for ours,
/// CAF's own rendering for system errors.
std::string describe(const caf::error& err);

template <class T>
using expected = caf::expected<T>;

} // namespace triplane
