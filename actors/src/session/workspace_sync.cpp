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

#include "session/fd_guard.hpp"

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

/// Opens what `opath_fd` (an O_PATH descriptor) names with `flags`, when a command made it
/// unreadable to a node that does not run as root (`chmod 000`): the node owns what its
/// sandboxes create (their user namespace maps to its uid), so it adds its own read (and, for
/// a directory, search) permission for the open and then puts the mode back. Going through
/// the O_PATH descriptor, never a path, the mode change cannot land on anything a symlink
/// swapped in points at. With `keep_mode` (a directory, whose entries need the search
/// permission while they are listed), the permission stays and *keep_mode gets the mode to put
/// back (fchmod on the returned descriptor). -1 and errno (EACCES when not the node's own) on
/// failure.
int reopen_as_owner(int opath_fd, int flags, mode_t* keep_mode = nullptr) {
  struct stat st {};
  if (::fstat(opath_fd, &st) != 0) return -1;
  if (st.st_uid != ::geteuid() || !(S_ISDIR(st.st_mode) || S_ISREG(st.st_mode))) {
    errno = EACCES;
    return -1;
  }
  const std::string self = "/proc/self/fd/" + std::to_string(opath_fd);
  const mode_t mode = st.st_mode & 07777;
  if (::chmod(self.c_str(), mode | S_IRUSR | (S_ISDIR(st.st_mode) ? S_IXUSR : 0)) != 0) return -1;
  int fd = ::open(self.c_str(), flags);
  int saved = errno;
  if (keep_mode != nullptr && fd >= 0)
    *keep_mode = mode;
  else
    ::chmod(self.c_str(), mode);
  errno = saved;
  return fd;
}

struct scanned {
  std::string path;
  struct stat st;
  std::string link_target;
};

/// Directories a scan made searchable to read them (see reopen_as_owner), by path below the
/// root; their modes go back when the sync that needed them is done (destruction), children
/// before parents.
class unlocked_dirs {
public:
  explicit unlocked_dirs(int rootfd) : rootfd_(rootfd) {}
  unlocked_dirs(const unlocked_dirs&) = delete;
  unlocked_dirs& operator=(const unlocked_dirs&) = delete;
  ~unlocked_dirs();
  void add(std::string path, mode_t mode) { dirs_.emplace_back(std::move(path), mode); }

private:
  int rootfd_;
  std::vector<std::pair<std::string, mode_t>> dirs_;  ///< in discovery order: parents first
};

caf::error scan(int dirfd, const std::string& prefix, std::vector<scanned>& out, unlocked_dirs& unlocked) {
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
    bool restore = false;
    mode_t mode = 0;
    if (fd < 0 && errno == EACCES) {
      // Skipping it would drop everything below it from the manifest: lost at passivation.
      fd_guard path_fd{::openat(dirfd, sub.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)};
      if (path_fd.fd >= 0) fd = reopen_as_owner(path_fd.fd, O_DIRECTORY | O_RDONLY | O_CLOEXEC, &mode);
      if (fd < 0)
        return make_error(errc::io_error, "cannot list workspace directory '" +
                                              (prefix.empty() ? sub : prefix + "/" + sub) + "': " +
                                              std::strerror(errno));
      restore = true;
    }
    if (fd < 0) continue;  // gone since the listing
    const std::string path = prefix.empty() ? sub : prefix + "/" + sub;
    // Searchable until the sync has read the files below it; then as the command left it.
    if (restore) unlocked.add(path, mode);
    auto err = scan(fd, path, out, unlocked);
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
int open_without_symlinks(int rootfd, const std::string& path,
                          uint64_t flags = O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC) {
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

unlocked_dirs::~unlocked_dirs() {
  for (auto i = dirs_.rbegin(); i != dirs_.rend(); ++i) {
    fd_guard dir{open_without_symlinks(rootfd_, i->first, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)};
    if (dir.fd >= 0) ::chmod(("/proc/self/fd/" + std::to_string(dir.fd)).c_str(), i->second);
  }
}

/// Reads the regular file at `path` into chunks. *vanished (and no error) when the file is no
/// longer there as a regular file reached without symlinks: removed, or a directory of its
/// path replaced, since the scan.
caf::error read_chunks(int rootfd, const std::string& path, manifest_entry& e,
                       std::map<std::string, std::string>& new_chunks, bool* vanished,
                       ino_t* read_ino) {
  *vanished = false;
  int fd = open_without_symlinks(rootfd, path);
  if (fd < 0 && errno == EACCES) {  // made unreadable by a command, to a node not running as root
    fd_guard path_fd{open_without_symlinks(rootfd, path, O_PATH | O_NOFOLLOW | O_CLOEXEC)};
    if (path_fd.fd >= 0) fd = reopen_as_owner(path_fd.fd, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  }
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
  *read_ino = st.st_ino;
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

/// The chunks an entry of a manifest stands for: its own, or a hard link's primary's; nullptr
/// when it is no regular file or its primary is missing.
const std::vector<std::string>* contents_of(const manifest& m, manifest::const_iterator e) {
  if (e == m.end() || e->second.type != file_type::regular) return nullptr;
  if (e->second.hard_link_of.empty()) return &e->second.chunks;
  auto primary = m.find(e->second.hard_link_of);
  if (primary == m.end() || primary->second.type != file_type::regular ||
      !primary->second.hard_link_of.empty())
    return nullptr;
  return &primary->second.chunks;
}

} // namespace

expected<sync_outcome> sync_manifest(const std::string& root, manifest& m, uint64_t quota_bytes,
                                     uint64_t max_entries) {
  int rootfd = ::open(root.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (rootfd < 0) return make_error(errc::io_error, "cannot open workspace '" + root + "'");
  fd_guard root_guard{rootfd};
  const int64_t scan_start = now_realtime_ns();
  std::vector<scanned> found;
  unlocked_dirs unlocked{rootfd};  // after root_guard: restored while the root is still open
  if (auto err = scan(rootfd, "", found, unlocked)) return err;
  sync_outcome out;
  // Hard-link groups: the regular files of the workspace that share an inode, in path order
  // (the first is the group's primary). Only names found in the workspace join a group.
  std::map<std::pair<dev_t, ino_t>, std::vector<size_t>> inodes;
  for (size_t i = 0; i < found.size(); ++i) {
    const auto& st = found[i].st;
    if (!S_ISREG(st.st_mode)) continue;
    ++out.files;
    if (st.st_nlink > 1) {
      auto& names = inodes[{st.st_dev, st.st_ino}];
      names.push_back(i);
      if (names.size() > 1) continue;  // one file: its bytes count once
    }
    out.total_bytes += static_cast<uint64_t>(st.st_size);
  }
  if (quota_bytes && out.total_bytes > quota_bytes)
    return make_error(errc::limit_exceeded,
                      "workspace holds " + std::to_string(out.total_bytes) +
                          " bytes, over its quota of " + std::to_string(quota_bytes));
  if (max_entries && found.size() > max_entries)
    return make_error(errc::limit_exceeded,
                      "workspace holds " + std::to_string(found.size()) +
                          " files, directories and symlinks, over its limit of " +
                          std::to_string(max_entries));
  std::vector<const std::vector<size_t>*> group_of(found.size(), nullptr);
  for (auto& [inode, names] : inodes) {
    if (names.size() < 2) continue;
    std::sort(names.begin(), names.end(), [&](size_t a, size_t b) { return found[a].path < found[b].path; });
    for (auto i : names) group_of[i] = &names;
  }
  auto entry_of = [&](const scanned& s) {
    manifest_entry e;
    e.mode = s.st.st_mode & 07777;
    e.mtime_ns = ns_of(s.st.st_mtim);
    e.ino = s.st.st_ino;
    e.ctime_ns = ns_of(s.st.st_ctim);
    if (S_ISDIR(s.st.st_mode)) {
      e.type = file_type::directory;
    } else if (S_ISLNK(s.st.st_mode)) {
      e.type = file_type::symlink;
      e.link_target = s.link_target;
      e.size = s.link_target.size();
    } else {
      e.type = file_type::regular;
      e.size = static_cast<uint64_t>(s.st.st_size);
      e.stat_unproven = racy(e, scan_start);
    }
    return e;
  };
  // A regular file's chunks: those of its last entry when its stat shows it untouched, else
  // read. *read_ino: the inode read (the scan's when trusted).
  auto take_contents = [&](const scanned& s, manifest_entry& e, bool* vanished,
                           ino_t* read_ino) -> caf::error {
    auto old = m.find(s.path);
    const auto* before = contents_of(m, old);
    bool untouched = before && !old->second.stat_unproven && old->second.size == e.size &&
                     old->second.mtime_ns == e.mtime_ns && old->second.ino == e.ino &&
                     old->second.ctime_ns == e.ctime_ns;
    *vanished = false;
    *read_ino = e.ino;
    if (untouched) {
      e.chunks = *before;
      return {};
    }
    if (auto err = read_chunks(rootfd, s.path, e, out.new_chunks, vanished, read_ino)) return err;
    ++out.files_read;
    // Read again only because its stat proved nothing, and unchanged: its chunks are stored,
    // as an untouched file's are.
    if (!*vanished && before && *before == e.chunks)
      for (const auto& hash : e.chunks) out.new_chunks.erase(hash);
    return {};
  };
  manifest next;
  auto keep = [&](const std::string& path, manifest_entry e) -> const manifest_entry& {
    auto old = m.find(path);
    if (old == m.end() || old->second.type != e.type || old->second.mode != e.mode ||
        old->second.size != e.size || old->second.chunks != e.chunks ||
        old->second.link_target != e.link_target || old->second.hard_link_of != e.hard_link_of ||
        (e.type == file_type::regular && old->second.mtime_ns != e.mtime_ns))
      out.changed = true;
    return next.emplace(path, std::move(e)).first->second;
  };
  for (size_t i = 0; i < found.size(); ++i) {
    const auto& s = found[i];
    if (!S_ISREG(s.st.st_mode)) {
      keep(s.path, entry_of(s));
      continue;
    }
    if (!group_of[i]) {
      auto e = entry_of(s);
      bool vanished = false;
      ino_t read_ino = 0;
      if (auto err = take_contents(s, e, &vanished, &read_ino)) return err;
      if (!vanished) keep(s.path, std::move(e));  // (vanished: as if the scan had not seen it)
      continue;
    }
    if (group_of[i]->front() != i) continue;  // recorded with its group's first name
    // The first name whose contents come from the inode the scan saw is the primary; the
    // others are recorded as its links, unread.
    const std::string* primary_path = nullptr;
    const manifest_entry* primary = nullptr;
    for (size_t member : *group_of[i]) {
      const auto& ms = found[member];
      auto e = entry_of(ms);
      if (primary) {
        e.hard_link_of = *primary_path;
        e.mode = primary->mode;
        e.size = primary->size;
        e.mtime_ns = primary->mtime_ns;
        e.ino = primary->ino;
        e.ctime_ns = primary->ctime_ns;
        e.stat_unproven = primary->stat_unproven;
        keep(ms.path, std::move(e));
        continue;
      }
      bool vanished = false;
      ino_t read_ino = 0;
      if (auto err = take_contents(ms, e, &vanished, &read_ino)) return err;
      if (vanished) continue;
      bool same_inode = read_ino == e.ino;  // else another file was swapped in: kept on its own
      const auto& kept = keep(ms.path, std::move(e));
      if (same_inode) {
        primary_path = &ms.path;
        primary = &kept;
      }
    }
  }
  if (next.size() != m.size()) out.changed = true;
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

/// Gives the regular file `primary` (just written by write_regular) its other names `links`,
/// and refreshes the group's stat caches (linking changed the inode's ctime). Both ends are
/// reached beneath `rootfd` without following a symlink, and the file linked is the one written
/// (its inode checked): a manifest can never link a name to anything outside the workspace.
caf::error link_group(int rootfd, const std::string& primary_path, manifest_entry& primary,
                      std::vector<std::pair<const std::string*, manifest_entry*>>& links) {
  fd_guard file{open_without_symlinks(rootfd, primary_path)};
  struct stat st {};
  if (file.fd < 0 || ::fstat(file.fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_ino != primary.ino)
    return make_error(errc::corrupted, "cannot link to '" + primary_path + "': not the file written there");
  for (auto& [path, e] : links) {
    auto slash = path->rfind('/');
    std::string name = slash == std::string::npos ? *path : path->substr(slash + 1);
    fd_guard dir{slash == std::string::npos
                     ? ::fcntl(rootfd, F_DUPFD_CLOEXEC, 0)
                     : open_without_symlinks(rootfd, path->substr(0, slash),
                                             O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC)};
    if (dir.fd < 0)
      return make_error(errc::io_error, "cannot create hard link '" + *path + "': " + std::strerror(errno));
    // By the open file, not by a name: AT_EMPTY_PATH (needs CAP_DAC_READ_SEARCH), else its
    // /proc/self/fd entry.
    int linked = ::linkat(file.fd, "", dir.fd, name.c_str(), AT_EMPTY_PATH);
    if (linked != 0 && (errno == ENOENT || errno == EPERM)) {
      std::string proc = "/proc/self/fd/" + std::to_string(file.fd);
      linked = ::linkat(AT_FDCWD, proc.c_str(), dir.fd, name.c_str(), AT_SYMLINK_FOLLOW);
    }
    if (linked != 0)
      return make_error(errc::io_error, "cannot create hard link '" + *path + "': " + std::strerror(errno));
  }
  if (::fstat(file.fd, &st) != 0)
    return make_error(errc::io_error, "cannot stat '" + primary_path + "': " + std::strerror(errno));
  primary.ctime_ns = ns_of(st.st_ctim);
  for (auto& [path, e] : links) {
    e->mode = primary.mode;
    e->size = primary.size;
    e->mtime_ns = primary.mtime_ns;
    e->ino = primary.ino;
    e->ctime_ns = primary.ctime_ns;
    e->stat_unproven = primary.stat_unproven;
  }
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
  std::map<std::string, std::vector<std::pair<const std::string*, manifest_entry*>>> links;  ///< by primary
  uint64_t file_bytes = 0;
  // The record was checked when it was decoded; a manifest is still not trusted to name what
  // its hard links join.
  if (auto bad = bad_path(m))
    return make_error(errc::corrupted, "manifest entry '" + *bad +
                                           "' is not a path inside the workspace below a directory entry");
  if (auto bad = bad_hard_link(m))
    return make_error(errc::corrupted,
                      "manifest entry '" + *bad + "' is a hard link of no regular file of the manifest");
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
        if (!e.hard_link_of.empty()) {
          links[e.hard_link_of].emplace_back(&path, &e);
          break;
        }
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
  if (!links.empty()) {
    fd_guard rootfd{::open(root.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC)};
    if (rootfd.fd < 0)
      return make_error(errc::io_error, "cannot open workspace '" + root + "': " + std::strerror(errno));
    for (auto& [primary_path, names] : links)
      if (auto err = link_group(rootfd.fd, primary_path, m.at(primary_path), names)) return err;
  }
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
