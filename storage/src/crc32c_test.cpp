// CRC-32C against published check values, and the hardware path against the portable one.
#include "crc32c.hpp"

#include <random>
#include <string>

#include <catch2/catch.hpp>

using triplane::storage::crc32c;
using triplane::storage::crc32c_portable;

TEST_CASE("crc32c matches the published check values", "[storage][crc32c]") {
  // RFC 3720 (iSCSI) B.4 and the standard "123456789" check value.
  struct vector {
    std::string data;
    uint32_t expected;
  };
  auto v = GENERATE(vector{"123456789", 0xE3069283u}, vector{std::string(32, '\0'), 0x8A9136AAu},
                    vector{std::string(32, '\xff'), 0x62A8AB43u}, vector{"", 0u});
  INFO("input of " << v.data.size() << " bytes");
  CHECK(crc32c(v.data) == v.expected);
  CHECK(crc32c_portable(v.data) == v.expected);
}

TEST_CASE("crc32c hardware and portable paths agree and chain", "[storage][crc32c]") {
  std::mt19937_64 rng(42);
  for (size_t n : {1u, 7u, 8u, 9u, 63u, 64u, 65u, 1000u, 3071u, 3072u, 3073u, 3079u, 65536u + 3u,
                   (1u << 20) + 5u}) {
    std::string data(n, '\0');
    for (auto& ch : data) ch = static_cast<char>(rng());
    INFO("length " << n);
    CHECK(crc32c(data) == crc32c_portable(data));
    size_t cut = n / 3;
    CHECK(crc32c(data.substr(cut), crc32c(data.substr(0, cut))) == crc32c(data));
    uint32_t before = crc32c(data);
    data[n / 2] ^= 1;  // any single-bit flip changes the checksum
    CHECK(crc32c(data) != before);
  }
}
