// Plain file I/O with errors that name the file and the cause: whole-file reads and
// writes, and atomic replacement (write a temporary, fsync, rename, fsync the directory).
#pragma once

#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace shardprop::fileio {

// The bytes of `path`; throws naming the file if it cannot be read.
std::vector<std::byte> read_bytes(const std::string& path);

// Writes `bytes` to `path` (created or truncated) with POSIX calls; throws naming the file
// and the cause, also for an error only close() reports.
void write_bytes(const std::string& path, std::span<const std::byte> bytes);

// Writes `path` through path.tmp: `write` fills the temporary file, which is then fsynced
// and renamed over `path`, and the directory fsynced, so `path` is never left half written
// and a file already there stays intact until the new one replaces it. A failure removes
// the temporary file.
void write_atomically(const std::string& path, const std::function<void(const std::string&)>& write);

// Checks that `path` may be written by a command whose flag is `flag`: its directory exists
// (so a long run does not fail at its end), and a file already there is one `ours` says
// this program wrote (so it replaces nothing else). Throws UsageError naming both.
void check_replaceable(const std::string& flag, const std::string& path,
                       const std::function<bool()>& ours);

}  // namespace shardprop::fileio
