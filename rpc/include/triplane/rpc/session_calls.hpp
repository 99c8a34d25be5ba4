// The messages the RPC adapter sends to actors of kind `session` through the directory's
// `(call_atom, "session", id, caf::message)` protocol, and the replies it expects.
// Interim contract: the session kind's own protocol (actors/session_protocol.hpp, sandbox
// branch) had not landed when this adapter was written; when it does, the adapter's
// translation (rpc/src/session_impl.cpp) switches to it and this header goes away.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/optional.hpp>

namespace triplane::rpc::session_calls {

/// `(open_atom, bool create)` -> session_info. not_found when absent and !create.
using open_atom = caf::atom_constant<caf::atom("s_open")>;
/// `(exec_atom, exec_request, caf::actor sink, uint64_t call_id)` -> exec_result.
/// Output goes to `sink` as REQUESTS `(chunk_atom, call_id, uint8_t stream, std::string bytes)`
/// -> bool, stream 0 = stdout, 1 = stderr. The reply is flow-control credit: the sink answers
/// late while its consumer (a remote client) is behind, so a producer keeps at most a few
/// chunks (<= 8, <= 64 KiB each) unanswered. A producer that ignores this gets its exec
/// cancelled once the sink's buffer cap is exceeded. Every chunk is sent before the exec reply,
/// whose `chunks` counts them.
using exec_atom = caf::atom_constant<caf::atom("s_exec")>;
using chunk_atom = caf::atom_constant<caf::atom("s_chunk")>;
/// `(cancel_atom, uint64_t call_id)`: kill the exec of that call if it still runs (no reply).
using cancel_atom = caf::atom_constant<caf::atom("s_cancel")>;
/// `(read_atom, path, uint64_t offset, uint64_t length)` -> std::string (length 0 = to the end).
using read_atom = caf::atom_constant<caf::atom("s_read")>;
/// `(write_atom, path, std::string data, bool make_parents, bool executable)` -> bool.
using write_atom = caf::atom_constant<caf::atom("s_write")>;
/// `(list_atom, path, bool recursive)` -> std::vector<file_entry>.
using list_atom = caf::atom_constant<caf::atom("s_list")>;
/// `(remove_atom, path, bool recursive)` -> bool.
using remove_atom = caf::atom_constant<caf::atom("s_remove")>;
/// `(kv_get_atom, key)` -> caf::optional<std::string>.
using kv_get_atom = caf::atom_constant<caf::atom("s_kvget")>;
/// `(kv_put_atom, key, value)` -> bool.
using kv_put_atom = caf::atom_constant<caf::atom("s_kvput")>;
/// `(kv_delete_atom, key)` -> bool (whether it existed).
using kv_delete_atom = caf::atom_constant<caf::atom("s_kvdel")>;
/// `(kv_list_atom, prefix)` -> std::vector<std::string>.
using kv_list_atom = caf::atom_constant<caf::atom("s_kvlist")>;
/// `(fork_atom, std::string new_id)` -> bool. `new_id` is a full directory id (tenant-scoped).
/// already_exists when the target exists.
using fork_atom = caf::atom_constant<caf::atom("s_fork")>;
/// `(destroy_atom)` -> bool.
using destroy_atom = caf::atom_constant<caf::atom("s_destroy")>;
/// `(info_atom)` -> session_info.
using info_atom = caf::atom_constant<caf::atom("s_info")>;

struct exec_request {
  std::vector<std::string> argv;
  std::string shell;
  std::string stdin_data;
  std::vector<std::pair<std::string, std::string>> env;
  std::string cwd;
  uint32_t timeout_ms = 0;
};

struct exec_result {
  int32_t exit_code = 0;
  int32_t signal = 0;
  bool truncated = false;
  uint64_t duration_us = 0;
  uint64_t cpu_us = 0;
  uint64_t peak_memory_bytes = 0;
  uint64_t chunks = 0;  ///< output chunks sent to the sink before this reply
};

struct file_entry {
  std::string path;
  uint64_t size = 0;
  uint32_t mode = 0;
};

struct session_info {
  std::string id;  ///< the full directory id
  uint64_t created_unix_ms = 0;
  uint64_t last_used_unix_ms = 0;
  uint64_t file_count = 0;
  uint64_t kv_count = 0;
  uint64_t exec_count = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, exec_request& x) {
  return f(caf::meta::type_name("tp_exec_request"), x.argv, x.shell, x.stdin_data, x.env, x.cwd,
           x.timeout_ms);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, exec_result& x) {
  return f(caf::meta::type_name("tp_exec_result"), x.exit_code, x.signal, x.truncated,
           x.duration_us, x.cpu_us, x.peak_memory_bytes, x.chunks);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, file_entry& x) {
  return f(caf::meta::type_name("tp_file_entry"), x.path, x.size, x.mode);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, session_info& x) {
  return f(caf::meta::type_name("tp_session_info"), x.id, x.created_unix_ms,
           x.last_used_unix_ms, x.file_count, x.kv_count, x.exec_count);
}

} // namespace triplane::rpc::session_calls
