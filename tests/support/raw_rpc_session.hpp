// TEST ONLY: a Cap'n Proto connection or session opened with the raw generated API (no triplane::client), for
// tests that need what the client library hides: dropping a call mid-flight, a sink that never
// returns, a tiny socket receive buffer.
#pragma once

#include <string>

#include <sys/socket.h>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include "api.capnp.h"

namespace triplane::test {

/// A connection to `endpoint` (HOST:PORT or unix:PATH) holding the node's Bootstrap capability,
/// not authenticated. `receive_buffer` > 0 sets SO_RCVBUF before the first byte is read.
/// Member order is destruction order: the capability before the connection before the loop.
struct raw_rpc_connection {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<capnp::TwoPartyClient> rpc;
  triplane::api::Bootstrap::Client bootstrap = nullptr;

  explicit raw_rpc_connection(const std::string& endpoint, int receive_buffer = 0) {
    auto addr = io.provider->getNetwork().parseAddress(endpoint).wait(io.waitScope);
    stream = addr->connect().wait(io.waitScope);
    if (receive_buffer > 0) stream->setsockopt(SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof receive_buffer);
    rpc = kj::heap<capnp::TwoPartyClient>(*stream);
    bootstrap = rpc->bootstrap().castAs<triplane::api::Bootstrap>();
  }

  /// Lets the event loop run for `ms` milliseconds.
  void wait_ms(int ms) { io.provider->getTimer().afterDelay(ms * kj::MILLISECONDS).wait(io.waitScope); }
};

/// A raw_rpc_connection authenticated with `token`, with session `id` opened (and created).
struct raw_rpc_session : raw_rpc_connection {
  triplane::api::Session::Client session = nullptr;

  raw_rpc_session(const std::string& endpoint, const std::string& token, const std::string& id,
                  int receive_buffer = 0)
    : raw_rpc_connection(endpoint, receive_buffer) {
    auto auth = bootstrap.authenticateRequest();
    auth.setToken(token);
    auto tenant = auth.send().getTenant();
    auto open = tenant.sessionRequest();
    open.setId(id);
    open.setCreate(true);
    session = open.send().getSession();
  }
};

} // namespace triplane::test
