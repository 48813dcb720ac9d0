// Model specification: the `--layers` grammar, activations and losses.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace shardprop {

enum class Activation { identity, sigmoid, tanh, relu, softmax };
enum class Loss { xent, bce, mse };

std::string_view to_string(Activation a);
std::string_view to_string(Loss l);
// Parses an activation or loss name; throws naming the value on an unknown one.
Activation parse_activation(std::string_view name);
Loss parse_loss(std::string_view name);

// One dense layer: Z = X·W + b, A = act(Z), W of shape (in, out). A hidden layer may drop
// each unit of A with probability `dropout` while training, scaling the rest by
// 1/(1 − dropout) (inverted dropout; evaluation keeps every unit).
struct LayerSpec {
  std::size_t in = 0;
  std::size_t out = 0;
  Activation activation = Activation::identity;
  double dropout = 0;
};

// A whole network: the input width, then one dense layer per further `--layers` entry.
struct ModelSpec {
  std::vector<LayerSpec> layers;
  Loss loss = Loss::xent;

  std::size_t input_width() const { return layers.front().in; }
  std::size_t output_width() const { return layers.back().out; }
  Activation output_activation() const { return layers.back().activation; }
  // The `--layers` string this spec parses from (round-trips through parse_model).
  std::string layers_string() const;
  // Number of trainable scalars (weights and biases, no padding).
  std::size_t parameter_count() const;
  // Whether a layer drops units while training.
  bool has_dropout() const;
};

// Parses `width[:activation][:dropout=R],...`: the first entry is the input width and takes
// no activation; hidden entries default to relu, the last one to softmax; a hidden entry may
// drop units with probability R in [0, 1). Throws UsageError.
std::vector<LayerSpec> parse_layers(std::string_view layers);
// The `--layers` text of `layers` (round-trips through parse_layers).
std::string layers_string(const std::vector<LayerSpec>& layers);

// parse_layers, then checks that `loss` fits the output activation: xent needs softmax, bce
// needs sigmoid, mse needs identity. Throws UsageError.
ModelSpec parse_model(std::string_view layers, std::string_view loss);

}  // namespace shardprop
