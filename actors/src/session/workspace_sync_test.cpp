// Change detection of workspace syncs: which files a sync reads again and which it trusts by
// their stat.
#include "session/workspace_sync.hpp"

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <memory>

#include <fcntl.h>
#include <grp.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <unistd.h>

#include "session/testing/session_fixture.hpp"
#include "temp_directory.hpp"
#include "triplane/storage/database.hpp"

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

namespace {

using store_fixture = triplane::actors::session::testing::test_store;

/// For manifests a test writes by hand: a store holding the chunk of "x", and entries of each
/// kind (a regular file of that chunk, a symlink to `outside`, a directory).
struct hand_made_entries {
  store_fixture f;
  manifest_entry file, symlink, directory;
  hand_made_entries(const std::string& db_dir, const fs::path& outside) : f(db_dir) {
    session_record r;
    r.id = "chunks";
    file.type = triplane::actors::file_type::regular;
    file.mode = 0644;
    file.size = 1;
    file.chunks = {sha256("x")};
    r.files["x"] = file;
    REQUIRE_FALSE(f.store->save(r, nullptr, {{sha256("x"), "x"}}));
    symlink.type = triplane::actors::file_type::symlink;
    symlink.mode = 0777;
    symlink.link_target = outside.string();
    directory.type = triplane::actors::file_type::directory;
    directory.mode = 0755;
  }
};

/// Sets the mtime of `path` well in the past, so that syncs trust its stat.
void age(const fs::path& path) {
  timespec old_times[2] = {{1700000000, 0}, {1700000000, 0}};
  REQUIRE(::utimensat(AT_FDCWD, path.c_str(), old_times, AT_SYMLINK_NOFOLLOW) == 0);
}

struct stat stat_of(const fs::path& path) {
  struct stat st {};
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  return st;
}

} // namespace

TEST_CASE("files sharing an inode are one hard-link group in the manifest, read and counted once",
          "[workspace]") {
  triplane::testing::temp_directory dir("tp-sync-test");
  const fs::path root = dir.path();
  fs::create_directories(root / "sub");
  write(root, "b", "shared");
  REQUIRE(::link((root / "b").c_str(), (root / "a").c_str()) == 0);
  REQUIRE(::link((root / "b").c_str(), (root / "sub/c").c_str()) == 0);
  write(root, "alone", "x");
  age(root / "a");
  age(root / "alone");
  manifest m;
  auto first = sync_manifest(root.string(), m, 0);
  REQUIRE(first);
  CHECK(first->files == 4);
  CHECK(first->files_read == 2);  // a (the group's primary: its first path) and alone
  CHECK(first->total_bytes == 7);
  CHECK(m.at("a").hard_link_of.empty());
  CHECK(m.at("a").chunks == std::vector<std::string>{sha256("shared")});
  for (const char* name : {"b", "sub/c"}) {
    INFO(name);
    CHECK(m.at(name).hard_link_of == "a");
    CHECK(m.at(name).chunks.empty());
    CHECK(m.at(name).size == 6);
  }
  // The quota counts the file once: 7 bytes fit in 7.
  manifest copy = m;
  CHECK(sync_manifest(root.string(), copy, 7));
  auto again = sync_manifest(root.string(), m, 0);
  REQUIRE(again);
  CHECK(again->files_read == 0);
  CHECK_FALSE(again->changed);

  SECTION("writing through a link reads the group once, and its links follow") {
    std::ofstream(root / "sub/c", std::ios::app) << "+";
    age(root / "a");
    auto changed = sync_manifest(root.string(), m, 0);
    REQUIRE(changed);
    CHECK(changed->changed);
    CHECK(changed->files_read == 1);
    CHECK(m.at("a").chunks == std::vector<std::string>{sha256("shared+")});
    CHECK(m.at("b").size == 7);
  }
  SECTION("removing the primary's name makes the next name the primary") {
    REQUIRE(::unlink((root / "a").c_str()) == 0);
    auto changed = sync_manifest(root.string(), m, 0);
    REQUIRE(changed);
    CHECK(changed->changed);
    CHECK(m.count("a") == 0);
    CHECK(m.at("b").hard_link_of.empty());
    CHECK(m.at("b").chunks == std::vector<std::string>{sha256("shared")});
    CHECK(m.at("sub/c").hard_link_of == "b");
  }
  SECTION("a name unlinked down to one is a plain file again") {
    REQUIRE(::unlink((root / "a").c_str()) == 0);
    REQUIRE(::unlink((root / "b").c_str()) == 0);
    auto changed = sync_manifest(root.string(), m, 0);
    REQUIRE(changed);
    CHECK(m.at("sub/c").hard_link_of.empty());
    CHECK(m.at("sub/c").chunks == std::vector<std::string>{sha256("shared")});
  }
}

TEST_CASE("materialize recreates hard-link groups as links, and the next sync reads nothing",
          "[workspace]") {
  triplane::testing::temp_directory dir("tp-sync-test");
  const fs::path source = fs::path(dir.path()) / "source", target = fs::path(dir.path()) / "target";
  fs::create_directories(source / "deep/er");
  write(source, "a", "shared");
  REQUIRE(::chmod((source / "a").c_str(), 0751) == 0);
  REQUIRE(::link((source / "a").c_str(), (source / "deep/er/b").c_str()) == 0);
  REQUIRE(::link((source / "a").c_str(), (source / "z").c_str()) == 0);
  write(source, "alone", "x");
  age(source / "a");
  age(source / "alone");
  store_fixture f(dir.sub("db"));
  session_record record;
  record.id = "links";
  auto synced = sync_manifest(source.string(), record.files, 0);
  REQUIRE(synced);
  REQUIRE_FALSE(f.store->save(record, nullptr, synced->new_chunks));
  CHECK(*f.store->refcount(sha256("shared")) == 1);  // one file, however many names

  auto loaded = f.store->load("links");
  REQUIRE(loaded);
  REQUIRE(*loaded);
  manifest m = (**loaded).files;
  REQUIRE_FALSE(materialize(target.string(), m, *f.store));
  auto a = stat_of(target / "a");
  CHECK(a.st_nlink == 3);
  CHECK((a.st_mode & 07777) == 0751);
  for (const char* name : {"deep/er/b", "z"}) {
    INFO(name);
    CHECK(stat_of(target / name).st_ino == a.st_ino);
  }
  CHECK(stat_of(target / "alone").st_nlink == 1);
  std::ofstream(target / "z", std::ios::app) << "+";
  std::ifstream in(target / "deep/er/b");
  CHECK(std::string((std::istreambuf_iterator<char>(in)), {}) == "shared+");
  // Materializing refreshed the stat caches after linking (which changes the inode's ctime).
  manifest fresh = (**loaded).files;
  triplane::testing::temp_directory dir2("tp-sync-test");
  REQUIRE_FALSE(materialize(dir2.sub("ws"), fresh, *f.store));
  auto after = sync_manifest(dir2.sub("ws"), fresh, 0);
  REQUIRE(after);
  CHECK(after->files_read == 0);
  CHECK_FALSE(after->changed);
}

TEST_CASE("a manifest whose hard links name no file of its own, or lead through a symlink, is "
          "refused by materialize and nothing is linked outside",
          "[workspace][bad-input]") {
  triplane::testing::temp_directory dir("tp-sync-test");
  const fs::path outside = fs::path(dir.path()) / "outside";
  fs::create_directories(outside);
  write(outside, "secret", "secret");
  hand_made_entries h(dir.sub("db"), outside);
  auto& f = h.f;
  const auto file = h.file, symlink = h.symlink, directory = h.directory;
  manifest_entry link = file;
  link.chunks.clear();
  struct row {
    const char* what;
    manifest m;
  };
  auto with = [](manifest_entry e, const std::string& of) {
    e.hard_link_of = of;
    return e;
  };
  auto r = GENERATE_COPY(
      row{"a link of a missing entry", {{"a", file}, {"b", with(link, "missing")}}},
      row{"a link of a symlink", {{"a", symlink}, {"b", with(link, "a")}}},
      row{"a link of a link", {{"a", file}, {"b", with(link, "a")}, {"c", with(link, "b")}}},
      row{"a link with chunks of its own", {{"a", file}, {"b", with(file, "a")}}},
      row{"a link of a directory", {{"a", directory}, {"b", with(link, "a")}}},
      row{"a link of itself", {{"b", with(link, "b")}}},
      row{"a link made through a symlinked directory",
          {{"a", file}, {"out", symlink}, {"out/b", with(link, "a")}}});
  INFO(r.what);
  triplane::testing::temp_directory ws_dir("tp-sync-test");
  auto err = materialize(ws_dir.sub("ws"), r.m, *f.store);
  REQUIRE(err);
  CHECK(fs::directory_iterator(outside) != fs::directory_iterator());
  CHECK_FALSE(fs::exists(outside / "b"));
  CHECK(stat_of(outside / "secret").st_nlink == 1);
}

TEST_CASE("records stored before hard links existed still load; records with links round-trip",
          "[workspace]") {
  // encode_record of this build's predecessor (format 1, FileEntry without hardLinkOf): a
  // directory "src", regular files "src/a.txt" and "src/b.txt" (both "one") and a symlink
  // "src/l" -> "a.txt", cwd "src", env LANG=C, kv note=v.
  const std::string old_hex =
      "0000000054000000000000000400080001000000000000000068e5cf8b0100000168e5cf8b01000001000000000000001d00"
      "0000220000001d0000000a0000001d000000220000001d000000170000002d000000170000003d000000070000003c000000"
      "0a00010069000000c70000006f6c640000000000000000000000000073726300000000000400000000000200050000002a00"
      "0000050000000a0000004c414e470000000043000000000000000400000000000200050000002a000000050000000a000000"
      "6e6f746500000000760000000000000000000000040001000000000000000000000000000000000000000000000000000000"
      "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
      "00000000010000000a0000000000000000000000100000000300030001000000ed0100000000000000000000050000000000"
      "0000510000002200000051000000060000004d0000000a00000000000000a401000003000000000000000700000000000000"
      "4100000052000000450000000e000000550000000a00000000000000a4010000030000000000000007000000000000004900"
      "0000520000004d0000000e0000005d0000000a00000002000000ff0100000500000000000000090000000000000051000000"
      "3200000051000000060000004d00000032000000737263000000000000000000000000007372632f612e7478740000000000"
      "000001000000020100007692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed0000000000000000"
      "7372632f622e7478740000000000000001000000020100007692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0"
      "add73ff431ed00000000000000007372632f6c000000612e747874000000";
  std::string old_bytes;
  for (size_t i = 0; i + 1 < old_hex.size(); i += 2)
    old_bytes += static_cast<char>(std::stoi(old_hex.substr(i, 2), nullptr, 16));
  auto old = decode_record(old_bytes, "old");
  REQUIRE(old);
  CHECK(old->cwd == "src");
  CHECK(old->kv.at("note") == "v");
  REQUIRE(old->files.size() == 4);
  for (const char* name : {"src/a.txt", "src/b.txt"}) {
    INFO(name);
    CHECK(old->files.at(name).hard_link_of.empty());
    CHECK(old->files.at(name).chunks == std::vector<std::string>{sha256("one")});
  }
  CHECK(old->files.at("src/l").link_target == "a.txt");
  // Without links a record stays format 1 (older builds read it); with them it is format 2.
  auto format_of = [](const std::string& bytes) {
    // formatVersion: the first field of the root's data, after the segment table (8 bytes)
    // and the root pointer (8 bytes) of a one-segment flat message.
    REQUIRE(bytes.size() > 18);
    return static_cast<int>(static_cast<unsigned char>(bytes[16])) |
           static_cast<int>(static_cast<unsigned char>(bytes[17])) << 8;
  };
  CHECK(format_of(old_bytes) == 1);
  CHECK(format_of(encode_record(*old)) == 1);
  session_record linked = *old;
  auto& b = linked.files.at("src/b.txt");
  b.chunks.clear();
  b.hard_link_of = "src/a.txt";
  auto bytes = encode_record(linked);
  CHECK(format_of(bytes) == 2);
  auto back = decode_record(bytes, "old");
  REQUIRE(back);
  CHECK(back->files.at("src/b.txt").hard_link_of == "src/a.txt");
  CHECK(back->files.at("src/b.txt").chunks.empty());
  // A link of no regular file of the record is refused as corrupted.
  linked.files.at("src/b.txt").hard_link_of = "src/l";
  auto bad = decode_record(encode_record(linked), "old");
  REQUIRE_FALSE(bad);
  CHECK(code_of(bad.error()) == errc::corrupted);
  CHECK(describe(bad.error()).find("src/b.txt") != std::string::npos);
}

TEST_CASE("a manifest whose paths leave the workspace or lead through a symlink is refused when "
          "decoded and by materialize, and nothing is written outside",
          "[workspace][bad-input]") {
  triplane::testing::temp_directory dir("tp-sync-test");
  const fs::path outside = fs::path(dir.path()) / "outside";
  fs::create_directories(outside / "ws");
  hand_made_entries h(dir.sub("db"), outside);
  auto& f = h.f;
  const auto file = h.file, symlink = h.symlink, directory = h.directory;
  struct row {
    const char* what;
    manifest m;
  };
  auto r = GENERATE_COPY(
      row{"a file below a symlink to a directory outside", {{"out", symlink}, {"out/planted", file}}},
      row{"a directory below a symlink", {{"out", symlink}, {"out/planted", directory}}},
      row{"a parent directory name", {{"../planted", file}}},
      row{"a parent directory name inside", {{"d", directory}, {"d/../../planted", file}}},
      row{"an absolute path", {{(outside / "planted").string(), file}}},
      row{"an empty name", {{"d", directory}, {"d//planted", file}}},
      row{"a dot name", {{"./planted", file}}},
      row{"a parent that is not in the manifest", {{"missing/planted", file}}},
      row{"a parent that is a file", {{"f", file}, {"f/planted", file}}});
  INFO(r.what);
  // Stored: refused when the record is read back.
  session_record stored;
  stored.id = "tampered";
  stored.files = r.m;
  auto decoded = decode_record(encode_record(stored), "tampered");
  REQUIRE_FALSE(decoded);
  CHECK(code_of(decoded.error()) == triplane::errc::corrupted);
  // Given directly: refused before anything is created.
  auto err = materialize((outside / "ws" / "w").string(), r.m, *f.store);
  REQUIRE(err);
  CHECK(code_of(err) == triplane::errc::corrupted);
  CHECK_FALSE(fs::exists(outside / "planted"));
  CHECK_FALSE(fs::exists(outside / "ws" / "planted"));
}

TEST_CASE("a node that does not run as root still stores what a command made unreadable, and "
          "leaves the modes as they were",
          "[workspace]") {
  // A command can `chmod 000` a directory or a file of its workspace. A root node reads them
  // anyway; a node running as a plain user did not: the directory's contents dropped out of the
  // manifest (lost at passivation) and the file failed every sync. Here the sync runs as a plain
  // user: in a child that drops to uid 65534 when the test runs as root.
  triplane::testing::temp_directory dir("tp-sync-test");
  const fs::path ws = fs::path(dir.path()) / "ws";
  fs::create_directories(ws / "locked" / "deeper");
  write(ws / "locked", "inner.txt", "inner");
  write(ws / "locked" / "deeper", "deep.txt", "deep!");
  write(ws, "secret.txt", "secret");
  const uid_t user = ::geteuid() == 0 ? 65534 : ::geteuid();
  const gid_t group = ::geteuid() == 0 ? 65534 : ::getegid();
  if (::geteuid() == 0) {
    REQUIRE(::chmod(dir.path().c_str(), 0755) == 0);
    for (auto& p : fs::recursive_directory_iterator(ws)) REQUIRE(::lchown(p.path().c_str(), user, group) == 0);
    REQUIRE(::lchown(ws.c_str(), user, group) == 0);
  }
  REQUIRE(::chmod((ws / "locked" / "deeper").c_str(), 0) == 0);
  REQUIRE(::chmod((ws / "locked").c_str(), 0) == 0);
  REQUIRE(::chmod((ws / "secret.txt").c_str(), 0) == 0);

  int out[2];
  REQUIRE(::pipe(out) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(out[0]);
    if (::geteuid() == 0 && (::setgroups(0, nullptr) != 0 || ::setgid(group) != 0 || ::setuid(user) != 0))
      ::_exit(3);
    manifest m;
    auto synced = sync_manifest(ws.string(), m, 0);
    std::string report;
    if (!synced) {
      report = "error " + triplane::describe(synced.error()) + "\n";
    } else {
      for (const auto& [path, e] : m) {
        std::string contents;
        for (const auto& hash : e.chunks) contents += synced->new_chunks.at(hash);
        report += path + "=" + contents + "\n";
      }
    }
    (void)!::write(out[1], report.data(), report.size());
    ::_exit(0);
  }
  ::close(out[1]);
  std::string report;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) > 0;) report.append(buf, static_cast<size_t>(n));
  ::close(out[0]);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  INFO(report);
  CHECK(report == "locked=\nlocked/deeper=\nlocked/deeper/deep.txt=deep!\nlocked/inner.txt=inner\n"
                  "secret.txt=secret\n");
  // The modes the command set are the ones it finds again.
  CHECK((stat_of(ws / "locked").st_mode & 07777) == 0);
  CHECK((stat_of(ws / "locked" / "deeper").st_mode & 07777) == 0);
  CHECK((stat_of(ws / "secret.txt").st_mode & 07777) == 0);
  ::chmod((ws / "locked").c_str(), 0755);  // so that the temporary directory can be removed
  ::chmod((ws / "locked" / "deeper").c_str(), 0755);
}
