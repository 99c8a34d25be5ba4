// Generating tokens for one request on a backend, and the `triplane generate` command built on it.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "triplane/gpu/backend.hpp"
#include "triplane/gpu/sampler.hpp"

namespace triplane::gpu {

struct generate_request {
  std::vector<int32_t> prompt;        ///< >= 1 token ids
  int64_t max_new_tokens = 16;        ///< >= 0
  sampling_params sampling;
  std::vector<int32_t> stop_tokens;   ///< generation ends after emitting one of these (it is kept)
  bool keep_prompt_logits = false;    ///< return the logits at every prompt position
  int64_t prefill_chunk = 0;          ///< prompt tokens per step; 0: the whole prompt at once
};

struct generate_result {
  std::vector<int32_t> tokens;        ///< generated ids (prompt excluded)
  bool stopped = false;               ///< ended on a stop token rather than max_new_tokens
  std::vector<float> prompt_logits;   ///< [prompt.size(), vocab] when keep_prompt_logits
};

/// Runs the request alone on `engine` as sequence `id` (which must be unused; it is freed on return,
/// also on error). Errors: those of validate(sampling), invalid_argument for an empty prompt or a
/// negative max_new_tokens, and whatever backend::forward reports.
expected<generate_result> generate(backend& engine, const generate_request& request, sequence_id id = 0);

/// `triplane generate`: parses `args` (the words after "generate"), runs, prints the generated ids
/// (comma-separated, one line) to `out` and diagnostics to `err`. Returns the process exit code:
/// 0 success, 2 bad usage, 1 any other failure. `--help` prints usage to `out` and returns 0.
int run_generate_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

/// The usage text of run_generate_command.
std::string generate_usage();

} // namespace triplane::gpu
