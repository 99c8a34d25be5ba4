// What an archive given to tar_in holds, read from its headers before tar runs, so that tar_in
// names the members a workspace cannot keep (devices, fifos) instead of letting them vanish.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "triplane/runtime/error.hpp"

namespace triplane::actors::session {

/// One member of a tar archive as its headers describe it.
struct tar_member {
  std::string name;     ///< as the archive names it: pax path, GNU long name, or ustar prefix/name
  char type = '0';      ///< the ustar typeflag ('\0', the pre-POSIX regular file, reads as '0')
  uint64_t offset = 0;  ///< of its header in the archive
};

/// The members of a ustar, GNU or pax archive, in order, up to its end-of-archive block (or the
/// end of the data at a header boundary). pax ('x', 'g') and GNU long-name ('L', 'K') headers
/// are applied to the member they describe, not listed. std::nullopt when the headers cannot be
/// followed (not a tar archive, compressed, truncated, a bad checksum): tar itself refuses all of
/// these. Never reads outside `archive`.
std::optional<std::vector<tar_member>> read_tar_members(std::string_view archive);

/// A readable name of a typeflag ("fifo", "character device", "type 'Q'").
std::string tar_type_name(char type);

/// invalid_argument naming the first member a workspace cannot hold (a character or block
/// device, a fifo) and its type; no error when there is none.
caf::error check_tar_members(const std::vector<tar_member>& members);

} // namespace triplane::actors::session
