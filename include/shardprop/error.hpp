// Error reporting: one exception type carrying the rank and file:line of the throw site.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace shardprop {

// The rank printed in error messages ("[rank 3] ..."): set once, by the program's main(),
// to its MPI_COMM_WORLD rank when there is more than one. -1 (the default) prints none.
void set_error_rank(int rank);
int error_rank();

// The exit statuses of the shardprop program (README, "Exit statuses").
enum ExitStatus : int {
  kExitSuccess = 0,
  kExitFailure = 1,  // a runtime failure: bad data, a lost rank, divergence, a full disk
  kExitUsage = 2,    // a bad flag, value or combination of them; nothing was run
  kExitStopped = 75  // stopped by a signal at a step boundary, resumable (EX_TEMPFAIL)
};

// The one exception type of the library. what() is a single line.
class Error : public std::runtime_error {
 public:
  Error(const std::string& message, const char* file, int line);
  // The message without the location prefix, for user-facing output.
  const std::string& message() const { return message_; }
  // The exit status the failure calls for.
  virtual int exit_status() const { return kExitFailure; }

 private:
  std::string message_;
};

// A flag, value or combination of them that cannot be used (exit status 2).
class UsageError : public Error {
 public:
  using Error::Error;
  int exit_status() const override { return kExitUsage; }
};

// A failure every rank knows about (see collective_check): on the lowest failing rank it
// carries that rank's error text and reports() is true; on the others reports() is false.
// Since no rank is left inside a collective, the job can end without MPI_Abort.
class CollectiveFailure : public std::runtime_error {
 public:
  CollectiveFailure(const std::string& what, bool reports, int exit_status = kExitFailure)
      : std::runtime_error(what), reports_(reports), exit_status_(exit_status) {}
  bool reports() const { return reports_; }
  // The reporting rank's status, the same on every rank.
  int exit_status() const { return exit_status_; }

 private:
  bool reports_;
  int exit_status_;
};

// A collective that did not complete within the communicator's timeout: some rank is
// stopped, hung or gone. The other ranks may still wait inside it, so only MPI_Abort can
// end the job.
class CollectiveTimeout : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}
}  // namespace detail

}  // namespace shardprop

// Throws shardprop::Error with a message built from the streamed arguments.
#define SP_THROW(...) \
  throw ::shardprop::Error(::shardprop::detail::concat(__VA_ARGS__), __FILE__, __LINE__)

// Throws unless cond holds.
#define SP_CHECK(cond, ...)   \
  do {                        \
    if (!(cond)) {            \
      SP_THROW(__VA_ARGS__);  \
    }                         \
  } while (false)

// Throws shardprop::UsageError: a flag or value that cannot be used.
#define SP_USAGE(...) \
  throw ::shardprop::UsageError(::shardprop::detail::concat(__VA_ARGS__), __FILE__, __LINE__)
#define SP_CHECK_USAGE(cond, ...) \
  do {                            \
    if (!(cond)) {                \
      SP_USAGE(__VA_ARGS__);      \
    }                             \
  } while (false)
