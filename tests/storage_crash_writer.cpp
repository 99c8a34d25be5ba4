// Child process of storage_crash_test: opens a state store and saves forever, writing one line
// to stdout for each write only after it was acknowledged (the call returned). The test kills it
// with SIGKILL at a random moment and checks the acknowledged writes against the reopened store.
//
// usage: storage_crash_writer state|batch DIR process_crash|power_loss real|volatile KEYS
//   state: state_store saves over KEYS ids; stdout lines "epoch ID E" after begin_activation
//     returned E, "save ID V" after save returned V.
//   batch: database write_batches of chunk i + its reference count + manifest (i % KEYS) -> chunk
//     i, across three column families; stdout line "batch I" after write() returned.
//   volatile: files lose every byte not yet synced when the process dies (lost page cache).
#include <unistd.h>

#include <algorithm>
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

int run_state(const store_options& options, durability level, bool volatile_fs, int keys) {
  auto store = volatile_fs ? testing::open_with_volatile_page_cache(options)
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

int run_batch(const std::string& path, durability level, bool volatile_fs, int keys) {
  database_options options;
  options.path = path;
  options.column_families = crash::batch_column_families();
  auto db = volatile_fs ? testing::open_with_volatile_page_cache(options)
                        : database::open(options);
  if (!db) return fail("opening " + path, db.error());
  auto chunks = (*db)->column("chunks");
  auto refs = (*db)->column("refs");
  auto manifests = (*db)->column("manifests");
  if (!chunks || !refs || !manifests) return fail("column families", make_error(errc::internal, "missing"));
  // Continue after the chunks an earlier (killed) writer left.
  uint64_t first = 0;
  auto err = (*db)->for_each(*chunks, "", [&first](std::string_view key, std::string_view) {
    first = std::max(first, crash::chunk_number(key) + 1);
    return true;
  });
  if (err) return fail("scanning chunks", err);
  const auto stop = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  write_batch batch(**db);
  for (uint64_t i = first; std::chrono::steady_clock::now() < stop; ++i) {
    auto chunk = crash::chunk_key(i);
    batch.clear();
    batch.put(*chunks, chunk, crash::payload_for(chunk, i));
    batch.add_refcount(*refs, chunk, 1);
    batch.put(*manifests, "m" + std::to_string(i % static_cast<uint64_t>(keys)), chunk);
    if (auto err = (*db)->write(batch, level)) return fail("write", err);
    report("batch " + chunk + " " + std::to_string(i));
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s state|batch DIR process_crash|power_loss real|volatile KEYS\n",
                 argv[0]);
    return 64;
  }
  const std::string mode = argv[1];
  const std::string path = argv[2];
  const std::string level_name = argv[3];
  const std::string fs_name = argv[4];
  const int keys = std::atoi(argv[5]);
  if ((mode != "state" && mode != "batch")
      || (level_name != "process_crash" && level_name != "power_loss")
      || (fs_name != "real" && fs_name != "volatile") || keys <= 0) {
    std::fprintf(stderr, "storage_crash_writer: bad arguments\n");
    return 64;
  }
  const auto level = level_name == "power_loss" ? durability::power_loss
                                                : durability::process_crash;
  const bool volatile_fs = fs_name == "volatile";
  if (mode == "batch") return run_batch(path, level, volatile_fs, keys);
  store_options options;
  options.path = path;
  options.default_durability = level;  // begin_activation's epochs follow the same level
  return run_state(options, level, volatile_fs, keys);
}
