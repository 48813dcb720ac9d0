// A non-owning reference to a callable `void(Args...)`, for callbacks on the training step's
// path: unlike std::function it never allocates. Empty means do nothing. The callable must
// outlive the reference.
#pragma once

namespace shardprop {

template <class... Args>
class FunctionRef {
 public:
  FunctionRef() = default;
  template <class F>
  FunctionRef(const F& f)  // NOLINT(google-explicit-constructor): used like a function argument
      : object_(&f), call_([](const void* o, Args... args) { (*static_cast<const F*>(o))(args...); }) {}
  explicit operator bool() const { return call_ != nullptr; }
  void operator()(Args... args) const {
    if (call_) call_(object_, args...);
  }

 private:
  const void* object_ = nullptr;
  void (*call_)(const void*, Args...) = nullptr;
};

// Work to run at a point of the step (between kernels, before a wait).
using Callback = FunctionRef<>;

}  // namespace shardprop
