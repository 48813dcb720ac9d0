#include "shardprop/error.hpp"

#include <cstring>

namespace shardprop {

namespace {
int process_rank = -1;
}  // namespace

void set_error_rank(int rank) { process_rank = rank; }
int error_rank() { return process_rank; }

namespace {
std::string located(const std::string& message, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  std::ostringstream out;
  if (error_rank() >= 0) out << "[rank " << error_rank() << "] ";
  out << message << " (" << (base ? base + 1 : file) << ":" << line << ")";
  return out.str();
}
}  // namespace

Error::Error(const std::string& message, const char* file, int line)
    : std::runtime_error(located(message, file, line)), message_(message) {}

}  // namespace shardprop
