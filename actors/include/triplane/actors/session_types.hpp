// Registers the session protocol's message types with a CAF actor system config. Every node
// (and every RPC front end) must call it so the types carry the same names on the wire.
#pragma once

#include <caf/fwd.hpp>

namespace triplane::actors {

/// Adds every type of session_protocol.hpp (and the vectors replies use) to `cfg`.
void add_session_message_types(caf::actor_system_config& cfg);

} // namespace triplane::actors
