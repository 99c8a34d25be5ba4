// database over RocksDB: column family handles, the refcount merge operator, status conversion.
#include "triplane/storage/database.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <rocksdb/cache.h>
#include <rocksdb/db.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/merge_operator.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include "database_internal.hpp"

namespace triplane::storage {

namespace {

rocksdb::Slice to_slice(std::string_view s) { return {s.data(), s.size()}; }

std::string_view to_view(const rocksdb::Slice& s) { return {s.data(), s.size()}; }

void encode_u64(uint64_t v, char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(v >> (8 * i));
}

uint64_t decode_u64(const char* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{static_cast<unsigned char>(in[i])} << (8 * i);
  return v;
}

rocksdb::WriteOptions write_options(durability level) {
  rocksdb::WriteOptions wo;
  wo.sync = level == durability::power_loss;
  return wo;
}

/// Converts a failed RocksDB status at the layer boundary: what we were doing, then RocksDB's
/// own message.
caf::error from_status(const rocksdb::Status& s, const std::string& doing) {
  errc code = errc::io_error;
  if (s.IsCorruption())
    code = errc::corrupted;
  else if (s.IsInvalidArgument())
    code = errc::invalid_argument;
  else if (s.IsNotFound())
    code = errc::not_found;
  else if (s.IsBusy() || s.IsTryAgain() || s.IsShutdownInProgress())
    code = errc::unavailable;
  return make_error(code, doing + ": " + s.ToString());
}

/// Adds 8-byte little-endian deltas to an 8-byte little-endian counter (missing = 0). Refuses
/// (so RocksDB reports corruption on read) any operand that is not 8 bytes.
class refcount_add_operator final : public rocksdb::AssociativeMergeOperator {
public:
  bool Merge(const rocksdb::Slice&, const rocksdb::Slice* existing, const rocksdb::Slice& value,
             std::string* new_value, rocksdb::Logger*) const override {
    uint64_t base = 0;
    if (existing != nullptr) {
      if (existing->size() != 8) return false;
      base = decode_u64(existing->data());
    }
    if (value.size() != 8) return false;
    new_value->resize(8);
    encode_u64(base + decode_u64(value.data()), new_value->data());
    return true;
  }
  const char* Name() const override { return "triplane.refcount_add"; }
};

} // namespace

struct database::impl {
  std::string path;
  std::shared_ptr<rocksdb::Env> env;  // declared first: outlives the DB that uses it
  std::shared_ptr<rocksdb::Cache> block_cache;
  std::unique_ptr<rocksdb::DB> db;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;  // owned; released before db closes
  std::vector<std::string> names;
  rocksdb::ReadOptions read_options;

  ~impl() {
    if (!db) return;
    for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
    db->Close();
  }

  rocksdb::ColumnFamilyHandle* handle(column_family cf) const {
    if (cf.index >= handles.size()) {
      // A handle from another database, or made up: a bug in the caller.
      std::fprintf(stderr, "triplane::storage: column family index %u out of range (%zu open) in %s\n",
                   cf.index, handles.size(), path.c_str());
      std::abort();
    }
    return handles[cf.index];
  }

  std::string doing(const char* what, column_family cf) const {
    return std::string(what) + " in column family '" + names[cf.index] + "' of " + path;
  }
};

struct database_access {
  static std::unique_ptr<database> make(std::unique_ptr<database::impl> state) {
    return std::unique_ptr<database>(new database(std::move(state)));
  }
  static const database::impl& state(const database& db) { return *db.impl_; }
};

// -- write_batch ---------------------------------------------------------------------------------

struct write_batch::impl {
  explicit impl(const database* owner) : db(owner) {}
  const database* db;
  rocksdb::WriteBatch batch;
};

write_batch::write_batch(const database& db) : impl_(std::make_unique<impl>(&db)) {}
write_batch::~write_batch() = default;
write_batch::write_batch(write_batch&&) noexcept = default;
write_batch& write_batch::operator=(write_batch&&) noexcept = default;

void write_batch::put(column_family cf, std::string_view key, std::string_view value) {
  impl_->batch.Put(database_access::state(*impl_->db).handle(cf), to_slice(key), to_slice(value));
}

void write_batch::erase(column_family cf, std::string_view key) {
  impl_->batch.Delete(database_access::state(*impl_->db).handle(cf), to_slice(key));
}

void write_batch::add_refcount(column_family cf, std::string_view key, int64_t delta) {
  char operand[8];
  encode_u64(static_cast<uint64_t>(delta), operand);
  impl_->batch.Merge(database_access::state(*impl_->db).handle(cf), to_slice(key),
                     rocksdb::Slice(operand, 8));
}

uint32_t write_batch::count() const { return impl_->batch.Count(); }

size_t write_batch::byte_size() const { return impl_->batch.GetDataSize(); }

void write_batch::clear() { impl_->batch.Clear(); }

// -- database ------------------------------------------------------------------------------------

namespace detail {

expected<std::unique_ptr<database>> open_database(const database_options& options,
                                                  std::shared_ptr<rocksdb::Env> env) {
  if (options.path.empty())
    return make_error(errc::invalid_argument, "database path is empty");
  std::vector<std::string> names{rocksdb::kDefaultColumnFamilyName};
  for (const auto& name : options.column_families) {
    if (name.empty())
      return make_error(errc::invalid_argument,
                        "empty column family name for database " + options.path);
    if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
  }

  auto state = std::make_unique<database::impl>();
  state->path = options.path;
  state->env = std::move(env);
  // RocksDB's default sharding splits the cache into shards of 512 KiB and up; a block larger
  // than its shard is never kept, so 1 MiB values would be read from the file on every get.
  // Shards of at least 16 MiB keep values up to that size cacheable (2 cores: few shards suffice).
  int shard_bits = 0;
  while (shard_bits < 6 && (options.block_cache_bytes >> (shard_bits + 1)) >= (size_t{16} << 20))
    ++shard_bits;
  state->block_cache = rocksdb::NewLRUCache(options.block_cache_bytes, shard_bits);

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = options.create_if_missing;
  db_options.create_missing_column_families = true;
  if (state->env) db_options.env = state->env.get();

  // Column families that exist on disk must all be opened; keep the ones we do not know.
  std::vector<std::string> existing;
  auto listed = rocksdb::DB::ListColumnFamilies(db_options, options.path, &existing);
  if (listed.ok()) {
    for (const auto& name : existing)
      if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
  }  // else: no database there yet (or unreadable, which Open reports)

  rocksdb::BlockBasedTableOptions table_options;
  table_options.block_cache = state->block_cache;
  table_options.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  rocksdb::ColumnFamilyOptions cf_options;
  cf_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table_options));
  cf_options.merge_operator = std::make_shared<refcount_add_operator>();

  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  for (const auto& name : names) descriptors.emplace_back(name, cf_options);
  rocksdb::DB* raw = nullptr;
  auto s = rocksdb::DB::Open(db_options, options.path, descriptors, &state->handles, &raw);
  if (!s.ok()) return from_status(s, "opening database " + options.path);
  state->db.reset(raw);
  state->names = std::move(names);
  return database_access::make(std::move(state));
}

} // namespace detail

expected<std::unique_ptr<database>> database::open(const database_options& options) {
  return detail::open_database(options, nullptr);
}

database::database(std::unique_ptr<impl> state) : impl_(std::move(state)) {}

database::~database() = default;

const std::string& database::path() const { return impl_->path; }

expected<column_family> database::column(std::string_view name) const {
  for (size_t i = 0; i < impl_->names.size(); ++i)
    if (impl_->names[i] == name) return column_family{static_cast<uint32_t>(i)};
  return make_error(errc::not_found, "column family '" + std::string(name)
                                       + "' was not opened in database " + impl_->path);
}

expected<std::optional<std::string>> database::get(column_family cf, std::string_view key) const {
  rocksdb::PinnableSlice value;
  auto s = impl_->db->Get(impl_->read_options, impl_->handle(cf), to_slice(key), &value);
  if (s.IsNotFound()) return std::optional<std::string>{};
  if (!s.ok()) return from_status(s, impl_->doing("reading a key", cf));
  return std::optional<std::string>{std::string(value.data(), value.size())};
}

expected<bool> database::get(column_family cf, std::string_view key,
                             const std::function<void(std::string_view value)>& visit) const {
  rocksdb::PinnableSlice value;
  auto s = impl_->db->Get(impl_->read_options, impl_->handle(cf), to_slice(key), &value);
  if (s.IsNotFound()) return false;
  if (!s.ok()) return from_status(s, impl_->doing("reading a key", cf));
  visit(to_view(value));
  return true;
}

expected<std::optional<size_t>> database::get_raw(column_family cf, std::string_view key) const {
  rocksdb::PinnableSlice value;
  auto s = impl_->db->Get(impl_->read_options, impl_->handle(cf), to_slice(key), &value);
  if (s.IsNotFound()) return std::optional<size_t>{};
  if (!s.ok()) return from_status(s, impl_->doing("reading a key", cf));
  return std::optional<size_t>{value.size()};
}

caf::error database::put(column_family cf, std::string_view key, std::string_view value,
                         durability level) {
  auto s = impl_->db->Put(write_options(level), impl_->handle(cf), to_slice(key), to_slice(value));
  if (!s.ok()) return from_status(s, impl_->doing("writing a key", cf));
  return {};
}

caf::error database::erase(column_family cf, std::string_view key, durability level) {
  auto s = impl_->db->Delete(write_options(level), impl_->handle(cf), to_slice(key));
  if (!s.ok()) return from_status(s, impl_->doing("deleting a key", cf));
  return {};
}

caf::error database::add_refcount(column_family cf, std::string_view key, int64_t delta,
                                  durability level) {
  char operand[8];
  encode_u64(static_cast<uint64_t>(delta), operand);
  auto s = impl_->db->Merge(write_options(level), impl_->handle(cf), to_slice(key),
                            rocksdb::Slice(operand, 8));
  if (!s.ok()) return from_status(s, impl_->doing("adding to a reference count", cf));
  return {};
}

caf::error database::write(const write_batch& batch, durability level) {
  if (batch.impl_->db != this)
    return make_error(errc::internal, "write_batch made for another database written to "
                                        + impl_->path);
  if (batch.impl_->batch.Count() == 0) return {};
  // WriteBatch is const-correct in DB::Write only by pointer; RocksDB does not modify it.
  auto s = impl_->db->Write(write_options(level), &const_cast<write_batch&>(batch).impl_->batch);
  if (!s.ok())
    return from_status(s, "writing a batch of " + std::to_string(batch.count())
                            + " changes to " + impl_->path);
  return {};
}

caf::error database::for_each(
  column_family cf, std::string_view prefix,
  const std::function<bool(std::string_view key, std::string_view value)>& visit) const {
  return for_each(cf, prefix, prefix, visit);
}

caf::error database::for_each(
  column_family cf, std::string_view prefix, std::string_view start,
  const std::function<bool(std::string_view key, std::string_view value)>& visit) const {
  // Upper bound: the prefix with its last byte below 0xFF incremented and the rest dropped; it
  // lets RocksDB stop at the range's end instead of at the next live key (tombstones).
  std::string upper(prefix);
  while (!upper.empty() && static_cast<unsigned char>(upper.back()) == 0xFF) upper.pop_back();
  if (!upper.empty()) upper.back() = static_cast<char>(static_cast<unsigned char>(upper.back()) + 1);
  rocksdb::Slice upper_slice(upper);
  rocksdb::ReadOptions ro;
  if (!upper.empty()) ro.iterate_upper_bound = &upper_slice;
  std::unique_ptr<rocksdb::Iterator> it(impl_->db->NewIterator(ro, impl_->handle(cf)));
  for (it->Seek(to_slice(std::max(prefix, start))); it->Valid(); it->Next()) {
    auto key = to_view(it->key());
    if (key.substr(0, prefix.size()) != prefix) break;
    if (!visit(key, to_view(it->value()))) break;
  }
  if (!it->status().ok()) return from_status(it->status(), impl_->doing("iterating", cf));
  return {};
}

caf::error database::flush() {
  auto s = impl_->db->FlushWAL(true);
  if (!s.ok()) return from_status(s, "syncing the WAL of " + impl_->path);
  s = impl_->db->Flush(rocksdb::FlushOptions(), impl_->handles);
  if (!s.ok()) return from_status(s, "flushing memtables of " + impl_->path);
  return {};
}

expected<uint64_t> database::property(column_family cf, std::string_view name) const {
  uint64_t value = 0;
  if (!impl_->db->GetIntProperty(impl_->handle(cf), to_slice(name), &value))
    return make_error(errc::not_found, "RocksDB has no integer property '" + std::string(name)
                                         + "' for column family '" + impl_->names[cf.index]
                                         + "' of " + impl_->path);
  return value;
}

expected<uint64_t> database::estimate_num_keys(column_family cf) const {
  return property(cf, "rocksdb.estimate-num-keys");
}

expected<uint64_t> database::live_sst_bytes(column_family cf) const {
  return property(cf, "rocksdb.live-sst-files-size");
}

expected<uint64_t> decode_refcount(std::string_view value) {
  if (value.size() != 8)
    return make_error(errc::corrupted, "reference count of " + std::to_string(value.size())
                                         + " bytes (expected 8)");
  return decode_u64(value.data());
}

} // namespace triplane::storage
