// The node core: store, actor system, directory; started and stopped in a fixed order.
#include "triplane/runtime/node.hpp"

#include <filesystem>
#include <system_error>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

namespace triplane::runtime {

struct node::impl {
  node_options options;
  std::unique_ptr<storage::state_store> store;
  std::unique_ptr<caf::actor_system> system;
  directory actors;
  std::vector<std::string> kind_names;
  uint16_t port = 0;
  bool stopped = false;
};

node::node() : impl_(std::make_unique<impl>()) {}

node::~node() {
  if (!impl_->stopped) (void)shutdown(impl_->options.shutdown_timeout);
}

expected<std::unique_ptr<node>> node::start(node_config& config, const node_options& options,
                                            std::vector<kind_spec> kinds) {
  std::unique_ptr<node> result{new node()};
  auto& st = *result->impl_;
  st.options = options;
  st.port = options.listen_port;
  std::error_code ec;
  std::filesystem::create_directories(options.data_dir, ec);
  if (ec)
    return make_error(errc::io_error, "cannot create data directory '" + options.data_dir + "': " + ec.message());
  storage::store_options so;
  so.path = (std::filesystem::path{options.data_dir} / "state").string();
  so.default_durability = options.durability;
  auto store = storage::state_store::open(so);
  if (!store) return std::move(store.error());
  st.store = std::move(*store);
  st.system = std::make_unique<caf::actor_system>(config);
  for (auto& kind : kinds) {
    if (kind.idle_timeout.count() == 0) kind.idle_timeout = options.idle_timeout;
    st.kind_names.push_back(kind.name);
  }
  directory_options dopts;
  dopts.max_live = options.max_live_actors;
  dopts.default_durability = options.durability;
  auto started = directory::start(*st.system, *st.store, std::move(kinds), dopts);
  if (!started) return std::move(started.error());
  st.actors = std::move(*started);
  spdlog::info("node started: data {}, durability {}, max-live {}, {} scheduler threads",
               options.data_dir,
               options.durability == storage::durability::power_loss ? "power-loss" : "process-crash",
               options.max_live_actors, st.system->scheduler().num_workers());
  spdlog::info("supervision tree:\n{}", result->supervision_tree());
  return result;
}

caf::actor_system& node::system() { return *impl_->system; }
storage::state_store& node::store() { return *impl_->store; }
const directory& node::actors() const { return impl_->actors; }
const node_options& node::options() const { return impl_->options; }
uint16_t node::listen_port() const { return impl_->port; }
void node::set_listen_port(uint16_t port) { impl_->port = port; }

std::string node::supervision_tree() const {
  std::string out = "triplane.node\n";
  out += "  directory (" + std::to_string(impl_->actors.shards().size()) + " shards; kinds:";
  for (auto& name : impl_->kind_names) out += " " + name;
  out += ")\n";
  return out;
}

expected<uint64_t> node::shutdown(std::chrono::milliseconds deadline) {
  auto& st = *impl_;
  if (st.stopped) return uint64_t{0};
  st.stopped = true;
  expected<uint64_t> drained = uint64_t{0};
  if (st.system) {
    drained = st.actors.stop(*st.system, deadline);
    st.system.reset();  // waits for every actor to finish
  }
  if (st.store) {
    if (auto err = st.store->flush()) spdlog::error("flushing the store at shutdown: {}", describe(err));
    st.store.reset();
  }
  return drained;
}

} // namespace triplane::runtime
