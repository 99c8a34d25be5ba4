// state_store on a storage::database: records in state_column_family, epochs in
// epoch_column_family, read-check-write made atomic per key by striped mutexes.
#include "triplane/storage/state_store.hpp"

#include <array>
#include <limits>
#include <mutex>

#include "database_internal.hpp"
#include "state_record.hpp"

namespace triplane::storage {

namespace {

std::string encode_epoch(uint64_t epoch) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(epoch >> (8 * i));
  return out;
}

class rocksdb_state_store final : public state_store {
public:
  rocksdb_state_store(std::unique_ptr<database> owned, database& db, column_family state_cf,
                      column_family epoch_cf, durability default_durability)
    : owned_(std::move(owned)),
      db_(db),
      state_cf_(state_cf),
      epoch_cf_(epoch_cf),
      default_durability_(default_durability) {}

  database& db() override { return db_; }

  expected<uint64_t> begin_activation(const actor_key& key) override {
    if (auto err = detail::validate_key(key)) return err;
    auto encoded = encode_record_key(key);
    std::lock_guard<std::mutex> guard(stripe(encoded));
    auto current = current_epoch(key, encoded);
    if (!current) return current.error();
    if (*current == std::numeric_limits<uint64_t>::max())
      return make_error(errc::limit_exceeded, "activation epochs of " + detail::describe_key(key)
                                                + " are exhausted");
    const uint64_t next = *current + 1;
    if (auto err = db_.put(epoch_cf_, encoded, encode_epoch(next), default_durability_))
      return err;
    return next;
  }

  expected<std::optional<stored_state>> load(const actor_key& key) override {
    if (auto err = detail::validate_key(key)) return err;
    // One Get is atomic on its own: no lock.
    expected<stored_state> decoded{stored_state{}};
    auto found = db_.get(state_cf_, encode_record_key(key), [&](std::string_view bytes) {
      decoded = detail::decode_state_record(bytes, key, true);
    });
    if (!found) return found.error();
    if (!*found) return std::optional<stored_state>{};
    if (!decoded) return decoded.error();
    return std::optional<stored_state>{std::move(*decoded)};
  }

  expected<uint64_t> save(const actor_key& key, uint64_t epoch, uint32_t schema_version,
                          std::string_view payload, durability level) override {
    if (auto err = detail::validate_key(key)) return err;
    if (payload.size() > max_payload_bytes)
      return make_error(errc::limit_exceeded,
                        "payload of " + std::to_string(payload.size()) + " bytes for "
                          + detail::describe_key(key) + " exceeds "
                          + std::to_string(max_payload_bytes));
    auto encoded = encode_record_key(key);
    std::lock_guard<std::mutex> guard(stripe(encoded));
    if (auto err = check_epoch(key, encoded, epoch, "save")) return err;
    // The new version builds on the stored one, so a record we cannot read is not overwritten.
    expected<stored_state> previous{stored_state{}};
    auto found = db_.get(state_cf_, encoded, [&](std::string_view bytes) {
      previous = detail::decode_state_record(bytes, key, false);
    });
    if (!found) return found.error();
    if (!previous) return previous.error();
    const uint64_t version = *found ? previous->version + 1 : 1;
    write_batch batch(db_);
    batch.put(state_cf_, encoded,
              detail::encode_state_record(version, epoch, schema_version, payload));
    if (auto err = db_.write(batch, level)) return err;
    return version;
  }

  caf::error erase(const actor_key& key, uint64_t epoch) override {
    if (auto err = detail::validate_key(key)) return err;
    auto encoded = encode_record_key(key);
    std::lock_guard<std::mutex> guard(stripe(encoded));
    if (auto err = check_epoch(key, encoded, epoch, "erase")) return err;
    // The epoch record stays: epochs must keep growing across an erase (see the header).
    return db_.erase(state_cf_, encoded, default_durability_);
  }

  caf::error for_each_id(std::string_view kind,
                         const std::function<bool(std::string_view id)>& visit) override {
    if (auto err = detail::validate_kind(kind)) return err;
    auto prefix = detail::encode_kind_prefix(kind);
    return db_.for_each(state_cf_, prefix, [&](std::string_view key, std::string_view) {
      return visit(key.substr(prefix.size()));
    });
  }

  expected<uint64_t> count(bool exact) override {
    if (!exact) return db_.estimate_num_keys(state_cf_);
    uint64_t n = 0;
    if (auto err = db_.for_each(state_cf_, {}, [&n](std::string_view, std::string_view) {
          ++n;
          return true;
        }))
      return err;
    return n;
  }

  caf::error flush() override { return db_.flush(); }

private:
  // Read-check-write is atomic within this process by locking the key's stripe. Across nodes,
  // which node may activate an id is decided by the directory's placement; the epoch fence is
  // the safety net for a zombie activation that missed a hand-over.
  static constexpr size_t stripe_count = 64;

  std::mutex& stripe(const std::string& encoded) {
    return stripes_[std::hash<std::string>{}(encoded) % stripe_count];
  }

  expected<uint64_t> current_epoch(const actor_key& key, const std::string& encoded) {
    auto stored = db_.get(epoch_cf_, encoded);
    if (!stored) return stored.error();
    if (!*stored) return uint64_t{0};
    auto decoded = decode_refcount(**stored);  // the same 8-byte little-endian layout
    if (!decoded)
      return make_error(errc::corrupted, "epoch record of " + detail::describe_key(key)
                                           + " is unreadable: " + std::to_string((*stored)->size())
                                           + " bytes (expected 8)");
    return *decoded;
  }

  caf::error check_epoch(const actor_key& key, const std::string& encoded, uint64_t epoch,
                         const char* what) {
    auto current = current_epoch(key, encoded);
    if (!current) return current.error();
    if (epoch < *current)
      return make_error(errc::stale_epoch, std::string(what) + " of " + detail::describe_key(key)
                                             + " from epoch " + std::to_string(epoch)
                                             + " refused: the current epoch is "
                                             + std::to_string(*current));
    return {};
  }

  std::unique_ptr<database> owned_;  // set when the store opened its own database
  database& db_;
  column_family state_cf_;
  column_family epoch_cf_;
  durability default_durability_;
  std::array<std::mutex, stripe_count> stripes_;
};

expected<std::unique_ptr<state_store>> make_store(std::unique_ptr<database> owned, database& db,
                                                  durability default_durability) {
  auto state_cf = db.column(state_column_family);
  if (!state_cf) return state_cf.error();
  auto epoch_cf = db.column(epoch_column_family);
  if (!epoch_cf) return epoch_cf.error();
  return std::unique_ptr<state_store>(new rocksdb_state_store(
    std::move(owned), db, *state_cf, *epoch_cf, default_durability));
}

} // namespace

namespace detail {

expected<std::unique_ptr<state_store>> open_state_store(const store_options& options,
                                                        std::shared_ptr<rocksdb::Env> env) {
  database_options db_options;
  db_options.path = options.path;
  db_options.column_families = {std::string(state_column_family),
                                std::string(epoch_column_family)};
  db_options.block_cache_bytes = options.block_cache_bytes;
  db_options.create_if_missing = options.create_if_missing;
  auto db = open_database(db_options, std::move(env));
  if (!db) return db.error();
  auto& ref = **db;
  return make_store(std::move(*db), ref, options.default_durability);
}

} // namespace detail

expected<std::unique_ptr<state_store>> state_store::open(const store_options& options) {
  return detail::open_state_store(options, nullptr);
}

expected<std::unique_ptr<state_store>> state_store::open(database& db,
                                                         durability default_durability) {
  return make_store(nullptr, db, default_durability);
}

} // namespace triplane::storage
