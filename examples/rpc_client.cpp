// A minimal Triplane client: open a session, store a note, run a command with live output.
// Build target: example_rpc_client. Run:
//   TRIPLANE_ENDPOINT=127.0.0.1:7400 TRIPLANE_TOKEN=... ./example_rpc_client
#include <cstdlib>
#include <iostream>

#include "triplane/rpc/client.hpp"

int main() {
  const char* endpoint = std::getenv("TRIPLANE_ENDPOINT");
  const char* token = std::getenv("TRIPLANE_TOKEN");
  if (!token) {
    std::cerr << "set TRIPLANE_TOKEN (and TRIPLANE_ENDPOINT, default 127.0.0.1:7400)\n";
    return 2;
  }
  auto conn = triplane::client::connection::connect(endpoint ? endpoint : "127.0.0.1:7400", token);
  if (!conn) {
    std::cerr << "connect: " << triplane::describe(conn.error()) << "\n";
    return 1;
  }
  std::cout << "connected as tenant " << (*conn)->tenant() << "\n";

  // Every call returns a triplane::expected: check it, the error names what went wrong.
  auto session = (*conn)->open_session("example", /*create=*/true);
  if (!session) {
    std::cerr << "open: " << triplane::describe(session.error()) << "\n";
    return 1;
  }
  if (auto put = session->kv_put("greeting", "hello from C++"); !put) {
    std::cerr << "kv_put: " << triplane::describe(put.error()) << "\n";
    return 1;
  }
  auto note = session->kv_get("greeting");
  if (note && *note) std::cout << "kv greeting = " << **note << "\n";

  triplane::client::exec_options cmd;
  cmd.argv = {"echo", "hello", "world"};
  auto result = session->exec(cmd, [](triplane::client::output_stream, std::string_view chunk) {
    std::cout << "output: " << chunk << std::flush;  // arrives while the command runs
  });
  if (!result) {
    std::cerr << "exec: " << triplane::describe(result.error()) << "\n";
    return 1;
  }
  std::cout << "exit code " << result->exit_code << "\n";
  return 0;
}
