// Reading tar headers before tar runs: every member named and typed, whatever header style names
// it; archives that cannot be followed are left to tar; nothing read outside the archive.
#include "session/tar_members.hpp"

#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>
#include <random>

#include "session/testing/tar_writer.hpp"

using namespace triplane;
using namespace triplane::actors::session;
using triplane::actors::session::testing::tar_writer;

TEST_CASE("every member of an archive is read with its name and type", "[tar]") {
  std::string long_name(180, 'n');
  tar_writer w;
  w.add("dir/", '5', "", "", 0755)
      .add("dir/a.txt", '0', "hello")
      .add("dir/b.txt", '1', "", "dir/a.txt")
      .add("dir/s", '2', "", "a.txt")
      .add("null", '3')
      .add("disk", '4')
      .add("pipe", '6')
      .add_gnu_long("deep/" + long_name, '6')
      .add_pax("pax/" + long_name, '3', "")
      .add("after.txt", '0', std::string(1000, 'x'));
  auto members = read_tar_members(w.finish());
  REQUIRE(members);
  std::vector<std::pair<std::string, char>> got;
  for (const auto& m : *members) got.emplace_back(m.name, m.type);
  std::vector<std::pair<std::string, char>> want = {
      {"dir/", '5'},  {"dir/a.txt", '0'}, {"dir/b.txt", '1'}, {"dir/s", '2'},
      {"null", '3'},  {"disk", '4'},      {"pipe", '6'},      {"deep/" + long_name, '6'},
      {"pax/" + long_name, '3'}, {"after.txt", '0'}};
  CHECK(got == want);
}

TEST_CASE("devices and fifos are refused naming the member and its type", "[tar][bad-input]") {
  struct row {
    char type;
    const char* type_name;
  };
  auto r = GENERATE(row{'3', "character device"}, row{'4', "block device"}, row{'6', "fifo"});
  INFO(r.type_name);
  tar_writer w;
  w.add("ok.txt", '0', "x").add("sub/special", r.type).add("later.txt", '0', "y");
  auto members = read_tar_members(w.finish());
  REQUIRE(members);
  auto err = check_tar_members(*members);
  REQUIRE(err);
  CHECK(code_of(err) == errc::invalid_argument);
  CHECK(describe(err).find("'sub/special'") != std::string::npos);
  CHECK(describe(err).find(r.type_name) != std::string::npos);
}

TEST_CASE("regular files, directories, symlinks and hard links are accepted", "[tar]") {
  tar_writer w;
  w.add("d/", '5').add("d/f", '0', "x").add("d/h", '1', "", "d/f").add("d/l", '2', "", "f").add("c", '7', "y");
  auto members = read_tar_members(w.finish());
  REQUIRE(members);
  CHECK_FALSE(check_tar_members(*members));
}

TEST_CASE("archives whose headers cannot be followed are left to tar, never read past their end",
          "[tar][bad-input]") {
  tar_writer w;
  w.add("a.txt", '0', std::string(700, 'a')).add("pipe", '6');
  const std::string good = w.finish();
  SECTION("not an archive") { CHECK_FALSE(read_tar_members("this is not a tar archive at all")); }
  SECTION("a bad checksum") {
    std::string bad = good;
    bad[0] = 'b';
    CHECK_FALSE(read_tar_members(bad));
  }
  SECTION("truncated in a member's data") { CHECK_FALSE(read_tar_members(good.substr(0, 900))); }
  SECTION("truncated in a header") { CHECK_FALSE(read_tar_members(good.substr(0, 1536 + 100))); }
  SECTION("the end-of-archive blocks missing") {
    auto members = read_tar_members(good.substr(0, 2048));
    REQUIRE(members);
    CHECK(members->size() == 2);
  }
  SECTION("random corruption with valid checksums") {
    // Headers whose fields say anything (sizes, types, pax lengths, sparse flags), with their
    // checksums made right again: the reader stays inside the archive (ASan builds report a read
    // outside it; every build at least must not crash).
    tar_writer big;
    big.add("a", '0', std::string(600, 'a')).add_pax("p", '6').add_gnu_long(std::string(120, 'l'), '0', "z");
    big.add("s", 'S', "sparse").add("g", 'g', "20 path=global/name\n");
    const std::string base = big.finish();
    std::mt19937 rng(7);
    for (int i = 0; i < 5000; ++i) {
      std::string mutated = base;
      size_t header = (rng() % (base.size() / 512)) * 512;
      for (int k = 0; k < 3; ++k) {
        static const size_t fields[] = {124, 130, 135, 156, 482, 504, 0, 345, 511};
        size_t at = header + (rng() % 2 ? fields[rng() % 9] : rng() % 512);
        mutated[at] = static_cast<char>(rng() % 3 ? '0' + rng() % 8 : rng());
      }
      std::memset(&mutated[header + 148], ' ', 8);
      unsigned sum = 0;
      for (size_t b = 0; b < 512; ++b) sum += static_cast<unsigned char>(mutated[header + b]);
      std::snprintf(&mutated[header + 148], 8, "%06o", sum);
      (void)read_tar_members(mutated.substr(0, rng() % 4 ? mutated.size() : rng() % (mutated.size() + 1)));
    }
    SUCCEED();
  }
}
