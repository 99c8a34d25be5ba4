// Session records (Cap'n Proto SessionRecord) and reference-counted chunks in RocksDB.
#include "session/session_store.hpp"

#include <algorithm>
#include <cstring>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>
#include <kj/exception.h>
#include <openssl/evp.h>

#include "triplane/schemas/session.capnp.h"

namespace triplane::actors::session {
namespace {

constexpr const char* cf_chunks = "sandbox.chunks";
constexpr const char* cf_refs = "sandbox.refs";
constexpr const char* cf_sessions = "sandbox.sessions";

kj::ArrayPtr<const capnp::byte> bytes_of(std::string_view s) {
  return {reinterpret_cast<const capnp::byte*>(s.data()), s.size()};
}

std::string_view view_of(capnp::Data::Reader d) {
  return {reinterpret_cast<const char*>(d.begin()), d.size()};
}

/// Each chunk occurrence in `m`, counted.
std::map<std::string, int64_t> chunk_counts(const manifest& m) {
  std::map<std::string, int64_t> out;
  for (const auto& [path, e] : m)
    for (const auto& c : e.chunks) ++out[c];
  return out;
}

} // namespace

std::string sha256(std::string_view data) {
  std::string out(hash_bytes, '\0');
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), reinterpret_cast<unsigned char*>(out.data()), &len,
             EVP_sha256(), nullptr);
  return out;
}

std::string to_hex(std::string_view raw) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

std::string encode_record(const session_record& r) {
  capnp::MallocMessageBuilder message;
  auto root = message.initRoot<schemas::SessionRecord>();
  bool links = std::any_of(r.files.begin(), r.files.end(),
                          [](const auto& f) { return !f.second.hard_link_of.empty(); });
  root.setFormatVersion(links ? 2 : 1);
  root.setId(r.id);
  root.setCreatedUnixMs(r.created_unix_ms);
  root.setLastUsedUnixMs(r.last_used_unix_ms);
  root.setForkedFrom(r.forked_from);
  root.setCwd(r.cwd);
  root.setNextBgId(r.next_bg_id);
  auto put_map = [](auto list, const std::map<std::string, std::string>& m) {
    unsigned i = 0;
    for (const auto& [k, v] : m) {
      list[i].setKey(k);
      list[i].setValue(bytes_of(v));
      ++i;
    }
  };
  put_map(root.initEnv(static_cast<unsigned>(r.env.size())), r.env);
  put_map(root.initKv(static_cast<unsigned>(r.kv.size())), r.kv);
  auto hist = root.initHistory(static_cast<unsigned>(r.history.size()));
  for (unsigned i = 0; i < r.history.size(); ++i) {
    const auto& c = r.history[i];
    auto h = hist[i];
    auto argv = h.initArgv(static_cast<unsigned>(c.argv.size()));
    for (unsigned j = 0; j < c.argv.size(); ++j) argv.set(j, c.argv[j]);
    h.setExited(c.exited);
    h.setExitCode(c.exit_code);
    h.setTermSignal(c.term_signal);
    h.setTimedOut(c.timed_out);
    h.setDurationUs(c.duration_us);
    h.setStartedUnixMs(c.started_unix_ms);
  }
  auto s = root.initSettings();
  const auto& st = r.settings;
  s.setMemoryBytes(st.default_limits.memory_bytes);
  s.setMaxProcesses(st.default_limits.max_processes);
  s.setCpuTimeMs(st.default_limits.cpu_time_ms);
  s.setMaxFileBytes(st.default_limits.max_file_bytes);
  s.setStdoutCapBytes(st.default_limits.stdout_cap_bytes);
  s.setStderrCapBytes(st.default_limits.stderr_cap_bytes);
  s.setDefaultTimeoutMs(st.default_timeout_ms);
  s.setWorkspaceQuotaBytes(st.workspace_quota_bytes);
  s.setMaxKvBytes(st.max_kv_bytes);
  s.setMaxTarBytes(st.max_tar_bytes);
  s.setNetwork(static_cast<uint8_t>(st.network));
  s.setOwner(st.owner);
  auto files = root.initFiles(static_cast<unsigned>(r.files.size()));
  unsigned i = 0;
  for (const auto& [path, e] : r.files) {
    auto f = files[i++];
    f.setPath(path);
    f.setKind(static_cast<uint8_t>(e.type));
    f.setMode(e.mode);
    f.setSize(e.size);
    f.setMtimeNs(e.mtime_ns);
    auto chunks = f.initChunks(static_cast<unsigned>(e.chunks.size()));
    for (unsigned j = 0; j < e.chunks.size(); ++j) chunks.set(j, bytes_of(e.chunks[j]));
    f.setLinkTarget(e.link_target);
    if (!e.hard_link_of.empty()) f.setHardLinkOf(e.hard_link_of);
  }
  auto words = capnp::messageToFlatArray(message);
  auto bytes = words.asChars();
  return std::string(bytes.begin(), bytes.size());
}

expected<session_record> decode_record(std::string_view bytes, const std::string& id) {
  if (bytes.size() % sizeof(capnp::word) != 0)
    return make_error(errc::corrupted, "session '" + id + "': record size is not word-aligned");
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  session_record r;
  try {
    capnp::ReaderOptions options;
    options.traversalLimitInWords = 1ull << 32;
    capnp::FlatArrayMessageReader reader(words, options);
    auto root = reader.getRoot<schemas::SessionRecord>();
    if (root.getFormatVersion() > 2)
      return make_error(errc::corrupted, "session '" + id + "': record format " +
                                             std::to_string(root.getFormatVersion()) + " is newer than this build");
    r.id = root.getId();
    r.created_unix_ms = root.getCreatedUnixMs();
    r.last_used_unix_ms = root.getLastUsedUnixMs();
    r.forked_from = root.getForkedFrom();
    r.cwd = root.getCwd();
    r.next_bg_id = root.getNextBgId();
    for (auto kv : root.getEnv()) r.env[kv.getKey()] = std::string(view_of(kv.getValue()));
    for (auto kv : root.getKv()) r.kv[kv.getKey()] = std::string(view_of(kv.getValue()));
    for (auto h : root.getHistory()) {
      command_record c;
      for (auto a : h.getArgv()) c.argv.emplace_back(a);
      c.exited = h.getExited();
      c.exit_code = h.getExitCode();
      c.term_signal = h.getTermSignal();
      c.timed_out = h.getTimedOut();
      c.duration_us = h.getDurationUs();
      c.started_unix_ms = h.getStartedUnixMs();
      r.history.push_back(std::move(c));
    }
    auto s = root.getSettings();
    auto& st = r.settings;
    st.default_limits.memory_bytes = s.getMemoryBytes();
    st.default_limits.max_processes = s.getMaxProcesses();
    st.default_limits.cpu_time_ms = s.getCpuTimeMs();
    st.default_limits.max_file_bytes = s.getMaxFileBytes();
    st.default_limits.stdout_cap_bytes = s.getStdoutCapBytes();
    st.default_limits.stderr_cap_bytes = s.getStderrCapBytes();
    st.default_timeout_ms = s.getDefaultTimeoutMs();
    st.workspace_quota_bytes = s.getWorkspaceQuotaBytes();
    st.max_kv_bytes = s.getMaxKvBytes();
    st.max_tar_bytes = s.getMaxTarBytes();
    st.network = s.getNetwork() == 1 ? network_policy::loopback : network_policy::none;
    st.owner = s.getOwner();
    for (auto f : root.getFiles()) {
      manifest_entry e;
      if (f.getKind() > 2)
        return make_error(errc::corrupted, "session '" + id + "': bad file kind in manifest");
      e.type = static_cast<file_type>(f.getKind());
      e.mode = f.getMode() & 07777;
      e.size = f.getSize();
      e.mtime_ns = f.getMtimeNs();
      for (auto c : f.getChunks()) {
        if (c.size() != hash_bytes)
          return make_error(errc::corrupted, "session '" + id + "': bad chunk name in manifest");
        e.chunks.emplace_back(view_of(c));
      }
      e.link_target = f.getLinkTarget();
      e.hard_link_of = f.getHardLinkOf();
      r.files.emplace(std::string(f.getPath()), std::move(e));
    }
    if (auto bad = bad_path(r.files))
      return make_error(errc::corrupted, "session '" + id + "': manifest entry '" + *bad +
                                             "' is not a path inside the workspace below a directory "
                                             "entry of the manifest");
    if (auto bad = bad_hard_link(r.files))
      return make_error(errc::corrupted, "session '" + id + "': manifest entry '" + *bad +
                                             "' is a hard link of no regular file of the manifest");
  } catch (const kj::Exception& ex) {
    return make_error(errc::corrupted, "session '" + id + "': undecodable record: " +
                                           std::string(ex.getDescription().cStr()));
  }
  return r;
}

const std::string* bad_path(const manifest& m) {
  for (const auto& [path, e] : m) {
    if (path.empty() || path.front() == '/' || path.back() == '/' || path.find('\0') != std::string::npos)
      return &path;
    size_t begin = 0;
    while (begin <= path.size()) {
      size_t end = path.find('/', begin);
      if (end == std::string::npos) end = path.size();
      std::string_view name(path.data() + begin, end - begin);
      if (name.empty() || name == "." || name == ".." || name.size() > 255) return &path;
      begin = end + 1;
    }
    // Every parent is a directory of the manifest, so that no path leads through a symlink.
    auto slash = path.rfind('/');
    if (slash != std::string::npos) {
      auto parent = m.find(path.substr(0, slash));
      if (parent == m.end() || parent->second.type != file_type::directory) return &path;
    }
  }
  return nullptr;
}

const std::string* bad_hard_link(const manifest& m) {
  for (const auto& [path, e] : m) {
    if (e.hard_link_of.empty()) continue;
    if (e.type != file_type::regular || !e.chunks.empty() || e.hard_link_of == path) return &path;
    auto primary = m.find(e.hard_link_of);
    if (primary == m.end() || primary->second.type != file_type::regular ||
        !primary->second.hard_link_of.empty())
      return &path;
  }
  return nullptr;
}

std::vector<std::string> session_store::column_families() {
  return {cf_chunks, cf_refs, cf_sessions};
}

expected<std::unique_ptr<session_store>> session_store::open(storage::database& db,
                                                             storage::durability level) {
  auto store = std::unique_ptr<session_store>(new session_store(db, level));
  auto chunks = db.column(cf_chunks);
  auto refs = db.column(cf_refs);
  auto sessions = db.column(cf_sessions);
  if (!chunks || !refs || !sessions)
    return make_error(errc::invalid_argument,
                      "the database was opened without the sandbox column families");
  store->chunks_ = *chunks;
  store->refs_ = *refs;
  store->sessions_ = *sessions;
  return store;
}

expected<std::optional<session_record>> session_store::load(const std::string& id) {
  auto value = db_.get(sessions_, id);
  if (!value) return value.error();
  if (!*value) return std::optional<session_record>{};
  auto rec = decode_record(**value, id);
  if (!rec) return rec.error();
  return std::optional<session_record>{std::move(*rec)};
}

expected<bool> session_store::exists(const std::string& id) {
  auto raw = db_.get_raw(sessions_, id);
  if (!raw) return raw.error();
  return raw->has_value();
}

caf::error session_store::save(const session_record& record, const manifest* previous,
                               const std::map<std::string, std::string>& new_chunks) {
  auto now = chunk_counts(record.files);
  std::map<std::string, int64_t> delta = now;
  if (previous)
    for (const auto& [hash, n] : chunk_counts(*previous)) delta[hash] -= n;
  std::lock_guard<std::mutex> guard(refs_mutex_);
  if (!previous) {  // a first save must not replace a record (a fork's) it did not account for
    auto taken = exists(record.id);
    if (!taken) return taken.error();
    if (*taken)
      return make_error(errc::already_exists, "session '" + record.id +
                                                   "' was stored meanwhile (by a fork onto its id)");
  }
  storage::write_batch batch(db_);
  batch.put(sessions_, record.id, encode_record(record));
  std::vector<std::string> dropped;
  for (const auto& [hash, d] : delta) {
    if (d == 0) continue;
    if (d > 0) {
      auto have = db_.get_raw(chunks_, hash);
      if (!have) return have.error();
      if (!*have) {
        auto bytes = new_chunks.find(hash);
        if (bytes == new_chunks.end())
          return make_error(errc::internal, "session '" + record.id + "': chunk " + to_hex(hash) +
                                                " is neither stored nor supplied");
        batch.put(chunks_, hash, bytes->second);
      }
    } else {
      dropped.push_back(hash);
    }
    batch.add_refcount(refs_, hash, d);
  }
  if (auto err = db_.write(batch, level_)) return err;
  return reclaim(dropped);
}

caf::error session_store::reclaim(const std::vector<std::string>& candidates) {
  // Called with refs_mutex_ held: no reference can be added between the read and the delete.
  storage::write_batch batch(db_);
  for (const auto& hash : candidates) {
    auto count = refcount(hash);
    if (!count) return count.error();
    if (*count == 0) {
      batch.erase(chunks_, hash);
      batch.erase(refs_, hash);
    }
  }
  return db_.write(batch, level_);
}

caf::error session_store::fork(const session_record& source, const std::string& new_id,
                               uint64_t now_ms) {
  session_record copy = source;
  copy.id = new_id;
  copy.forked_from = source.id;
  copy.created_unix_ms = now_ms;
  copy.last_used_unix_ms = now_ms;
  copy.history.clear();
  std::lock_guard<std::mutex> guard(refs_mutex_);
  auto taken = exists(new_id);
  if (!taken) return taken.error();
  if (*taken) return make_error(errc::already_exists, "session '" + new_id + "' already exists");
  storage::write_batch batch(db_);
  batch.put(sessions_, new_id, encode_record(copy));
  for (const auto& [hash, n] : chunk_counts(copy.files)) batch.add_refcount(refs_, hash, n);
  return db_.write(batch, level_);
}

caf::error session_store::destroy(const std::string& id) {
  std::lock_guard<std::mutex> guard(refs_mutex_);
  auto rec = load(id);
  if (!rec) return rec.error();
  if (!*rec) return make_error(errc::not_found, "session '" + id + "' has no stored record");
  storage::write_batch batch(db_);
  batch.erase(sessions_, id);
  std::vector<std::string> dropped;
  for (const auto& [hash, n] : chunk_counts((*rec)->files)) {
    batch.add_refcount(refs_, hash, -n);
    dropped.push_back(hash);
  }
  if (auto err = db_.write(batch, level_)) return err;
  return reclaim(dropped);
}

expected<std::vector<std::string>> session_store::list_ids(std::string_view prefix,
                                                          std::string_view after,
                                                          size_t limit) const {
  std::vector<std::string> ids;
  if (limit == 0) return ids;
  // The smallest key above `after` is `after` followed by a NUL byte.
  std::string start;
  if (!after.empty()) {
    start.assign(after);
    start.push_back('\0');
  }
  auto err = db_.for_each(sessions_, prefix, start, [&](std::string_view key, std::string_view) {
    ids.emplace_back(key);
    return ids.size() < limit;
  });
  if (err) return err;
  return ids;
}

expected<uint64_t> session_store::count_ids(std::string_view prefix) const {
  uint64_t n = 0;
  auto err = db_.for_each(sessions_, prefix, [&n](std::string_view, std::string_view) {
    ++n;
    return true;
  });
  if (err) return err;
  return n;
}

expected<std::string> session_store::chunk(std::string_view hash) const {
  auto value = db_.get(chunks_, hash);
  if (!value) return value.error();
  if (!*value) return make_error(errc::corrupted, "chunk " + to_hex(hash) + " is missing");
  if (sha256(**value) != hash)
    return make_error(errc::corrupted, "chunk " + to_hex(hash) + " does not match its hash");
  return std::move(**value);
}

caf::error session_store::with_chunk(std::string_view hash,
                                     const std::function<void(std::string_view)>& use,
                                     bool verify) const {
  bool matches = true;
  auto found = db_.get(chunks_, hash, [&](std::string_view bytes) {
    matches = !verify || sha256(bytes) == hash;
    if (matches) use(bytes);
  });
  if (!found) return found.error();
  if (!*found) return make_error(errc::corrupted, "chunk " + to_hex(hash) + " is missing");
  if (!matches) return make_error(errc::corrupted, "chunk " + to_hex(hash) + " does not match its hash");
  return {};
}

expected<uint64_t> session_store::refcount(std::string_view hash) const {
  auto value = db_.get(refs_, hash);
  if (!value) return value.error();
  if (!*value) return uint64_t{0};
  return storage::decode_refcount(**value);
}

expected<store_stats> session_store::stats() const {
  store_stats s;
  if (auto err = db_.for_each(chunks_, "", [&](std::string_view, std::string_view v) {
        ++s.chunks;
        s.chunk_bytes += v.size();
        return true;
      }))
    return err;
  if (auto err = db_.for_each(sessions_, "", [&](std::string_view, std::string_view) {
        ++s.sessions;
        return true;
      }))
    return err;
  return s;
}

} // namespace triplane::actors::session
