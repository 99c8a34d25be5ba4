// Workspace <-> manifest.
#include "session/workspace_sync.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>

namespace triplane::actors::session {
namespace {

int64_t ns_of(const timespec& t) {
  return static_cast<int64_t>(t.tv_sec) * 1000000000 + t.tv_nsec;
}

int64_t now_realtime_ns() {
  timespec t{};
  ::clock_gettime(CLOCK_REALTIME, &t);
  return ns_of(t);
}

/// How far a file timestamp may lag the clock, with margin: the kernel stamps files from its
/// coarse clock, which advances at timer ticks (4 ms at Debian's HZ=250, and on this 6.18 host
/// files read 4-8 ms behind CLOCK_REALTIME right after a write: idle CPUs skip ticks). Debian
/// 12's 6.1 kernel stamps every write this way. A file last written less than this before the
/// scan that recorded it could be written again before the coarse clock moves, with the same
/// size and timestamps: its stat proves nothing, so the next sync reads it again (git's
/// "racily clean" entries). Costs one more read of what a command wrote in its last 20 ms.
constexpr int64_t timestamp_granularity_ns = 20'000'000;

/// Whether `e`'s recorded stat may not show a later change (see timestamp_granularity_ns).
bool racy(const manifest_entry& e, int64_t recorded_at_ns) {
  return e.mtime_ns > recorded_at_ns - timestamp_granularity_ns;
}

timespec ts_of(int64_t ns) {
  timespec t{};
  t.tv_sec = static_cast<time_t>(ns / 1000000000);
  t.tv_nsec = static_cast<long>(ns % 1000000000);
  return t;
}

/// A path (relative to `dirfd`, or absolute) as a (directory fd, name) pair for the *at()
/// calls: the path itself when one system call can take it, else the parent opened in pieces
/// under PATH_MAX and the last name. Commands create trees one name at a time, so workspace
/// paths have no length limit; storing and restoring them must not have one either.
class at_path {
public:
  at_path(int dirfd, const std::string& path) : dir_(dirfd), name_(path) {
    if (name_.size() < PATH_MAX) return;
    auto slash = name_.rfind('/');
    if (slash == std::string::npos || slash == 0) {
      errno_ = ENAMETOOLONG;
      return;
    }
    std::string parent = name_.substr(0, slash);
    name_.erase(0, slash + 1);
    size_t pos = 0;
    while (pos < parent.size()) {
      size_t len = parent.size() - pos;
      if (len >= PATH_MAX) {  // cut at a '/' (every name is at most NAME_MAX bytes)
        auto cut = parent.rfind('/', pos + PATH_MAX - 1);
        if (cut == std::string::npos || cut <= pos) {
          errno_ = ENAMETOOLONG;
          return;
        }
        len = cut - pos;
      }
      int next = ::openat(dir_, parent.substr(pos, len).c_str(),
                          O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
      if (next < 0) {
        errno_ = errno;
        return;
      }
      opened_.reset(next);
      dir_ = next;
      pos += len + 1;
    }
  }
  int dir() const { return dir_; }
  const char* name() const { return name_.c_str(); }
  /// 0, or the errno of opening the parent (then the *at() calls are not to be made).
  int error() const { return errno_; }

private:
  struct owned_fd {
    int fd = -1;
    ~owned_fd() { reset(-1); }
    void reset(int f) {
      if (fd >= 0) ::close(fd);
      fd = f;
    }
  } opened_;
  int dir_;
  std::string name_;
  int errno_ = 0;
};

struct scanned {
  std::string path;
  struct stat st;
  std::string link_target;
};

caf::error scan(int dirfd, const std::string& prefix, std::vector<scanned>& out) {
  int copy = ::fcntl(dirfd, F_DUPFD_CLOEXEC, 0);
  DIR* d = ::fdopendir(copy);
  if (!d) {
    ::close(copy);
    return make_error(errc::io_error, "cannot list workspace directory '" + prefix + "'");
  }
  // A dup shares its file offset with the original: start at the beginning even when an
  // earlier listing of the same directory fd read it to the end.
  ::rewinddir(d);
  std::vector<std::string> subdirs;
  while (auto* ent = ::readdir(d)) {
    std::string name = ent->d_name;
    if (name == "." || name == "..") continue;
    scanned s;
    s.path = prefix.empty() ? name : prefix + "/" + name;
    if (::fstatat(dirfd, name.c_str(), &s.st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (S_ISLNK(s.st.st_mode)) {
      char buf[4097];
      auto n = ::readlinkat(dirfd, name.c_str(), buf, sizeof buf - 1);
      if (n < 0) continue;
      s.link_target.assign(buf, static_cast<size_t>(n));
    } else if (S_ISDIR(s.st.st_mode)) {
      subdirs.push_back(name);
    } else if (!S_ISREG(s.st.st_mode)) {
      continue;
    }
    out.push_back(std::move(s));
  }
  ::closedir(d);
  for (const auto& sub : subdirs) {
    int fd = ::openat(dirfd, sub.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;
    auto err = scan(fd, prefix.empty() ? sub : prefix + "/" + sub, out);
    ::close(fd);
    if (err) return err;
  }
  return {};
}

/// Opens the file at `path` beneath `rootfd` for reading without following a symlink anywhere
/// on the way: between the scan and this read, a background process may have replaced a
/// directory of the path by a symlink, which on the host can lead anywhere (the node must never
/// read what it points at). openat2 (RESOLVE_NO_SYMLINKS) where the kernel has it and the path
/// fits in one call, else one name at a time with O_NOFOLLOW. Non-blocking: a fifo swapped in
/// for the file would otherwise block the open until some writer came. -1 and errno on failure.
int open_without_symlinks(int rootfd, const std::string& path) {
  constexpr uint64_t flags = O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC;
  if (path.size() < PATH_MAX) {
    open_how how{};
    how.flags = flags;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    int fd = static_cast<int>(::syscall(SYS_openat2, rootfd, path.c_str(), &how, sizeof how));
    if (fd >= 0 || errno != ENOSYS) return fd;
  }
  int dir = rootfd;
  size_t start = 0;
  for (;;) {
    auto slash = path.find('/', start);
    std::string name = path.substr(start, slash == std::string::npos ? slash : slash - start);
    bool last = slash == std::string::npos;
    int next = ::openat(dir, name.c_str(),
                        last ? static_cast<int>(flags) : O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    int saved = errno;
    if (dir != rootfd) ::close(dir);
    errno = saved;
    if (next < 0 || last) return next;
    dir = next;
    start = slash + 1;
  }
}

/// Reads the regular file at `path` into chunks. *vanished (and no error) when the file is no
/// longer there as a regular file reached without symlinks: removed, or a directory of its
/// path replaced, since the scan.
caf::error read_chunks(int rootfd, const std::string& path, manifest_entry& e,
                       std::map<std::string, std::string>& new_chunks, bool* vanished) {
  *vanished = false;
  int fd = open_without_symlinks(rootfd, path);
  if (fd < 0 && (errno == ENOENT || errno == ENOTDIR || errno == ELOOP || errno == EXDEV)) {
    *vanished = true;
    return {};
  }
  if (fd < 0) return make_error(errc::io_error, "cannot read '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {  // replaced by a fifo or a device
    ::close(fd);
    *vanished = true;
    return {};
  }
  e.chunks.clear();
  std::string buf;
  uint64_t total = 0;
  for (;;) {
    buf.resize(chunk_bytes);
    size_t got = 0;
    while (got < chunk_bytes) {
      auto n = ::read(fd, buf.data() + got, chunk_bytes - got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    if (got == 0) break;
    buf.resize(got);
    total += got;
    auto hash = sha256(buf);
    e.chunks.push_back(hash);
    new_chunks.emplace(std::move(hash), buf);
    if (got < chunk_bytes) break;
  }
  ::close(fd);
  e.size = total;  // what was actually read (the file may have changed meanwhile)
  return {};
}

} // namespace

expected<sync_outcome> sync_manifest(const std::string& root, manifest& m, uint64_t quota_bytes) {
  int rootfd = ::open(root.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (rootfd < 0) return make_error(errc::io_error, "cannot open workspace '" + root + "'");
  const int64_t scan_start = now_realtime_ns();
  std::vector<scanned> found;
  auto err = scan(rootfd, "", found);
  if (err) {
    ::close(rootfd);
    return err;
  }
  sync_outcome out;
  for (const auto& s : found)
    if (S_ISREG(s.st.st_mode)) {
      out.total_bytes += static_cast<uint64_t>(s.st.st_size);
      ++out.files;
    }
  if (quota_bytes && out.total_bytes > quota_bytes) {
    ::close(rootfd);
    return make_error(errc::limit_exceeded,
                      "workspace holds " + std::to_string(out.total_bytes) +
                          " bytes, over its quota of " + std::to_string(quota_bytes));
  }
  manifest next;
  for (auto& s : found) {
    manifest_entry e;
    e.mode = s.st.st_mode & 07777;
    e.mtime_ns = ns_of(s.st.st_mtim);
    e.ino = s.st.st_ino;
    e.ctime_ns = ns_of(s.st.st_ctim);
    auto old = m.find(s.path);
    if (S_ISDIR(s.st.st_mode)) {
      e.type = file_type::directory;
    } else if (S_ISLNK(s.st.st_mode)) {
      e.type = file_type::symlink;
      e.link_target = s.link_target;
      e.size = s.link_target.size();
    } else {
      e.type = file_type::regular;
      e.size = static_cast<uint64_t>(s.st.st_size);
      bool untouched = old != m.end() && old->second.type == file_type::regular &&
                       !old->second.stat_unproven && old->second.size == e.size &&
                       old->second.mtime_ns == e.mtime_ns && old->second.ino == e.ino &&
                       old->second.ctime_ns == e.ctime_ns;
      e.stat_unproven = racy(e, scan_start);
      if (untouched) {
        e.chunks = old->second.chunks;
      } else {
        bool vanished = false;
        if (auto rerr = read_chunks(rootfd, s.path, e, out.new_chunks, &vanished)) {
          ::close(rootfd);
          return rerr;
        }
        ++out.files_read;
        if (vanished) continue;  // as if the scan had not seen it (the count check below notes the change)
        // Read again only because its stat proved nothing, and unchanged: its chunks are
        // stored, as an untouched file's are.
        if (old != m.end() && old->second.type == file_type::regular && old->second.chunks == e.chunks)
          for (const auto& hash : e.chunks) out.new_chunks.erase(hash);
      }
    }
    if (old == m.end() || old->second.type != e.type || old->second.mode != e.mode ||
        old->second.size != e.size || old->second.chunks != e.chunks ||
        old->second.link_target != e.link_target ||
        (e.type == file_type::regular && old->second.mtime_ns != e.mtime_ns))
      out.changed = true;
    next.emplace(std::move(s.path), std::move(e));
  }
  if (next.size() != m.size()) out.changed = true;
  ::close(rootfd);
  m = std::move(next);
  return out;
}

namespace {

/// One regular file of the manifest: created exclusively, contents from the store (verified
/// against their hash), mode and mtime as recorded, stat cache refreshed.
caf::error write_regular(const std::string& root, const std::string& path, manifest_entry& e,
                         const session_store& store, bool verify) {
  at_path at(AT_FDCWD, root + "/" + path);
  int fd = at.error() ? (errno = at.error(), -1)
                      : ::openat(at.dir(), at.name(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                                 0600);
  if (fd < 0) return make_error(errc::io_error, "cannot create '" + path + "': " + std::strerror(errno));
  caf::error write_error;
  for (const auto& hash : e.chunks) {
    auto err = store.with_chunk(hash, [&](std::string_view bytes) {
      size_t done = 0;
      while (done < bytes.size()) {
        auto n = ::write(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
          write_error = make_error(errc::io_error, "cannot write '" + path + "': " + std::strerror(errno));
          return;
        }
        done += static_cast<size_t>(n);
      }
    }, verify);
    if (!err) err = std::move(write_error);
    if (err) {
      ::close(fd);
      return err;
    }
  }
  ::fchmod(fd, e.mode);
  timespec times[2] = {ts_of(e.mtime_ns), ts_of(e.mtime_ns)};
  ::futimens(fd, times);
  struct stat st {};
  if (::fstat(fd, &st) == 0) {
    e.ino = st.st_ino;
    e.ctime_ns = ns_of(st.st_ctim);
  }
  e.stat_unproven = racy(e, now_realtime_ns());
  ::close(fd);
  return {};
}

/// Threads for work over `bytes`: one per 256 KiB, at most one per core, 4, and `max_useful`;
/// below 256 KiB a thread's start costs more than it saves.
size_t worker_threads(uint64_t bytes, size_t max_useful) {
  size_t cores = std::max(1u, std::thread::hardware_concurrency());
  return std::min<size_t>({cores, 4, std::max<uint64_t>(1, bytes / (256u << 10)), std::max<size_t>(1, max_useful)});
}

/// Runs `fn(i)` for every i in [0, n) on `threads` threads (this one included), stopping at the
/// first error, which it returns.
template <class F>
caf::error for_each_on_threads(size_t n, size_t threads, F fn) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  caf::error first_error;
  auto work = [&] {
    for (size_t i = next++; i < n && !failed; i = next++)
      if (auto err = fn(i)) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!first_error) first_error = std::move(err);
        failed = true;
      }
  };
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < threads; ++t) helpers.emplace_back(work);
  work();
  for (auto& h : helpers) h.join();
  return first_error;
}

} // namespace

caf::error verify_chunks(const manifest& m, const session_store& store) {
  // Distinct chunks, hashed on up to min(cores, 4) threads (one per 256 KiB): this runs beside
  // the command, and the command's result waits for it.
  std::set<std::string_view> seen;
  std::vector<std::string_view> hashes;
  uint64_t bytes = 0;
  for (const auto& [path, e] : m) {
    for (const auto& hash : e.chunks)
      if (seen.insert(hash).second) hashes.push_back(hash);
    bytes += e.size;
  }
  size_t threads = worker_threads(bytes, hashes.size());
  return for_each_on_threads(hashes.size(), threads, [&](size_t i) {
    return store.with_chunk(hashes[i], [](std::string_view) {});
  });
}

caf::error materialize(const std::string& root, manifest& m, const session_store& store, bool verify) {
  std::error_code ec;
  std::filesystem::create_directories(root, ec);
  if (ec) return make_error(errc::io_error, "cannot create workspace '" + root + "': " + ec.message());
  // Directories and symlinks first, in manifest order (parents before children); then the
  // regular files, several at a time: fetching, verifying (SHA-256) and writing their
  // contents is most of the cost, and independent per file.
  std::vector<std::pair<std::string, manifest_entry*>> dirs;
  std::vector<std::pair<const std::string*, manifest_entry*>> files;
  uint64_t file_bytes = 0;
  for (auto& [path, e] : m) {
    std::string full = root + "/" + path;
    switch (e.type) {
      case file_type::directory: {
        at_path at(AT_FDCWD, full);
        if (at.error() || (::mkdirat(at.dir(), at.name(), 0700) != 0 && errno != EEXIST))
          return make_error(errc::io_error, "cannot create '" + path + "': " +
                                                std::strerror(at.error() ? at.error() : errno));
        dirs.emplace_back(full, &e);
        break;
      }
      case file_type::symlink: {
        at_path at(AT_FDCWD, full);
        if (at.error() || ::symlinkat(e.link_target.c_str(), at.dir(), at.name()) != 0)
          return make_error(errc::io_error, "cannot create symlink '" + path + "': " +
                                                std::strerror(at.error() ? at.error() : errno));
        struct stat st {};
        if (::fstatat(at.dir(), at.name(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
          e.ino = st.st_ino;
          e.ctime_ns = ns_of(st.st_ctim);
        }
        break;
      }
      case file_type::regular:
        files.emplace_back(&path, &e);
        file_bytes += e.size;
        break;
      default:
        break;
    }
  }
  // At least 16 files per thread.
  size_t threads = worker_threads(file_bytes, std::max<size_t>(1, files.size() / 16));
  auto first_error = for_each_on_threads(files.size(), threads, [&](size_t i) {
    return write_regular(root, *files[i].first, *files[i].second, store, verify);
  });
  if (first_error) return first_error;
  // Directories last, deepest first: creating their children changed their mtimes.
  for (auto i = dirs.rbegin(); i != dirs.rend(); ++i) {
    at_path at(AT_FDCWD, i->first);
    if (at.error()) continue;  // (it was created above: only a concurrent change gets here)
    ::fchmodat(at.dir(), at.name(), i->second->mode, 0);
    timespec times[2] = {ts_of(i->second->mtime_ns), ts_of(i->second->mtime_ns)};
    ::utimensat(at.dir(), at.name(), times, AT_SYMLINK_NOFOLLOW);
    struct stat st {};
    if (::fstatat(at.dir(), at.name(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
      i->second->ino = st.st_ino;
      i->second->ctime_ns = ns_of(st.st_ctim);
    }
  }
  return {};
}

} // namespace triplane::actors::session
