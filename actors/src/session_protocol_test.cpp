// The session protocol's types survive CAF's binary serialization (what the middleman and the
// RPC layer rely on) and carry the registered names.
#include <caf/all.hpp>

#include <catch2/catch.hpp>

#include "triplane/actors/session_protocol.hpp"
#include "triplane/actors/session_types.hpp"

using namespace triplane::actors;

namespace {

struct config : caf::actor_system_config {
  config() { add_session_message_types(*this); }
};

template <class T>
T round_trip(caf::actor_system& sys, const T& value) {
  std::vector<char> buf;
  caf::binary_serializer sink{sys, buf};
  auto copy = value;
  REQUIRE_FALSE(sink(copy));
  T out;
  caf::binary_deserializer source{sys, buf};
  REQUIRE_FALSE(source(out));
  return out;
}

} // namespace

TEST_CASE("session protocol messages round-trip through the binary serializer", "[session][protocol]") {
  config cfg;
  caf::actor_system sys{cfg};
  exec_request req;
  req.argv = {"python3", "-c", "print(1)"};
  req.stdin_data = std::string("in\0put", 6);
  req.env = {{"A", "1"}};
  req.env_unset = {"B"};
  req.cwd = "src";
  req.timeout_ms = 1234;
  req.limits.memory_bytes = 1 << 20;
  req.limits.max_processes = 7;
  auto r = round_trip(sys, req);
  CHECK(r.argv == req.argv);
  CHECK(r.stdin_data == req.stdin_data);
  CHECK(r.env == req.env);
  CHECK(r.env_unset == req.env_unset);
  CHECK(r.limits.memory_bytes == req.limits.memory_bytes);
  CHECK(r.limits.max_processes == 7);

  exec_result res;
  res.exited = false;
  res.term_signal = 9;
  res.timed_out = true;
  res.stdout_data = "out";
  res.enforced.memory = limit_mechanism::cgroup_v1;
  res.enforced.wall_clock = limit_mechanism::supervisor;
  auto rr = round_trip(sys, res);
  CHECK(rr.term_signal == 9);
  CHECK(rr.timed_out);
  CHECK(rr.enforced.memory == limit_mechanism::cgroup_v1);
  CHECK(rr.enforced.wall_clock == limit_mechanism::supervisor);

  session_info info;
  info.id = "s";
  info.settings.network = network_policy::loopback;
  info.history.push_back(command_record{{"true"}, true, 0, 0, false, 10, 20});
  auto ri = round_trip(sys, info);
  CHECK(ri.settings.network == network_policy::loopback);
  REQUIRE(ri.history.size() == 1);
  CHECK(ri.history[0].duration_us == 10);

  auto entries = round_trip(sys, std::vector<file_entry>{{"a", file_type::symlink, 0777, 1, 5, "b"}});
  REQUIRE(entries.size() == 1);
  CHECK(entries[0].type == file_type::symlink);
  CHECK(entries[0].link_target == "b");
  auto kv = round_trip(sys, kv_value{true, "v"});
  CHECK(kv.found);
  CHECK(round_trip(sys, exec_chunk{3, output_stream::err, "e"}).stream == output_stream::err);
}

TEST_CASE("session protocol types are registered under stable names", "[session][protocol]") {
  config cfg;
  caf::actor_system sys{cfg};
  auto msg = caf::make_message(exec_atom::value, exec_request{});
  std::vector<char> buf;
  caf::binary_serializer sink{sys, buf};
  CHECK_FALSE(msg.save(sink));
  caf::message back;
  caf::binary_deserializer source{sys, buf};
  CHECK_FALSE(back.load(source));
  CHECK(back.match_elements<exec_atom, exec_request>());
}
