// state_store: versions, epoch fencing, corruption isolation, key validation, iteration,
// concurrency, schema evolution of payloads.
#include "triplane/storage/state_store.hpp"

#include <atomic>
#include <cstring>
#include <map>
#include <thread>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <catch2/catch.hpp>

#include "temp_directory.hpp"

#include "crc32c.hpp"
#include "state_record.hpp"
#include "triplane/schemas/state.capnp.h"
#include "triplane/schemas/test/evolution_v1.capnp.h"
#include "triplane/schemas/test/evolution_v2.capnp.h"

using namespace triplane;
using namespace triplane::storage;
using triplane::testing::temp_directory;

namespace {

std::unique_ptr<state_store> open_store(const std::string& path,
                                        durability level = durability::process_crash) {
  store_options options;
  options.path = path;
  options.default_durability = level;
  auto store = state_store::open(options);
  REQUIRE(store);
  return std::move(*store);
}

stored_state load_existing(state_store& store, const actor_key& key) {
  auto loaded = store.load(key);
  REQUIRE(loaded);
  REQUIRE(loaded->has_value());
  return **loaded;
}

template <class Builder>
std::string to_bytes(Builder& builder) {
  auto words = capnp::messageToFlatArray(builder);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

} // namespace

TEST_CASE("a saved state loads back exactly, with its version, epoch and schema version",
          "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  actor_key key{"counter", "c1"};
  auto missing = store->load(key);
  REQUIRE(missing);
  CHECK_FALSE(missing->has_value());

  auto epoch = store->begin_activation(key);
  REQUIRE(epoch);
  CHECK(*epoch == 1);
  std::string payload("binary\0payload\xff", 15);
  auto level = GENERATE(durability::process_crash, durability::power_loss);
  auto version = store->save(key, *epoch, 3, payload, level);
  REQUIRE(version);
  CHECK(*version == 1);
  auto state = load_existing(*store, key);
  CHECK(state.version == 1);
  CHECK(state.epoch == 1);
  CHECK(state.schema_version == 3);
  CHECK(state.payload == payload);

  SECTION("an empty payload is a valid state") {
    REQUIRE(store->save(key, *epoch, 3, "", level));
    CHECK(load_existing(*store, key).payload.empty());
  }
  SECTION("a large payload survives a reopen") {
    std::string big(1u << 20, '\0');
    for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 + 7);
    REQUIRE(store->save(key, *epoch, 4, big, level));
    store.reset();
    store = open_store(dir.path());
    auto reloaded = load_existing(*store, key);
    CHECK(reloaded.payload == big);
    CHECK(reloaded.version == 2);
  }
}

TEST_CASE("each save raises the version by one and keeps the writer's epoch",
          "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  actor_key key{"k", "id"};
  auto e1 = *store->begin_activation(key);
  for (uint64_t i = 1; i <= 5; ++i) {
    auto v = store->save(key, e1, 1, "v" + std::to_string(i), durability::process_crash);
    REQUIRE(v);
    CHECK(*v == i);
  }
  auto e2 = *store->begin_activation(key);
  CHECK(e2 == e1 + 1);
  CHECK(*store->save(key, e2, 1, "x", durability::process_crash) == 6);
  auto state = load_existing(*store, key);
  CHECK(state.version == 6);
  CHECK(state.epoch == e2);
  store.reset();
  store = open_store(dir.path());
  CHECK(*store->save(key, e2, 1, "y", durability::process_crash) == 7);
}

TEST_CASE("a save or erase from a stale epoch is refused and changes nothing",
          "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  actor_key key{"session", "s-42"};
  auto zombie = *store->begin_activation(key);
  REQUIRE(store->save(key, zombie, 1, "zombie's state", durability::power_loss));
  auto owner = *store->begin_activation(key);
  REQUIRE(owner > zombie);
  REQUIRE(store->save(key, owner, 1, "owner's state", durability::power_loss));
  const auto before = load_existing(*store, key);

  auto refused = store->save(key, zombie, 1, "overwrite", durability::power_loss);
  REQUIRE_FALSE(refused);
  CHECK(code_of(refused.error()) == errc::stale_epoch);
  CHECK_THAT(describe(refused.error()), Catch::Contains("s-42"));

  auto erase_refused = store->erase(key, zombie);
  CHECK(code_of(erase_refused) == errc::stale_epoch);

  auto after = load_existing(*store, key);
  CHECK(after.payload == before.payload);
  CHECK(after.version == before.version);
  CHECK(after.epoch == owner);

  // The fence holds across a reopen, and even while the owner has not written yet.
  store.reset();
  store = open_store(dir.path());
  auto newest = *store->begin_activation(key);
  CHECK(code_of(store->save(key, owner, 1, "late", durability::process_crash).error())
        == errc::stale_epoch);
  CHECK(load_existing(*store, key).payload == "owner's state");
  CHECK_FALSE(store->erase(key, newest));
  auto gone = store->load(key);
  REQUIRE(gone);
  CHECK_FALSE(gone->has_value());
}

TEST_CASE("activation epochs only grow, across reopening and erasing",
          "[storage][state_store]") {
  temp_directory dir;
  auto level = GENERATE(durability::process_crash, durability::power_loss);
  INFO("durability " << static_cast<int>(level));
  actor_key key{"k", "monotonic"};
  uint64_t last = 0;
  for (int round = 0; round < 3; ++round) {
    auto store = open_store(dir.path(), level);
    for (int i = 0; i < 4; ++i) {
      auto e = store->begin_activation(key);
      REQUIRE(e);
      CHECK(*e == last + 1);
      last = *e;
    }
    REQUIRE(store->save(key, last, 1, "s", level));
    REQUIRE_FALSE(store->erase(key, last));
    // After the erase an old activation is still fenced off.
    CHECK(code_of(store->erase(key, last - 1)) == errc::stale_epoch);
  }
  CHECK(last == 12);
}

TEST_CASE("a corrupted record fails to load for its own id only, naming it",
          "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  actor_key bad{"counter", "broken-id"};
  std::vector<actor_key> good{{"counter", "a"}, {"counter", "z"}, {"other", "broken-id"}};
  for (const auto& key : good)
    REQUIRE(store->save(key, 0, 1, "fine " + key.id, durability::process_crash));
  REQUIRE(store->save(bad, 0, 1, "will be damaged", durability::process_crash));

  auto& db = store->db();
  auto state_cf = *db.column(state_column_family);
  const auto record_key = encode_record_key(bad);
  const auto valid = **db.get(state_cf, record_key);

  struct damage {
    const char* name;
    std::string bytes;
  };
  std::string flipped = valid;
  flipped[flipped.size() - 9] ^= 0x20;  // inside the payload: only the checksum notices
  std::string huge_segment = valid;
  huge_segment[4] = '\xff';  // first segment's size far beyond the value
  huge_segment[5] = '\xff';
  auto d = GENERATE_COPY(damage{"garbage text", "not a capnp record at all"},
                         damage{"empty value", ""},
                         damage{"eight zero bytes", std::string(8, '\0')},
                         damage{"truncated record", valid.substr(0, valid.size() - 8)},
                         damage{"payload bit flip", flipped},
                         damage{"segment size beyond the value", huge_segment},
                         damage{"trailing bytes", valid + std::string(8, '\0')},
                         damage{"random words", std::string("\x07\x00\x00\x00\xde\xad\xbe\xef"
                                                            "\x01\x02\x03\x04\x05\x06\x07\x08",
                                                            16)});
  INFO("damage: " << d.name);
  REQUIRE_FALSE(db.put(state_cf, record_key, d.bytes, durability::process_crash));

  auto loaded = store->load(bad);
  REQUIRE_FALSE(loaded);
  CHECK(code_of(loaded.error()) == errc::corrupted);
  CHECK_THAT(describe(loaded.error()), Catch::Contains("broken-id"));
  CHECK_THAT(describe(loaded.error()), Catch::Contains("counter"));
  for (const auto& key : good) {
    INFO("healthy key " << key.kind << "/" << key.id);
    CHECK(load_existing(*store, key).payload == "fine " + key.id);
  }
  // A save cannot build a version on a record it cannot read; an erase clears the way.
  auto refused = store->save(bad, 0, 1, "new", durability::process_crash);
  REQUIRE_FALSE(refused);
  CHECK(code_of(refused.error()) == errc::corrupted);
  REQUIRE_FALSE(store->erase(bad, 0));
  CHECK(*store->save(bad, 0, 1, "new", durability::process_crash) == 1);
  CHECK(load_existing(*store, bad).payload == "new");
}

TEST_CASE("a record from a newer format version is refused rather than misread",
          "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  actor_key key{"counter", "future"};
  capnp::MallocMessageBuilder builder;
  auto record = builder.initRoot<schemas::StateRecord>();
  record.setFormatVersion(detail::state_record_format + 1);
  record.setVersion(1);
  record.setPayload(capnp::Data::Reader(reinterpret_cast<const kj::byte*>("p"), 1));
  record.setPayloadCrc32c(crc32c("p"));
  auto& db = store->db();
  REQUIRE_FALSE(db.put(*db.column(state_column_family), encode_record_key(key),
                       to_bytes(builder), durability::process_crash));
  auto loaded = store->load(key);
  REQUIRE_FALSE(loaded);
  CHECK(code_of(loaded.error()) == errc::corrupted);
  CHECK_THAT(describe(loaded.error()), Catch::Contains("format version 2"));
}

TEST_CASE("a corrupted epoch record fails activation of its own id only",
          "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  actor_key bad{"k", "bad-epoch"}, good{"k", "good"};
  auto& db = store->db();
  REQUIRE_FALSE(db.put(*db.column(epoch_column_family), encode_record_key(bad), "xyz",
                       durability::process_crash));
  auto e = store->begin_activation(bad);
  REQUIRE_FALSE(e);
  CHECK(code_of(e.error()) == errc::corrupted);
  CHECK_THAT(describe(e.error()), Catch::Contains("bad-epoch"));
  CHECK(code_of(store->save(bad, 5, 1, "x", durability::process_crash).error())
        == errc::corrupted);
  CHECK(*store->begin_activation(good) == 1);
}

TEST_CASE("invalid keys and payloads are refused with invalid_argument or limit_exceeded",
          "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  struct bad_key {
    const char* name;
    actor_key key;
  };
  auto c = GENERATE(bad_key{"empty kind", {"", "id"}}, bad_key{"empty id", {"kind", ""}},
                    bad_key{"kind of 256 bytes", {std::string(256, 'k'), "id"}},
                    bad_key{"id of 4097 bytes", {"kind", std::string(4097, 'i')}});
  INFO(c.name);
  CHECK(code_of(store->begin_activation(c.key).error()) == errc::invalid_argument);
  CHECK(code_of(store->load(c.key).error()) == errc::invalid_argument);
  CHECK(code_of(store->save(c.key, 1, 1, "p", durability::process_crash).error())
        == errc::invalid_argument);
  CHECK(code_of(store->erase(c.key, 1)) == errc::invalid_argument);

  // The limits themselves are accepted.
  actor_key widest{std::string(255, 'k'), std::string(4096, '\xff')};
  CHECK(*store->save(widest, 0, 1, "p", durability::process_crash) == 1);
  CHECK(load_existing(*store, widest).payload == "p");
  CHECK(code_of(store->for_each_id("", [](std::string_view) { return true; }))
        == errc::invalid_argument);
}

TEST_CASE("a payload over the size limit is refused", "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  std::string too_big(max_payload_bytes + 1, 'x');
  auto refused = store->save({"k", "big"}, 0, 1, too_big, durability::process_crash);
  REQUIRE_FALSE(refused);
  CHECK(code_of(refused.error()) == errc::limit_exceeded);
  CHECK_FALSE(store->load({"k", "big"})->has_value());
}

TEST_CASE("for_each_id lists one kind's ids in byte order, never another kind's",
          "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  // "a"+"bc" and "ab"+"c" concatenate alike: the kind's length prefix keeps them apart.
  const std::vector<actor_key> keys{{"a", "bc"}, {"ab", "c"}, {"a", "a"}, {"a", "\xff"},
                                    {"b", "x"},  {"a", "b"}};
  for (const auto& key : keys) REQUIRE(store->save(key, 0, 1, key.id, durability::process_crash));
  REQUIRE_FALSE(store->erase({"a", "b"}, 0));
  auto ids_of = [&](std::string_view kind, size_t limit = 100) {
    std::vector<std::string> ids;
    REQUIRE_FALSE(store->for_each_id(kind, [&](std::string_view id) {
      ids.emplace_back(id);
      return ids.size() < limit;
    }));
    return ids;
  };
  CHECK(ids_of("a") == std::vector<std::string>{"a", "bc", "\xff"});
  CHECK(ids_of("ab") == std::vector<std::string>{"c"});
  CHECK(ids_of("a", 1) == std::vector<std::string>{"a"});
  CHECK(ids_of("none").empty());
  CHECK(load_existing(*store, {"ab", "c"}).payload == "c");
  CHECK(*store->count(true) == 5);
  REQUIRE_FALSE(store->flush());
  auto estimate = store->count(false);
  REQUIRE(estimate);
  CHECK(*estimate >= 4);
  CHECK(*estimate <= 7);
}

TEST_CASE("concurrent saves lose no version, on distinct keys and on one shared key",
          "[storage][state_store]") {
  temp_directory dir;
  auto store = open_store(dir.path());
  constexpr int threads = 8;
  constexpr int saves = 200;
  actor_key shared{"k", "shared"};
  std::atomic<int> failures{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&store, &shared, &failures, t] {
      actor_key own{"k", "own-" + std::to_string(t)};
      for (int i = 0; i < saves; ++i) {
        auto a = store->save(own, 0, 1, std::to_string(i), durability::process_crash);
        if (!a || *a != static_cast<uint64_t>(i + 1)) ++failures;
        if (!store->save(shared, 0, 1, std::to_string(t), durability::process_crash)) ++failures;
        if (i % 50 == 0 && !store->begin_activation({"k", "epochs"})) ++failures;
        if (!store->load(shared)) ++failures;
      }
    });
  }
  for (auto& w : workers) w.join();
  CHECK(failures == 0);
  CHECK(load_existing(*store, shared).version == uint64_t{threads} * saves);
  for (int t = 0; t < threads; ++t) {
    auto own = load_existing(*store, {"k", "own-" + std::to_string(t)});
    CHECK(own.version == saves);
    CHECK(own.payload == std::to_string(saves - 1));
  }
  CHECK(*store->begin_activation({"k", "epochs"}) == uint64_t{threads} * (saves / 50) + 1);
}

TEST_CASE("a store opened inside a shared database uses its column families",
          "[storage][state_store]") {
  temp_directory dir;
  database_options options;
  options.path = dir.path();
  options.column_families = {std::string(state_column_family), std::string(epoch_column_family),
                             "chunks"};
  auto db = database::open(options);
  REQUIRE(db);
  auto store = state_store::open(**db, durability::power_loss);
  REQUIRE(store);
  CHECK(&(*store)->db() == db->get());
  REQUIRE((*store)->save({"k", "x"}, 0, 1, "p", durability::process_crash));
  auto raw = (*db)->get_raw(*(*db)->column(state_column_family), encode_record_key({"k", "x"}));
  REQUIRE(raw);
  CHECK(raw->has_value());

  temp_directory other;
  database_options bare;
  bare.path = other.path();
  auto plain = database::open(bare);
  REQUIRE(plain);
  auto refused = state_store::open(**plain, durability::process_crash);
  REQUIRE_FALSE(refused);
  CHECK(code_of(refused.error()) == errc::not_found);
}

TEST_CASE("a payload written with schema v1 loads under v2 with defaults for new fields",
          "[storage][state_store][schema]") {
  temp_directory dir;
  actor_key key{"counter", "evolving"};
  {
    auto store = open_store(dir.path());
    capnp::MallocMessageBuilder v1;
    auto counter = v1.initRoot<schemas::test::v1::Counter>();
    counter.setCount(41);
    counter.setOwner("alice");
    REQUIRE(store->save(key, 0, 1, to_bytes(v1), durability::power_loss));
  }
  // A later build, knowing only v2, reopens the store.
  auto store = open_store(dir.path());
  auto state = load_existing(*store, key);
  CHECK(state.schema_version == 1);
  REQUIRE(state.payload.size() % sizeof(capnp::word) == 0);
  auto words = kj::heapArray<capnp::word>(state.payload.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), state.payload.data(), state.payload.size());
  {
    capnp::FlatArrayMessageReader reader(words);
    auto counter = reader.getRoot<schemas::test::v2::Counter>();
    CHECK(counter.getCount() == 41);
    CHECK(std::string(counter.getOwner().cStr()) == "alice");
    CHECK(counter.getStep() == 1);  // v2's declared default
    CHECK(counter.getLabels().size() == 0);
    CHECK_FALSE(counter.hasLabels());
    CHECK(counter.getLimits().getCeiling() == 1000);
  }

  SECTION("and v2's own writes still load under v1, which ignores the new fields") {
    capnp::MallocMessageBuilder v2;
    auto counter = v2.initRoot<schemas::test::v2::Counter>();
    counter.setCount(42);
    counter.setOwner("alice");
    counter.setStep(5);
    counter.initLabels(1).set(0, "blue");
    REQUIRE(store->save(key, 0, 2, to_bytes(v2), durability::power_loss));
    auto newer = load_existing(*store, key);
    CHECK(newer.schema_version == 2);
    auto newer_words = kj::heapArray<capnp::word>(newer.payload.size() / sizeof(capnp::word));
    std::memcpy(newer_words.begin(), newer.payload.data(), newer.payload.size());
    capnp::FlatArrayMessageReader reader(newer_words);
    auto old_view = reader.getRoot<schemas::test::v1::Counter>();
    CHECK(old_view.getCount() == 42);
    CHECK(std::string(old_view.getOwner().cStr()) == "alice");
  }
}
