// Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a
// per-request seeded generator, so the same request with the same seed yields the same tokens.
#pragma once

#include <cstdint>
#include <random>

#include "triplane/runtime/error.hpp"

namespace triplane::gpu {

struct sampling_params {
  float temperature = 0.0f;  ///< <= 0: greedy (argmax). Otherwise logits are divided by it.
  int64_t top_k = 0;         ///< keep the k most likely tokens; 0: no limit
  float top_p = 1.0f;        ///< keep the smallest set whose probability reaches top_p; 1: no limit
  uint64_t seed = 0;
};

/// Errors (invalid_argument): temperature not finite or negative, top_k < 0, top_p outside (0, 1].
caf::error validate(const sampling_params& params);

/// Index of the largest logit; the lowest index among equals. n >= 1.
int32_t argmax(const float* logits, int64_t n);

/// One request's sampler. Deterministic: its draws depend only on the seed and the logits seen.
class sampler {
public:
  explicit sampler(const sampling_params& params);
  /// Picks a token from `logits` (n >= 1 floats).
  int32_t sample(const float* logits, int64_t n);

private:
  double uniform();  ///< in [0, 1), from 53 random bits (same on every platform)
  sampling_params params_;
  std::mt19937_64 rng_;
};

} // namespace triplane::gpu
