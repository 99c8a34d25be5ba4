// The node core: its supervision tree, the stable directory proxy across a directory restart,
// and shutdown passivating every live actor into the store.
#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <thread>

#include <caf/all.hpp>
#include <unistd.h>

#include "triplane/runtime/node.hpp"

using namespace std::chrono_literals;
using namespace triplane;
using namespace triplane::runtime;

namespace {

using bump_atom = caf::atom_constant<caf::atom("bump")>;

class tally final : public virtual_actor {
public:
  caf::error restore(activation_context&, const std::optional<storage::stored_state>& state) override {
    if (state && state->payload.size() == 8) std::memcpy(&n_, state->payload.data(), 8);
    return caf::none;
  }
  caf::behavior make_behavior(activation_context& ctx) override {
    auto* c = &ctx;
    return {[this, c](bump_atom) {
      ++n_;
      c->mark_changed();
      return n_;
    }};
  }
  expected<std::string> snapshot() override {
    std::string out(8, '\0');
    std::memcpy(out.data(), &n_, 8);
    return out;
  }
  uint32_t schema_version() const override { return 1; }

private:
  int64_t n_ = 0;
};

node::plane tally_plane(persistence when) {
  kind_spec k;
  k.name = "tally";
  k.factory = [](const std::string&) { return std::make_unique<tally>(); };
  k.when = when;
  node::plane p;
  p.kinds.push_back(k);
  return p;
}

expected<int64_t> bump(node& n, const std::string& id) {
  caf::scoped_actor self{n.system()};
  expected<int64_t> out = make_error(errc::internal, "no reply");
  self->request(n.directory_proxy(), 5s, call_atom::value, std::string{"tally"}, id, caf::make_message(bump_atom::value))
    .receive([&](int64_t v) { out = v; }, [&](caf::error& e) { out = std::move(e); });
  return out;
}

struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const std::string& name)
    : path(std::filesystem::temp_directory_path() / ("triplane-node-" + name + "-" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
  }
  ~temp_dir() { std::filesystem::remove_all(path); }
};

} // namespace

TEST_CASE("the directory proxy keeps working after the supervisor restarts a crashed directory", "[node]") {
  temp_dir dir("restart");
  node_config cfg;
  cfg.set("scheduler.max-threads", 2);
  node_options opts;
  opts.data_dir = dir.path.string();
  auto n = node::start(cfg, opts, {}, [](node&) -> expected<std::vector<node::plane>> {
    return std::vector<node::plane>{tally_plane(persistence::every_change)};
  });
  REQUIRE(n);
  REQUIRE(bump(**n, "a").value() == 1);
  auto before = (*n)->actors().front();
  // Kill the directory's front (its shards and activations go down with it).
  caf::anon_send_exit(before, caf::exit_reason::kill);
  // The supervisor restarts it after its backoff; calls meanwhile may fail (unavailable) or, in
  // the instant before the old activations notice, still reach them: wait for the new one.
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while ((*n)->actors().front() == before && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(20ms);
  REQUIRE((*n)->actors().front() != before);
  expected<int64_t> after = make_error(errc::internal, "");
  do {
    after = bump(**n, "a");
    if (!after) std::this_thread::sleep_for(50ms);
  } while (!after && std::chrono::steady_clock::now() < deadline);
  REQUIRE(after);
  CHECK(*after == 2);  // the durable value survived the crash
  CHECK((*n)->supervision_tree().find("directory (worker, running, restarts 1)") != std::string::npos);
  REQUIRE((*n)->shutdown(5s));
}

TEST_CASE("shutdown passivates every live actor into the store", "[node]") {
  temp_dir dir("shutdown");
  node_options opts;
  opts.data_dir = dir.path.string();
  {
    node_config cfg;
    cfg.set("scheduler.max-threads", 2);
    auto n = node::start(cfg, opts, {}, [](node&) -> expected<std::vector<node::plane>> {
      return std::vector<node::plane>{tally_plane(persistence::at_passivation)};
    });
    REQUIRE(n);
    for (int i = 0; i < 20; ++i) REQUIRE(bump(**n, "id-" + std::to_string(i % 5)));
    auto drained = (*n)->shutdown(5s);
    REQUIRE(drained);
    CHECK(*drained == 5);
  }
  node_config cfg;
  cfg.set("scheduler.max-threads", 2);
  auto n = node::start(cfg, opts, {}, [](node&) -> expected<std::vector<node::plane>> {
    return std::vector<node::plane>{tally_plane(persistence::at_passivation)};
  });
  REQUIRE(n);
  CHECK(bump(**n, "id-0").value() == 5);
  CHECK(bump(**n, "id-4").value() == 5);
}
