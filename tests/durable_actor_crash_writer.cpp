// Child process of durable_actor_crash_test: a node core (store + directory) with a durable
// kind; it increments counters through the directory and writes "ack ID VALUE" to stdout after
// each reply arrived, i.e. after the runtime acknowledged the change. The test kills it with
// SIGKILL at a random moment and checks the reopened store holds every acknowledged value.
//
// usage: durable_actor_crash_writer DIR process_crash|power_loss real|volatile IDS
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

#include <caf/all.hpp>

#include "triplane/runtime/directory.hpp"
#include "triplane/storage/state_store.hpp"
#include "triplane/storage/testing.hpp"

using namespace std::chrono_literals;
using namespace triplane;
using namespace triplane::runtime;

namespace {

using incr_atom = caf::atom_constant<caf::atom("incr")>;

class ledger final : public virtual_actor {
public:
  caf::error restore(activation_context&, const std::optional<storage::stored_state>& state) override {
    if (state && state->payload.size() == 8) std::memcpy(&value_, state->payload.data(), 8);
    return caf::none;
  }
  caf::behavior make_behavior(activation_context& ctx) override {
    auto* c = &ctx;
    return {[this, c](incr_atom) {
      ++value_;
      c->mark_changed();
      return value_;
    }};
  }
  expected<std::string> snapshot() override {
    std::string out(8, '\0');
    std::memcpy(out.data(), &value_, 8);
    return out;
  }
  uint32_t schema_version() const override { return 1; }

private:
  uint64_t value_ = 0;
};

void report(const std::string& line) {
  std::string out = line + "\n";
  const char* p = out.data();
  size_t left = out.size();
  while (left > 0) {
    auto n = ::write(STDOUT_FILENO, p, left);
    if (n < 0) std::_Exit(3);
    p += n;
    left -= static_cast<size_t>(n);
  }
}

} // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s DIR process_crash|power_loss real|volatile IDS\n", argv[0]);
    return 64;
  }
  storage::store_options options;
  options.path = argv[1];
  const std::string level_name = argv[2];
  const bool volatile_fs = std::string{argv[3]} == "volatile";
  const int ids = std::atoi(argv[4]);
  auto level = level_name == "power_loss" ? storage::durability::power_loss : storage::durability::process_crash;
  options.default_durability = level;
  auto store = volatile_fs ? storage::testing::open_with_volatile_page_cache(options)
                           : storage::state_store::open(options);
  if (!store) {
    std::fprintf(stderr, "open: %s\n", describe(store.error()).c_str());
    return 2;
  }
  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 2);
  caf::actor_system sys{cfg};
  kind_spec kind;
  kind.name = "ledger";
  kind.factory = [](const std::string&) { return std::make_unique<ledger>(); };
  kind.when = persistence::every_change;
  kind.durability = level;
  directory_options dopts;
  dopts.max_live = 4;  // fewer live slots than ids: passivation and rehydration happen too
  auto dir = directory::start(sys, **store, {kind}, dopts);
  if (!dir) {
    std::fprintf(stderr, "directory: %s\n", describe(dir.error()).c_str());
    return 2;
  }
  caf::scoped_actor self{sys};
  report("ready");
  for (uint64_t i = 0;; ++i) {
    auto id = "id-" + std::to_string(i % static_cast<uint64_t>(ids));
    self->request(dir->front(), 10s, call_atom::value, std::string{"ledger"}, id, caf::make_message(incr_atom::value))
      .receive([&](uint64_t v) { report("ack " + id + " " + std::to_string(v)); },
               [&](caf::error& err) {
                 std::fprintf(stderr, "call: %s\n", describe(err).c_str());
                 std::_Exit(4);
               });
  }
}
