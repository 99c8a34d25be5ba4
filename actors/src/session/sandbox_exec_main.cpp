// triplane-sandbox-exec: the first program of a pre-started sandbox (sandbox_pool). bwrap sets
// the sandbox up before the command is known and runs this program; it reads the command from
// stdin, applies its working directory and rlimits, closes every other descriptor and execs it.
// It first removes its own file, a copy bwrap made on the sandbox's tmpfs.
// Linked statically: no loader work inside the sandbox.
//
// Stdin carries, before the command's own input, a header: an 8-byte little-endian length L, then
// L bytes of NUL-terminated fields: cwd, file-size limit, CPU seconds, address-space bytes (all
// decimal, 0 = none), argc, argv..., envc, env... (sandbox_process::assign writes it).
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

extern char** environ;

namespace {

constexpr uint64_t max_header_bytes = 64ull << 20;

[[noreturn]] void fail(const char* what, const char* detail, int code) {
  std::string_view parts[] = {"triplane: ", what, detail ? ": " : "", detail ? detail : "", "\n"};
  for (auto p : parts) (void)!::write(2, p.data(), p.size());
  ::_exit(code);
}

bool read_exact(int fd, char* out, size_t n) {
  while (n > 0) {
    auto got = ::read(fd, out, n);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    out += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

uint64_t number(const char* s) {
  char* end = nullptr;
  errno = 0;
  auto v = std::strtoull(s, &end, 10);
  if (errno != 0 || !end || *end != '\0') fail("malformed command header", s, 125);
  return v;
}

void limit(int resource, uint64_t soft, uint64_t hard) {
  if (soft == 0) return;
  rlimit rl{soft, hard};
  if (::setrlimit(resource, &rl) != 0) fail("setrlimit", std::strerror(errno), 125);
}

} // namespace

int main(int, char** self) {
  // This program is a copy on the sandbox's tmpfs (sandbox_process: bwrap --file): gone from
  // the sandbox's file tree before anything of the command runs.
  if (self && self[0] && ::unlink(self[0]) != 0)
    fail("cannot remove the sandbox's exec shim", std::strerror(errno), 125);
  unsigned char len_bytes[8];
  if (!read_exact(0, reinterpret_cast<char*>(len_bytes), sizeof len_bytes))
    fail("no command header on stdin", nullptr, 125);
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | len_bytes[i];
  if (len == 0 || len > max_header_bytes) fail("command header has a bad length", nullptr, 125);
  std::vector<char> buf(len);
  if (!read_exact(0, buf.data(), len)) fail("command header is truncated", nullptr, 125);
  if (buf.back() != '\0') fail("command header is not NUL-terminated", nullptr, 125);
  std::vector<char*> fields;
  for (size_t i = 0; i < len; i += std::strlen(buf.data() + i) + 1) fields.push_back(buf.data() + i);
  size_t at = 0;
  auto next = [&]() -> char* {
    if (at >= fields.size()) fail("command header has too few fields", nullptr, 125);
    return fields[at++];
  };
  const char* cwd = next();
  uint64_t fsize = number(next()), cpu_s = number(next()), as_bytes = number(next());
  uint64_t argc = number(next());
  if (argc == 0 || argc > fields.size()) fail("command header has a bad argc", nullptr, 125);
  std::vector<char*> argv;
  for (uint64_t i = 0; i < argc; ++i) argv.push_back(next());
  argv.push_back(nullptr);
  uint64_t envc = number(next());
  if (envc > fields.size()) fail("command header has a bad envc", nullptr, 125);
  std::vector<char*> envp;
  for (uint64_t i = 0; i < envc; ++i) envp.push_back(next());
  envp.push_back(nullptr);

  limit(RLIMIT_FSIZE, fsize, fsize);
  limit(RLIMIT_CPU, cpu_s, cpu_s + 1);
  limit(RLIMIT_AS, as_bytes, as_bytes);
  if (::chdir(cwd) != 0) fail("cannot change directory", std::strerror(errno), 1);
  // Nothing but stdio reaches the command (as with a sandbox started for it).
  ::close_range(3, ~0u, 0);
  environ = envp.data();  // execvp searches the command's own PATH
  ::execvp(argv[0], argv.data());
  int err = errno;
  fail(argv[0], std::strerror(err), err == ENOENT ? 127 : 126);
}
