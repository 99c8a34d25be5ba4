// In-memory session directory test double (see the header).
#include "session_directory_double.hpp"

#include <chrono>
#include <map>
#include <set>

#include <caf/all.hpp>

#include "triplane/rpc/session_calls.hpp"
#include "triplane/runtime/directory.hpp"
#include "triplane/runtime/error.hpp"


namespace triplane::test {
namespace {

namespace sc = rpc::session_calls;
using runtime::call_atom;
using tick_atom = caf::atom_constant<caf::atom("dbl_tick")>;
using flood_atom = caf::atom_constant<caf::atom("dbl_flood")>;

uint64_t now_ms() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                 std::chrono::system_clock::now().time_since_epoch())
                                 .count());
}

struct file {
  std::string data;
  uint32_t mode = 0100644;
};

struct session {
  std::map<std::string, std::string> kv;
  std::map<std::string, file> files;
  uint64_t created = now_ms(), last_used = now_ms(), execs = 0;
};

struct pending_exec {
  caf::actor sink;
  caf::response_promise rp;
  uint64_t chunks_left = 0, chunk_size = 0, sent = 0;
  uint64_t unanswered = 0;     // chunks without credit back yet
  bool ignore_credit = false;  // "spew": a producer that does not wait for credit
};

struct session_state {
  session data;
  std::map<uint64_t, pending_exec> running;  // by call id
  static inline const char* name = "session_double";
};

using install_atom = caf::atom_constant<caf::atom("dbl_inst")>;
using session_ptr = caf::stateful_actor<session_state>*;

} // namespace
} // namespace triplane::test

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(triplane::test::session)

namespace triplane::test {
namespace {

caf::behavior session_actor(session_ptr self, std::string id, session initial,
                            caf::actor directory) {
  self->state.data = std::move(initial);
  auto touch = [self]() -> session& {
    self->state.data.last_used = now_ms();
    return self->state.data;
  };
  return {
    [touch](sc::kv_get_atom, const std::string& key) -> caf::result<caf::optional<std::string>> {
      auto& s = touch();
      auto i = s.kv.find(key);
      if (i == s.kv.end()) return caf::optional<std::string>{};
      return caf::optional<std::string>{i->second};
    },
    [touch](sc::kv_put_atom, const std::string& key, std::string& value) {
      touch().kv[key] = std::move(value);
      return true;
    },
    [touch](sc::kv_delete_atom, const std::string& key) { return touch().kv.erase(key) > 0; },
    [touch](sc::kv_list_atom, const std::string& prefix) {
      auto& s = touch();
      std::vector<std::string> out;
      for (auto i = s.kv.lower_bound(prefix);
           i != s.kv.end() && i->first.compare(0, prefix.size(), prefix) == 0; ++i)
        out.push_back(i->first);
      return out;
    },
    [touch](sc::write_atom, const std::string& path, std::string& data, bool,
            bool executable) -> caf::result<bool> {
      if (path.empty() || path[0] == '/' || path.find("..") != std::string::npos)
        return make_error(errc::invalid_argument, "path '" + path + "' leaves the workspace");
      touch().files[path] = file{std::move(data), executable ? 0100755u : 0100644u};
      return true;
    },
    [touch](sc::read_atom, const std::string& path, uint64_t offset,
            uint64_t length) -> caf::result<std::string> {
      auto& s = touch();
      auto i = s.files.find(path);
      if (i == s.files.end()) return make_error(errc::not_found, "no file '" + path + "'");
      const auto& d = i->second.data;
      if (offset > d.size()) return std::string{};
      return d.substr(offset, length == 0 ? std::string::npos : length);
    },
    [touch](sc::list_atom, const std::string& path, bool) {
      std::vector<sc::file_entry> out;
      for (const auto& [p, f] : touch().files)
        if (path.empty() || path == "." || p.compare(0, path.size(), path) == 0)
          out.push_back({p, f.data.size(), f.mode});
      return out;
    },
    [touch](sc::remove_atom, const std::string& path, bool) -> caf::result<bool> {
      if (touch().files.erase(path) == 0) return make_error(errc::not_found, "no file '" + path + "'");
      return true;
    },
    [self, touch, directory](sc::fork_atom, const std::string& new_id) {
      return self->delegate(directory, install_atom::value, new_id, touch());
    },
    [self, touch, id](sc::info_atom) {
      auto& s = touch();
      sc::session_info info;
      info.id = id;
      info.created_unix_ms = s.created;
      info.last_used_unix_ms = s.last_used;
      info.file_count = s.files.size();
      info.kv_count = s.kv.size();
      info.exec_count = s.execs;
      return info;
    },
    [self, touch](sc::cancel_atom, uint64_t call_id) {
      auto i = self->state.running.find(call_id);
      if (i == self->state.running.end()) return;
      touch().kv["last_cancelled"] = std::to_string(call_id);
      sc::exec_result killed;
      killed.exit_code = -1;
      killed.signal = 9;
      killed.chunks = i->second.sent;
      i->second.rp.deliver(killed);
      self->state.running.erase(i);
    },
    [self, touch](sc::exec_atom, sc::exec_request& req, caf::actor& sink,
                  uint64_t call_id) -> caf::result<sc::exec_result> {
      ++touch().execs;
      auto argv = req.argv;
      if (argv.empty()) argv = {"echo", req.shell};
      sc::exec_result r;
      auto emit = [&](uint8_t stream, std::string bytes) {
        self->request(sink, caf::infinite, sc::chunk_atom::value, call_id, stream,
                      std::move(bytes))
          .then([](bool) {}, [](caf::error&) {});
        ++r.chunks;
      };
      if (argv[0] == "echo") {
        std::string line;
        for (size_t i = 1; i < argv.size(); ++i) line += (i > 1 ? " " : "") + argv[i];
        emit(0, line + "\n");
        return r;
      }
      if (argv[0] == "stderr" && argv.size() == 2) {
        emit(1, argv[1]);
        return r;
      }
      if (argv[0] == "exit" && argv.size() == 2) {
        r.exit_code = std::stoi(argv[1]);
        return r;
      }
      if ((argv[0] == "sleep" && argv.size() == 2)
          || ((argv[0] == "flood" || argv[0] == "spew") && argv.size() == 3)) {
        auto rp = self->make_response_promise();
        pending_exec p{sink, rp};
        if (argv[0] == "sleep") {
          self->delayed_send(self, std::chrono::milliseconds(std::stoll(argv[1])),
                             tick_atom::value, call_id);
        } else {
          p.chunks_left = std::stoull(argv[1]);
          p.chunk_size = std::stoull(argv[2]);
          p.ignore_credit = argv[0] == "spew";
          self->send(self, flood_atom::value, call_id);
        }
        self->state.running.emplace(call_id, std::move(p));
        return caf::delegated<sc::exec_result>{};
      }
      return make_error(errc::invalid_argument, "the test double has no command '" + argv[0] + "'");
    },
    [self](tick_atom, uint64_t call_id) {
      auto i = self->state.running.find(call_id);
      if (i == self->state.running.end()) return;
      i->second.rp.deliver(sc::exec_result{});
      self->state.running.erase(i);
    },
    [self](flood_atom, uint64_t call_id) {
      auto i = self->state.running.find(call_id);
      if (i == self->state.running.end()) return;  // cancelled
      auto& p = i->second;
      // Like a real producer: at most 8 chunks without credit ("spew" ignores that).
      while (p.chunks_left > 0 && (p.ignore_credit || p.unanswered < 8)) {
        --p.chunks_left;
        ++p.sent;
        ++p.unanswered;
        self->request(p.sink, caf::infinite, sc::chunk_atom::value, call_id, uint8_t{0},
                      std::string(p.chunk_size, 'x'))
          .then(
            [self, call_id](bool) {
              auto j = self->state.running.find(call_id);
              if (j == self->state.running.end()) return;
              --j->second.unanswered;
              self->send(self, flood_atom::value, call_id);
            },
            [](caf::error&) {});
        if (p.ignore_credit && p.sent % 16 == 0) break;  // let other messages in
      }
      if (p.chunks_left > 0) {
        if (p.ignore_credit) self->send(self, flood_atom::value, call_id);
        return;
      }
      if (p.unanswered > 0 && !p.ignore_credit) return;  // finish once all were accepted
      sc::exec_result r;
      r.chunks = p.sent;
      p.rp.deliver(r);
      self->state.running.erase(i);
    },
  };
}

struct directory_state {
  std::map<std::string, caf::actor> sessions;
  std::vector<caf::response_promise> slow;
  uint64_t activations = 0;
  static inline const char* name = "session_directory_double";
};

caf::behavior directory_double(caf::stateful_actor<directory_state>* self) {
  auto start = [self](const std::string& id, session s) {
    auto a = self->spawn<caf::linked>(session_actor, id, std::move(s), caf::actor_cast<caf::actor>(self));
    self->state.sessions.emplace(id, a);
    ++self->state.activations;
    return a;
  };
  return {
    [self, start](call_atom, const std::string& kind, const std::string& id,
                  caf::message& msg) -> caf::result<caf::message> {
      if (kind != "session") return make_error(errc::not_found, "no kind '" + kind + "'");
      auto missing = make_error(errc::not_found, "session '" + id + "' does not exist");
      auto i = self->state.sessions.find(id);
      if (msg.match_elements<sc::open_atom, bool>()) {
        if (i == self->state.sessions.end()) {
          if (!msg.get_as<bool>(1)) return missing;
          start(id, session{});
        }
        sc::session_info info;
        info.id = id;
        return caf::make_message(info);
      }
      if (i == self->state.sessions.end()) return missing;
      if (msg.match_elements<sc::destroy_atom>()) {
        self->send_exit(i->second, caf::exit_reason::user_shutdown);
        self->state.sessions.erase(i);
        return caf::make_message(true);
      }
      if (msg.match_elements<sc::kv_get_atom, std::string>()
          && msg.get_as<std::string>(1).rfind("slow:", 0) == 0) {
        // Answers late, so that callers can exercise their deadlines.
        self->state.slow.push_back(self->make_response_promise());
        self->delayed_send(self, std::chrono::seconds(2), tick_atom::value, uint64_t{0});
        return caf::delegated<caf::message>{};
      }
      return self->delegate(i->second, std::move(msg));
    },
    [self, start](install_atom, const std::string& new_id, session& s) -> caf::result<bool> {
      if (self->state.sessions.count(new_id))
        return make_error(errc::already_exists, "session '" + new_id + "' exists");
      s.created = now_ms();
      start(new_id, std::move(s));
      return true;
    },
    [self](tick_atom, uint64_t) {
      for (auto& rp : self->state.slow) rp.deliver(caf::optional<std::string>{});
      self->state.slow.clear();
    },
    [self](runtime::stats_atom) {
      runtime::directory_stats s;
      s.live = self->state.sessions.size();
      s.activations = self->state.activations;
      return s;
    },
  };
}

} // namespace

caf::actor spawn_session_directory_double(caf::actor_system& sys) {
  return sys.spawn(directory_double);
}

} // namespace triplane::test
