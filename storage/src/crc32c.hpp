// CRC-32C (Castagnoli), the checksum of state record payloads. Hand-written because neither
// RocksDB nor Cap'n Proto export theirs; uses the SSE4.2 crc32 instruction where the CPU has it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace triplane::storage {

/// CRC-32C of `data`, continuing from `crc` (0 to start): crc32c(a+b) == crc32c(b, crc32c(a)).
uint32_t crc32c(std::string_view data, uint32_t crc = 0);

/// The portable table-driven implementation (what crc32c() uses without SSE4.2); exposed so tests
/// can compare the two paths.
uint32_t crc32c_portable(std::string_view data, uint32_t crc = 0);

} // namespace triplane::storage
