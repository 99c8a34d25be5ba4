// Test support: a node's worth of session resources (temp dir, database, store, sandbox).
#pragma once

#include <catch2/catch.hpp>

#include <filesystem>
#include <memory>
#include <string>

#include <unistd.h>

#include "session/cgroup_limits.hpp"
#include "session/sandbox_process.hpp"
#include "session/session_core.hpp"
#include "session/session_store.hpp"
#include "triplane/storage/database.hpp"

namespace triplane::actors::session::testing {

/// A session store in the database at `path` (created when missing).
struct test_store {
  std::unique_ptr<storage::database> db;
  std::unique_ptr<session_store> store;
  explicit test_store(const std::string& path) {
    storage::database_options opts;
    opts.path = path;
    opts.column_families = session_store::column_families();
    auto d = storage::database::open(opts);
    REQUIRE(d);
    db = std::move(*d);
    auto s = session_store::open(*db, storage::durability::process_crash);
    REQUIRE(s);
    store = std::move(*s);
  }
};

struct node_fixture {
  std::filesystem::path base;
  std::unique_ptr<storage::database> db;
  std::unique_ptr<session_store> store;
  std::unique_ptr<cgroup_host> cgroups = cgroup_host::detect();
  sandbox_config sandbox;
  node_resources node;

  node_fixture() {
    char tmpl[] = "/tmp/tp-session-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    base = tmpl;
    open_db();
    auto cfg = sandbox_config::detect(cgroups.get());
    REQUIRE(cfg);
    sandbox = *cfg;
    node.sandbox = &sandbox;
    node.workspaces_dir = (base / "workspaces").string();
  }
  void open_db() {
    store.reset();
    db.reset();
    test_store opened((base / "db").string());
    db = std::move(opened.db);
    store = std::move(opened.store);
    node.store = store.get();
  }
  ~node_fixture() {
    store.reset();
    db.reset();
    std::filesystem::remove_all(base);
  }
  std::unique_ptr<session_core> activate(const std::string& id) {
    auto core = session_core::activate(node, id);
    REQUIRE(core);
    return std::move(*core);
  }
};

inline exec_request shell(const std::string& script) {
  exec_request r;
  r.shell = script;
  return r;
}

} // namespace triplane::actors::session::testing
