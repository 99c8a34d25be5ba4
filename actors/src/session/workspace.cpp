// Files API over a workspace directory, resolved beneath its directory fd.
#include "session/workspace.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "session/fd_guard.hpp"

namespace triplane::actors::session {
namespace {

caf::error errno_error(int err, const std::string& what, const std::string& path) {
  std::string msg = what + " '" + path + "': ";
  switch (err) {
    case ENOENT: return make_error(errc::not_found, msg + "no such file or directory");
    case EEXIST: return make_error(errc::already_exists, msg + "already exists");
    case EXDEV:
    case ELOOP:
      return make_error(errc::permission_denied,
                        msg + "the path goes through a symlink that is refused or leaves the workspace");
    case ENOTDIR: return make_error(errc::invalid_argument, msg + "a parent is not a directory");
    case EISDIR: return make_error(errc::invalid_argument, msg + "is a directory");
    case ENOTEMPTY: return make_error(errc::invalid_argument, msg + "directory not empty (use recursive)");
    case ENAMETOOLONG: return make_error(errc::invalid_argument, msg + "name too long");
    case EACCES:
    case EPERM: return make_error(errc::permission_denied, msg + std::strerror(err));
    case ENOSPC:
    case EDQUOT:
    case EFBIG: return make_error(errc::limit_exceeded, msg + std::strerror(err));
    default: return make_error(errc::io_error, msg + std::strerror(err));
  }
}

int sys_openat2(int dirfd, const char* path, uint64_t flags, uint64_t mode) {
  open_how how{};
  how.flags = flags;
  how.mode = mode;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  return static_cast<int>(::syscall(SYS_openat2, dirfd, path, &how, sizeof how));
}

std::string join(const std::vector<std::string>& names, size_t count) {
  std::string out;
  for (size_t i = 0; i < count; ++i) {
    if (i) out += '/';
    out += names[i];
  }
  return out;
}

file_entry entry_from(const struct stat& st, const std::string& path) {
  file_entry e;
  e.path = path;
  e.mode = st.st_mode & 07777;
  e.size = static_cast<uint64_t>(st.st_size);
  e.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  if (S_ISREG(st.st_mode)) e.type = file_type::regular;
  else if (S_ISDIR(st.st_mode)) e.type = file_type::directory;
  else if (S_ISLNK(st.st_mode)) e.type = file_type::symlink;
  else e.type = file_type::other;
  return e;
}

} // namespace

expected<std::vector<std::string>> split_path(const std::string& path, bool allow_root) {
  if (path.find('\0') != std::string::npos)
    return make_error(errc::invalid_argument, "path contains a NUL byte");
  if (path.size() > max_path_bytes)
    return make_error(errc::invalid_argument,
                      "path is " + std::to_string(path.size()) + " bytes, more than " +
                          std::to_string(max_path_bytes));
  if (!path.empty() && path.front() == '/')
    return make_error(errc::invalid_argument,
                      "path '" + path + "' is absolute; paths are relative to the workspace");
  std::vector<std::string> names;
  size_t start = 0;
  while (start <= path.size()) {
    auto end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    std::string name = path.substr(start, end - start);
    if (name == "..")
      return make_error(errc::invalid_argument, "path '" + path + "' contains '..'");
    if (name.size() > max_name_bytes)
      return make_error(errc::invalid_argument,
                        "a name in the path is " + std::to_string(name.size()) +
                            " bytes, more than " + std::to_string(max_name_bytes));
    if (!name.empty() && name != ".") names.push_back(std::move(name));
    start = end + 1;
  }
  if (names.empty() && !allow_root)
    return make_error(errc::invalid_argument, "path '" + path + "' names the workspace root");
  return names;
}

bool kernel_has_openat2() {
  int fd = sys_openat2(AT_FDCWD, ".", O_PATH | O_CLOEXEC, 0);
  if (fd >= 0) {
    ::close(fd);
    return true;
  }
  return errno != ENOSYS;
}

expected<std::unique_ptr<workspace>> workspace::open(const std::string& root, bool use_openat2,
                                                     workspace_limits limits) {
  std::error_code ec;
  std::filesystem::create_directories(root, ec);
  if (ec) return make_error(errc::io_error, "cannot create workspace '" + root + "': " + ec.message());
  int fd = ::open(root.c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return errno_error(errno, "cannot open workspace", root);
  auto ws = std::unique_ptr<workspace>(new workspace);
  ws->root_ = root;
  ws->root_fd_ = fd;
  ws->openat2_ = use_openat2 && kernel_has_openat2();
  ws->limits_ = limits;
  return ws;
}

workspace::~workspace() {
  if (root_fd_ >= 0) ::close(root_fd_);
}

int workspace::open_dir(const std::vector<std::string>& names, size_t count, bool create,
                        caf::error* err) {
  const std::string shown = join(names, count);
  if (openat2_ && !create) {
    int fd = count == 0 ? ::fcntl(root_fd_, F_DUPFD_CLOEXEC, 0)
                        : sys_openat2(root_fd_, shown.c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0 && err) *err = errno_error(errno, "cannot open directory", shown);
    return fd;
  }
  int fd = ::fcntl(root_fd_, F_DUPFD_CLOEXEC, 0);
  for (size_t i = 0; i < count && fd >= 0; ++i) {
    if (create && ::mkdirat(fd, names[i].c_str(), 0755) != 0 && errno != EEXIST) {
      int e = errno;
      ::close(fd);
      if (err) *err = errno_error(e, "cannot create directory", join(names, i + 1));
      return -1;
    }
    // One name at a time: openat2 with RESOLVE_BENEATH relative to the current directory fd
    // can only follow symlinks that stay beneath it; the fallback follows none.
    int next = openat2_ ? sys_openat2(fd, names[i].c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC, 0)
                        : ::openat(fd, names[i].c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    int e = errno;
    ::close(fd);
    fd = next;
    if (fd < 0) {
      if (err) *err = errno_error(e == ENOTDIR && !openat2_ ? ELOOP : e, "cannot open directory",
                                  join(names, i + 1));
      return -1;
    }
  }
  return fd;
}

expected<file_entry> workspace::stat_at(int dirfd, const std::string& name, const std::string& path) {
  struct stat st {};
  if (::fstatat(dirfd, name.empty() ? "" : name.c_str(), &st,
                AT_SYMLINK_NOFOLLOW | (name.empty() ? AT_EMPTY_PATH : 0)) != 0)
    return errno_error(errno, "cannot stat", path);
  auto e = entry_from(st, path);
  if (e.type == file_type::symlink) {
    char buf[max_path_bytes + 1];
    auto n = ::readlinkat(dirfd, name.c_str(), buf, sizeof buf);
    if (n > 0) e.link_target.assign(buf, static_cast<size_t>(n));
  }
  return e;
}

expected<file_entry> workspace::write(const file_write_request& req) {
  auto names = split_path(req.path, false);
  if (!names) return names.error();
  if (req.mode > 07777) return make_error(errc::invalid_argument, "mode " + std::to_string(req.mode) + " is not a permission mask");
  caf::error err;
  fd_guard dir{open_dir(*names, names->size() - 1, req.create_parents, &err)};
  if (dir.fd < 0) return err;
  const auto& name = names->back();
  // Without append, the data goes to a new file beside the target, renamed over it once
  // complete: a write that fails part-way (a full disk, the file size limit) leaves the old
  // contents, never a truncated file that the next sync would store.
  std::string temp;
  if (!req.append) {
    struct stat current {};
    if (::fstatat(dir.fd, name.c_str(), &current, AT_SYMLINK_NOFOLLOW) == 0) {
      if (S_ISLNK(current.st_mode)) return errno_error(ELOOP, "cannot write", req.path);
      if (S_ISDIR(current.st_mode)) return errno_error(EISDIR, "cannot write", req.path);
      if (!S_ISREG(current.st_mode))
        return make_error(errc::invalid_argument, "'" + req.path + "' is not a regular file");
    } else if (errno != ENOENT) {
      return errno_error(errno, "cannot write", req.path);
    }
  }
  fd_guard file;
  if (req.append) {
    // Non-blocking: opening a fifo (a command can leave one) would otherwise wait for a reader.
    file.fd = ::openat(dir.fd, name.c_str(),
                       O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_APPEND | O_NONBLOCK, req.mode & 0777);
    if (file.fd < 0 && errno == ENXIO)  // a fifo without a reader
      return make_error(errc::invalid_argument, "'" + req.path + "' is not a regular file");
  } else {
    for (int attempt = 0; attempt < 100 && file.fd < 0; ++attempt) {  // (a name the command took)
      temp = ".triplane-write-" + std::to_string(::getpid()) + "-" + std::to_string(++writes_);
      file.fd = ::openat(dir.fd, temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                         req.mode & 0777);
      if (file.fd < 0 && errno != EEXIST) break;
    }
  }
  if (file.fd < 0) return errno_error(errno, "cannot write", req.path);
  auto fail = [&](caf::error err) -> caf::error {
    if (!temp.empty()) ::unlinkat(dir.fd, temp.c_str(), 0);
    return err;
  };
  struct stat st {};
  if (::fstat(file.fd, &st) != 0 || !S_ISREG(st.st_mode))
    return fail(make_error(errc::invalid_argument, "'" + req.path + "' is not a regular file"));
  ::fchmod(file.fd, req.mode & 07777);
  size_t done = 0;
  while (done < req.data.size()) {
    auto n = ::write(file.fd, req.data.data() + done, req.data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail(errno_error(errno, "cannot write", req.path));
    }
    done += static_cast<size_t>(n);
  }
  // (A symlink or directory swapped in meanwhile is replaced, or refused: never followed.)
  if (!temp.empty() && ::renameat(dir.fd, temp.c_str(), dir.fd, name.c_str()) != 0)
    return fail(errno_error(errno, "cannot write", req.path));
  return stat_at(dir.fd, name, join(*names, names->size()));
}

expected<file_data> workspace::read(const file_read_request& req) {
  auto names = split_path(req.path, false);
  if (!names) return names.error();
  caf::error err;
  fd_guard dir{open_dir(*names, names->size() - 1, false, &err)};
  if (dir.fd < 0) return err;
  // Non-blocking: opening a fifo (a command can leave one) would otherwise wait for a writer.
  fd_guard file{::openat(dir.fd, names->back().c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)};
  if (file.fd < 0) return errno_error(errno, "cannot read", req.path);
  struct stat st {};
  if (::fstat(file.fd, &st) != 0 || !S_ISREG(st.st_mode))
    return make_error(errc::invalid_argument, "'" + req.path + "' is not a regular file");
  file_data out;
  out.total_size = static_cast<uint64_t>(st.st_size);
  uint64_t offset = std::min<uint64_t>(req.offset, out.total_size);
  uint64_t want = req.length ? req.length : out.total_size - offset;
  want = std::min<uint64_t>(want, out.total_size - offset);
  if (want > limits_.max_read_bytes)
    return make_error(errc::limit_exceeded,
                      "read of " + std::to_string(want) + " bytes exceeds the maximum of " +
                          std::to_string(limits_.max_read_bytes) + "; read a range");
  out.data.resize(static_cast<size_t>(want));
  size_t got = 0;
  while (got < want) {
    auto n = ::pread(file.fd, out.data.data() + got, want - got, static_cast<off_t>(offset + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error(errno, "cannot read", req.path);
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  out.data.resize(got);
  out.eof = offset + got >= out.total_size;
  return out;
}

expected<std::vector<file_entry>> workspace::list(const file_list_request& req) {
  auto names = split_path(req.path, true);
  if (!names) return names.error();
  caf::error err;
  int top = open_dir(*names, names->size(), false, &err);
  if (top < 0) return err;
  std::vector<file_entry> out;
  caf::error failure;
  std::function<void(int, const std::string&)> walk = [&](int dirfd, const std::string& prefix) {
    DIR* d = ::fdopendir(dirfd);  // takes ownership of dirfd
    if (!d) {
      ::close(dirfd);
      return;
    }
    // A dup shares its file offset with the original (the workspace root fd is listed many
    // times): start at the beginning even when an earlier listing read it to the end.
    ::rewinddir(d);
    std::vector<std::string> subdirs;
    while (auto* ent = ::readdir(d)) {
      std::string name = ent->d_name;
      if (name == "." || name == "..") continue;
      if (out.size() >= limits_.max_list_entries) {
        failure = make_error(errc::limit_exceeded, "listing has more than " +
                                                       std::to_string(limits_.max_list_entries) + " entries");
        break;
      }
      std::string path = prefix.empty() ? name : prefix + "/" + name;
      auto e = stat_at(::dirfd(d), name, path);
      if (!e) continue;  // vanished meanwhile
      if (e->type == file_type::directory && req.recursive) subdirs.push_back(name);
      out.push_back(std::move(*e));
    }
    for (const auto& sub : subdirs) {
      if (failure) break;
      int fd = ::openat(::dirfd(d), sub.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
      if (fd >= 0) walk(fd, prefix.empty() ? sub : prefix + "/" + sub);
    }
    ::closedir(d);
  };
  walk(top, join(*names, names->size()));
  if (failure) return failure;
  std::sort(out.begin(), out.end(),
            [](const file_entry& a, const file_entry& b) { return a.path < b.path; });
  return out;
}

expected<file_entry> workspace::stat(const std::string& path) {
  auto names = split_path(path, true);
  if (!names) return names.error();
  if (names->empty()) return stat_at(root_fd_, "", "");
  caf::error err;
  fd_guard dir{open_dir(*names, names->size() - 1, false, &err)};
  if (dir.fd < 0) return err;
  return stat_at(dir.fd, names->back(), join(*names, names->size()));
}

expected<file_entry> workspace::make_directory(const mkdir_request& req) {
  auto names = split_path(req.path, false);
  if (!names) return names.error();
  caf::error err;
  if (req.parents) {
    fd_guard parent{open_dir(*names, names->size() - 1, true, &err)};
    if (parent.fd < 0) return err;
    const auto& name = names->back();
    const std::string shown = join(*names, names->size());
    bool created = ::mkdirat(parent.fd, name.c_str(), req.mode & 07777) == 0;
    if (!created && errno != EEXIST) return errno_error(errno, "cannot create directory", shown);
    // As open_dir resolves each name: beneath, and without following symlinks in the fallback.
    fd_guard dir{openat2_ ? sys_openat2(parent.fd, name.c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC, 0)
                          : ::openat(parent.fd, name.c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC | O_NOFOLLOW)};
    if (dir.fd < 0)
      return errno_error(errno == ENOTDIR && !openat2_ ? ELOOP : errno, "cannot open directory", shown);
    // The mode is the new directory's (exactly: not masked by the umask); an existing one
    // keeps its own, as with mkdir -p.
    if (created) ::fchmod(dir.fd, req.mode & 07777);
    return stat_at(dir.fd, "", shown);
  }
  fd_guard parent{open_dir(*names, names->size() - 1, false, &err)};
  if (parent.fd < 0) return err;
  if (::mkdirat(parent.fd, names->back().c_str(), req.mode & 07777) != 0)
    return errno_error(errno, "cannot create directory", req.path);
  return stat_at(parent.fd, names->back(), join(*names, names->size()));
}

namespace {

/// Removes everything inside the directory `dirfd` (not following symlinks); counts entries.
caf::error empty_directory(int dirfd, uint64_t& removed, const std::string& path) {
  int copy = ::fcntl(dirfd, F_DUPFD_CLOEXEC, 0);
  DIR* d = ::fdopendir(copy);
  if (!d) {
    ::close(copy);
    return errno_error(errno, "cannot list", path);
  }
  // A dup shares its file offset with the original: start at the beginning even when an
  // earlier listing of the same directory fd read it to the end.
  ::rewinddir(d);
  std::vector<std::pair<std::string, bool>> entries;
  while (auto* ent = ::readdir(d)) {
    std::string name = ent->d_name;
    if (name == "." || name == "..") continue;
    struct stat st {};
    if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    entries.emplace_back(name, S_ISDIR(st.st_mode));
  }
  ::closedir(d);
  for (const auto& [name, is_dir] : entries) {
    if (is_dir) {
      fd_guard sub{::openat(dirfd, name.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC)};
      if (sub.fd < 0) return errno_error(errno, "cannot open", path + "/" + name);
      if (auto e = empty_directory(sub.fd, removed, path + "/" + name)) return e;
      if (::unlinkat(dirfd, name.c_str(), AT_REMOVEDIR) != 0)
        return errno_error(errno, "cannot remove", path + "/" + name);
    } else if (::unlinkat(dirfd, name.c_str(), 0) != 0) {
      return errno_error(errno, "cannot remove", path + "/" + name);
    }
    ++removed;
  }
  return {};
}

} // namespace

expected<uint64_t> workspace::remove(const remove_request& req) {
  auto names = split_path(req.path, false);
  if (!names) return names.error();
  caf::error err;
  fd_guard parent{open_dir(*names, names->size() - 1, false, &err)};
  if (parent.fd < 0) return err;
  const auto& name = names->back();
  struct stat st {};
  if (::fstatat(parent.fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
    return errno_error(errno, "cannot remove", req.path);
  uint64_t removed = 0;
  if (S_ISDIR(st.st_mode)) {
    if (req.recursive) {
      fd_guard sub{::openat(parent.fd, name.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC)};
      if (sub.fd < 0) return errno_error(errno, "cannot remove", req.path);
      if (auto e = empty_directory(sub.fd, removed, req.path)) return e;
    }
    if (::unlinkat(parent.fd, name.c_str(), AT_REMOVEDIR) != 0)
      return errno_error(errno, "cannot remove", req.path);
  } else if (::unlinkat(parent.fd, name.c_str(), 0) != 0) {
    return errno_error(errno, "cannot remove", req.path);
  }
  return removed + 1;
}

expected<file_entry> workspace::move(const move_request& req) {
  auto from = split_path(req.from, false);
  if (!from) return from.error();
  auto to = split_path(req.to, false);
  if (!to) return to.error();
  caf::error err;
  fd_guard from_dir{open_dir(*from, from->size() - 1, false, &err)};
  if (from_dir.fd < 0) return err;
  fd_guard to_dir{open_dir(*to, to->size() - 1, false, &err)};
  if (to_dir.fd < 0) return err;
  if (::renameat2(from_dir.fd, from->back().c_str(), to_dir.fd, to->back().c_str(),
                  req.overwrite ? 0 : RENAME_NOREPLACE) != 0) {
    if (errno == EINVAL)
      return make_error(errc::invalid_argument, "cannot move '" + req.from + "' into itself");
    return errno_error(errno, "cannot move", req.from + "' to '" + req.to);
  }
  return stat_at(to_dir.fd, to->back(), join(*to, to->size()));
}

namespace {

/// Names in directory `fd` (without "." and ".."); collected first, because moving entries out
/// of a directory while readdir walks it may skip some.
expected<std::vector<std::string>> names_in(int fd, const std::string& shown) {
  int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  DIR* d = copy >= 0 ? ::fdopendir(copy) : nullptr;
  if (!d) {
    if (copy >= 0) ::close(copy);
    return errno_error(errno, "cannot list", shown);
  }
  ::rewinddir(d);
  std::vector<std::string> out;
  while (auto* ent = ::readdir(d)) {
    std::string name = ent->d_name;
    if (name != "." && name != "..") out.push_back(std::move(name));
  }
  ::closedir(d);
  return out;
}

const char* special_type_name(mode_t mode) {
  if (S_ISFIFO(mode)) return "fifo";
  if (S_ISSOCK(mode)) return "socket";
  if (S_ISCHR(mode)) return "character device";
  if (S_ISBLK(mode)) return "block device";
  return "special file";
}

/// invalid_argument naming the first entry of the tree at `name` in `dir_fd` (`st` its stat)
/// that is neither a regular file, a directory nor a symlink.
caf::error check_keepable(int dir_fd, const std::string& name, const struct stat& st,
                          const std::string& path) {
  if (S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)) return {};
  if (!S_ISDIR(st.st_mode))
    return make_error(errc::invalid_argument,
                      "'" + path + "' is a " + special_type_name(st.st_mode) +
                          ": a workspace keeps only regular files, directories and symlinks");
  fd_guard sub{::openat(dir_fd, name.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC)};
  if (sub.fd < 0) return errno_error(errno, "cannot open directory", path);
  auto names = names_in(sub.fd, path);
  if (!names) return names.error();
  for (const auto& n : *names) {
    struct stat child {};
    std::string child_path = path + "/" + n;
    if (::fstatat(sub.fd, n.c_str(), &child, AT_SYMLINK_NOFOLLOW) != 0)
      return errno_error(errno, "cannot stat", child_path);
    if (auto err = check_keepable(sub.fd, n, child, child_path)) return err;
  }
  return {};
}

/// One level of workspace::merge_into: checks only (apply false) or moves (apply true).
caf::error merge_level(int from_fd, int into_fd, const std::string& shown, bool apply) {
  auto names = names_in(from_fd, shown);
  if (!names) return names.error();
  for (const auto& name : *names) {
    std::string path = shown.empty() ? name : shown + "/" + name;
    struct stat from_st {}, into_st {};
    if (::fstatat(from_fd, name.c_str(), &from_st, AT_SYMLINK_NOFOLLOW) != 0)
      return errno_error(errno, "cannot stat", path);
    if (::fstatat(into_fd, name.c_str(), &into_st, AT_SYMLINK_NOFOLLOW) != 0) {
      if (errno != ENOENT) return errno_error(errno, "cannot stat", path);
      // Moved whole: its tree is checked here (a merged directory is checked level by level).
      if (!apply)
        if (auto err = check_keepable(from_fd, name, from_st, path)) return err;
      if (apply && ::renameat(from_fd, name.c_str(), into_fd, name.c_str()) != 0)
        return errno_error(errno, "cannot move into place", path);
      continue;
    }
    bool from_dir = S_ISDIR(from_st.st_mode), into_dir = S_ISDIR(into_st.st_mode);
    if (from_dir != into_dir)
      return make_error(errc::invalid_argument,
                        "'" + path + "' would replace a " + (into_dir ? "directory" : "non-directory") +
                            " by a " + (from_dir ? "directory" : "non-directory"));
    if (!from_dir) {
      if (!apply)
        if (auto err = check_keepable(from_fd, name, from_st, path)) return err;
      if (apply && ::renameat(from_fd, name.c_str(), into_fd, name.c_str()) != 0)
        return errno_error(errno, "cannot move into place", path);
      continue;
    }
    fd_guard from_sub{::openat(from_fd, name.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC)};
    fd_guard into_sub{::openat(into_fd, name.c_str(), O_DIRECTORY | O_RDONLY | O_NOFOLLOW | O_CLOEXEC)};
    if (from_sub.fd < 0 || into_sub.fd < 0) return errno_error(errno, "cannot open directory", path);
    if (auto err = merge_level(from_sub.fd, into_sub.fd, path, apply)) return err;
  }
  return {};
}

} // namespace

caf::error workspace::merge_into(const std::string& from, const std::string& into) {
  auto from_names = split_path(from, false);
  if (!from_names) return from_names.error();
  auto into_names = split_path(into, true);
  if (!into_names) return into_names.error();
  if (into_names->size() >= from_names->size() &&
      std::equal(from_names->begin(), from_names->end(), into_names->begin()))
    return make_error(errc::invalid_argument, "cannot merge '" + from + "' into itself");
  caf::error err;
  fd_guard from_fd{open_dir(*from_names, from_names->size(), false, &err)};
  if (from_fd.fd < 0) return err;
  fd_guard into_fd{open_dir(*into_names, into_names->size(), false, &err)};
  if (into_fd.fd < 0) return err;
  if (auto check = merge_level(from_fd.fd, into_fd.fd, "", false)) return check;
  return merge_level(from_fd.fd, into_fd.fd, "", true);
}

caf::error remove_tree(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);  // removes symlinks themselves, never their targets
  if (ec) return make_error(errc::io_error, "cannot remove '" + path + "': " + ec.message());
  return {};
}

} // namespace triplane::actors::session
