// Names and network registration of the inference protocol's types.
#include "triplane/actors/inference_protocol.hpp"

#include <caf/actor_system_config.hpp>

namespace triplane::actors::inference {

const char* to_string(finish_reason reason) {
  switch (reason) {
    case finish_reason::length: return "length";
    case finish_reason::stop: return "stop";
    case finish_reason::cancelled: return "cancelled";
    case finish_reason::error: return "error";
  }
  return "unknown";
}

void register_inference_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<sampling>("triplane.inference.sampling");
  cfg.add_message_type<generate_request>("triplane.inference.generate_request");
  cfg.add_message_type<generate_accepted>("triplane.inference.generate_accepted");
  cfg.add_message_type<token_event>("triplane.inference.token_event");
  cfg.add_message_type<generation_finished>("triplane.inference.generation_finished");
  cfg.add_message_type<model_info>("triplane.inference.model_info");
  cfg.add_message_type<worker_stats>("triplane.inference.worker_stats");
}

} // namespace triplane::actors::inference
