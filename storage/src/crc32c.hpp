// CRC-32C (Castagnoli), the checksum of state record payloads. Hand-written because neither
// RocksDB nor Cap'n Proto export theirs. Chosen over zlib's crc32 because x86-64 computes it in
// hardware (SSE4.2: ~14 GB/s here against ~1 GB/s in software, and a state load checksums every
// payload byte) and it is the storage world's usual choice (RocksDB, ext4, iSCSI), with better
// error detection than zlib's polynomial at these lengths.
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
