// Message-type registration for the session protocol (names must match on every node).
#include "triplane/actors/session_types.hpp"

#include <caf/actor_system_config.hpp>

#include "triplane/actors/session_protocol.hpp"

namespace triplane::actors {

void add_session_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<exec_limits>("tp_exec_limits");
  cfg.add_message_type<session_settings>("tp_session_settings");
  cfg.add_message_type<exec_request>("tp_exec_request");
  cfg.add_message_type<enforced_limits>("tp_enforced_limits");
  cfg.add_message_type<exec_result>("tp_exec_result");
  cfg.add_message_type<exec_chunk>("tp_exec_chunk");
  cfg.add_message_type<bg_status>("tp_bg_status");
  cfg.add_message_type<std::vector<bg_status>>("tp_bg_status_list");
  cfg.add_message_type<file_entry>("tp_file_entry");
  cfg.add_message_type<std::vector<file_entry>>("tp_file_entry_list");
  cfg.add_message_type<file_write_request>("tp_file_write_request");
  cfg.add_message_type<file_read_request>("tp_file_read_request");
  cfg.add_message_type<file_data>("tp_file_data");
  cfg.add_message_type<file_list_request>("tp_file_list_request");
  cfg.add_message_type<mkdir_request>("tp_mkdir_request");
  cfg.add_message_type<remove_request>("tp_remove_request");
  cfg.add_message_type<move_request>("tp_move_request");
  cfg.add_message_type<tar_in_request>("tp_tar_in_request");
  cfg.add_message_type<kv_entry>("tp_kv_entry");
  cfg.add_message_type<std::vector<kv_entry>>("tp_kv_entry_list");
  cfg.add_message_type<command_record>("tp_command_record");
  cfg.add_message_type<session_info>("tp_session_info");
  cfg.add_message_type<std::map<std::string, std::string>>("tp_string_map");
  cfg.add_message_type<kv_value>("tp_kv_value");
}

} // namespace triplane::actors
