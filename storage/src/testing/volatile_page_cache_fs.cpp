// Test-only file system: appends stay in process memory until the file is synced, so a SIGKILL
// loses what a power cut would (see triplane/storage/testing.hpp).
#include "triplane/storage/testing.hpp"

#include <mutex>

#include <rocksdb/env.h>
#include <rocksdb/file_system.h>

#include "database_internal.hpp"

namespace triplane::storage::testing {

namespace {

using rocksdb::IODebugContext;
using rocksdb::IOOptions;
using rocksdb::IOStatus;
using rocksdb::Slice;

/// Holds appended bytes as the page cache would; only Sync/Fsync makes them reach the real file.
/// Close without a sync drops them, as a power cut after close would.
class volatile_writable_file final : public rocksdb::FSWritableFileOwnerWrapper {
public:
  explicit volatile_writable_file(std::unique_ptr<rocksdb::FSWritableFile> target)
    : FSWritableFileOwnerWrapper(std::move(target)) {}

  IOStatus Append(const Slice& data, const IOOptions&, IODebugContext*) override {
    std::lock_guard<std::mutex> guard(mutex_);
    pending_.append(data.data(), data.size());
    return IOStatus::OK();
  }
  IOStatus Append(const Slice& data, const IOOptions& options,
                  const rocksdb::DataVerificationInfo&, IODebugContext* dbg) override {
    return Append(data, options, dbg);
  }
  IOStatus PositionedAppend(const Slice&, uint64_t, const IOOptions&, IODebugContext*) override {
    return IOStatus::NotSupported("volatile page cache: positioned appends (direct I/O)");
  }
  IOStatus PositionedAppend(const Slice&, uint64_t, const IOOptions&,
                            const rocksdb::DataVerificationInfo&, IODebugContext*) override {
    return IOStatus::NotSupported("volatile page cache: positioned appends (direct I/O)");
  }
  // Flushing hands bytes to the OS, i.e. to the page cache: they stay volatile.
  IOStatus Flush(const IOOptions&, IODebugContext*) override { return IOStatus::OK(); }
  // sync_file_range does not make data durable either.
  IOStatus RangeSync(uint64_t, uint64_t, const IOOptions&, IODebugContext*) override {
    return IOStatus::OK();
  }
  IOStatus Sync(const IOOptions& options, IODebugContext* dbg) override {
    std::lock_guard<std::mutex> guard(mutex_);
    if (auto s = write_pending(options, dbg); !s.ok()) return s;
    return target()->Sync(options, dbg);
  }
  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    std::lock_guard<std::mutex> guard(mutex_);
    if (auto s = write_pending(options, dbg); !s.ok()) return s;
    return target()->Fsync(options, dbg);
  }
  bool IsSyncThreadSafe() const override { return true; }
  uint64_t GetFileSize(const IOOptions& options, IODebugContext* dbg) override {
    std::lock_guard<std::mutex> guard(mutex_);
    return target()->GetFileSize(options, dbg) + pending_.size();
  }
  IOStatus Truncate(uint64_t size, const IOOptions& options, IODebugContext* dbg) override {
    std::lock_guard<std::mutex> guard(mutex_);
    uint64_t durable = target()->GetFileSize(options, dbg);
    if (size >= durable) {
      pending_.resize(size - durable, '\0');
      return IOStatus::OK();
    }
    pending_.clear();
    return target()->Truncate(size, options, dbg);
  }
  IOStatus Close(const IOOptions& options, IODebugContext* dbg) override {
    std::lock_guard<std::mutex> guard(mutex_);
    pending_.clear();
    return target()->Close(options, dbg);
  }

private:
  IOStatus write_pending(const IOOptions& options, IODebugContext* dbg) {
    if (pending_.empty()) return IOStatus::OK();
    auto s = target()->Append(pending_, options, dbg);
    if (s.ok()) s = target()->Flush(options, dbg);
    if (s.ok()) pending_.clear();
    return s;
  }

  std::mutex mutex_;
  std::string pending_;
};

bool is_info_log(const std::string& name) {
  // RocksDB's human-readable LOG is diagnostics, not data: keep it whole for debugging.
  auto slash = name.find_last_of('/');
  auto base = slash == std::string::npos ? name : name.substr(slash + 1);
  return base == "LOG" || base.rfind("LOG.old", 0) == 0;
}

class volatile_page_cache_fs final : public rocksdb::FileSystemWrapper {
public:
  volatile_page_cache_fs() : FileSystemWrapper(rocksdb::FileSystem::Default()) {}

  const char* Name() const override { return "triplane.volatile_page_cache"; }

  IOStatus NewWritableFile(const std::string& name, const rocksdb::FileOptions& options,
                           std::unique_ptr<rocksdb::FSWritableFile>* result,
                           IODebugContext* dbg) override {
    return wrap(name, target()->NewWritableFile(name, options, result, dbg), result);
  }
  IOStatus ReopenWritableFile(const std::string& name, const rocksdb::FileOptions& options,
                              std::unique_ptr<rocksdb::FSWritableFile>* result,
                              IODebugContext* dbg) override {
    return wrap(name, target()->ReopenWritableFile(name, options, result, dbg), result);
  }
  IOStatus ReuseWritableFile(const std::string& name, const std::string& old_name,
                             const rocksdb::FileOptions& options,
                             std::unique_ptr<rocksdb::FSWritableFile>* result,
                             IODebugContext* dbg) override {
    return wrap(name, target()->ReuseWritableFile(name, old_name, options, result, dbg), result);
  }

private:
  static IOStatus wrap(const std::string& name, IOStatus s,
                       std::unique_ptr<rocksdb::FSWritableFile>* result) {
    if (s.ok() && !is_info_log(name))
      *result = std::make_unique<volatile_writable_file>(std::move(*result));
    return s;
  }
};

std::shared_ptr<rocksdb::Env> make_env() {
  return std::shared_ptr<rocksdb::Env>(
    rocksdb::NewCompositeEnv(std::make_shared<volatile_page_cache_fs>()));
}

} // namespace

expected<std::unique_ptr<state_store>> open_with_volatile_page_cache(const store_options& options) {
  return detail::open_state_store(options, make_env());
}

expected<std::unique_ptr<database>> open_with_volatile_page_cache(const database_options& options) {
  return detail::open_database(options, make_env());
}

} // namespace triplane::storage::testing
