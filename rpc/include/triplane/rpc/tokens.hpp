// API tokens: who may connect, as which tenant, with which role. Tokens are stored only as
// salted SHA-256 hashes; the clear token exists only in the client's hands.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "triplane/runtime/error.hpp"

namespace triplane::rpc {

enum class role { tenant, admin };

/// One configured token. `salt` and `sha256` are lowercase hex; sha256 = SHA-256(salt bytes ||
/// token bytes). Tokens are random high-entropy secrets (not passwords), so one salted SHA-256
/// suffices and keeps authenticate cheap on the event loop; a stretched KDF would only slow it.
struct token_record {
  std::string tenant;  ///< tenant name: 1..64 chars of [A-Za-z0-9._-]
  role who = role::tenant;
  std::string salt;    ///< hex, 16..64 bytes decoded
  std::string sha256;  ///< hex, 32 bytes decoded
};

/// Parses a tokens file. Format: one record per line,
///   token <tenant> <tenant|admin> <salt-hex> <sha256-hex>
/// blank lines and lines starting with '#' are ignored. invalid_argument naming the line on any
/// malformed record (unknown role, bad hex, bad tenant name, duplicate hash).
expected<std::vector<token_record>> parse_tokens(std::string_view text);

/// Reads and parses a tokens file; io_error when it cannot be read.
expected<std::vector<token_record>> load_tokens_file(const std::string& path);

/// A new record for `token` with a fresh random 16-byte salt (OpenSSL RAND_bytes).
expected<token_record> make_token_record(std::string tenant, role who, std::string_view token);

/// The line parse_tokens() reads back for `rec`.
std::string format_token_line(const token_record& rec);

/// A fresh random token (32 random bytes, hex): what an operator hands to a client.
std::string generate_token();

/// Validates one record (tenant name, hex lengths).
caf::error validate(const token_record& rec);

/// The record `token` matches, or nullptr. Compares every record in constant time per record.
const token_record* match_token(const std::vector<token_record>& records, std::string_view token);

const char* to_string(role r);

} // namespace triplane::rpc
