// Rendezvous placement: deterministic, balanced, minimal movement, and plugged into the directory.
#include <catch2/catch.hpp>

#include <filesystem>
#include <map>

#include <caf/all.hpp>
#include <unistd.h>

#include "triplane/cluster/rendezvous_placement.hpp"
#include "triplane/storage/state_store.hpp"

using namespace triplane;
using namespace std::chrono_literals;

TEST_CASE("every node computes the same owner and exactly one node owns each id", "[placement]") {
  std::vector<std::string> members{"node-a", "node-b", "node-c"};
  std::vector<cluster::rendezvous_placement> views;
  for (auto& m : members) views.push_back(cluster::rendezvous_placement::make(members, m).value());
  for (int i = 0; i < 3000; ++i) {
    auto id = "session-" + std::to_string(i);
    int owners = 0;
    for (auto& v : views) {
      CHECK(v.owner("session", id) == views[0].owner("session", id));
      owners += v.is_local("session", id) ? 1 : 0;
    }
    CHECK(owners == 1);
  }
}

TEST_CASE("ids spread evenly and a leaving node moves only its own ids", "[placement]") {
  std::vector<std::string> three{"a", "b", "c"}, two{"a", "b"};
  auto p3 = cluster::rendezvous_placement::make(three, "a").value();
  auto p2 = cluster::rendezvous_placement::make(two, "a").value();
  std::map<std::string, int> load;
  int moved_wrongly = 0;
  constexpr int n = 30000;
  for (int i = 0; i < n; ++i) {
    auto id = std::to_string(i);
    auto& before = p3.owner("k", id);
    ++load[before];
    if (before != "c" && p2.owner("k", id) != before) ++moved_wrongly;
  }
  for (auto& [m, count] : load) {
    INFO(m);
    CHECK(count > n / 3 * 0.9);
    CHECK(count < n / 3 * 1.1);
  }
  CHECK(moved_wrongly == 0);
}

TEST_CASE("bad member lists are refused", "[placement]") {
  CHECK_FALSE(cluster::rendezvous_placement::make({}, "a"));
  CHECK_FALSE(cluster::rendezvous_placement::make({"a", "a"}, "a"));
  CHECK_FALSE(cluster::rendezvous_placement::make({"a", ""}, "a"));
  auto missing = cluster::rendezvous_placement::make({"a", "b"}, "c");
  REQUIRE_FALSE(missing);
  CHECK(describe(missing.error()).find("'c'") != std::string::npos);
}

namespace {
using get_atom = caf::get_atom;
class echo_actor final : public runtime::virtual_actor {
public:
  caf::error restore(runtime::activation_context&, const std::optional<storage::stored_state>&) override {
    return caf::none;
  }
  caf::behavior make_behavior(runtime::activation_context& ctx) override {
    auto* c = &ctx;
    return {[c](get_atom) { return c->id(); }};
  }
  expected<std::string> snapshot() override { return std::string{}; }
  uint32_t schema_version() const override { return 1; }
};
} // namespace

TEST_CASE("the directory refuses ids that another node owns", "[placement]") {
  auto dir = std::filesystem::temp_directory_path() / ("triplane-placement-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  storage::store_options so;
  so.path = dir.string();
  auto store = std::move(storage::state_store::open(so).value());
  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 2);
  {
    caf::actor_system sys{cfg};
    auto placement = std::make_shared<cluster::rendezvous_placement>(
      cluster::rendezvous_placement::make({"here", "there"}, "here").value());
    runtime::directory_options opts;
    opts.owner = placement;
    runtime::kind_spec kind;
    kind.name = "echo";
    kind.factory = [](const std::string&) { return std::make_unique<echo_actor>(); };
    auto d = runtime::directory::start(sys, *store, {kind}, opts).value();
    caf::scoped_actor self{sys};
    int local = 0, remote = 0;
    for (int i = 0; i < 50; ++i) {
      auto id = "id-" + std::to_string(i);
      self->request(d.front(), 5s, runtime::call_atom::value, std::string{"echo"}, id, caf::make_message(get_atom::value))
        .receive(
          [&](const std::string& got) {
            CHECK(got == id);
            CHECK(placement->is_local("echo", id));
            ++local;
          },
          [&](caf::error& err) {
            CHECK(code_of(err) == errc::unavailable);
            CHECK_FALSE(placement->is_local("echo", id));
            ++remote;
          });
    }
    CHECK(local > 0);
    CHECK(remote > 0);
    (void)d.stop(sys, 5s);
  }
  store.reset();
  std::filesystem::remove_all(dir);
}
