// SIGKILL during a stream of acknowledged changes to durable virtual actors: every acknowledged
// change is in the store after reopening, for both durability levels; power_loss also under a
// simulated lost page cache.
#include <catch2/catch.hpp>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <sstream>

#include "child_process.hpp"
#include "triplane/storage/state_store.hpp"

using namespace std::chrono_literals;
using triplane::testing::child_process;

TEST_CASE("a killed node keeps every acknowledged change of a durable actor", "[durability]") {
  struct mode {
    const char* level;
    const char* fs;
  };
  auto m = GENERATE(mode{"process_crash", "real"}, mode{"power_loss", "real"}, mode{"power_loss", "volatile"});
  INFO(m.level << " " << m.fs);
  std::mt19937 rng(std::random_device{}());
  for (int round = 0; round < 3; ++round) {
    auto dir = (std::filesystem::temp_directory_path() /
                ("triplane-durable-crash-" + std::to_string(::getpid()) + "-" + std::to_string(round)))
                 .string();
    std::filesystem::remove_all(dir);
    std::map<std::string, uint64_t> acked;
    {
      child_process writer({TRIPLANE_DURABLE_WRITER, dir, m.level, m.fs, "7"});
      REQUIRE(writer.wait_for_output("ready", 20s));
      // Let it run for a random while (enough for some acknowledgements), then kill it.
      std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(150, 600)(rng)));
      writer.signal(SIGKILL);
      REQUIRE(writer.wait(20s) == 128 + SIGKILL);
      std::istringstream lines(writer.out());
      std::string tag, id;
      uint64_t value = 0;
      while (lines >> tag) {
        if (tag != "ack") continue;
        if (!(lines >> id >> value)) break;  // a line cut by the kill
        acked[id] = std::max(acked[id], value);
      }
    }
    REQUIRE(acked.size() > 0);
    triplane::storage::store_options options;
    options.path = dir;
    auto store = triplane::storage::state_store::open(options);
    REQUIRE(store);
    for (auto& [id, value] : acked) {
      INFO("id " << id << " acknowledged " << value);
      auto state = (*store)->load({"ledger", id});
      REQUIRE(state);
      REQUIRE(state->has_value());
      uint64_t stored = 0;
      REQUIRE((*state)->payload.size() == 8);
      std::memcpy(&stored, (*state)->payload.data(), 8);
      CHECK(stored >= value);
    }
    store->reset();
    std::filesystem::remove_all(dir);
  }
}
