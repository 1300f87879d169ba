// The one error type the program reports: a message for the user, printed as one `error: ...` line.
#pragma once

#include <stdexcept>
#include <string>

namespace mf {

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace mf
