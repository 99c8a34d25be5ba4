// Benchmark of the runtime core: rehydration latency beside a bare RocksDB get, activation cost,
// memory per live idle actor, rehydration among 1,000,000 passivated actors, and request/response
// throughput through the directory beside raw CAF request/response.
//
//   bench_runtime [--json FILE] [--dir DIR] [--samples N] [--live N] [--passivated N]
#include <cstring>
#include <filesystem>
#include <malloc.h>
#include <random>
#include <thread>

#include <caf/all.hpp>
#include <sys/resource.h>
#include <unistd.h>

#include "bench_support.hpp"
#include "triplane/runtime/directory.hpp"
#include "triplane/storage/state_store.hpp"

using namespace std::chrono_literals;
using namespace triplane;
using namespace triplane::runtime;
using triplane::bench::percentile;

namespace {

using touch_atom = caf::atom_constant<caf::atom("touch")>;
using run_atom = caf::atom_constant<caf::atom("run")>;

/// A kind whose state is an opaque blob: restore copies it in, snapshot copies it out, like a
/// real kind decoding and encoding its record.
class blob_actor final : public virtual_actor {
public:
  caf::error restore(activation_context&, const std::optional<storage::stored_state>& state) override {
    if (state) blob_ = state->payload;
    return caf::none;
  }
  caf::behavior make_behavior(activation_context& ctx) override {
    auto* c = &ctx;
    return {
      [this](touch_atom) { return static_cast<uint64_t>(blob_.size()); },
      [this, c](touch_atom, uint64_t size) {
        blob_.assign(size, 'x');
        for (size_t i = 0; i < blob_.size(); i += 64) blob_[i] = static_cast<char>(i * 31);
        c->mark_changed();
        return static_cast<uint64_t>(blob_.size());
      },
    };
  }
  expected<std::string> snapshot() override { return blob_; }
  uint32_t schema_version() const override { return 1; }

private:
  std::string blob_;
};

kind_spec blob_kind() {
  kind_spec k;
  k.name = "blob";
  k.factory = [](const std::string&) { return std::make_unique<blob_actor>(); };
  k.idle_timeout = 3600s;
  return k;
}

std::string id_of(size_t i) { return "actor-" + std::to_string(i); }

size_t heap_in_use() { return mallinfo2().uordblks; }

size_t rss_bytes() {
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return static_cast<size_t>(resident) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

/// Runs `requests` calls with `window` in flight from inside an event-based actor (no
/// blocking hand-offs in the measured path) and returns per-call latencies in microseconds.
/// `make` builds the request for call i: (target, message).
using request_maker = std::function<std::pair<caf::actor, caf::message>(size_t i)>;

template <class Reply>
struct driver_state {
  request_maker make;
  size_t total = 0, sent = 0, done = 0;
  std::vector<double> latencies;
  caf::response_promise finished;
};

template <class Reply>
void issue(caf::stateful_actor<driver_state<Reply>>* self) {
  auto& st = self->state;
  auto i = st.sent++;
  auto [target, msg] = st.make(i);
  auto start = std::chrono::steady_clock::now();
  self->request(target, 30s, std::move(msg)).then(
    [self, start](Reply) {
      auto& st = self->state;
      st.latencies.push_back(bench::micros_since(start));
      if (++st.done == st.total) {
        st.finished.deliver(std::move(st.latencies));
        return;
      }
      if (st.sent < st.total) issue<Reply>(self);
    },
    [self](caf::error& err) {
      std::fprintf(stderr, "request failed: %s\n", describe(err).c_str());
      self->state.finished.deliver(std::move(err));
    });
}

template <class Reply>
caf::behavior request_driver(caf::stateful_actor<driver_state<Reply>>* self, request_maker make) {
  self->state.make = std::move(make);
  return {
    [self](run_atom, uint64_t total, uint64_t window) -> caf::result<std::vector<double>> {
      auto& st = self->state;
      st.total = total;
      st.sent = st.done = 0;
      st.latencies.clear();
      st.latencies.reserve(total);
      st.finished = self->make_response_promise();
      for (uint64_t w = 0; w < std::min(window, total); ++w) issue<Reply>(self);
      return st.finished;
    },
  };
}

template <class Reply = uint64_t>
std::vector<double> drive(caf::actor_system& sys, request_maker make, size_t total, size_t window) {
  auto driver = sys.spawn(request_driver<Reply>, std::move(make));
  caf::scoped_actor self{sys};
  std::vector<double> out;
  self->request(driver, caf::infinite, run_atom::value, uint64_t{total}, uint64_t{window})
    .receive([&](std::vector<double>& lat) { out = std::move(lat); },
             [&](caf::error& err) { std::fprintf(stderr, "driver: %s\n", describe(err).c_str()); });
  self->send_exit(driver, caf::exit_reason::user_shutdown);
  return out;
}

caf::message call_msg(const std::string& id, caf::message payload) {
  return caf::make_message(call_atom::value, std::string{"blob"}, id, std::move(payload));
}

/// Passivates ids [0, n) and waits until each is stored and stopped.
void passivate_ids(caf::actor_system& sys, directory& dir, size_t n) {
  auto make = [&dir](size_t i) {
    auto id = id_of(i);
    return std::pair<caf::actor, caf::message>{
      dir.route("blob", id), caf::make_message(passivate_atom::value, std::string{"blob"}, id)};
  };
  drive<bool>(sys, make, n, 64);
}

struct bench_env {
  std::filesystem::path path;
  std::unique_ptr<storage::state_store> store;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  directory dir;

  explicit bench_env(std::filesystem::path p, size_t max_live = 2000000) : path(std::move(p)) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path.parent_path());
    storage::store_options so;
    so.path = path.string();
    so.block_cache_bytes = 256u << 20;
    auto opened = storage::state_store::open(so);
    if (!opened) throw std::runtime_error(describe(opened.error()));
    store = std::move(*opened);
    cfg.set("scheduler.max-threads", 2);
    sys = std::make_unique<caf::actor_system>(cfg);
    directory_options opts;
    opts.max_live = max_live;
    auto started = directory::start(*sys, *store, {blob_kind()}, opts);
    if (!started) throw std::runtime_error(describe(started.error()));
    dir = std::move(*started);
  }
  ~bench_env() {
    (void)dir.stop(*sys, 600s);
    sys.reset();
    store.reset();
    std::filesystem::remove_all(path);
  }
};

/// Rehydration latency for states of `size` bytes, beside a bare get of the same records.
void bench_rehydration(const std::filesystem::path& base, bench::report& rep, size_t size, size_t samples) {
  bench_env env(base / ("rehydrate-" + std::to_string(size)));
  size_t ids = std::min<size_t>(samples, size >= (1u << 20) ? 200 : 1000);
  // Create the actors with their state, then passivate them.
  drive(*env.sys,
        [&](size_t i) {
          auto id = id_of(i);
          return std::pair{env.dir.route("blob", id), call_msg(id, caf::make_message(touch_atom::value, uint64_t{size}))};
        },
        ids, 16);
  passivate_ids(*env.sys, env.dir, ids);
  std::vector<double> rehydrate, floor;
  auto cf = env.store->db().column(storage::state_column_family);
  size_t rounds = (samples + ids - 1) / ids;
  for (size_t r = 0; r < rounds; ++r) {
    // The floor: a bare RocksDB get of each record, in the same state of the caches.
    for (size_t i = 0; i < ids; ++i) {
      auto key = storage::encode_record_key({"blob", id_of(i)});
      auto start = std::chrono::steady_clock::now();
      auto got = env.store->db().get_raw(*cf, key);
      floor.push_back(bench::micros_since(start));
      if (!got || !*got) throw std::runtime_error("record missing");
    }
    auto lat = drive(*env.sys,
                     [&](size_t i) {
                       auto id = id_of(i);
                       return std::pair{env.dir.route("blob", id), call_msg(id, caf::make_message(touch_atom::value))};
                     },
                     ids, 1);
    rehydrate.insert(rehydrate.end(), lat.begin(), lat.end());
    passivate_ids(*env.sys, env.dir, ids);
  }
  auto row = "rehydrate " + std::to_string(size / 1024) + " KiB";
  rep.add(row, "p50_us", percentile(rehydrate, 50));
  rep.add(row, "p99_us", percentile(rehydrate, 99));
  rep.add(row, "p999_us", percentile(rehydrate, 99.9));
  rep.add(row, "floor_get_p50_us", percentile(floor, 50));
  rep.add(row, "floor_get_p99_us", percentile(floor, 99));
  rep.add(row, "samples", static_cast<double>(rehydrate.size()));
}

/// Activation cost and memory per live idle actor at `live` actors.
void bench_live_memory(const std::filesystem::path& base, bench::report& rep, size_t live) {
  bench_env env(base / "live");
  // Warm up allocator arenas and the shards.
  drive(*env.sys, [&](size_t i) {
    auto id = "warm-" + std::to_string(i);
    return std::pair{env.dir.route("blob", id), call_msg(id, caf::make_message(touch_atom::value))};
  }, 1000, 64);
  std::this_thread::sleep_for(200ms);
  malloc_trim(0);
  auto heap_before = heap_in_use();
  auto rss_before = rss_bytes();
  auto start = std::chrono::steady_clock::now();
  auto lat = drive(*env.sys, [&](size_t i) {
    auto id = id_of(i);
    return std::pair{env.dir.route("blob", id), call_msg(id, caf::make_message(touch_atom::value))};
  }, live, 256);
  double seconds = bench::micros_since(start) / 1e6;
  std::this_thread::sleep_for(500ms);  // let every activation settle
  auto heap_after = heap_in_use();
  auto rss_after = rss_bytes();
  double per_actor_heap = static_cast<double>(heap_after - heap_before) / static_cast<double>(live);
  double per_actor_rss = static_cast<double>(rss_after - rss_before) / static_cast<double>(live);
  // What the kind itself holds per actor (its object); the rest is the runtime's.
  double user_bytes = sizeof(blob_actor) + 16;  // object + allocator header
  rep.add("activation (new id, no state)", "per_sec", static_cast<double>(live) / seconds);
  rep.add("activation (new id, no state)", "p50_us", percentile(lat, 50));
  rep.add("activation (new id, no state)", "p99_us", percentile(lat, 99));
  std::string row = "memory per live idle actor @" + std::to_string(live);
  rep.add(row, "heap_bytes", per_actor_heap);
  rep.add(row, "runtime_heap_bytes", per_actor_heap - user_bytes);
  rep.add(row, "rss_bytes", per_actor_rss);
}

/// Rehydration latency of random ids among `count` passivated actors on disk.
void bench_many_passivated(const std::filesystem::path& base, bench::report& rep, size_t count,
                           size_t samples) {
  bench_env env(base / "many");
  constexpr size_t state_bytes = 1024;
  std::string payload(state_bytes, 'p');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>((i * 131) ^ (i >> 3));
  auto start = std::chrono::steady_clock::now();
  // Write the records as passivation writes them (epoch claim + state save), without spending
  // the time to run a million actors through activation first.
  for (size_t i = 0; i < count; ++i) {
    storage::actor_key key{"blob", id_of(i)};
    auto epoch = env.store->begin_activation(key);
    if (!epoch) throw std::runtime_error(describe(epoch.error()));
    auto saved = env.store->save(key, *epoch, 1, payload, storage::durability::process_crash);
    if (!saved) throw std::runtime_error(describe(saved.error()));
  }
  double write_s = bench::micros_since(start) / 1e6;
  (void)env.store->flush();
  std::mt19937_64 rng(42);
  std::uniform_int_distribution<size_t> pick(0, count - 1);
  std::vector<size_t> chosen(samples);
  for (auto& c : chosen) c = pick(rng);
  std::vector<double> floor;
  auto cf = env.store->db().column(storage::state_column_family);
  for (auto c : chosen) {
    auto key = storage::encode_record_key({"blob", id_of(c)});
    auto t = std::chrono::steady_clock::now();
    (void)env.store->db().get_raw(*cf, key);
    floor.push_back(bench::micros_since(t));
  }
  auto lat = drive(*env.sys, [&](size_t i) {
    auto id = id_of(chosen[i]);
    return std::pair{env.dir.route("blob", id), call_msg(id, caf::make_message(touch_atom::value))};
  }, chosen.size(), 1);
  std::string row = "rehydrate 1 KiB among " + std::to_string(count) + " passivated";
  rep.add(row, "p50_us", percentile(lat, 50));
  rep.add(row, "p99_us", percentile(lat, 99));
  rep.add(row, "p999_us", percentile(lat, 99.9));
  rep.add(row, "floor_get_p50_us", percentile(floor, 50));
  rep.add(row, "floor_get_p99_us", percentile(floor, 99));
  rep.add(row, "write_per_sec", static_cast<double>(count) / write_s);
  auto keys = env.store->count(false);
  if (keys) rep.add(row, "keys_on_disk_estimate", static_cast<double>(*keys));
}

// -- throughput: directory vs raw CAF -------------------------------------------------------

caf::behavior raw_echo(caf::event_based_actor*) {
  return {[](touch_atom) { return uint64_t{0}; }};
}

void bench_throughput(const std::filesystem::path& base, bench::report& rep, size_t actors,
                      size_t calls) {
  bench_env env(base / "throughput");
  std::vector<caf::actor> raw;
  for (size_t i = 0; i < actors; ++i) raw.push_back(env.sys->spawn(raw_echo));
  std::vector<std::string> ids;
  for (size_t i = 0; i < actors; ++i) ids.push_back(id_of(i));
  // Activate the virtual actors first: this measures calls to live actors.
  drive(*env.sys, [&](size_t i) {
    return std::pair{env.dir.route("blob", ids[i]), call_msg(ids[i], caf::make_message(touch_atom::value))};
  }, actors, 64);

  // One timed pass: several drivers in parallel, each with a window of requests in flight.
  auto cpu_seconds = [] {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  };
  std::vector<double> raw_cpu, route_cpu, front_cpu;
  auto pass = [&](request_maker make, size_t drivers, size_t n, std::vector<double>& lat,
                  std::vector<double>& cpu_per_call) {
    double cpu_start = cpu_seconds();
    std::vector<caf::actor> ds;
    for (size_t d = 0; d < drivers; ++d) ds.push_back(env.sys->spawn(request_driver<uint64_t>, make));
    caf::scoped_actor self{*env.sys};
    auto start = std::chrono::steady_clock::now();
    for (auto& d : ds) self->send(d, run_atom::value, uint64_t{n / drivers}, uint64_t{64});
    size_t done = 0;
    for (size_t d = 0; d < drivers; ++d)
      self->receive([&](std::vector<double>& l) { done += l.size(); lat.insert(lat.end(), l.begin(), l.end()); },
                    [&](caf::error& err) { std::fprintf(stderr, "%s\n", describe(err).c_str()); });
    double secs = bench::micros_since(start) / 1e6;
    cpu_per_call.push_back((cpu_seconds() - cpu_start) * 1e6 / static_cast<double>(done));
    for (auto& d : ds) self->send_exit(d, caf::exit_reason::user_shutdown);
    return static_cast<double>(done) / secs;
  };
  request_maker raw_call = [&](size_t i) {
    return std::pair{raw[i % actors], caf::make_message(touch_atom::value)};
  };
  request_maker route_call = [&](size_t i) {
    auto& id = ids[i % actors];
    return std::pair{env.dir.route("blob", id), call_msg(id, caf::make_message(touch_atom::value))};
  };
  request_maker front_call = [&](size_t i) {
    auto& id = ids[i % actors];
    return std::pair{env.dir.front(), call_msg(id, caf::make_message(touch_atom::value))};
  };
  // Interleaved rounds, so that load from elsewhere on the machine hits all three alike; the
  // overhead is the median of the per-round ratios.
  constexpr int rounds = 9;
  size_t per_round = std::max<size_t>(calls / rounds, 1000);
  std::vector<double> raw_rates, route_rates, front_rates, route_ratios, front_ratios;
  std::vector<double> raw_lat, route_lat, front_lat;
  for (int r = 0; r < rounds; ++r) {
    raw_rates.push_back(pass(raw_call, 2, per_round, raw_lat, raw_cpu));
    route_rates.push_back(pass(route_call, 2, per_round, route_lat, route_cpu));
    front_rates.push_back(pass(front_call, 2, per_round, front_lat, front_cpu));
    route_ratios.push_back(raw_rates.back() / route_rates.back());
    front_ratios.push_back(raw_rates.back() / front_rates.back());
  }
  auto add_row = [&](const std::string& name, const std::vector<double>& rates, const std::vector<double>& lat,
                     const std::vector<double>& cpu) {
    rep.add(name, "calls_per_sec_median", percentile(rates, 50));
    rep.add(name, "cpu_us_per_call", percentile(cpu, 50));
    rep.add(name, "p50_us", percentile(lat, 50));
    rep.add(name, "p99_us", percentile(lat, 99));
  };
  add_row("raw CAF request/response", raw_rates, raw_lat, raw_cpu);
  add_row("directory (via route())", route_rates, route_lat, route_cpu);
  add_row("directory (via front actor)", front_rates, front_lat, front_cpu);
  rep.add("overhead vs raw CAF (median of 9 rounds)", "via_route_x", percentile(route_ratios, 50));
  rep.add("overhead vs raw CAF (median of 9 rounds)", "via_front_x", percentile(front_ratios, 50));
  rep.add("CPU per call vs raw CAF", "via_route_x", percentile(route_cpu, 50) / percentile(raw_cpu, 50));
  rep.add("CPU per call vs raw CAF", "via_front_x", percentile(front_cpu, 50) / percentile(raw_cpu, 50));
  caf::scoped_actor self{*env.sys};
  for (auto& a : raw) self->send_exit(a, caf::exit_reason::user_shutdown);
}

} // namespace

int main(int argc, char** argv) {
  auto json = bench::json_path(argc, argv);
  std::filesystem::path base = std::filesystem::temp_directory_path() / ("triplane-bench-" + std::to_string(::getpid()));
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string{argv[i]} == "--dir") base = argv[i + 1];
  auto samples = static_cast<size_t>(bench::int_flag(argc, argv, "--samples", 2000));
  auto live = static_cast<size_t>(bench::int_flag(argc, argv, "--live", 100000));
  auto passivated = static_cast<size_t>(bench::int_flag(argc, argv, "--passivated", 1000000));
  auto calls = static_cast<size_t>(bench::int_flag(argc, argv, "--calls", 400000));

  bench::report rep("runtime core");
  rep.note("machine", std::to_string(std::thread::hardware_concurrency()) + " hardware threads; 2 CAF scheduler threads");
  rep.note("rehydrate", "message to a passivated actor -> reply, measured inside an event-based actor; "
                        "floor = bare RocksDB Get (PinnableSlice) of the same record in the same run");
  try {
    for (size_t size : {size_t{1024}, size_t{64 * 1024}, size_t{1024 * 1024}})
      bench_rehydration(base, rep, size, size >= (1u << 20) ? std::min<size_t>(samples, 1000) : samples);
    rep.print();
    bench_live_memory(base, rep, live);
    rep.print();
    bench_throughput(base, rep, 1000, calls);
    rep.print();
    if (passivated > 0) bench_many_passivated(base, rep, passivated, samples);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_runtime: %s\n", e.what());
    std::filesystem::remove_all(base);
    return 1;
  }
  std::filesystem::remove_all(base);
  rep.print();
  if (!json.empty() && !bench::write_json(json, {&rep})) {
    std::fprintf(stderr, "bench_runtime: cannot write %s\n", json.c_str());
    return 1;
  }
  return 0;
}
