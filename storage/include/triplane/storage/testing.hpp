// TEST ONLY (library triplane::storage_testing, built with the tests, never linked into programs):
// stores whose files behave as if every write not yet fsynced lived only in the page cache.
#pragma once

#include <memory>

#include "triplane/storage/database.hpp"
#include "triplane/storage/state_store.hpp"

namespace triplane::storage::testing {

/// Opens a state store whose files keep every byte appended since their last Sync/Fsync in this
/// process's memory, writing it to the real file only when RocksDB syncs. Killing the process
/// (SIGKILL) then loses exactly what a power cut would lose from the page cache, so a test can
/// check power_loss durability without cutting power. Not simulated: lost directory entries of
/// files created but not yet fsynced in their directory, torn sector writes.
expected<std::unique_ptr<state_store>> open_with_volatile_page_cache(const store_options& options);

/// The same for a bare database.
expected<std::unique_ptr<database>> open_with_volatile_page_cache(const database_options& options);

} // namespace triplane::storage::testing
