// Greedy and temperature / top-k / top-p sampling.
#include "triplane/gpu/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace triplane::gpu {

caf::error validate(const sampling_params& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0)
    return make_error(errc::invalid_argument, "temperature must be a finite number >= 0");
  if (p.top_k < 0) return make_error(errc::invalid_argument, "top_k must be >= 0");
  if (!(p.top_p > 0 && p.top_p <= 1)) return make_error(errc::invalid_argument, "top_p must be in (0, 1]");
  return caf::none;
}

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

sampler::sampler(const sampling_params& params) : params_(params), rng_(params.seed) {}

double sampler::uniform() {
  return static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0);
}

int32_t sampler::sample(const float* logits, int64_t n) {
  if (params_.temperature <= 0 || params_.top_k == 1) return argmax(logits, n);
  // Candidates sorted by logit, descending (ties: lower index first, so the order is total).
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  size_t keep = order.size();
  if (params_.top_k > 0 && params_.top_k < n) {
    keep = static_cast<size_t>(params_.top_k);
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(), by_logit);
  } else {
    std::sort(order.begin(), order.end(), by_logit);
  }
  order.resize(keep);
  // Softmax of logits / temperature over the candidates, in double for a stable cut-off.
  std::vector<double> probs(keep);
  const double top = logits[order[0]];
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((static_cast<double>(logits[order[i]]) - top) / params_.temperature);
    sum += probs[i];
  }
  for (auto& p : probs) p /= sum;
  if (params_.top_p < 1) {
    double cumulative = 0;
    size_t cut = keep;
    for (size_t i = 0; i < keep; ++i) {
      cumulative += probs[i];
      if (cumulative >= params_.top_p) {
        cut = i + 1;
        break;
      }
    }
    probs.resize(cut);
    order.resize(cut);
    double renorm = std::accumulate(probs.begin(), probs.end(), 0.0);
    for (auto& p : probs) p /= renorm;
  }
  double u = uniform();
  double cumulative = 0;
  for (size_t i = 0; i < probs.size(); ++i) {
    cumulative += probs[i];
    if (u < cumulative) return order[i];
  }
  return order.back();
}

} // namespace triplane::gpu
