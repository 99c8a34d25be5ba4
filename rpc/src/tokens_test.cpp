// Token records: the tokens file format, hashing and matching.
#include <catch2/catch.hpp>

#include "triplane/rpc/tokens.hpp"

using namespace triplane;
using namespace triplane::rpc;

TEST_CASE("a token record made for a token matches that token and no other", "[rpc][tokens]") {
  auto token = generate_token();
  REQUIRE(token.size() == 64);
  auto rec = make_token_record("alice", role::tenant, token);
  REQUIRE(rec);
  CHECK_FALSE(validate(*rec));
  std::vector<token_record> records{*rec};
  auto other = make_token_record("ops", role::admin, "ops-secret-token");
  REQUIRE(other);
  records.push_back(*other);
  const auto* m = match_token(records, token);
  REQUIRE(m);
  CHECK(m->tenant == "alice");
  const auto* o = match_token(records, "ops-secret-token");
  REQUIRE(o);
  CHECK(o->who == role::admin);
  CHECK(match_token(records, token.substr(1)) == nullptr);
  CHECK(match_token(records, "") == nullptr);
  // The same token with another salt hashes differently: no hash reveals equal tokens.
  auto again = make_token_record("alice", role::tenant, token);
  REQUIRE(again);
  CHECK(again->sha256 != rec->sha256);
}

TEST_CASE("a tokens file round-trips through format_token_line and parse_tokens",
          "[rpc][tokens]") {
  auto a = make_token_record("alice", role::tenant, "a-token");
  auto b = make_token_record("ops.team-1", role::admin, "b-token");
  REQUIRE(a);
  REQUIRE(b);
  auto text = "# comment\n\n" + format_token_line(*a) + "\n   \n" + format_token_line(*b) + "\n";
  auto parsed = parse_tokens(text);
  REQUIRE(parsed);
  REQUIRE(parsed->size() == 2);
  CHECK((*parsed)[1].tenant == "ops.team-1");
  CHECK((*parsed)[1].who == role::admin);
  CHECK(match_token(*parsed, "b-token") != nullptr);
}

TEST_CASE("malformed tokens file lines are refused naming the line", "[rpc][tokens]") {
  auto good = make_token_record("alice", role::tenant, "t");
  REQUIRE(good);
  std::string salt = good->salt, hash = good->sha256;
  struct bad_line {
    const char* what;
    std::string line;
  };
  auto bad = GENERATE_COPY(values<bad_line>({
    {"unknown keyword", "tok alice tenant " + salt + " " + hash},
    {"missing field", "token alice tenant " + salt},
    {"extra field", "token alice tenant " + salt + " " + hash + " x"},
    {"unknown role", "token alice root " + salt + " " + hash},
    {"tenant with a slash", "token al/ice tenant " + salt + " " + hash},
    {"salt not hex", "token alice tenant zz" + salt.substr(2) + " " + hash},
    {"salt too short", "token alice tenant abcd " + hash},
    {"hash of the wrong length", "token alice tenant " + salt + " " + hash.substr(2)},
  }));
  INFO(bad.what);
  auto parsed = parse_tokens("# header\n" + bad.line + "\n");
  REQUIRE_FALSE(parsed);
  CHECK(code_of(parsed.error()) == errc::invalid_argument);
  CHECK(describe(parsed.error()).find("line 2") != std::string::npos);
}

TEST_CASE("a duplicate token hash and an unreadable file are refused", "[rpc][tokens]") {
  auto rec = make_token_record("alice", role::tenant, "t");
  REQUIRE(rec);
  auto line = format_token_line(*rec) + "\n";
  auto dup = parse_tokens(line + line);
  REQUIRE_FALSE(dup);
  CHECK(describe(dup.error()).find("duplicate") != std::string::npos);
  auto missing = load_tokens_file("/nonexistent/tokens");
  REQUIRE_FALSE(missing);
  CHECK(code_of(missing.error()) == errc::io_error);
}
