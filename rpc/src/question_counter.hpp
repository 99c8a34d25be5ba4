// Counts the questions a Cap'n Proto RPC peer opens (Call, Bootstrap) and finishes (Finish) by
// following the stream framing of the bytes it sends, without buffering or decoding messages:
// the node's connection guard uses it to bound the answers a client leaves unfinished.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace triplane::rpc::detail {

/// Feed it every byte the peer sends, in order. Reads only each message's segment table, its
/// root pointer and the first data word of its root struct (the rpc::Message union's tag); the
/// rest of each message is skipped. A message whose tag it cannot find there (a far root
/// pointer, a root far into the segment: encodings Cap'n Proto's own writer never makes) counts
/// as a question opened, so that no encoding hides calls. Framing it cannot follow (more
/// segments than Cap'n Proto's reader accepts) stops the counting, since the RPC layer then
/// aborts the connection itself.
class question_counter {
public:
  void feed(const void* data, size_t size);

  /// Questions opened and not finished yet (never negative: a Finish for an unknown question
  /// counts nothing).
  uint64_t unfinished() const { return unfinished_; }
  uint64_t messages() const { return messages_; }
  bool lost_framing() const { return phase_ == phase::lost; }

private:
  enum class phase { first_word, segment_sizes, body, lost };
  /// rpc::Message's union tags (the members' order of declaration in capnp/rpc.capnp).
  static constexpr uint16_t tag_call = 2, tag_finish = 4, tag_bootstrap = 8;
  static constexpr uint32_t max_segments = 512;  // Cap'n Proto's stream reader refuses more
  static constexpr size_t max_prefix = 64 * 8;   // a root struct at most 62 words in

  void on_tag(uint16_t tag);
  void end_message();

  phase phase_ = phase::first_word;
  std::array<uint8_t, max_prefix> buf_{};  ///< the first word, then the body's prefix
  size_t have_ = 0;                        ///< bytes of buf_ filled in this phase
  uint32_t segments_ = 0, sizes_left_ = 0;
  uint64_t header_left_ = 0;  ///< bytes of the segment table still to skip (sizes and padding)
  uint64_t first_segment_bytes_ = 0, body_left_ = 0;
  size_t prefix_needed_ = 0;  ///< body bytes to keep: 8 (root pointer), then up to the tag
  bool tag_done_ = false;  ///< this message's tag was counted, or cannot be found
  uint64_t unfinished_ = 0, messages_ = 0;
};

} // namespace triplane::rpc::detail
