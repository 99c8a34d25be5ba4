// Encoding of state records (schemas/state.capnp StateRecord) and of their keys, with the
// validation every load goes through.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "triplane/storage/state_store.hpp"

namespace triplane::storage::detail {

/// The StateRecord.formatVersion this build writes and the highest it reads.
inline constexpr uint16_t state_record_format = 1;

/// invalid_argument naming what is wrong when `key` breaks actor_key's limits.
caf::error validate_key(const actor_key& key);
caf::error validate_kind(std::string_view kind);

/// The prefix all of `kind`'s record keys share (see encode_record_key).
std::string encode_kind_prefix(std::string_view kind);

/// "kind 'k' id 'i'" for messages, with non-printable bytes escaped and long ids shortened.
std::string describe_key(const actor_key& key);

/// The serialized StateRecord (a single-segment Cap'n Proto message, flat array form).
std::string encode_state_record(uint64_t version, uint64_t epoch, uint32_t schema_version,
                                std::string_view payload);

/// Decodes and verifies a stored StateRecord: Cap'n Proto structure under bounded reader limits,
/// no trailing bytes, known format version, version >= 1, payload checksum. Copies the payload
/// only when `with_payload`. Errors: corrupted, naming `key` and what failed.
expected<stored_state> decode_state_record(std::string_view bytes, const actor_key& key,
                                           bool with_payload);

} // namespace triplane::storage::detail
