// Answering a message with an error from a mailbox-less actor (a router), in the sender's context.
#pragma once

#include <caf/all.hpp>

namespace triplane::runtime {

/// Sends `err` as the response to `what` when it is a request; drops it otherwise (a plain send
/// has nobody waiting). CAF's own bounce() always answers sec::request_receiver_down, which
/// would hide the reason from the caller.
inline void reject_request(caf::mailbox_element_ptr& what, const caf::error& err,
                           caf::execution_unit* context) {
  if (!what->mid.is_request() || !what->sender) return;
  what->sender->enqueue(caf::make_mailbox_element(nullptr, what->mid.response_id(), {}, err), context);
}

} // namespace triplane::runtime
