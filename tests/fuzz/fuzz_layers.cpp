// The --layers/--loss parser on arbitrary text: a spec that round-trips through its own
// layers_string() and whose every layer fits one MPI call, or shardprop::Error.
#include <climits>
#include <string>

#include "shardprop/error.hpp"
#include "shardprop/spec.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace sp = shardprop;
  const std::string text(reinterpret_cast<const char*>(data), size);
  const std::size_t bar = text.find('|');  // "LAYERS|LOSS"; the loss defaults to xent
  const std::string layers = text.substr(0, bar);
  const std::string loss = bar == std::string::npos ? "xent" : text.substr(bar + 1);
  try {
    const sp::ModelSpec spec = sp::parse_model(layers, loss);
    if (spec.layers.empty()) std::abort();
    for (const sp::LayerSpec& l : spec.layers) {
      if (l.in == 0 || l.out == 0 || (l.in + 1) * l.out > std::size_t(INT_MAX)) std::abort();
    }
    const sp::ModelSpec again = sp::parse_model(spec.layers_string(), sp::to_string(spec.loss));
    if (again.layers_string() != spec.layers_string() || again.loss != spec.loss) std::abort();
  } catch (const sp::Error&) {
  }
  return 0;
}
