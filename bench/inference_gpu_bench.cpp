// CUDA backend throughput on a random model with Llama-3.2-1B's exact shapes in bf16: decode
// tok/s at several batch sizes (128-token prompts, 128 new tokens), prefill tok/s, time to first
// token at 128 and 1024 prompt tokens; beside them, in the same run, the device-to-device copy
// bandwidth and the batch-1 roofline it implies (a decode step reads every weight once:
// tok/s <= bandwidth / weight bytes). Without a GPU it says so and exits 0.
//
//   bench_inference_gpu [--json FILE] [--model-dir DIR] [--batches 1,16,64,256] [--new-tokens N] [--quick]
//                       [--write-model-only] [--tiny]
// --write-model-only writes (and opens) the random model and stops: it needs no GPU. --tiny uses
// small shapes (for checking the writer).
//
// Timings are host wall-clock around backend::forward, which returns after the device finished
// and the float32 logits reached the host; greedy argmax runs on the host (timed separately).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "triplane/gpu/backend.hpp"
#include "triplane/gpu/checkpoint.hpp"
#include "triplane/gpu/random_model.hpp"
#include "triplane/gpu/cuda_device.hpp"
#include "triplane/gpu/safetensors.hpp"
#include "triplane/gpu/sampler.hpp"

using namespace triplane::gpu;
using clock_type = std::chrono::steady_clock;

namespace {

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "bench_inference_gpu: %s\n", what.c_str());
  std::exit(1);
}

// Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json).
struct shape {
  int64_t vocab = 128256, hidden = 2048, layers = 16, heads = 32, kv_heads = 8, head_dim = 64, mlp = 8192;
};

// Writes the random bf16 model unless `dir` already holds one (reused between runs).
void ensure_random_model(const std::string& dir, const shape& s) {
  if (std::filesystem::exists(dir + "/model.safetensors") && std::filesystem::exists(dir + "/config.json")) return;
  random_llama_spec spec;
  spec.vocab_size = s.vocab;
  spec.hidden_size = s.hidden;
  spec.intermediate_size = s.mlp;
  spec.num_layers = s.layers;
  spec.num_heads = s.heads;
  spec.num_kv_heads = s.kv_heads;
  spec.head_dim = s.head_dim;
  spec.max_position_embeddings = 131072;
  spec.llama3_rope_scaling = true;
  // Uniform in +-0.02*sqrt(3) (standard deviation 0.02, as transformers' initializer_range), drawn
  // with xorshift64 and rounded to bf16 directly: 1.2 G values in seconds. Norms are 1.
  uint64_t state = 0x9E3779B97F4A7C15ull;
  const float bound = 0.02f * std::sqrt(3.0f);
  auto next = [&](bool norm) {
    if (norm) return 1.0f;
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (static_cast<float>(state >> 40) / 16777216.0f * 2.0f - 1.0f) * bound;
  };
  if (auto err = write_random_llama(dir, spec, next)) fail(triplane::describe(err));
}

// Bytes one batch-1 decode step must read: every weight once (the tied head reads the whole
// embedding; the embedding lookup reads one row, counted in the head).
double decode_weight_bytes(const model_config& c) {
  const double per_layer = static_cast<double>(c.hidden_size) * (c.q_size() + 2 * c.kv_size()) +
                           static_cast<double>(c.q_size()) * c.hidden_size +
                           3.0 * c.hidden_size * c.intermediate_size + 2.0 * c.hidden_size;
  return 2.0 * (per_layer * c.num_layers + c.hidden_size + static_cast<double>(c.vocab_size) * c.hidden_size);
}

// Greedy next tokens of every item, with the host's threads over the rows.
void argmax_rows(const std::vector<step_logits>& logits, int64_t vocab, std::vector<step_item>& items) {
  const size_t n = items.size();
  const size_t threads = std::min<size_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (size_t i = t; i < n; i += threads) {
        const auto& v = logits[i].values;
        items[i].tokens = {argmax(v.data() + v.size() - static_cast<size_t>(vocab), vocab)};
      }
    });
  for (auto& th : pool) th.join();
}

struct figure {
  std::string name;
  int batch = 0;
  int64_t prompt = 0, tokens = 0;
  double seconds = 0, rate = 0;  // rate: tok/s, or seconds for ttft
  double host_seconds = 0;       // of which host argmax (decode)
  double roofline = 0;           // tok/s bound (batch-1 decode)
};

std::vector<int> parse_list(const std::string& text) {
  std::vector<int> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::max(1, std::atoi(item.c_str())));
  return out;
}

} // namespace

int main(int argc, char** argv) {
  std::string json_path, model_dir = "/tmp/triplane-llama-3.2-1b-random";
  std::vector<int> batches = {1, 16, 64, 256};
  int new_tokens = 128;
  bool write_only = false;
  shape s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) json_path = argv[++i];
    else if (a == "--model-dir" && i + 1 < argc) model_dir = argv[++i];
    else if (a == "--batches" && i + 1 < argc) batches = parse_list(argv[++i]);
    else if (a == "--new-tokens" && i + 1 < argc) new_tokens = std::max(4, std::atoi(argv[++i]));
    else if (a == "--quick") new_tokens = 16;
    else if (a == "--write-model-only") write_only = true;
    else if (a == "--tiny") s = shape{1000, 256, 2, 4, 2, 64, 512};
    else {
      std::fprintf(stderr, "usage: bench_inference_gpu [--json FILE] [--model-dir DIR] [--batches 1,16,64,256] "
                           "[--new-tokens N] [--quick] [--write-model-only] [--tiny]\n");
      return 2;
    }
  }
  auto write_json = [&](const std::string& body) {
    if (json_path.empty()) return;
    std::ofstream j(json_path);
    j << body << "\n";
    if (!j) fail("cannot write " + json_path);
  };

  if (write_only) {
    auto t0 = clock_type::now();
    ensure_random_model(model_dir, s);
    auto ckpt = checkpoint::open(model_dir);
    if (!ckpt) fail(triplane::describe(ckpt.error()));
    std::printf("%s: %.3f GB of weights (%s), rope %s, written and opened in %.1f s\n", model_dir.c_str(),
                (*ckpt)->weight_bytes() / 1e9, dtype_name((*ckpt)->weight_dtype()),
                (*ckpt)->config().rope.kind == rope_kind::llama3 ? "llama3" : "other", seconds_since(t0));
    return 0;
  }

  const cuda_devices devices = query_cuda_devices();
  if (devices.count == 0) {
    std::printf("no GPU: skipped (%s)\n", devices.why.c_str());
    write_json("{\"skipped\": true, \"reason\": \"no GPU\"}");
    return 0;
  }
  std::printf("device: %s, %.1f GiB\n", devices.name.c_str(), devices.memory_bytes / double(1 << 30));

  // The floor: a 2 GiB device-to-device copy (larger than L2 many times over).
  auto bandwidth = measure_copy_bandwidth(0, int64_t{2} << 30, 20);
  if (!bandwidth) fail(triplane::describe(bandwidth.error()));
  std::printf("device-to-device copy: %.2f TB/s (bytes read + written)\n", *bandwidth / 1e12);

  auto t0 = clock_type::now();
  ensure_random_model(model_dir, s);
  auto ckpt = checkpoint::open(model_dir);
  if (!ckpt) fail(triplane::describe(ckpt.error()));
  backend_options opts;
  opts.kind = backend_kind::cuda;
  const int64_t prompt = 128;
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  // Room for the largest batch's sequences (prompt + new tokens each), plus slack for block rounding.
  const int64_t kv_per_token = 2 * s.layers * s.kv_heads * s.head_dim * 2;
  opts.kv_cache_bytes = std::max<int64_t>(int64_t{max_batch} * (prompt + new_tokens + 32), 2048) * kv_per_token;
  auto engine = make_backend(**ckpt, opts);
  if (!engine) fail(triplane::describe(engine.error()));
  backend& b = **engine;
  const model_config& c = b.config();
  const double weight_bytes = decode_weight_bytes(c);
  const double roofline = *bandwidth / weight_bytes;
  std::printf("model: Llama-3.2-1B shapes, bf16, %.2f GB of weights read per decode step; set-up %.1f s\n",
              weight_bytes / 1e9, seconds_since(t0));

  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(c.vocab_size - 1));
  auto random_prompt = [&](int64_t n) {
    std::vector<int32_t> out(static_cast<size_t>(n));
    for (auto& t : out) t = token(rng);
    return out;
  };
  sequence_id next_id = 1;
  std::vector<figure> figures;
  auto check = [](const auto& result) {
    if (!result) fail(triplane::describe(result.error()));
  };

  // Warm-up: cuBLAS handles, heuristics, the scratch buffers of the largest shapes.
  {
    const sequence_id id = next_id++;
    b.add_sequence(id);
    check(b.forward({{id, random_prompt(prompt), false}}));
    for (int i = 0; i < 3; ++i) check(b.forward({{id, {token(rng)}, false}}));
    b.free_sequence(id);
  }

  // Time to first token: one prompt alone, the median of 3.
  for (int64_t length : {int64_t{128}, int64_t{1024}}) {
    std::vector<double> times;
    for (int rep = 0; rep < 3; ++rep) {
      const sequence_id id = next_id++;
      b.add_sequence(id);
      step_item item{id, random_prompt(length), false};
      auto start = clock_type::now();
      auto out = b.forward({item});
      check(out);
      argmax((*out)[0].values.data(), c.vocab_size);
      times.push_back(seconds_since(start));
      b.free_sequence(id);
    }
    std::sort(times.begin(), times.end());
    figures.push_back({"ttft", 1, length, length, times[1], times[1], 0, 0});
  }

  for (int batch : batches) {
    std::vector<step_item> items;
    for (int i = 0; i < batch; ++i) {
      const sequence_id id = next_id++;
      b.add_sequence(id);
      items.push_back({id, random_prompt(prompt), false});
    }
    auto start = clock_type::now();
    auto out = b.forward(items);
    check(out);
    const double prefill_s = seconds_since(start);
    figures.push_back({"prefill", batch, prompt, batch * prompt, prefill_s, batch * prompt / prefill_s, 0, 0});
    argmax_rows(*out, c.vocab_size, items);
    double forward_s = 0, host_s = 0;
    for (int step = 1; step < new_tokens; ++step) {  // the prefill produced the first new token
      start = clock_type::now();
      out = b.forward(items);
      check(out);
      forward_s += seconds_since(start);
      start = clock_type::now();
      argmax_rows(*out, c.vocab_size, items);
      host_s += seconds_since(start);
    }
    const int64_t decoded = int64_t{batch} * (new_tokens - 1);
    figure f{"decode", batch, prompt, decoded, forward_s + host_s, decoded / (forward_s + host_s), host_s, 0};
    if (batch == 1) f.roofline = roofline;
    figures.push_back(f);
    for (auto& item : items) b.free_sequence(item.sequence);
  }

  std::printf("\n%-8s %6s %7s %8s %10s %12s %10s %14s %9s\n", "phase", "batch", "prompt", "tokens", "seconds",
              "tok/s | ms", "host s", "roofline tok/s", "fraction");
  for (const auto& f : figures) {
    std::printf("%-8s %6d %7lld %8lld %10.4f", f.name.c_str(), f.batch, static_cast<long long>(f.prompt),
                static_cast<long long>(f.tokens), f.seconds);
    if (f.name == "ttft") std::printf(" %9.2f ms %10s", f.rate * 1e3, "-");
    else std::printf(" %12.1f %10.4f", f.rate, f.host_seconds);
    if (f.roofline > 0) std::printf(" %14.1f %9.3f\n", f.roofline, f.rate / f.roofline);
    else std::printf(" %14s %9s\n", "-", "-");
  }
  std::printf("(decode tok/s include the host argmax over float32 logits; 'host s' is that part)\n");

  std::ostringstream j;
  j << "{\"device\": \"" << devices.name << "\", \"copy_bandwidth_bytes_per_s\": " << *bandwidth
    << ", \"weight_bytes_per_decode_step\": " << weight_bytes << ", \"batch1_roofline_tok_s\": " << roofline
    << ", \"figures\": [";
  for (size_t i = 0; i < figures.size(); ++i) {
    const auto& f = figures[i];
    j << (i ? ", " : "") << "{\"phase\": \"" << f.name << "\", \"batch\": " << f.batch << ", \"prompt\": " << f.prompt
      << ", \"tokens\": " << f.tokens << ", \"seconds\": " << f.seconds;
    if (f.name == "ttft") j << ", \"ttft_s\": " << f.rate;
    else j << ", \"tok_s\": " << f.rate << ", \"host_argmax_s\": " << f.host_seconds;
    if (f.roofline > 0) j << ", \"roofline_tok_s\": " << f.roofline << ", \"fraction_of_roofline\": " << f.rate / f.roofline;
    j << "}";
  }
  j << "]}";
  write_json(j.str());
  return 0;
}
