// Synthetic Llama checkpoints with random weights, for tests, benchmarks and load tests: the
// tensors are exactly those checkpoint::open() requires, so the writer and the loader cannot
// drift apart.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "triplane/runtime/error.hpp"

namespace triplane::gpu {

struct random_llama_spec {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 4096;
  bool llama3_rope_scaling = false;  ///< Llama 3.1/3.2 rope_scaling: factor 32, original 8192
};

/// Draws the next weight value; `norm` is true for the RMSNorm weights (the 1-D tensors).
using weight_generator = std::function<float(bool norm)>;

/// Writes `dir`/config.json and `dir`/model.safetensors, creating `dir`: a bf16 Llama with tied
/// embeddings, rope_theta 500000 and rms_norm_eps 1e-5, whose tensors are
/// checkpoint::required_tensors() of that config, filled in order by `next`.
/// Errors: invalid_argument when the spec is not a valid Llama config (e.g. a zero dimension,
/// heads not a multiple of kv heads); io_error when a file cannot be written.
caf::error write_random_llama(const std::string& dir, const random_llama_spec& spec, const weight_generator& next);

} // namespace triplane::gpu
