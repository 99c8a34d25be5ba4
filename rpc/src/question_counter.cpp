// question_counter: the stream framing of Cap'n Proto messages (a segment table, then the
// segments), read as it arrives.
#include "question_counter.hpp"

#include <algorithm>
#include <cstring>

namespace triplane::rpc::detail {

namespace {
uint32_t u32_at(const uint8_t* p) {
  uint32_t v = 0;
  std::memcpy(&v, p, 4);  // little-endian wire, little-endian hosts (as Cap'n Proto's own reader)
  return v;
}
uint64_t u64_at(const uint8_t* p) {
  uint64_t v = 0;
  std::memcpy(&v, p, 8);
  return v;
}
} // namespace

void question_counter::on_tag(uint16_t tag) {
  if (tag == tag_call || tag == tag_bootstrap) ++unfinished_;
  else if (tag == tag_finish && unfinished_ > 0) --unfinished_;
}

void question_counter::end_message() {
  ++messages_;
  phase_ = phase::first_word;
  have_ = 0;
}

void question_counter::feed(const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (size > 0 && phase_ != phase::lost) {
    switch (phase_) {
      case phase::first_word: {
        // (segment count - 1, first segment's size in words)
        size_t take = std::min(size, 8 - have_);
        std::memcpy(buf_.data() + have_, p, take);
        have_ += take, p += take, size -= take;
        if (have_ < 8) break;
        segments_ = u32_at(buf_.data()) + 1;
        if (segments_ == 0 || segments_ > max_segments) {
          phase_ = phase::lost;
          break;
        }
        first_segment_bytes_ = uint64_t{u32_at(buf_.data() + 4)} * 8;
        body_left_ = first_segment_bytes_;
        sizes_left_ = segments_ - 1;
        // The rest of the table: the other sizes, padded to a whole word.
        header_left_ = (uint64_t{segments_ + 1} * 4 + 7) / 8 * 8 - 8;
        have_ = 0;
        phase_ = phase::segment_sizes;
        if (header_left_ == 0) phase_ = phase::body;
        prefix_needed_ = std::min<uint64_t>(8, first_segment_bytes_);
        tag_done_ = false;
        if (phase_ == phase::body && body_left_ == 0) end_message();
        break;
      }
      case phase::segment_sizes: {
        // Sizes are read whole (4 bytes each) as they come; the padding after them is skipped.
        size_t take = static_cast<size_t>(std::min<uint64_t>(size, header_left_));
        for (size_t i = 0; i < take; ++i) {
          if (sizes_left_ > 0) {
            buf_[have_++] = p[i];
            if (have_ == 4) {
              body_left_ += uint64_t{u32_at(buf_.data())} * 8;
              have_ = 0;
              --sizes_left_;
            }
          }
        }
        header_left_ -= take, p += take, size -= take;
        if (header_left_ == 0) {
          have_ = 0;
          phase_ = phase::body;
          if (body_left_ == 0) end_message();
        }
        break;
      }
      case phase::body: {
        // Keep the first segment's prefix up to the root struct's first data word.
        if (!tag_done_ && have_ < prefix_needed_) {
          size_t take = static_cast<size_t>(std::min<uint64_t>(size, prefix_needed_ - have_));
          std::memcpy(buf_.data() + have_, p, take);
          have_ += take, p += take, size -= take, body_left_ -= take;
          if (have_ == 8 && prefix_needed_ == 8) {
            const uint64_t root = u64_at(buf_.data());
            const int64_t offset = static_cast<int32_t>(static_cast<uint32_t>(root)) >> 2;
            const uint32_t data_words = static_cast<uint32_t>(root >> 32) & 0xffff;
            const uint64_t tag_end = (1 + static_cast<uint64_t>(offset)) * 8 + 2;
            if ((root & 3) != 0 || offset < 0 || data_words == 0 || tag_end > max_prefix ||
                tag_end > first_segment_bytes_)
            {
              // A far or odd root, which Cap'n Proto's own writer never makes (the root struct
              // follows its pointer in the first segment): taken for a question, so that such
              // an encoding cannot hide calls from the count.
              ++unfinished_;
              tag_done_ = true;
            }
            else
              prefix_needed_ = static_cast<size_t>(tag_end);
          }
          if (!tag_done_ && prefix_needed_ > 8 && have_ == prefix_needed_) {
            uint16_t tag = 0;
            std::memcpy(&tag, buf_.data() + prefix_needed_ - 2, 2);
            on_tag(tag);
            tag_done_ = true;
          }
        } else {
          uint64_t skip = std::min<uint64_t>(size, body_left_);
          p += skip, size -= static_cast<size_t>(skip), body_left_ -= skip;
        }
        if (body_left_ == 0) end_message();
        break;
      }
      case phase::lost:
        break;
    }
  }
}

} // namespace triplane::rpc::detail
