// Crash durability of state_store (issue 2): a child process saves a stream of states and
// reports each acknowledged write; the test SIGKILLs it at a random moment, reopens the store and
// checks that every acknowledged write is there. Runs for both durability levels; power_loss is
// also run on a file system that drops unsynced bytes at the kill (a lost page cache), and
// process_crash on that file system must lose writes, which shows the simulation bites.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <ostream>
#include <random>
#include <sstream>
#include <string>

#include <catch2/catch.hpp>

#include "temp_directory.hpp"

#include "storage_crash_payload.hpp"
#include "triplane/storage/state_store.hpp"

using namespace triplane;
using namespace triplane::storage;
using triplane::testing::temp_directory;
using clock_type = std::chrono::steady_clock;

namespace {

constexpr int key_count = 16;

struct writer_config {
  const char* level;
  const char* fs;
};

std::ostream& operator<<(std::ostream& out, const writer_config& config) {
  return out << "durability " << config.level << ", file system " << config.fs;
}

/// What the killed writer acknowledged: the highest version per id, the epoch per id (state
/// mode); the chunks whose batch was written (batch mode).
struct acknowledged {
  std::map<std::string, uint64_t> versions;
  std::map<std::string, uint64_t> epochs;
  std::map<std::string, uint64_t> chunks;
  size_t saves = 0;
};

void parse_lines(const std::string& text, acknowledged& acks) {
  std::istringstream in(text);
  std::string what, id;
  uint64_t n = 0;
  while (in >> what >> id >> n) {
    if (what == "save") {
      auto& v = acks.versions[id];
      v = std::max(v, n);
      ++acks.saves;
    } else if (what == "epoch") {
      acks.epochs[id] = n;
    } else if (what == "batch") {
      acks.chunks[id] = n;
      ++acks.saves;
    }
  }
}

/// Starts the writer, lets it run `run_for` after its first acknowledged save, SIGKILLs it and
/// collects every line it wrote (complete lines only: a line is written after its ack).
acknowledged run_and_kill(const char* mode, const std::string& dir, writer_config config,
                          std::chrono::milliseconds run_for) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::close(fds[0]);
    ::close(fds[1]);
    std::string keys = std::to_string(key_count);
    const char* writer = TRIPLANE_STORAGE_CRASH_WRITER;
    ::execl(writer, writer, mode, dir.c_str(), config.level, config.fs, keys.c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(fds[1]);

  std::string text;
  char buf[4096];
  bool killed = false;
  auto started = clock_type::now();
  std::optional<clock_type::time_point> deadline;
  while (true) {
    if (!killed) {
      auto now = clock_type::now();
      if (!deadline
          && (text.find("save ") != std::string::npos || text.find("batch ") != std::string::npos))
        deadline = now + run_for;
      if ((deadline && now >= *deadline) || now - started > std::chrono::seconds(30)) {
        ::kill(pid, SIGKILL);
        killed = true;
      }
    }
    pollfd p{fds[0], POLLIN, 0};
    ::poll(&p, 1, killed ? -1 : 1);
    if (p.revents == 0) continue;
    auto n = ::read(fds[0], buf, sizeof buf);
    if (n <= 0) break;  // EOF once the writer is dead
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  INFO("writer exit status " << status << ", output tail: "
                             << text.substr(text.size() > 200 ? text.size() - 200 : 0));
  REQUIRE(WIFSIGNALED(status));
  REQUIRE(WTERMSIG(status) == SIGKILL);

  // Only lines that ended before the kill count; a torn last line was never fully reported.
  text.resize(text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1);
  acknowledged acks;
  parse_lines(text, acks);
  if (std::string(mode) == "state") REQUIRE(acks.epochs.size() == key_count);
  REQUIRE(acks.saves > 0);
  return acks;
}

/// Acknowledged writes missing from the reopened store; checks surviving records are intact.
size_t count_lost(const std::string& dir, const acknowledged& acks) {
  store_options options;
  options.path = dir;
  auto store = state_store::open(options);
  REQUIRE(store);
  size_t lost = 0;
  for (const auto& [id, version] : acks.versions) {
    actor_key key{"crash", id};
    auto loaded = (*store)->load(key);
    REQUIRE(loaded);
    if (!*loaded || (*loaded)->version < version) {
      ++lost;
      continue;
    }
    INFO("id " << id << " version " << (*loaded)->version);
    CHECK((*loaded)->payload == crash::payload_for(id, (*loaded)->version));
  }
  for (const auto& [id, epoch] : acks.epochs) {
    auto next = (*store)->begin_activation({"crash", id});
    REQUIRE(next);
    if (*next <= epoch) ++lost;  // an acknowledged epoch was handed out again
  }
  return lost;
}

/// Acknowledged batches missing from the reopened database. Checks that every batch on disk,
/// acknowledged or not, is whole: chunk, reference count and manifest entry together.
size_t count_lost_batches(const std::string& dir, const acknowledged& acks) {
  database_options options;
  options.path = dir;
  options.column_families = crash::batch_column_families();
  auto db = database::open(options);
  REQUIRE(db);
  auto chunks = *(*db)->column("chunks");
  auto refs = *(*db)->column("refs");
  auto manifests = *(*db)->column("manifests");
  size_t lost = 0;
  for (const auto& [chunk, n] : acks.chunks) {
    auto value = (*db)->get(chunks, chunk);
    REQUIRE(value);
    if (!*value) {
      ++lost;
      continue;
    }
    CHECK(**value == crash::payload_for(chunk, n));
  }
  size_t present = 0;
  REQUIRE_FALSE((*db)->for_each(chunks, "", [&](std::string_view chunk, std::string_view) {
    ++present;
    auto count = (*db)->get(refs, chunk);
    INFO("chunk " << chunk);
    REQUIRE(count);
    REQUIRE(count->has_value());  // a chunk without its reference count: a torn batch
    CHECK(*decode_refcount(**count) == 1);
    return true;
  }));
  REQUIRE_FALSE((*db)->for_each(refs, "", [&](std::string_view chunk, std::string_view) {
    INFO("reference count of " << chunk);
    CHECK((*db)->get(chunks, chunk)->has_value());
    return true;
  }));
  REQUIRE_FALSE((*db)->for_each(manifests, "", [&](std::string_view m, std::string_view chunk) {
    INFO("manifest " << m << " -> " << chunk);
    CHECK((*db)->get(chunks, chunk)->has_value());
    return true;
  }));
  INFO(present << " chunks on disk");
  return lost;
}

} // namespace

TEST_CASE("a writer killed by SIGKILL loses no acknowledged write at either durability level",
          "[storage][crash]") {
  auto config = GENERATE(writer_config{"process_crash", "real"},
                         writer_config{"power_loss", "real"},
                         writer_config{"power_loss", "volatile"});
  const auto seed = std::random_device{}();
  INFO("durability " << config.level << ", file system " << config.fs << ", seed " << seed);
  std::mt19937 rng(seed);
  temp_directory dir("triplane-crash");
  // Several kills of the same store: later writers continue from the recovered state.
  for (int round = 0; round < 3; ++round) {
    std::chrono::milliseconds run_for(std::uniform_int_distribution<int>(5, 250)(rng));
    INFO("round " << round << ", killed " << run_for.count() << " ms after the first save");
    auto acks = run_and_kill("state", dir.path(), config, run_for);
    CHECK(count_lost(dir.path(), acks) == 0);
  }
}

TEST_CASE("with a lost page cache, process_crash durability loses acknowledged writes",
          "[storage][crash]") {
  // Not a guarantee we want but a check of the simulation: writes that were never fsynced must
  // vanish with the killed process's "page cache", else the power_loss case above proves nothing.
  temp_directory dir("triplane-crash");
  auto acks = run_and_kill("state", dir.path(), {"process_crash", "volatile"},
                           std::chrono::milliseconds(50));
  INFO(acks.saves << " acknowledged saves");
  CHECK(count_lost(dir.path(), acks) > 0);
}

TEST_CASE("batches across column families survive a SIGKILL whole or not at all",
          "[storage][crash]") {
  auto config = GENERATE(writer_config{"process_crash", "real"},
                         writer_config{"power_loss", "real"},
                         writer_config{"power_loss", "volatile"},
                         writer_config{"process_crash", "volatile"});
  // The last configuration may lose acknowledged batches (nothing was synced), never tear one.
  const bool may_lose = std::string(config.level) == "process_crash"
                        && std::string(config.fs) == "volatile";
  const auto seed = std::random_device{}();
  INFO(config << ", seed " << seed);
  std::mt19937 rng(seed);
  temp_directory dir("triplane-crash");
  size_t lost = 0;
  for (int round = 0; round < 3; ++round) {
    std::chrono::milliseconds run_for(std::uniform_int_distribution<int>(5, 250)(rng));
    INFO("round " << round << ", killed " << run_for.count() << " ms after the first batch");
    auto acks = run_and_kill("batch", dir.path(), config, run_for);
    auto round_lost = count_lost_batches(dir.path(), acks);
    if (!may_lose) CHECK(round_lost == 0);
    lost += round_lost;
  }
  if (may_lose) CHECK(lost > 0);
}
