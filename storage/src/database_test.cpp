// database: column families, pinned gets, batches, refcount merges, iteration, properties.
#include "triplane/storage/database.hpp"

#include <fstream>
#include <map>

#include <catch2/catch.hpp>

#include "temp_directory.hpp"


using namespace triplane;
using namespace triplane::storage;
using triplane::testing::temp_directory;

namespace {

std::unique_ptr<database> open_db(const std::string& path, std::vector<std::string> cfs) {
  database_options options;
  options.path = path;
  options.column_families = std::move(cfs);
  auto db = database::open(options);
  REQUIRE(db);
  return std::move(*db);
}

column_family cf_of(const database& db, std::string_view name) {
  auto cf = db.column(name);
  REQUIRE(cf);
  return *cf;
}

std::string counter(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(v >> (8 * i));
  return out;
}

uint64_t read_counter(database& db, column_family cf, std::string_view key) {
  auto value = db.get(cf, key);
  REQUIRE(value);
  REQUIRE(value->has_value());
  auto n = decode_refcount(**value);
  REQUIRE(n);
  return *n;
}

} // namespace

TEST_CASE("a value put in a column family is read back from that column family only",
          "[storage][database]") {
  temp_directory dir;
  auto db = open_db(dir.path(), {"chunks", "manifests"});
  auto chunks = cf_of(*db, "chunks");
  auto manifests = cf_of(*db, "manifests");
  std::string big(70000, 'x');
  REQUIRE_FALSE(db->put(chunks, "k", big, durability::process_crash));

  auto copy = db->get(chunks, "k");
  REQUIRE(copy);
  REQUIRE(copy->has_value());
  CHECK(**copy == big);

  std::string seen;
  auto found = db->get(chunks, "k", [&](std::string_view v) { seen.assign(v); });
  REQUIRE(found);
  CHECK(*found);
  CHECK(seen == big);

  auto size = db->get_raw(chunks, "k");
  REQUIRE(size);
  CHECK(*size == std::optional<size_t>{big.size()});

  auto other = db->get(manifests, "k");
  REQUIRE(other);
  CHECK_FALSE(other->has_value());
  bool called = false;
  auto absent = db->get(manifests, "k", [&](std::string_view) { called = true; });
  REQUIRE(absent);
  CHECK_FALSE(*absent);
  CHECK_FALSE(called);
  auto absent_raw = db->get_raw(manifests, "k");
  REQUIRE(absent_raw);
  CHECK_FALSE(absent_raw->has_value());

  REQUIRE_FALSE(db->erase(chunks, "k", durability::power_loss));
  CHECK_FALSE(db->get(chunks, "k")->has_value());
  CHECK_FALSE(db->erase(chunks, "never-there", durability::process_crash));
}

TEST_CASE("column families and their data survive reopening, also when no longer listed",
          "[storage][database]") {
  temp_directory dir;
  {
    auto db = open_db(dir.path(), {"a", "b"});
    REQUIRE_FALSE(db->put(cf_of(*db, "a"), "ka", "va", durability::power_loss));
    REQUIRE_FALSE(db->put(cf_of(*db, "b"), "kb", "vb", durability::process_crash));
  }
  auto db = open_db(dir.path(), {"a"});  // "b" exists on disk and must still open
  CHECK(*db->get(cf_of(*db, "a"), "ka") == std::optional<std::string>{"va"});
  CHECK(*db->get(cf_of(*db, "b"), "kb") == std::optional<std::string>{"vb"});
  auto missing = db->column("c");
  REQUIRE_FALSE(missing);
  CHECK(code_of(missing.error()) == errc::not_found);
  CHECK_THAT(describe(missing.error()), Catch::Contains("'c'"));
}

TEST_CASE("a write batch applies its changes to several column families together",
          "[storage][database]") {
  temp_directory dir;
  auto db = open_db(dir.path(), {"chunks", "manifests"});
  auto chunks = cf_of(*db, "chunks");
  auto manifests = cf_of(*db, "manifests");
  REQUIRE_FALSE(db->put(manifests, "old", "x", durability::process_crash));

  write_batch batch(*db);
  batch.put(chunks, "h1", "bytes1");
  batch.add_refcount(chunks, "rc/h1", 1);
  batch.put(manifests, "session", "h1");
  batch.erase(manifests, "old");
  CHECK(batch.count() == 4);
  CHECK(batch.byte_size() > 0);
  // Nothing is visible before write().
  CHECK_FALSE(db->get(chunks, "h1")->has_value());
  CHECK(db->get(manifests, "old")->has_value());

  auto level = GENERATE(durability::process_crash, durability::power_loss);
  INFO("durability " << static_cast<int>(level));
  REQUIRE_FALSE(db->write(batch, level));
  CHECK(*db->get(chunks, "h1") == std::optional<std::string>{"bytes1"});
  CHECK(*db->get(manifests, "session") == std::optional<std::string>{"h1"});
  CHECK_FALSE(db->get(manifests, "old")->has_value());
  CHECK(read_counter(*db, chunks, "rc/h1") == 1);

  batch.clear();
  CHECK(batch.count() == 0);
  CHECK_FALSE(db->write(batch, level));  // an empty batch is a no-op

  temp_directory other_dir;
  auto other = open_db(other_dir.path(), {"chunks"});
  write_batch foreign(*other);
  foreign.put(column_family{0}, "k", "v");
  auto err = db->write(foreign, level);
  CHECK(code_of(err) == errc::internal);
}

TEST_CASE("reference counts add and subtract by merge, across flushes and reopening",
          "[storage][database]") {
  temp_directory dir;
  {
    auto db = open_db(dir.path(), {"refs"});
    auto refs = cf_of(*db, "refs");
    REQUIRE_FALSE(db->add_refcount(refs, "c", 5, durability::process_crash));
    REQUIRE_FALSE(db->add_refcount(refs, "c", -2, durability::process_crash));
    CHECK(read_counter(*db, refs, "c") == 3);
    REQUIRE_FALSE(db->flush());  // base value in an SST, later operands in the memtable
    REQUIRE_FALSE(db->add_refcount(refs, "c", 10, durability::power_loss));
    CHECK(read_counter(*db, refs, "c") == 13);
    REQUIRE_FALSE(db->put(refs, "p", counter(7), durability::process_crash));
    REQUIRE_FALSE(db->add_refcount(refs, "p", -7, durability::process_crash));
    CHECK(read_counter(*db, refs, "p") == 0);
  }
  auto db = open_db(dir.path(), {"refs"});
  auto refs = cf_of(*db, "refs");
  CHECK(read_counter(*db, refs, "c") == 13);

  SECTION("a counter stored with the wrong size reads as corrupted, not as a number") {
    REQUIRE_FALSE(db->put(refs, "bad", "abc", durability::process_crash));
    REQUIRE_FALSE(db->add_refcount(refs, "bad", 1, durability::process_crash));
    auto value = db->get(refs, "bad");
    REQUIRE_FALSE(value);
    CHECK(code_of(value.error()) == errc::corrupted);
    CHECK_THAT(describe(value.error()), Catch::Contains("'refs'"));
    auto direct = decode_refcount("abc");
    REQUIRE_FALSE(direct);
    CHECK(code_of(direct.error()) == errc::corrupted);
  }
}

TEST_CASE("prefix iteration visits exactly the keys with the prefix, in byte order",
          "[storage][database]") {
  temp_directory dir;
  auto db = open_db(dir.path(), {"kv"});
  auto kv = cf_of(*db, "kv");
  const std::vector<std::string> keys{"a",         "ab",      "ab\x01",  "ab\xff",
                                      "ab\xff\xff", "ac",      "b",       std::string("ab\0", 3)};
  for (const auto& k : keys) REQUIRE_FALSE(db->put(kv, k, "v:" + k, durability::process_crash));
  REQUIRE_FALSE(db->erase(kv, "ab\x01", durability::process_crash));

  auto collect = [&](std::string_view prefix, size_t limit = 100) {
    std::vector<std::string> seen;
    auto err = db->for_each(kv, prefix, [&](std::string_view k, std::string_view v) {
      CHECK(v == "v:" + std::string(k));
      seen.emplace_back(k);
      return seen.size() < limit;
    });
    CHECK_FALSE(err);
    return seen;
  };
  CHECK(collect("ab") == std::vector<std::string>{"ab", std::string("ab\0", 3), "ab\xff",
                                                   "ab\xff\xff"});
  CHECK(collect("ab\xff") == std::vector<std::string>{"ab\xff", "ab\xff\xff"});
  CHECK(collect("") .size() == keys.size() - 1);
  CHECK(collect("a", 2) == std::vector<std::string>{"a", "ab"});
  CHECK(collect("z").empty());
}

TEST_CASE("prefix iteration from a start key pages through a range without leaving the prefix",
          "[storage][database]") {
  temp_directory dir;
  auto db = open_db(dir.path(), {"kv"});
  auto kv = cf_of(*db, "kv");
  for (std::string k : {"a/1", "a/2", "a/3", "a0", "b/1", "a", "a/"})
    REQUIRE_FALSE(db->put(kv, k, "v", durability::process_crash));
  auto collect = [&](std::string_view prefix, std::string_view start) {
    std::vector<std::string> seen;
    CHECK_FALSE(db->for_each(kv, prefix, start, [&](std::string_view k, std::string_view) {
      seen.emplace_back(k);
      return true;
    }));
    return seen;
  };
  // After "a/1": the key itself with a NUL appended is the smallest key above it.
  CHECK(collect("a/", std::string("a/1\0", 4)) == std::vector<std::string>{"a/2", "a/3"});
  CHECK(collect("a/", "a/2") == std::vector<std::string>{"a/2", "a/3"});
  // A start below the prefix starts at the prefix; one above the range visits nothing.
  CHECK(collect("a/", "") == std::vector<std::string>{"a/", "a/1", "a/2", "a/3"});
  CHECK(collect("a/", "a") == std::vector<std::string>{"a/", "a/1", "a/2", "a/3"});
  CHECK(collect("a/", "a0").empty());
  CHECK(collect("a/", "zzz").empty());
}

TEST_CASE("properties report estimated keys and live SST bytes", "[storage][database]") {
  temp_directory dir;
  auto db = open_db(dir.path(), {"kv"});
  auto kv = cf_of(*db, "kv");
  uint64_t noise = 0x9E3779B97F4A7C15u;  // incompressible values, so SST size tracks data size
  for (int i = 0; i < 1000; ++i) {
    std::string value(100, '\0');
    for (auto& c : value) {
      noise ^= noise << 13, noise ^= noise >> 7, noise ^= noise << 17;
      c = static_cast<char>(noise);
    }
    REQUIRE_FALSE(db->put(kv, "key" + std::to_string(i), value, durability::process_crash));
  }
  auto before = db->live_sst_bytes(kv);
  REQUIRE(before);
  CHECK(*before == 0);
  REQUIRE_FALSE(db->flush());
  auto keys = db->estimate_num_keys(kv);
  REQUIRE(keys);
  CHECK(*keys >= 900);
  CHECK(*keys <= 1100);
  auto after = db->live_sst_bytes(kv);
  REQUIRE(after);
  CHECK(*after > 1000 * 100);
  auto unknown = db->property(kv, "rocksdb.no-such-property");
  REQUIRE_FALSE(unknown);
  CHECK(code_of(unknown.error()) == errc::not_found);
}

TEST_CASE("opening refuses bad paths and names with errors that say what was wrong",
          "[storage][database]") {
  temp_directory dir;
  SECTION("empty path") {
    auto db = database::open(database_options{});
    REQUIRE_FALSE(db);
    CHECK(code_of(db.error()) == errc::invalid_argument);
  }
  SECTION("empty column family name") {
    database_options options;
    options.path = dir.sub("db");
    options.column_families = {"ok", ""};
    auto db = database::open(options);
    REQUIRE_FALSE(db);
    CHECK(code_of(db.error()) == errc::invalid_argument);
  }
  SECTION("path is a regular file") {
    auto file = dir.sub("file");
    std::ofstream(file) << "not a directory";
    database_options options;
    options.path = file;
    auto db = database::open(options);
    REQUIRE_FALSE(db);
    CHECK(code_of(db.error()) == errc::io_error);
    CHECK_THAT(describe(db.error()), Catch::Contains(file));
  }
  SECTION("missing database without create_if_missing") {
    database_options options;
    options.path = dir.sub("absent");
    options.create_if_missing = false;
    auto db = database::open(options);
    REQUIRE_FALSE(db);
    CHECK(code_of(db.error()) == errc::invalid_argument);
    CHECK_THAT(describe(db.error()), Catch::Contains("absent"));
  }
}

TEST_CASE("a value of 1 MiB stays in the block cache after it was read",
          "[storage][database]") {
  // With RocksDB's default cache sharding (512 KiB shards for 64 MiB), a 1 MiB block was never
  // cached and every get went back to the file.
  temp_directory dir;
  auto db = open_db(dir.path(), {"kv"});
  auto kv = cf_of(*db, "kv");
  std::string big(1u << 20, '\0');
  uint64_t noise = 7;
  for (auto& c : big) {
    noise ^= noise << 13, noise ^= noise >> 7, noise ^= noise << 17;
    c = static_cast<char>(noise);
  }
  REQUIRE_FALSE(db->put(kv, "big", big, durability::process_crash));
  REQUIRE_FALSE(db->flush());
  REQUIRE(*db->get_raw(kv, "big") == std::optional<size_t>{big.size()});
  auto usage = db->property(kv, "rocksdb.block-cache-usage");
  REQUIRE(usage);
  CHECK(*usage >= big.size());
  CHECK(*db->get(kv, "big") == std::optional<std::string>{big});
}
