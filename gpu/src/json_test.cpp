// The strict JSON reader behind config.json and safetensors headers.
#include <catch2/catch.hpp>

#include "json.hpp"

using namespace triplane::gpu;

TEST_CASE("the JSON reader parses values exactly", "[json]") {
  json::value v;
  std::string err;
  REQUIRE(json::parse(R"( {"a": [1, -2, 3.5e2, true, null], "s": "x\"\u00e9\ud83d\ude00", "big": 9007199254740993} )", v, err));
  REQUIRE(v.type == json::kind::object);
  const auto* a = v.find("a");
  REQUIRE(a != nullptr);
  REQUIRE(a->array.size() == 5);
  CHECK(a->array[1].is_integer);
  CHECK(a->array[1].integer == -2);
  CHECK(!a->array[2].is_integer);
  CHECK(a->array[2].number == 350.0);
  CHECK(a->array[3].boolean);
  CHECK(a->array[4].is_null());
  CHECK(v.find("s")->string == "x\"\xc3\xa9\xf0\x9f\x98\x80");
  CHECK(v.find("big")->integer == 9007199254740993LL);  // beyond double precision, kept exact
  CHECK(v.find("missing") == nullptr);
}

TEST_CASE("the JSON reader rejects malformed input with a position", "[json]") {
  auto text = GENERATE(as<std::string>{}, "", "{", "{\"a\":1,}", "[1,]", "{\"a\":1 \"b\":2}", "{'a':1}", "01",
                       "1.", "-", "1e", "tru", "\"\\x\"", "\"\\ud800\"", "\"a\nb\"", "NaN", "{\"a\":1}{",
                       "{\"a\":1,\"a\":2}", "// c\n{}", "1e999");
  INFO("input: " << text);
  json::value v;
  std::string err;
  CHECK(!json::parse(text, v, err));
  CHECK(err.find("at byte") != std::string::npos);
}

TEST_CASE("the JSON reader refuses nesting deeper than 64", "[json]") {
  json::value v;
  std::string err;
  CHECK(json::parse(std::string(64, '[') + std::string(64, ']'), v, err));
  CHECK(!json::parse(std::string(100000, '['), v, err));
  CHECK(err.find("nesting") != std::string::npos);
}
