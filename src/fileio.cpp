#include "fileio.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "shardprop/error.hpp"

namespace shardprop::fileio {

namespace fs = std::filesystem;

namespace {

// A file descriptor closed on destruction.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now; returns close()'s errno, or 0.
  int close() {
    const int rc = ::close(std::exchange(fd_, -1));
    return rc == 0 ? 0 : errno;
  }

 private:
  int fd_;
};

void fsync_path(const std::string& path, int flags) {
  Fd fd(::open(path.c_str(), flags | O_CLOEXEC));
  SP_CHECK(fd.get() >= 0, path, ": cannot open to sync: ", std::strerror(errno));
  SP_CHECK(::fsync(fd.get()) == 0, path, ": fsync failed: ", std::strerror(errno));
}

}  // namespace

std::vector<std::byte> read_bytes(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  SP_CHECK(fd.get() >= 0, path, ": cannot open: ", std::strerror(errno));
  struct stat info {};
  SP_CHECK(::fstat(fd.get(), &info) == 0, path, ": cannot stat: ", std::strerror(errno));
  SP_CHECK(S_ISREG(info.st_mode), path, ": not a regular file");
  std::vector<std::byte> bytes(static_cast<std::size_t>(info.st_size));
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::read(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    SP_CHECK(n >= 0, path, ": read failed: ", std::strerror(errno));
    SP_CHECK(n > 0, path, ": shorter than its size (", done, " of ", bytes.size(), " bytes)");
    done += std::size_t(n);
  }
  return bytes;
}

void write_bytes(const std::string& path, std::span<const std::byte> bytes) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  SP_CHECK(fd.get() >= 0, path, ": cannot create: ", std::strerror(errno));
  std::size_t done = 0;
  int err = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n < 0 ? errno : EIO;
      break;
    }
    done += std::size_t(n);
  }
  const int closed = fd.close();  // NFS may report write errors here
  if (err == 0) err = closed;
  SP_CHECK(err == 0, path, ": write failed: ", std::strerror(err));
}

void write_atomically(const std::string& path,
                      const std::function<void(const std::string&)>& write) {
  const fs::path target(path);
  fs::path tmp = target;
  tmp += ".tmp";
  try {
    write(tmp.string());
    fsync_path(tmp.string(), O_RDONLY);
  } catch (...) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    SP_THROW(path, ": cannot rename ", tmp.string(), " into place: ", ec.message());
  }
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  fsync_path(dir.string(), O_RDONLY | O_DIRECTORY);
}

void check_replaceable(const std::string& flag, const std::string& path,
                       const std::function<bool()>& ours) {
  std::error_code ec;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  SP_CHECK_USAGE(fs::is_directory(dir, ec), flag, " ", path, ": directory ", dir.string(),
                 " does not exist");
  if (!fs::exists(target, ec)) return;
  bool replaceable = false;
  try {
    replaceable = fs::is_regular_file(target, ec) && ours();
  } catch (const Error&) {
  }
  SP_CHECK_USAGE(replaceable, flag, " ", path, ": exists and is not a file this command "
                 "writes; not overwriting it");
}

}  // namespace shardprop::fileio
