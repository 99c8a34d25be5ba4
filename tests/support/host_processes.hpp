// Test support: looks at the host's processes, e.g. to check that a sandboxed command (visible
// from the host's pid namespace) started or is gone. Header-only; Linux /proc.
#pragma once

#include <fstream>
#include <iterator>
#include <string>

#include <dirent.h>

namespace triplane::testing {

/// Processes on this host whose command line contains `marker`; -1 when /proc is unreadable.
inline int processes_with(const std::string& marker) {
  int n = 0;
  DIR* d = opendir("/proc");
  if (!d) return -1;
  while (auto* e = readdir(d)) {
    std::string name = e->d_name;
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in{"/proc/" + name + "/cmdline"};
    std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (auto& c : cmdline)
      if (c == '\0') c = ' ';
    if (cmdline.find(marker) != std::string::npos) ++n;
  }
  closedir(d);
  return n;
}

} // namespace triplane::testing
