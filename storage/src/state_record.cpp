// StateRecord encoding and validation.
#include "state_record.hpp"

#include <cstring>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>
#include <kj/exception.h>
#include <kj/io.h>

#include "crc32c.hpp"
#include "triplane/schemas/state.capnp.h"

namespace triplane::storage {

std::string encode_record_key(const actor_key& key) {
  std::string out;
  out.reserve(1 + key.kind.size() + key.id.size());
  out.push_back(static_cast<char>(static_cast<unsigned char>(key.kind.size())));
  out += key.kind;
  out += key.id;
  return out;
}

namespace detail {

caf::error validate_kind(std::string_view kind) {
  if (kind.empty()) return make_error(errc::invalid_argument, "actor kind is empty");
  if (kind.size() > max_kind_bytes)
    return make_error(errc::invalid_argument,
                      "actor kind of " + std::to_string(kind.size()) + " bytes exceeds "
                        + std::to_string(max_kind_bytes));
  return {};
}

caf::error validate_key(const actor_key& key) {
  if (auto err = validate_kind(key.kind)) return err;
  if (key.id.empty())
    return make_error(errc::invalid_argument, "actor id is empty (kind '" + key.kind + "')");
  if (key.id.size() > max_id_bytes)
    return make_error(errc::invalid_argument,
                      "actor id of " + std::to_string(key.id.size()) + " bytes exceeds "
                        + std::to_string(max_id_bytes) + " (kind '" + key.kind + "')");
  return {};
}

std::string encode_kind_prefix(std::string_view kind) {
  std::string out;
  out.push_back(static_cast<char>(static_cast<unsigned char>(kind.size())));
  out += kind;
  return out;
}

namespace {

std::string quoted(std::string_view bytes) {
  constexpr size_t shown = 128;
  std::string out = "'";
  for (size_t i = 0; i < bytes.size() && i < shown; ++i) {
    auto c = static_cast<unsigned char>(bytes[i]);
    if (c >= 0x20 && c < 0x7F && c != '\\' && c != '\'') {
      out.push_back(static_cast<char>(c));
    } else {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  out += "'";
  if (bytes.size() > shown) out += "... (" + std::to_string(bytes.size()) + " bytes)";
  return out;
}

} // namespace

std::string describe_key(const actor_key& key) {
  return "kind " + quoted(key.kind) + " id " + quoted(key.id);
}

std::string encode_state_record(uint64_t version, uint64_t epoch, uint32_t schema_version,
                                std::string_view payload) {
  // One first segment large enough for everything, so the record is a single segment.
  const size_t payload_words = (payload.size() + 7) / 8;
  capnp::MallocMessageBuilder builder(static_cast<unsigned>(payload_words + 16));
  auto record = builder.initRoot<schemas::StateRecord>();
  record.setFormatVersion(state_record_format);
  record.setSchemaVersion(schema_version);
  record.setVersion(version);
  record.setEpoch(epoch);
  auto data = record.initPayload(static_cast<unsigned>(payload.size()));
  if (!payload.empty()) std::memcpy(data.begin(), payload.data(), payload.size());
  record.setPayloadCrc32c(crc32c(payload));

  std::string out(capnp::computeSerializedSizeInWords(builder) * sizeof(capnp::word), '\0');
  kj::ArrayOutputStream stream(
    kj::arrayPtr(reinterpret_cast<kj::byte*>(out.data()), out.size()));
  capnp::writeMessage(stream, builder);
  return out;
}

expected<stored_state> decode_state_record(std::string_view bytes, const actor_key& key,
                                           bool with_payload) {
  auto corrupted = [&key](const std::string& what) {
    return make_error(errc::corrupted, "state record of " + describe_key(key) + " is unreadable: "
                                         + what);
  };
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0)
    return corrupted("size " + std::to_string(bytes.size()) + " is not a positive multiple of 8");
  const size_t words = bytes.size() / sizeof(capnp::word);

  // Cap'n Proto reads words in place; values pinned by RocksDB are rarely 8-byte aligned.
  kj::Array<capnp::word> aligned;
  const capnp::word* begin = reinterpret_cast<const capnp::word*>(bytes.data());
  if (reinterpret_cast<uintptr_t>(bytes.data()) % alignof(capnp::word) != 0) {
    aligned = kj::heapArray<capnp::word>(words);
    std::memcpy(aligned.begin(), bytes.data(), bytes.size());
    begin = aligned.begin();
  }

  capnp::ReaderOptions limits;
  limits.traversalLimitInWords = 2 * words + 64;  // each word read at most about once
  limits.nestingLimit = 4;                        // StateRecord has no nested structs
  stored_state out;
  try {
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(begin, words), limits);
    if (reader.getEnd() != begin + words)
      return corrupted(std::to_string(words - static_cast<size_t>(reader.getEnd() - begin))
                       + " trailing words after the message");
    auto record = reader.getRoot<schemas::StateRecord>();
    auto format = record.getFormatVersion();
    if (format == 0) return corrupted("format version missing");
    if (format > state_record_format)
      return corrupted("format version " + std::to_string(format)
                       + " is newer than this build reads ("
                       + std::to_string(state_record_format) + ")");
    out.version = record.getVersion();
    if (out.version == 0) return corrupted("state version 0");
    out.epoch = record.getEpoch();
    out.schema_version = record.getSchemaVersion();
    auto payload = record.getPayload();
    std::string_view view(reinterpret_cast<const char*>(payload.begin()), payload.size());
    auto actual = crc32c(view);
    if (actual != record.getPayloadCrc32c())
      return corrupted("payload checksum mismatch (stored " + std::to_string(record.getPayloadCrc32c())
                       + ", computed " + std::to_string(actual) + ")");
    if (with_payload) out.payload.assign(view);
  } catch (const kj::Exception& e) {
    return corrupted(std::string(e.getDescription().cStr()));
  }
  return out;
}

} // namespace detail
} // namespace triplane::storage
