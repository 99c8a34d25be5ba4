// tar headers (POSIX ustar, GNU, pax) read without trusting a single field of them.
#include "session/tar_members.hpp"

#include <algorithm>
#include <cstring>
#include <map>

namespace triplane::actors::session {
namespace {

constexpr size_t block_bytes = 512;

/// A numeric header field: octal digits (leading spaces allowed, ended by a space or NUL), or
/// GNU's base-256 (high bit of the first byte set). nullopt when it is neither or negative.
std::optional<uint64_t> number_field(const unsigned char* field, size_t len) {
  if (field[0] & 0x80) {
    if (field[0] & 0x40) return std::nullopt;  // negative
    uint64_t v = field[0] & 0x3f;
    for (size_t i = 1; i < len; ++i) {
      if (v >> 56) return std::nullopt;
      v = (v << 8) | field[i];
    }
    return v;
  }
  size_t i = 0;
  while (i < len && field[i] == ' ') ++i;
  uint64_t v = 0;
  bool digits = false;
  for (; i < len && field[i] >= '0' && field[i] <= '7'; ++i) {
    if (v >> 60) return std::nullopt;
    v = v * 8 + (field[i] - '0');
    digits = true;
  }
  if (i < len && field[i] != ' ' && field[i] != '\0') return std::nullopt;
  if (!digits) return uint64_t{0};
  return v;
}

/// Whether the header's checksum matches, summed as unsigned bytes (POSIX) or, as some old
/// tars did, as signed ones (GNU tar accepts both).
bool checksum_matches(const unsigned char* h) {
  auto stored = number_field(h + 148, 8);
  if (!stored) return false;
  uint64_t unsigned_sum = 0;
  int64_t signed_sum = 0;
  for (size_t i = 0; i < block_bytes; ++i) {
    unsigned char c = (i >= 148 && i < 156) ? ' ' : h[i];
    unsigned_sum += c;
    signed_sum += static_cast<signed char>(c);
  }
  return *stored == unsigned_sum || static_cast<int64_t>(*stored) == signed_sum;
}

/// A NUL-terminated (or full-width) text field.
std::string text_field(const unsigned char* field, size_t len) {
  auto* end = static_cast<const unsigned char*>(std::memchr(field, 0, len));
  return std::string(reinterpret_cast<const char*>(field), end ? static_cast<size_t>(end - field) : len);
}

/// pax extended header records ("<len> <key>=<value>\n"...) into `out`; false when malformed.
bool parse_pax(std::string_view data, std::map<std::string, std::string>& out) {
  while (!data.empty()) {
    if (data.front() == '\0') return true;  // padding some writers leave
    size_t space = data.find(' ');
    if (space == std::string_view::npos || space == 0 || space > 20) return false;
    uint64_t len = 0;
    for (size_t i = 0; i < space; ++i) {
      if (data[i] < '0' || data[i] > '9') return false;
      len = len * 10 + static_cast<uint64_t>(data[i] - '0');
    }
    if (len <= space + 1 || len > data.size() || data[len - 1] != '\n') return false;
    std::string_view record = data.substr(space + 1, len - space - 2);
    size_t eq = record.find('=');
    if (eq == std::string_view::npos) return false;
    out[std::string(record.substr(0, eq))] = std::string(record.substr(eq + 1));
    data.remove_prefix(len);
  }
  return true;
}

std::optional<uint64_t> decimal(const std::string& s) {
  if (s.empty() || s.size() > 19) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  return v;
}

} // namespace

std::optional<std::vector<tar_member>> read_tar_members(std::string_view archive) {
  std::vector<tar_member> members;
  std::map<std::string, std::string> pax_global, pax_next;
  std::string gnu_long_name;
  uint64_t pos = 0;
  const auto* bytes = reinterpret_cast<const unsigned char*>(archive.data());
  while (pos < archive.size()) {
    if (archive.size() - pos < block_bytes) return std::nullopt;  // a partial header
    const unsigned char* h = bytes + pos;
    if (std::all_of(h, h + block_bytes, [](unsigned char c) { return c == 0; }))
      return members;  // end of archive (tar stops at the first zero block too)
    if (!checksum_matches(h)) return std::nullopt;
    auto size = number_field(h + 124, 12);
    if (!size) return std::nullopt;
    char type = static_cast<char>(h[156]);
    if (type == '\0') type = '0';
    bool meta = type == 'x' || type == 'g' || type == 'L' || type == 'K';
    uint64_t data_size = *size;
    if (!meta) {  // a pax "size" overrides the header's
      const std::string* pax_size = nullptr;
      if (auto i = pax_next.find("size"); i != pax_next.end()) pax_size = &i->second;
      else if (auto g = pax_global.find("size"); g != pax_global.end()) pax_size = &g->second;
      if (pax_size) {
        auto v = decimal(*pax_size);
        if (!v) return std::nullopt;
        data_size = *v;
      }
    }
    uint64_t data_start = pos + block_bytes;
    if (type == 'S' && h[482]) {  // old GNU sparse: extension headers follow, each flagging the next
      for (bool more = true; more;) {
        if (archive.size() - data_start < block_bytes) return std::nullopt;
        more = bytes[data_start + 504] != 0;
        data_start += block_bytes;
      }
    }
    if (data_size > archive.size() - data_start) return std::nullopt;  // truncated
    std::string_view data = archive.substr(data_start, data_size);
    switch (type) {
      case 'x':
        if (!parse_pax(data, pax_next)) return std::nullopt;
        break;
      case 'g':
        if (!parse_pax(data, pax_global)) return std::nullopt;
        break;
      case 'L':
        gnu_long_name = std::string(data.substr(0, data.find('\0')));
        break;
      case 'K':
        break;  // a long link target: not needed to name the member
      default: {
        tar_member m;
        m.type = type;
        m.offset = pos;
        if (auto p = pax_next.find("path"); p != pax_next.end()) {
          m.name = p->second;
        } else if (auto g = pax_global.find("path"); g != pax_global.end()) {
          m.name = g->second;
        } else if (!gnu_long_name.empty()) {
          m.name = gnu_long_name;
        } else {
          m.name = text_field(h, 100);
          // POSIX ustar ("ustar\0") keeps a prefix; GNU's "ustar  " uses that space otherwise.
          bool posix = std::memcmp(h + 257, "ustar", 6) == 0;
          std::string prefix = posix ? text_field(h + 345, 155) : std::string();
          if (!prefix.empty()) m.name = prefix + "/" + m.name;
        }
        members.push_back(std::move(m));
        pax_next.clear();
        gnu_long_name.clear();
        break;
      }
    }
    uint64_t padded = (data_size + block_bytes - 1) / block_bytes * block_bytes;
    pos = data_start + std::min<uint64_t>(padded, archive.size() - data_start);
  }
  return members;
}

std::string tar_type_name(char type) {
  switch (type) {
    case '0':
    case '7': return "regular file";
    case '1': return "hard link";
    case '2': return "symlink";
    case '3': return "character device";
    case '4': return "block device";
    case '5': return "directory";
    case '6': return "fifo";
    case 'S': return "sparse file";
    case 'D': return "directory listing";
    default:
      if (type > ' ' && type < 127) return std::string("type '") + type + "'";
      return "type " + std::to_string(static_cast<unsigned char>(type));
  }
}

caf::error check_tar_members(const std::vector<tar_member>& members) {
  for (const auto& m : members)
    if (m.type == '3' || m.type == '4' || m.type == '6')
      return make_error(errc::invalid_argument,
                        "archive member '" + m.name + "' is a " + tar_type_name(m.type) +
                            ": a workspace holds only regular files, directories, symlinks and hard links");
  return {};
}

} // namespace triplane::actors::session
