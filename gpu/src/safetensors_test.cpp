// The safetensors reader refuses every malformed file with an error naming the file and the
// tensor, reads unaligned data correctly, and round-trips what the writer writes.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "test_support.hpp"

using namespace triplane::gpu;
using namespace triplane::gpu::testing;
using triplane::describe;

namespace {

std::string f32_bytes(const std::vector<float>& v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(&s[0], v.data(), s.size());
  return s;
}

// Writes `bytes` as a file and expects open() to fail with a message naming the file and `needle`.
void expect_rejected(const std::string& bytes, const std::string& needle) {
  temp_dir dir;
  const std::string path = dir.file("bad.safetensors");
  write_bytes(path, bytes);
  auto f = safetensors_file::open(path);
  REQUIRE(!f);
  const std::string msg = describe(f.error());
  INFO(msg);
  CHECK(msg.find(path) != std::string::npos);
  CHECK(msg.find(needle) != std::string::npos);
}

} // namespace

TEST_CASE("a safetensors header length beyond the file is rejected", "[safetensors]") {
  expect_rejected(raw_safetensors("{}", "", 4096), "header length 4096 exceeds the file size");
  expect_rejected(std::string(5, '\0'), "too short");
}

TEST_CASE("a safetensors header that is not JSON is rejected", "[safetensors]") {
  expect_rejected(raw_safetensors("{\"w\": {\"dtype\": \"F32\",", ""), "not valid JSON");
  expect_rejected(raw_safetensors("[1, 2]", ""), "not a JSON object");
}

TEST_CASE("safetensors data offsets outside the data section are rejected", "[safetensors]") {
  expect_rejected(raw_safetensors(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", f32_bytes({1, 2})),
                  "tensor 'w': data_offsets [0, 16] exceed the data section of 8 bytes");
}

TEST_CASE("overlapping safetensors tensors are rejected", "[safetensors]") {
  expect_rejected(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                                  R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                  f32_bytes({1, 2, 3})),
                  "tensors 'a' and 'b' overlap");
}

TEST_CASE("an unknown safetensors dtype is rejected", "[safetensors]") {
  expect_rejected(raw_safetensors(R"({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})", "ab"),
                  "tensor 'w': unsupported dtype 'F8_E4M3'");
}

TEST_CASE("a safetensors tensor whose byte size does not match its shape is rejected", "[safetensors]") {
  expect_rejected(raw_safetensors(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", f32_bytes({1, 2})),
                  "tensor 'w': holds 8 bytes but shape [3] of F32 needs 12");
}

TEST_CASE("a truncated safetensors file is rejected", "[safetensors]") {
  auto full = raw_safetensors(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", f32_bytes({1, 2, 3, 4}));
  expect_rejected(full.substr(0, full.size() - 3), "tensor 'w'");
  auto model = read_text(fixture_dir("tiny-llama-f32") + "/model.safetensors");
  expect_rejected(model.substr(0, model.size() / 2), "truncated file?");
}

TEST_CASE("unaligned tensor data is read correctly", "[safetensors]") {
  // The header is padded so that the data section starts at an odd file offset, and the F32
  // tensor starts at odd offset 1 within it.
  std::string header = R"({"pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},)"
                       R"( "w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},)"
                       R"( "h": {"dtype": "BF16", "shape": [2], "data_offsets": [13, 17]}})";
  if ((8 + header.size()) % 2 == 0) header += " ";
  const std::vector<float> values = {1.5f, -2.25f, 3.0e-3f};
  uint16_t bf[2] = {f32_to_bf16(0.5f), f32_to_bf16(-7.0f)};
  std::string bf_bytes(4, '\0');
  std::memcpy(&bf_bytes[0], bf, 4);
  temp_dir dir;
  write_bytes(dir.file("u.safetensors"), raw_safetensors(header, "x" + f32_bytes(values) + bf_bytes));
  auto f = safetensors_file::open(dir.file("u.safetensors"));
  REQUIRE(f);
  const auto* w = (*f)->find("w");
  REQUIRE(w != nullptr);
  CHECK(reinterpret_cast<uintptr_t>(w->data) % 4 != 0);
  auto got = tensor_to_f32(*w, "u");
  REQUIRE(got);
  CHECK(*got == values);
  auto h = tensor_to_f32(*(*f)->find("h"), "u");
  REQUIRE(h);
  CHECK(*h == std::vector<float>{0.5f, -7.0f});
}

TEST_CASE("half-precision conversions are exact, subnormals and specials included", "[safetensors]") {
  CHECK(f16_to_f32(0x3C00) == 1.0f);
  CHECK(f16_to_f32(0xC000) == -2.0f);
  CHECK(f16_to_f32(0x7BFF) == 65504.0f);
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(f16_to_f32(0x03FF) == std::ldexp(1023.0f, -24));  // largest subnormal
  CHECK(f16_to_f32(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(std::signbit(f16_to_f32(0x8000)));
  CHECK(f16_to_f32(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(f16_to_f32(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(f16_to_f32(0x7E00)));
  // Every finite half survives f16 -> f32 -> f16.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7C00) == 0x7C00) continue;
    if (f32_to_f16(f16_to_f32(static_cast<uint16_t>(h))) != h) FAIL("half " << h << " does not round-trip");
  }
  CHECK(bf16_to_f32(0x3F80) == 1.0f);
  CHECK(bf16_to_f32(0xC0E0) == -7.0f);
  CHECK(std::isnan(bf16_to_f32(0x7FC0)));
  CHECK(bf16_to_f32(f32_to_bf16(1.00390625f)) == 1.0f);  // halfway: rounds to even
}

TEST_CASE("written safetensors files read back identically", "[safetensors]") {
  temp_dir dir;
  const std::vector<float> logits = {0.5f, -1.0f, 2.0f, 3.5f, 4.0f, -6.0f};
  REQUIRE(!write_safetensors(dir.file("o.safetensors"),
                             {make_f32_tensor("logits", {2, 3}, logits), make_i64_tensor("ids", {2}, {7, 9})}));
  auto f = safetensors_file::open(dir.file("o.safetensors"));
  REQUIRE(f);
  const auto* t = (*f)->find("logits");
  REQUIRE(t != nullptr);
  CHECK(t->shape == std::vector<int64_t>{2, 3});
  CHECK(*tensor_to_f32(*t, "o") == logits);
  CHECK(*tensor_to_i64(*(*f)->find("ids"), "o") == std::vector<int64_t>{7, 9});
  CHECK(write_safetensors(dir.file("p.safetensors"), {make_f32_tensor("x", {4}, logits)}));  // 6 values, shape 4
}

TEST_CASE("randomly corrupted safetensors files are rejected or read in bounds, never crash", "[safetensors]") {
  // Mutates bytes of the header (and the length prefix) of a small valid file. Whatever opens
  // must describe tensors inside the mapping: every tensor is converted in full (run under ASan
  // to see an out-of-bounds read).
  std::string header = R"({"__metadata__": {"k": "v"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},)"
                       R"( "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}})";
  const std::string valid = raw_safetensors(header, std::string(22, '\x01'));
  temp_dir dir;
  std::mt19937 rng(12345);
  int opened = 0;
  for (int round = 0; round < 3000; ++round) {
    std::string bytes = valid;
    int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      size_t pos = rng() % (8 + header.size());
      const char alphabet[] = "0123456789[]{},:\"-eE.FBI6 x";
      bytes[pos] = rng() % 2 ? alphabet[rng() % (sizeof alphabet - 1)] : static_cast<char>(rng());
    }
    if (rng() % 5 == 0) bytes.resize(rng() % bytes.size());
    write_bytes(dir.file("f.safetensors"), bytes);
    auto f = safetensors_file::open(dir.file("f.safetensors"));
    if (!f) continue;
    ++opened;
    for (const auto& t : (*f)->tensors()) {
      std::vector<unsigned char> copy(t.data, t.data + t.nbytes);
      CHECK(copy.size() == t.nbytes);
      if (t.type == dtype::f32 || t.type == dtype::f16 || t.type == dtype::bf16) CHECK(tensor_to_f32(t, "f"));
    }
  }
  CHECK(opened > 0);  // some mutations leave a valid file (e.g. a changed metadata value)
}
