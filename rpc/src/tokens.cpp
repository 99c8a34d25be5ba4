// Token records: parsing the tokens file, hashing with a salt, constant-time matching.
#include "triplane/rpc/tokens.hpp"

#include <fstream>
#include <sstream>
#include <unordered_set>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

namespace triplane::rpc {
namespace {

std::string to_hex(const unsigned char* p, size_t n) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    out += digits[p[i] >> 4];
    out += digits[p[i] & 15];
  }
  return out;
}

bool from_hex(std::string_view hex, std::string& out) {
  if (hex.size() % 2 != 0) return false;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  out.clear();
  for (size_t i = 0; i < hex.size(); i += 2) {
    int hi = nibble(hex[i]), lo = nibble(hex[i + 1]);
    if (hi < 0 || lo < 0) return false;
    out += static_cast<char>(hi * 16 + lo);
  }
  return true;
}

bool salted_sha256(std::string_view salt, std::string_view token, unsigned char out[32]) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (!ctx) return false;
  unsigned len = 0;
  bool ok = EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1
            && EVP_DigestUpdate(ctx, salt.data(), salt.size()) == 1
            && EVP_DigestUpdate(ctx, token.data(), token.size()) == 1
            && EVP_DigestFinal_ex(ctx, out, &len) == 1 && len == 32;
  EVP_MD_CTX_free(ctx);
  return ok;
}

bool valid_tenant_name(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) return false;
  return true;
}

} // namespace

const char* to_string(role r) {
  return r == role::admin ? "admin" : "tenant";
}

caf::error validate(const token_record& rec) {
  if (!valid_tenant_name(rec.tenant))
    return make_error(errc::invalid_argument,
                      "tenant name '" + rec.tenant + "' must be 1..64 chars of [A-Za-z0-9._-]");
  std::string bytes;
  if (!from_hex(rec.salt, bytes) || bytes.size() < 16 || bytes.size() > 64)
    return make_error(errc::invalid_argument,
                      "salt of tenant '" + rec.tenant + "' must be 16..64 bytes of hex");
  if (!from_hex(rec.sha256, bytes) || bytes.size() != 32)
    return make_error(errc::invalid_argument,
                      "sha256 of tenant '" + rec.tenant + "' must be 32 bytes of hex");
  return {};
}

expected<std::vector<token_record>> parse_tokens(std::string_view text) {
  std::vector<token_record> out;
  std::unordered_set<std::string> hashes;
  std::istringstream in{std::string{text}};
  std::string line;
  size_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos || line[first] == '#') continue;
    std::istringstream fields{line};
    std::string keyword, tenant, who, salt, hash, extra;
    fields >> keyword >> tenant >> who >> salt >> hash;
    auto where = "tokens line " + std::to_string(line_no) + ": ";
    if (keyword != "token" || hash.empty() || (fields >> extra))
      return make_error(errc::invalid_argument,
                        where + "expected 'token <tenant> <tenant|admin> <salt-hex> <sha256-hex>'");
    token_record rec;
    rec.tenant = tenant;
    if (who == "tenant") rec.who = role::tenant;
    else if (who == "admin") rec.who = role::admin;
    else return make_error(errc::invalid_argument, where + "unknown role '" + who + "'");
    rec.salt = salt;
    rec.sha256 = hash;
    if (auto err = validate(rec)) return make_error(errc::invalid_argument, where + describe(err));
    if (!hashes.insert(hash).second)
      return make_error(errc::invalid_argument, where + "duplicate token hash");
    out.push_back(std::move(rec));
  }
  return out;
}

expected<std::vector<token_record>> load_tokens_file(const std::string& path) {
  std::ifstream in{path};
  if (!in) return make_error(errc::io_error, "cannot read tokens file '" + path + "'");
  std::stringstream buf;
  buf << in.rdbuf();
  return parse_tokens(buf.str());
}

expected<token_record> make_token_record(std::string tenant, role who, std::string_view token) {
  unsigned char salt[16];
  if (RAND_bytes(salt, sizeof salt) != 1)
    return make_error(errc::internal, "RAND_bytes failed");
  token_record rec;
  rec.tenant = std::move(tenant);
  rec.who = who;
  rec.salt = to_hex(salt, sizeof salt);
  unsigned char digest[32];
  if (!salted_sha256({reinterpret_cast<const char*>(salt), sizeof salt}, token, digest))
    return make_error(errc::internal, "SHA-256 failed");
  rec.sha256 = to_hex(digest, sizeof digest);
  if (auto err = validate(rec)) return err;
  return rec;
}

std::string format_token_line(const token_record& rec) {
  return "token " + rec.tenant + " " + to_string(rec.who) + " " + rec.salt + " " + rec.sha256;
}

std::string generate_token() {
  unsigned char bytes[32];
  if (RAND_bytes(bytes, sizeof bytes) != 1) return {};
  return to_hex(bytes, sizeof bytes);
}

const token_record* match_token(const std::vector<token_record>& records, std::string_view token) {
  const token_record* found = nullptr;
  std::string salt, expected_hash;
  for (const auto& rec : records) {
    unsigned char digest[32];
    if (!from_hex(rec.salt, salt) || !from_hex(rec.sha256, expected_hash)
        || expected_hash.size() != 32 || !salted_sha256(salt, token, digest))
      continue;
    // Every record is hashed and compared whatever matched before: timing reveals nothing.
    if (CRYPTO_memcmp(digest, expected_hash.data(), 32) == 0 && !found) found = &rec;
  }
  return found;
}

} // namespace triplane::rpc
