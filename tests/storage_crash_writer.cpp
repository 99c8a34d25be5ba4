// Child process of storage_crash_test: opens a state store and saves forever, writing one line
// to stdout for each write only after it was acknowledged (the call returned). The test kills it
// with SIGKILL at a random moment and checks the acknowledged writes against the reopened store.
//
// usage: storage_crash_writer DIR process_crash|power_loss real|volatile KEYS
//   volatile: files lose every byte not yet synced when the process dies (lost page cache).
// stdout lines: "epoch ID E" after begin_activation returned E, "save ID V" after save returned V.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "storage_crash_payload.hpp"
#include "triplane/storage/state_store.hpp"
#include "triplane/storage/testing.hpp"

using namespace triplane;
using namespace triplane::storage;

namespace {

void report(const std::string& line) {
  // One write(2) per line: nothing is buffered in this process when it is killed.
  std::string out = line + "\n";
  const char* p = out.data();
  size_t left = out.size();
  while (left > 0) {
    auto n = ::write(STDOUT_FILENO, p, left);
    if (n < 0) std::_Exit(3);  // the test went away
    p += n;
    left -= static_cast<size_t>(n);
  }
}

int fail(const std::string& what, const caf::error& err) {
  std::fprintf(stderr, "storage_crash_writer: %s: %s\n", what.c_str(), describe(err).c_str());
  return 2;
}

} // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s DIR process_crash|power_loss real|volatile KEYS\n", argv[0]);
    return 64;
  }
  store_options options;
  options.path = argv[1];
  const std::string level_name = argv[2];
  const std::string fs_name = argv[3];
  const int keys = std::atoi(argv[4]);
  if ((level_name != "process_crash" && level_name != "power_loss")
      || (fs_name != "real" && fs_name != "volatile") || keys <= 0) {
    std::fprintf(stderr, "storage_crash_writer: bad arguments\n");
    return 64;
  }
  const auto level = level_name == "power_loss" ? durability::power_loss
                                                : durability::process_crash;
  options.default_durability = level;  // begin_activation's epochs follow the same level
  auto store = fs_name == "volatile" ? testing::open_with_volatile_page_cache(options)
                                     : state_store::open(options);
  if (!store) return fail("opening " + options.path, store.error());

  std::vector<uint64_t> epochs(keys);
  std::vector<actor_key> ids;
  for (int k = 0; k < keys; ++k) {
    ids.push_back({"crash", "key-" + std::to_string(k)});
    auto e = (*store)->begin_activation(ids.back());
    if (!e) return fail("begin_activation", e.error());
    epochs[k] = *e;
    report("epoch " + ids.back().id + " " + std::to_string(*e));
  }
  // Bounded so that a writer whose test died does not run forever.
  const auto stop = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (uint64_t i = 0; std::chrono::steady_clock::now() < stop; ++i) {
    const auto& key = ids[i % ids.size()];
    auto current = (*store)->load(key);
    if (!current) return fail("load", current.error());
    const uint64_t next = *current ? (*current)->version + 1 : 1;
    auto v = (*store)->save(key, epochs[i % ids.size()], 1, crash::payload_for(key.id, next),
                            level);
    if (!v) return fail("save", v.error());
    if (*v != next) {
      std::fprintf(stderr, "storage_crash_writer: save returned version %llu, expected %llu\n",
                   static_cast<unsigned long long>(*v), static_cast<unsigned long long>(next));
      return 2;
    }
    report("save " + key.id + " " + std::to_string(*v));
  }
  return 0;
}
