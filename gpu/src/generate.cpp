// Single-request generation and the `triplane generate` command line.
#include "triplane/gpu/generate.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "triplane/gpu/checkpoint.hpp"
#include "triplane/gpu/safetensors.hpp"

namespace triplane::gpu {

expected<generate_result> generate(backend& engine, const generate_request& request, sequence_id id) {
  if (request.prompt.empty()) return make_error(errc::invalid_argument, "the prompt is empty");
  if (request.max_new_tokens < 0) return make_error(errc::invalid_argument, "max_new_tokens must be >= 0");
  if (request.prefill_chunk < 0) return make_error(errc::invalid_argument, "prefill_chunk must be >= 0");
  if (auto err = validate(request.sampling)) return err;
  if (auto err = engine.add_sequence(id)) return err;
  struct release {
    backend& engine;
    sequence_id id;
    ~release() { engine.free_sequence(id); }
  } guard{engine, id};

  const int64_t vocab = engine.config().vocab_size;
  generate_result result;
  sampler pick(request.sampling);
  // Prefill, in chunks; the last chunk's last row gives the first generated token.
  std::vector<float> last;
  const auto prompt_len = static_cast<int64_t>(request.prompt.size());
  const int64_t chunk = request.prefill_chunk > 0 ? request.prefill_chunk : prompt_len;
  for (int64_t begin = 0; begin < prompt_len; begin += chunk) {
    int64_t end = std::min(prompt_len, begin + chunk);
    step_item item{id, std::vector<int32_t>(request.prompt.begin() + begin, request.prompt.begin() + end),
                   request.keep_prompt_logits};
    auto logits = engine.forward({item});
    if (!logits) return logits.error();
    auto& values = (*logits)[0].values;
    if (request.keep_prompt_logits)
      result.prompt_logits.insert(result.prompt_logits.end(), values.begin(), values.end());
    last.assign(values.end() - vocab, values.end());
  }
  for (int64_t i = 0; i < request.max_new_tokens; ++i) {
    int32_t token = pick.sample(last.data(), vocab);
    result.tokens.push_back(token);
    if (std::find(request.stop_tokens.begin(), request.stop_tokens.end(), token) != request.stop_tokens.end()) {
      result.stopped = true;
      break;
    }
    if (i + 1 == request.max_new_tokens) break;
    auto logits = engine.forward({step_item{id, {token}, false}});
    if (!logits) return logits.error();
    last = std::move((*logits)[0].values);
  }
  return result;
}

std::string generate_usage() {
  return "usage: triplane generate --model DIR --tokens ID,ID,... [options]\n"
         "  --model DIR            Hugging Face Llama directory (config.json + safetensors)\n"
         "  --tokens LIST          prompt token ids, comma-separated\n"
         "  --max-new-tokens N     tokens to generate (default 16)\n"
         "  --backend cpu|cuda     (default cpu)\n"
         "  --tp N                 tensor-parallel ranks (default 1)\n"
         "  --temperature T        0 = greedy (default 0)\n"
         "  --seed S               sampling seed (default 0)\n"
         "  --top-k K              0 = off (default 0)\n"
         "  --top-p P              1 = off (default 1)\n"
         "  --stop-tokens LIST     stop after emitting one of these ids\n"
         "  --threads N            CPU threads (default: all)\n"
         "  --kv-cache-mb N        KV cache budget per rank in MiB (default 256)\n"
         "  --prefill-chunk N      prompt tokens per engine step (default: the whole prompt)\n"
         "  --dump-logits FILE     write the prompt's logits (F32 [T, vocab], tensor 'logits')\n"
         "  --help                 this text\n"
         "Prints the generated ids, comma-separated, on one line.\n";
}

namespace {

bool parse_int(const std::string& s, int64_t min, int64_t max, int64_t& out) {
  if (s.empty() || !(std::isdigit(static_cast<unsigned char>(s[0])) || s[0] == '-')) return false;
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end != s.c_str() + s.size() || v < min || v > max) return false;
  out = v;
  return true;
}

bool parse_float(const std::string& s, float& out) {
  if (s.empty() || !(std::isdigit(static_cast<unsigned char>(s[0])) || s[0] == '-' || s[0] == '.')) return false;
  errno = 0;
  char* end = nullptr;
  float v = std::strtof(s.c_str(), &end);
  if (errno != 0 || end != s.c_str() + s.size() || !std::isfinite(v)) return false;
  out = v;
  return true;
}

bool parse_id_list(const std::string& s, std::vector<int32_t>& out) {
  out.clear();
  size_t start = 0;
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    int64_t v = 0;
    if (!parse_int(s.substr(start, comma - start), 0, std::numeric_limits<int32_t>::max(), v)) return false;
    out.push_back(static_cast<int32_t>(v));
    start = comma + 1;
  }
  return !out.empty();
}

} // namespace

int run_generate_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::string model_dir, dump_path;
  generate_request request;
  backend_options options;
  bool have_tokens = false;
  auto usage_error = [&](const std::string& msg) {
    err << "triplane generate: " << msg << "\n" << generate_usage();
    return 2;
  };
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--help" || flag == "-h") {
      out << generate_usage();
      return 0;
    }
    if (flag.rfind("--", 0) != 0) return usage_error("unexpected argument '" + flag + "'");
    if (i + 1 >= args.size()) return usage_error(flag + " needs a value");
    const std::string& value = args[++i];
    int64_t n = 0;
    auto bad_value = [&](const std::string& what) { return usage_error(flag + " '" + value + "': " + what); };
    if (flag == "--model") {
      model_dir = value;
    } else if (flag == "--tokens") {
      if (!parse_id_list(value, request.prompt)) return bad_value("expected comma-separated non-negative ids");
      have_tokens = true;
    } else if (flag == "--max-new-tokens") {
      if (!parse_int(value, 0, 1 << 24, n)) return bad_value("expected an integer >= 0");
      request.max_new_tokens = n;
    } else if (flag == "--backend") {
      if (value == "cpu") options.kind = backend_kind::cpu;
      else if (value == "cuda") options.kind = backend_kind::cuda;
      else return bad_value("expected cpu or cuda");
    } else if (flag == "--tp") {
      if (!parse_int(value, 1, 64, n)) return bad_value("expected an integer in [1, 64]");
      options.tensor_parallel = static_cast<int>(n);
    } else if (flag == "--temperature") {
      if (!parse_float(value, request.sampling.temperature) || request.sampling.temperature < 0)
        return bad_value("expected a number >= 0");
    } else if (flag == "--seed") {
      if (!parse_int(value, 0, std::numeric_limits<int64_t>::max(), n)) return bad_value("expected an integer >= 0");
      request.sampling.seed = static_cast<uint64_t>(n);
    } else if (flag == "--top-k") {
      if (!parse_int(value, 0, 1 << 24, n)) return bad_value("expected an integer >= 0");
      request.sampling.top_k = n;
    } else if (flag == "--top-p") {
      if (!parse_float(value, request.sampling.top_p) || !(request.sampling.top_p > 0 && request.sampling.top_p <= 1))
        return bad_value("expected a number in (0, 1]");
    } else if (flag == "--stop-tokens") {
      if (!parse_id_list(value, request.stop_tokens)) return bad_value("expected comma-separated non-negative ids");
    } else if (flag == "--threads") {
      if (!parse_int(value, 1, 1024, n)) return bad_value("expected an integer in [1, 1024]");
      options.threads = static_cast<int>(n);
    } else if (flag == "--kv-cache-mb") {
      if (!parse_int(value, 1, int64_t{1} << 20, n)) return bad_value("expected an integer in [1, 1048576]");
      options.kv_cache_bytes = n << 20;
    } else if (flag == "--prefill-chunk") {
      if (!parse_int(value, 1, 1 << 24, n)) return bad_value("expected an integer >= 1");
      request.prefill_chunk = n;
    } else if (flag == "--dump-logits") {
      dump_path = value;
    } else {
      return usage_error("unknown option " + flag);
    }
  }
  if (model_dir.empty()) return usage_error("--model is required");
  if (!have_tokens) return usage_error("--tokens is required");

  auto weights = checkpoint::open(model_dir);
  if (!weights) {
    err << "triplane generate: " << describe(weights.error()) << "\n";
    return 1;
  }
  auto engine = make_backend(**weights, options);
  if (!engine) {
    err << "triplane generate: " << describe(engine.error()) << "\n";
    return 1;
  }
  weights->reset();  // the backend holds its own copy of the weights
  request.keep_prompt_logits = !dump_path.empty();
  auto result = generate(**engine, request);
  if (!result) {
    err << "triplane generate: " << describe(result.error()) << "\n";
    return 1;
  }
  if (!dump_path.empty()) {
    const int64_t vocab = (*engine)->config().vocab_size;
    auto rows = static_cast<int64_t>(request.prompt.size());
    if (auto e = write_safetensors(dump_path, {make_f32_tensor("logits", {rows, vocab}, result->prompt_logits)})) {
      err << "triplane generate: " << describe(e) << "\n";
      return 1;
    }
  }
  for (size_t i = 0; i < result->tokens.size(); ++i) out << (i ? "," : "") << result->tokens[i];
  out << "\n";
  return 0;
}

} // namespace triplane::gpu
