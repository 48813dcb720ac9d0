// Error reporting: one exception type carrying the rank and file:line of the throw site.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace shardprop {

// The rank printed in error messages; -1 until the communicator sets it.
int& error_rank();

// The one exception type of the library. what() is a single line.
class Error : public std::runtime_error {
 public:
  Error(const std::string& message, const char* file, int line);
  // The message without the location prefix, for user-facing output.
  const std::string& message() const { return message_; }

 private:
  std::string message_;
};

// A failure every rank knows about (see collective_check): on the lowest failing rank it
// carries that rank's error text and reports() is true; on the others reports() is false.
// Since no rank is left inside a collective, the job can end without MPI_Abort.
class CollectiveFailure : public std::runtime_error {
 public:
  CollectiveFailure(const std::string& what, bool reports)
      : std::runtime_error(what), reports_(reports) {}
  bool reports() const { return reports_; }

 private:
  bool reports_;
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
