// The node core: database, state store, actor system, root supervisor with the directory and the
// planes' children; started and stopped in a fixed order.
#include "triplane/runtime/node.hpp"

#include <filesystem>
#include <mutex>
#include <system_error>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "reject_request.hpp"

namespace triplane::runtime {

/// The directory incarnation the node's proxy delivers to; replaced when the directory restarts.
struct directory_slot {
  mutable std::mutex mutex;
  directory current;
};

struct node::impl {
  node_options options;
  std::unique_ptr<storage::database> db;
  std::unique_ptr<storage::state_store> store;
  std::unique_ptr<caf::actor_system> system;
  caf::actor root;
  caf::actor proxy;
  std::shared_ptr<directory_slot> slot = std::make_shared<directory_slot>();
  uint16_t port = 0;
  bool stopped = false;
};

namespace {

/// The node's stable directory handle: passes each message to the current incarnation's router
/// on the sender's thread (like CAF's actor_pool, no mailbox of its own). An exit message stops
/// the proxy itself; afterwards, and while no directory is running, requests are bounced.
class directory_proxy_actor final : public caf::monitorable_actor {
public:
  directory_proxy_actor(caf::actor_config& cfg, std::shared_ptr<const directory_slot> slot)
      : caf::monitorable_actor(cfg), slot_(std::move(slot)) {}

  const char* name() const override { return "triplane.directory_proxy"; }

  void enqueue(caf::mailbox_element_ptr what, caf::execution_unit* context) override {
    if (what->content().match_elements<caf::exit_msg>()) {
      cleanup(caf::error{what->content().get_as<caf::exit_msg>(0).reason}, context);
      return;
    }
    caf::actor target;
    if (!getf(is_terminated_flag)) {
      std::lock_guard<std::mutex> guard{slot_->mutex};
      target = slot_->current.route({}, {});
    }
    if (!target) {
      reject_request(what, make_error(errc::unavailable, "the actor directory is not running; retry"), context);
      return;
    }
    target->enqueue(std::move(what), context);
  }

private:
  std::shared_ptr<const directory_slot> slot_;
};

} // namespace

node::node() : impl_(std::make_unique<impl>()) {}

node::~node() {
  if (!impl_->stopped) (void)shutdown(impl_->options.shutdown_timeout);
}

expected<std::unique_ptr<node>> node::start(node_config& config, const node_options& options,
                                            std::vector<std::string> column_families,
                                            std::function<expected<std::vector<plane>>(node&)> make_planes) {
  std::unique_ptr<node> result{new node()};
  auto& st = *result->impl_;
  st.options = options;
  st.port = options.listen_port;
  std::error_code ec;
  auto state_dir = std::filesystem::path{options.data_dir} / "state";
  std::filesystem::create_directories(state_dir, ec);
  if (ec)
    return make_error(errc::io_error, "cannot create data directory '" + state_dir.string() + "': " + ec.message());
  storage::database_options dbo;
  dbo.path = state_dir.string();
  dbo.column_families = {std::string{storage::state_column_family}, std::string{storage::epoch_column_family}};
  for (auto& cf : column_families) dbo.column_families.push_back(cf);
  auto db = storage::database::open(dbo);
  if (!db) return std::move(db.error());
  st.db = std::move(*db);
  auto store = storage::state_store::open(*st.db, options.durability);
  if (!store) return std::move(store.error());
  st.store = std::move(*store);
  st.system = std::make_unique<caf::actor_system>(config);

  std::vector<plane> planes;
  if (make_planes) {
    auto made = make_planes(*result);
    if (!made) return std::move(made.error());
    planes = std::move(*made);
  }
  std::vector<kind_spec> kinds;
  std::vector<child_spec> children;
  for (auto& p : planes) {
    for (auto& k : p.kinds) {
      if (k.idle_timeout.count() == 0) k.idle_timeout = options.idle_timeout;
      kinds.push_back(std::move(k));
    }
    for (auto& c : p.children) children.push_back(std::move(c));
  }
  directory_options dopts;
  dopts.max_live = options.max_live_actors;
  dopts.default_durability = options.durability;

  supervisor_spec root_spec;
  root_spec.flags.name = "triplane.node";
  root_spec.flags.strategy = restart_strategy::one_for_one;
  root_spec.flags.max_restarts = 5;
  root_spec.flags.period = std::chrono::seconds{30};
  root_spec.flags.backoff_base = std::chrono::milliseconds{100};
  root_spec.flags.backoff_cap = std::chrono::seconds{5};
  child_spec directory_child;
  directory_child.id = "directory";
  directory_child.kind = child_kind::worker;
  directory_child.restart = restart_type::permanent;
  directory_child.shutdown_timeout = options.shutdown_timeout;
  auto* shared = result->impl_.get();
  directory_child.start = [shared, kinds, dopts](caf::local_actor* parent) -> caf::actor {
    auto started = directory::start(parent->home_system(), *shared->store, kinds, dopts);
    if (!started) {
      spdlog::error("directory failed to start: {}", describe(started.error()));
      return nullptr;
    }
    std::lock_guard<std::mutex> guard{shared->slot->mutex};
    shared->slot->current = *started;
    return started->front();
  };
  root_spec.children.push_back(std::move(directory_child));
  for (auto& c : children) root_spec.children.push_back(std::move(c));
  if (auto err = validate(root_spec)) return err;
  auto root = spawn_supervisor(*st.system, std::move(root_spec));
  if (!root) return std::move(root.error());
  st.root = *root;
  caf::actor_config proxy_config;
  st.proxy = caf::make_actor<directory_proxy_actor, caf::actor>(st.system->next_actor_id(), st.system->node(),
                                                                 st.system.get(), proxy_config, st.slot);
  // The root supervisor starts its children asynchronously: wait until the tree answers, which
  // also surfaces a child that failed to start.
  auto tree = fetch_tree(*st.system, st.root, std::chrono::seconds{30});
  if (!tree) return make_error(errc::unavailable, "the node's supervision tree did not start: " + describe(tree.error()));
  spdlog::info("node started: data {}, durability {}, max-live {}, {} scheduler threads",
               options.data_dir,
               options.durability == storage::durability::power_loss ? "power-loss" : "process-crash",
               options.max_live_actors, st.system->scheduler().num_workers());
  spdlog::info("supervision tree:\n{}", render_tree(*tree));
  return result;
}

caf::actor_system& node::system() { return *impl_->system; }
storage::database& node::database() { return *impl_->db; }
storage::state_store& node::store() { return *impl_->store; }
const node_options& node::options() const { return impl_->options; }
uint16_t node::listen_port() const { return impl_->port; }
void node::set_listen_port(uint16_t port) { impl_->port = port; }
caf::actor node::directory_proxy() const { return impl_->proxy; }
caf::actor node::root_supervisor() const { return impl_->root; }

directory node::actors() const {
  std::lock_guard<std::mutex> guard{impl_->slot->mutex};
  return impl_->slot->current;
}

std::string node::supervision_tree(std::chrono::milliseconds timeout) const {
  auto tree = fetch_tree(*impl_->system, impl_->root, timeout);
  if (!tree) return "(supervision tree unavailable: " + describe(tree.error()) + ")";
  return render_tree(*tree);
}

expected<uint64_t> node::shutdown(std::chrono::milliseconds deadline) {
  auto& st = *impl_;
  if (st.stopped) return uint64_t{0};
  st.stopped = true;
  expected<uint64_t> drained = uint64_t{0};
  if (st.system) {
    if (st.root) {
      // Passivate every live actor first (their state reaches the store), then stop the tree
      // (children in reverse order, each within its shutdown timeout).
      drained = actors().drain(*st.system, deadline);
      caf::scoped_actor self{*st.system};
      self->send_exit(st.proxy, caf::exit_reason::user_shutdown);
      self->send_exit(st.root, caf::exit_reason::user_shutdown);
      self->wait_for(st.root);
      st.root = nullptr;
      st.proxy = nullptr;
    }
    {
      std::lock_guard<std::mutex> guard{st.slot->mutex};
      st.slot->current = directory{};
    }
    st.system.reset();  // waits for every actor to finish
  }
  st.store.reset();
  if (st.db) {
    if (auto err = st.db->flush()) spdlog::error("flushing the store at shutdown: {}", describe(err));
    st.db.reset();
  }
  return drained;
}

} // namespace triplane::runtime
