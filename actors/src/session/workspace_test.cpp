// The files API: path validation and symlink tricks, for both the openat2 and the fallback walk.
#include "session/workspace.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include <csignal>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <unistd.h>

using namespace triplane;
using namespace triplane::actors;
using namespace triplane::actors::session;
namespace fs = std::filesystem;

namespace {

struct temp_tree {
  fs::path base;
  temp_tree() {
    char tmpl[] = "/tmp/tp-ws-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    base = tmpl;
    fs::create_directories(base / "ws");
    fs::create_directories(base / "outside");
    std::ofstream(base / "outside" / "secret") << "secret";
  }
  ~temp_tree() { fs::remove_all(base); }
  fs::path ws() const { return base / "ws"; }
  /// The files API over ws(), resolving with openat2 or with the O_NOFOLLOW walk.
  std::unique_ptr<workspace> open(bool use_openat2) const {
    auto opened = workspace::open(ws().string(), use_openat2);
    REQUIRE(opened);
    return std::move(*opened);
  }
  fs::path outside() const { return base / "outside"; }
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

} // namespace

TEST_CASE("bad paths are refused with invalid_argument and a message naming the problem", "[workspace][bad-input]") {
  temp_tree t;
  bool use_openat2 = GENERATE(true, false);
  auto ws = t.open(use_openat2);
  struct bad { std::string path; std::string says; };
  auto c = GENERATE(values<bad>({
      {"../outside/secret", ".."},
      {"a/../../outside/secret", ".."},
      {"..", ".."},
      {"/etc/passwd", "absolute"},
      {std::string("a\0b", 3), "NUL"},
      {std::string(5000, 'a'), "more than 4096"},
      {std::string(256, 'n'), "more than 255"},
      {"", "root"},
  }));
  INFO("openat2=" << use_openat2 << " case: " << c.says);
  file_write_request w;
  w.path = c.path;
  w.data = "x";
  w.create_parents = true;
  auto r = ws->write(w);
  REQUIRE_FALSE(r);
  CHECK(code_of(r.error()) == errc::invalid_argument);
  CHECK(describe(r.error()).find(c.says) != std::string::npos);
  auto rd = ws->read({c.path, 0, 0});
  REQUIRE_FALSE(rd);
  CHECK(code_of(rd.error()) == errc::invalid_argument);
  CHECK(slurp(t.outside() / "secret") == "secret");
}

TEST_CASE("files are written, read by range, listed, moved and removed", "[workspace]") {
  temp_tree t;
  bool use_openat2 = GENERATE(true, false);
  auto ws = t.open(use_openat2);
  auto& w = *ws;
  file_write_request req{"src/pkg/mod.py", "print('hi')\n", 0755, true, false};
  auto e = w.write(req);
  REQUIRE(e);
  CHECK(e->size == 12);
  CHECK(e->mode == 0755);
  CHECK_FALSE(w.write({"nope/x", "x", 0644, false, false}));
  auto part = w.read({"src/pkg/mod.py", 6, 4});
  REQUIRE(part);
  CHECK(part->data == "'hi'");
  CHECK_FALSE(part->eof);
  auto all = w.list({"", true});
  REQUIRE(all);
  REQUIRE(all->size() == 3);
  CHECK((*all)[0].path == "src");
  CHECK((*all)[2].path == "src/pkg/mod.py");
  // Listing the root again gives the same entries (dups of the root fd share its offset).
  auto again = w.list({"", false});
  REQUIRE(again);
  CHECK(again->size() == 1);
  CHECK(w.list({"", true})->size() == 3);
  CHECK(w.make_directory({"a/b/c", true, 0755}));
  CHECK(w.move({"src/pkg/mod.py", "a/b/c/mod.py", false}));
  CHECK(slurp(t.ws() / "a/b/c/mod.py") == "print('hi')\n");
  CHECK(code_of(w.remove({"a", false}).error()) == errc::invalid_argument);
  auto removed = w.remove({"a", true});
  REQUIRE(removed);
  CHECK(*removed == 4);
  CHECK_FALSE(fs::exists(t.ws() / "a"));
  CHECK(code_of(w.stat("a").error()) == errc::not_found);
}

TEST_CASE("a write that fails part-way leaves the file as it was", "[workspace][bad-input]") {
  // As on a full disk: the kernel refuses the write past a size (RLIMIT_FSIZE here). A file
  // written without append is replaced whole or not at all, never left truncated.
  temp_tree t;
  bool use_openat2 = GENERATE(true, false);
  INFO("openat2=" << use_openat2);
  auto ws = t.open(use_openat2);
  auto& w = *ws;
  REQUIRE(w.write({"doc.txt", "precious", 0600, false, false}));
  struct rlimit saved {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
  auto previous = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit low = saved;
  low.rlim_cur = 100000;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &low) == 0);
  auto r = w.write({"doc.txt", std::string(200000, 'x'), 0644, false, false});
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::signal(SIGXFSZ, previous);
  REQUIRE_FALSE(r);
  CHECK(code_of(r.error()) == errc::limit_exceeded);
  CHECK(slurp(t.ws() / "doc.txt") == "precious");
  CHECK((fs::status(t.ws() / "doc.txt").permissions() & fs::perms::mask) == fs::perms(0600));
  size_t entries = 0;
  for (auto& e : fs::directory_iterator(t.ws())) {
    INFO(e.path());
    ++entries;
  }
  CHECK(entries == 1);  // nothing half-written left beside it
  // Writes that succeed replace the contents and the mode.
  REQUIRE(w.write({"doc.txt", "new", 0644, false, false}));
  CHECK(slurp(t.ws() / "doc.txt") == "new");
  CHECK((fs::status(t.ws() / "doc.txt").permissions() & fs::perms::mask) == fs::perms(0644));
  CHECK(code_of(w.write({"", "x", 0644, false, false}).error()) == errc::invalid_argument);
  REQUIRE(w.make_directory({"sub", false, 0755}));
  CHECK(code_of(w.write({"sub", "x", 0644, false, false}).error()) == errc::invalid_argument);
}

TEST_CASE("reading or appending to a fifo is refused at once instead of waiting for a peer",
          "[workspace][bad-input]") {
  // A command can leave a fifo in the workspace; opening it blocks until the other side opens,
  // which would hold the session's operations (and its passivation) for ever.
  temp_tree t;
  bool use_openat2 = GENERATE(true, false);
  INFO("openat2=" << use_openat2);
  auto ws = t.open(use_openat2);
  auto& w = *ws;
  REQUIRE(::mkfifo((t.ws() / "pipe").c_str(), 0644) == 0);
  auto peer = [&](int mode) {  // opening the other side releases an open that blocks
    int fd = ::open((t.ws() / "pipe").c_str(), mode | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0) ::close(fd);
  };
  auto read = std::async(std::launch::async, [&] { return w.read({"pipe", 0, 0}); });
  bool read_blocked = read.wait_for(std::chrono::seconds(5)) != std::future_status::ready;
  while (read.wait_for(std::chrono::milliseconds(10)) != std::future_status::ready) peer(O_WRONLY);
  CHECK_FALSE(read_blocked);
  auto r = read.get();
  REQUIRE_FALSE(r);
  CHECK(code_of(r.error()) == errc::invalid_argument);
  auto append = std::async(std::launch::async, [&] { return w.write({"pipe", "x", 0644, false, true}); });
  bool append_blocked = append.wait_for(std::chrono::seconds(5)) != std::future_status::ready;
  // (a reader that opens and closes at once: the writer's open returns, its write gets EPIPE)
  auto previous = ::signal(SIGPIPE, SIG_IGN);
  while (append.wait_for(std::chrono::milliseconds(10)) != std::future_status::ready) peer(O_RDONLY);
  ::signal(SIGPIPE, previous);
  CHECK_FALSE(append_blocked);
  auto a = append.get();
  REQUIRE_FALSE(a);
  auto replaced = w.write({"pipe", "x", 0644, false, false});
  REQUIRE_FALSE(replaced);
  CHECK(code_of(replaced.error()) == errc::invalid_argument);
}

TEST_CASE("mkdir with parents leaves an existing directory's mode alone", "[workspace]") {
  // "An existing directory is then not an error" (mkdir_request): like mkdir -p, not a chmod.
  // (tar_in makes its target directory this way: extracting must not change its mode.)
  temp_tree t;
  bool use_openat2 = GENERATE(true, false);
  INFO("openat2=" << use_openat2);
  auto ws = t.open(use_openat2);
  auto& w = *ws;
  REQUIRE(w.make_directory({"private", false, 0700}));
  auto again = w.make_directory({"private", true, 0755});
  REQUIRE(again);
  CHECK(again->mode == 0700);
  CHECK((fs::status(t.ws() / "private").permissions() & fs::perms::mask) == fs::perms(0700));
  auto made = w.make_directory({"private/a/b", true, 0750});
  REQUIRE(made);
  CHECK(made->mode == 0750);
  CHECK(w.stat("private")->mode == 0700);
  REQUIRE(w.write({"file", "x", 0644, false, false}));
  CHECK_FALSE(w.make_directory({"file", true, 0755}));
  CHECK(w.stat("file")->mode == 0644);
}

TEST_CASE("symlink tricks never reach outside the workspace", "[workspace][bad-input]") {
  temp_tree t;
  bool use_openat2 = GENERATE(true, false);
  INFO("openat2=" << use_openat2);
  auto ws = t.open(use_openat2);
  auto& w = *ws;
  fs::create_symlink(t.outside() / "secret", t.ws() / "link_out");
  fs::create_symlink(t.outside(), t.ws() / "dir_out");
  fs::create_symlink(t.ws() / "missing", t.ws() / "dangling");
  fs::create_symlink("../outside", t.ws() / "rel_out");

  SECTION("writing through a symlink that points outside") {
    CHECK_FALSE(w.write({"link_out", "pwned", 0644, false, false}));
    CHECK(slurp(t.outside() / "secret") == "secret");
  }
  SECTION("reading through a symlink that points outside") {
    auto r = w.read({"link_out", 0, 0});
    REQUIRE_FALSE(r);
    CHECK(code_of(r.error()) == errc::permission_denied);
  }
  SECTION("a dangling symlink") {
    CHECK_FALSE(w.write({"dangling", "x", 0644, false, false}));
    CHECK_FALSE(fs::exists(t.ws() / "missing"));
    auto s = w.stat("dangling");
    REQUIRE(s);
    CHECK(s->type == file_type::symlink);
  }
  SECTION("a symlinked directory, absolute and relative") {
    for (auto dir : {"dir_out", "rel_out"}) {
      auto r = w.write({std::string(dir) + "/planted", "x", 0644, false, false});
      REQUIRE_FALSE(r);
      CHECK(code_of(r.error()) == errc::permission_denied);
      CHECK_FALSE(w.read({std::string(dir) + "/secret", 0, 0}));
      CHECK_FALSE(w.list({dir, true}));
      CHECK_FALSE(w.make_directory({std::string(dir) + "/x/y", true, 0755}));
      CHECK_FALSE(w.move({"link_out", std::string(dir) + "/moved", false}));
    }
    CHECK_FALSE(fs::exists(t.outside() / "planted"));
    CHECK_FALSE(fs::exists(t.outside() / "x"));
    CHECK_FALSE(fs::exists(t.outside() / "moved"));
  }
  SECTION("removing a symlink removes the link, not its target") {
    CHECK(w.remove({"dir_out", true}));
    CHECK(fs::exists(t.outside() / "secret"));
  }
  SECTION("a recursive listing does not descend through symlinks") {
    auto l = w.list({"", true});
    REQUIRE(l);
    for (const auto& e : *l) CHECK(e.path.find("secret") == std::string::npos);
  }
}

TEST_CASE("a symlink swapped in between check and use never redirects a write outside", "[workspace][bad-input]") {
  temp_tree t;
  bool use_openat2 = GENERATE(true, false);
  INFO("openat2=" << use_openat2);
  auto ws = t.open(use_openat2);
  std::atomic<bool> stop{false};
  // A hostile command flips "d" between a real directory and a symlink to outside.
  std::thread flipper([&] {
    auto d = t.ws() / "d";
    auto tmp_dir = t.ws() / "d.dir";
    auto tmp_link = t.ws() / "d.link";
    std::error_code ec;
    while (!stop) {
      fs::create_directory(tmp_dir, ec);
      fs::rename(tmp_dir, d, ec);
      fs::remove_all(tmp_link, ec);
      fs::create_directory_symlink(t.outside(), tmp_link, ec);
      fs::remove_all(d, ec);
      fs::rename(tmp_link, d, ec);
      fs::remove(d, ec);
    }
  });
  int ok = 0;
  for (int i = 0; i < 3000; ++i) {
    auto r = ws->write({"d/f" + std::to_string(i % 10), "x", 0644, false, false});
    if (r) ++ok;
  }
  stop = true;
  flipper.join();
  INFO("writes that succeeded inside: " << ok);
  for (auto& e : fs::directory_iterator(t.outside())) CHECK(e.path().filename() == "secret");
}

TEST_CASE("merging a tree that holds a fifo or socket is refused naming it, and nothing moves",
          "[workspace][bad-input]") {
  // No sync keeps such an entry: merged in (as tar_in merges its staging directory), it would
  // vanish at the next passivation.
  temp_tree t;
  auto ws = t.open(true);
  auto& w = *ws;
  REQUIRE(w.write({"from/a.txt", "a", 0644, true, false}));
  REQUIRE(w.write({"from/sub/b.txt", "b", 0644, true, false}));
  REQUIRE(w.make_directory({"into", false, 0755}));
  std::string kind = GENERATE(std::string("fifo"), std::string("socket"));
  INFO(kind);
  if (kind == "fifo") {
    REQUIRE(::mkfifo((t.ws() / "from/sub/special").c_str(), 0644) == 0);
  } else {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::string path = (t.ws() / "from/sub/special").string();
    REQUIRE(path.size() < sizeof addr.sun_path);
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    ::close(fd);
  }
  auto err = w.merge_into("from", "into");
  REQUIRE(err);
  CHECK(code_of(err) == errc::invalid_argument);
  CHECK(describe(err).find("'sub/special' is a " + kind) != std::string::npos);
  CHECK(fs::is_empty(t.ws() / "into"));
  CHECK(slurp(t.ws() / "from/a.txt") == "a");
}
