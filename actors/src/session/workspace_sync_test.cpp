// Change detection of workspace syncs: which files a sync reads again and which it trusts by
// their stat.
#include "session/workspace_sync.hpp"

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "temp_directory.hpp"

using namespace triplane;
using namespace triplane::actors::session;
namespace fs = std::filesystem;

namespace {

/// Writes `contents` to `dir`/`name`, replacing what was there.
void write(const fs::path& dir, const std::string& name, const std::string& contents) {
  std::ofstream(dir / name, std::ios::trunc) << contents;
}

int64_t ns_of(const timespec& t) { return int64_t{t.tv_sec} * 1000000000 + t.tv_nsec; }

} // namespace

TEST_CASE("a file rewritten within a timestamp tick of the sync that recorded it is read again",
          "[workspace]") {
  // Kernels that stamp files from a coarse clock (Debian 12's 6.1: one tick, 4 ms at HZ=250)
  // give a rewrite of the same size in the same tick the same mtime and ctime, on the same
  // inode: its stat is what the last sync recorded. That is simulated here by giving the
  // entry the file's new stat; the change must be found anyway.
  triplane::testing::temp_directory dir("tp-sync-test");
  const fs::path root = dir.path();
  write(root, "counter", "1");
  manifest m;
  auto first = sync_manifest(root.string(), m, 0);
  REQUIRE(first);
  REQUIRE(m.count("counter") == 1);
  auto before = m.at("counter").chunks;

  write(root, "counter", "2");
  struct stat st {};
  REQUIRE(::stat((root / "counter").c_str(), &st) == 0);
  auto& e = m.at("counter");
  e.size = static_cast<uint64_t>(st.st_size);
  e.mtime_ns = ns_of(st.st_mtim);
  e.ctime_ns = ns_of(st.st_ctim);
  e.ino = st.st_ino;
  auto second = sync_manifest(root.string(), m, 0);
  REQUIRE(second);
  CHECK(second->files_read == 1);
  CHECK(second->changed);
  CHECK(m.at("counter").chunks != before);
  CHECK(m.at("counter").chunks == std::vector<std::string>{sha256("2")});

  // A file whose stat was recorded long after its last write is trusted: it is read once more
  // (its mtime changed), then no longer.
  timespec old_times[2] = {{1700000000, 0}, {1700000000, 0}};
  REQUIRE(::utimensat(AT_FDCWD, (root / "counter").c_str(), old_times, 0) == 0);
  auto third = sync_manifest(root.string(), m, 0);
  REQUIRE(third);
  CHECK(third->files_read == 1);
  auto fourth = sync_manifest(root.string(), m, 0);
  REQUIRE(fourth);
  CHECK(fourth->files_read == 0);
  CHECK_FALSE(fourth->changed);
}
