// Test support: tar archives written header by header, for members `tar -c` would not make from
// a workspace (devices, fifos, hard links to chosen names, pax and GNU long-name headers).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace triplane::actors::session::testing {

class tar_writer {
public:
  /// A POSIX ustar member; `link` is the target of a hard link ('1') or symlink ('2').
  tar_writer& add(const std::string& name, char type, const std::string& data = "",
                  const std::string& link = "", unsigned mode = 0644) {
    header(name, type, data.size(), link, mode);
    body(data);
    return *this;
  }
  /// A member named by a GNU long-name ('L') header before it.
  tar_writer& add_gnu_long(const std::string& name, char type, const std::string& data = "") {
    header("././@LongLink", 'L', name.size() + 1, "", 0644);
    body(name + '\0');
    header(name.substr(0, 99), type, data.size(), "", 0644);
    body(data);
    return *this;
  }
  /// A member named by a pax extended header ('x') before it.
  tar_writer& add_pax(const std::string& name, char type, const std::string& data = "") {
    std::string record = " path=" + name + "\n";
    size_t len = record.size() + 1;
    while (std::to_string(len).size() + record.size() != len) ++len;
    std::string pax = std::to_string(len) + record;
    header("PaxHeaders/x", 'x', pax.size(), "", 0644);
    body(pax);
    header("short-name", type, data.size(), "", 0644);
    body(data);
    return *this;
  }
  /// The archive with its two end-of-archive blocks.
  std::string finish() const { return out_ + std::string(1024, '\0'); }

private:
  void header(const std::string& name, char type, size_t size, const std::string& link, unsigned mode) {
    char h[512] = {};
    std::memcpy(h, name.data(), std::min<size_t>(name.size(), 100));
    std::snprintf(h + 100, 8, "%07o", mode);
    std::snprintf(h + 108, 8, "%07o", 0u);
    std::snprintf(h + 116, 8, "%07o", 0u);
    std::snprintf(h + 124, 12, "%011llo", static_cast<unsigned long long>(size));
    std::snprintf(h + 136, 12, "%011o", 1700000000u);
    h[156] = type;
    std::memcpy(h + 157, link.data(), std::min<size_t>(link.size(), 100));
    std::memcpy(h + 257, "ustar", 6);
    std::memcpy(h + 263, "00", 2);
    std::snprintf(h + 329, 8, "%07o", 1u);  // device numbers (1, 3: /dev/null)
    std::snprintf(h + 337, 8, "%07o", 3u);
    std::memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (unsigned char c : h) sum += c;
    std::snprintf(h + 148, 8, "%06o", sum);
    out_.append(h, sizeof h);
  }
  void body(const std::string& data) {
    out_ += data;
    out_.append((512 - data.size() % 512) % 512, '\0');
  }
  std::string out_;
};

} // namespace triplane::actors::session::testing
