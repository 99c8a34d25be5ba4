// Storage-internal ways to open a database on a custom rocksdb::Env (the test-only volatile page
// cache file system uses them). Includes RocksDB: only storage/src may include this header.
#pragma once

#include <memory>

#include <rocksdb/env.h>

#include "triplane/storage/database.hpp"
#include "triplane/storage/state_store.hpp"

namespace triplane::storage::detail {

/// database::open() on `env` (the default Env when null); the database keeps `env` alive.
expected<std::unique_ptr<database>> open_database(const database_options& options,
                                                  std::shared_ptr<rocksdb::Env> env);

/// state_store::open() on `env` (the default Env when null).
expected<std::unique_ptr<state_store>> open_state_store(const store_options& options,
                                                        std::shared_ptr<rocksdb::Env> env);

} // namespace triplane::storage::detail
