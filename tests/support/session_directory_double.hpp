// TEST DOUBLE of the node's directory for RPC tests and benchmarks: one CAF actor answering
// `(call_atom, "session", id, msg)` with in-memory sessions that speak
// triplane/rpc/session_calls.hpp. It is not the runtime's directory and its "exec" runs no
// process: it interprets a few fake commands (below) so the RPC path can be exercised.
//
// Fake commands (argv):
//   echo ARGS...         stdout "ARGS...\n", exit 0
//   stderr TEXT          stderr "TEXT", exit 0
//   exit N               exit code N
//   sleep MS             answers after MS ms; a cancel reply records kv "last_cancelled"=call id
//   flood N BYTES        N chunks of BYTES bytes each to stdout, in batches (stops on cancel)
// Keys starting with "slow:" make kv_get answer after 2 s (for deadline tests).
#pragma once

#include <caf/fwd.hpp>

namespace triplane::test {

caf::actor spawn_session_directory_double(caf::actor_system& sys);

} // namespace triplane::test
