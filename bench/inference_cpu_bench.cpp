// CPU backend throughput: prefill and decode tokens/s at several batch sizes for the tiny fixture
// and a random ~100M-parameter Llama, next to a memory-bandwidth roofline for batch-1 decode
// (each decode step reads every weight once, so tok/s <= bandwidth / weight bytes).
//
//   bench_inference_cpu [--json FILE] [--threads N] [--quick]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "triplane/gpu/backend.hpp"
#include "triplane/gpu/checkpoint.hpp"
#include "triplane/gpu/random_model.hpp"
#include "triplane/gpu/safetensors.hpp"
#include "triplane/gpu/sampler.hpp"

using namespace triplane::gpu;
using clock_type = std::chrono::steady_clock;

namespace {

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

struct figure {
  std::string model, phase;
  int batch = 0;
  int64_t prompt = 0, tokens = 0;
  double seconds = 0, tok_s = 0, roofline_tok_s = 0;
};

// Copy bandwidth with `threads` threads over a buffer of `bytes`: (bytes read + bytes written) / s.
double copy_bandwidth(size_t bytes, int threads) {
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = clock_type::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        size_t begin = bytes * t / threads, end = bytes * (t + 1) / threads;
        std::memcpy(dst.data() + begin, src.data() + begin, end - begin);
      });
    for (auto& th : pool) th.join();
    best = std::max(best, 2.0 * bytes / seconds_since(t0));
  }
  return best;
}

// Read bandwidth with `threads` threads streaming over `bytes` (summing floats): the floor of a
// decode step, which reads every weight once and writes almost nothing.
double read_bandwidth(size_t bytes, int threads) {
  std::vector<float> src(bytes / sizeof(float), 1.0f);
  std::vector<float> sums(static_cast<size_t>(threads));
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = clock_type::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        size_t begin = src.size() * t / threads, end = src.size() * (t + 1) / threads;
        float acc[16] = {};
        for (size_t i = begin; i + 16 <= end; i += 16)
          for (int j = 0; j < 16; ++j) acc[j] += src[i + j];
        float s = 0;
        for (float a : acc) s += a;
        sums[static_cast<size_t>(t)] = s;
      });
    for (auto& th : pool) th.join();
    best = std::max(best, bytes / seconds_since(t0));
  }
  return best;
}

// Writes a random BF16 Llama model (tied embeddings) to `dir`: weights ~ N(0, 0.02), norms 1.
void write_random_model(const std::string& dir, int64_t vocab, int64_t hidden, int64_t layers, int64_t heads,
                        int64_t kv_heads, int64_t mlp) {
  random_llama_spec spec;
  spec.vocab_size = vocab;
  spec.hidden_size = hidden;
  spec.intermediate_size = mlp;
  spec.num_layers = layers;
  spec.num_heads = heads;
  spec.num_kv_heads = kv_heads;
  spec.head_dim = hidden / heads;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  if (auto err = write_random_llama(dir, spec, [&](bool norm) { return norm ? 1.0f : normal(rng); })) {
    std::fprintf(stderr, "%s\n", triplane::describe(err).c_str());
    std::exit(1);
  }
}

// Prefill `batch` prompts of `prompt` tokens in one step, then `steps` lock-step decode steps.
void run_model(const std::string& name, const std::string& dir, int threads, int64_t prompt,
               const std::vector<int>& batches, int steps, double bandwidth, std::vector<figure>& out) {
  auto ckpt = checkpoint::open(dir);
  if (!ckpt) {
    std::fprintf(stderr, "%s\n", triplane::describe(ckpt.error()).c_str());
    std::exit(1);
  }
  backend_options opts;
  opts.threads = threads;
  opts.kv_cache_bytes = int64_t{512} << 20;
  auto engine = make_backend(**ckpt, opts);
  if (!engine) {
    std::fprintf(stderr, "%s\n", triplane::describe(engine.error()).c_str());
    std::exit(1);
  }
  const auto& cfg = (*engine)->config();
  // Bytes a decode step reads: every float32 weight once (the CPU backend holds float32).
  const int64_t per_layer = cfg.hidden_size * (cfg.q_size() + 2 * cfg.kv_size()) + cfg.q_size() * cfg.hidden_size +
                            3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size;
  const double weight_bytes =
      4.0 * (per_layer * cfg.num_layers + cfg.hidden_size + cfg.vocab_size * cfg.hidden_size);
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(cfg.vocab_size - 1));
  sequence_id next_id = 1;
  for (int batch : batches) {
    std::vector<step_item> items;
    for (int b = 0; b < batch; ++b) {
      step_item item{next_id++, {}, false};
      for (int64_t i = 0; i < prompt; ++i) item.tokens.push_back(token(rng));
      (*engine)->add_sequence(item.sequence);
      items.push_back(std::move(item));
    }
    auto t0 = clock_type::now();
    auto logits = (*engine)->forward(items);
    double prefill_s = seconds_since(t0);
    if (!logits) {
      std::fprintf(stderr, "%s\n", triplane::describe(logits.error()).c_str());
      std::exit(1);
    }
    out.push_back({name, "prefill", batch, prompt, batch * prompt, prefill_s, batch * prompt / prefill_s, 0});
    t0 = clock_type::now();
    for (int s = 0; s < steps; ++s) {
      for (size_t b = 0; b < items.size(); ++b)
        items[b].tokens = {argmax((*logits)[b].values.data(), cfg.vocab_size)};
      logits = (*engine)->forward(items);
      if (!logits) {
        std::fprintf(stderr, "%s\n", triplane::describe(logits.error()).c_str());
        std::exit(1);
      }
    }
    double decode_s = seconds_since(t0);
    figure f{name, "decode", batch, prompt, int64_t{batch} * steps, decode_s, batch * steps / decode_s, 0};
    if (batch == 1) f.roofline_tok_s = bandwidth / weight_bytes;
    out.push_back(f);
    for (auto& item : items) (*engine)->free_sequence(item.sequence);
  }
  std::printf("%s: %.1f M parameters, %.0f MB of float32 weights\n", name.c_str(), weight_bytes / 4 / 1e6,
              weight_bytes / 1e6);
}

} // namespace

int main(int argc, char** argv) {
  std::string json_path;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) json_path = argv[++i];
    else if (a == "--threads" && i + 1 < argc) threads = std::max(1, std::atoi(argv[++i]));
    else if (a == "--quick") quick = true;
    else {
      std::fprintf(stderr, "usage: bench_inference_cpu [--json FILE] [--threads N] [--quick]\n");
      return 2;
    }
  }
  // Measured floors over a buffer as large as the 100M model's float32 weights: the read
  // bandwidth gives the batch-1 decode roofline; the memcpy figure is printed beside it.
  const double copy = copy_bandwidth(size_t{400} << 20, threads);
  const double bandwidth = read_bandwidth(size_t{400} << 20, threads);
  std::printf("threads %d, read bandwidth %.2f GB/s, memcpy %.2f GB/s (bytes read + written)\n", threads,
              bandwidth / 1e9, copy / 1e9);

  std::vector<figure> figures;
  run_model("tiny-llama-f32", std::string(TRIPLANE_FIXTURES_DIR) + "/llama/tiny-llama-f32", threads, 128,
            {1, 4, 16}, quick ? 16 : 64, bandwidth, figures);
  char tmpl[] = "/tmp/triplane-bench-XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  write_random_model(dir, 32000, 768, 12, 12, 4, 2048);
  run_model("llama-100m-random", dir, threads, quick ? 32 : 128, {1, 4, 16}, quick ? 4 : 16, bandwidth, figures);
  std::filesystem::remove_all(dir);

  std::printf("\n%-20s %-8s %6s %7s %8s %10s %12s %14s %9s\n", "model", "phase", "batch", "prompt", "tokens", "seconds",
              "tok/s", "roofline tok/s", "fraction");
  for (const auto& f : figures) {
    std::printf("%-20s %-8s %6d %7lld %8lld %10.4f %12.1f", f.model.c_str(), f.phase.c_str(), f.batch,
                static_cast<long long>(f.prompt), static_cast<long long>(f.tokens), f.seconds, f.tok_s);
    if (f.roofline_tok_s > 0) std::printf(" %14.1f %9.2f\n", f.roofline_tok_s, f.tok_s / f.roofline_tok_s);
    else std::printf(" %14s %9s\n", "-", "-");
  }
  if (!json_path.empty()) {
    std::ofstream j(json_path);
    j << "{\"threads\": " << threads << ", \"read_bandwidth_bytes_per_s\": " << bandwidth
      << ", \"memcpy_bandwidth_bytes_per_s\": " << copy << ", \"figures\": [";
    for (size_t i = 0; i < figures.size(); ++i) {
      const auto& f = figures[i];
      j << (i ? ", " : "") << "{\"model\": \"" << f.model << "\", \"phase\": \"" << f.phase
        << "\", \"batch\": " << f.batch << ", \"prompt\": " << f.prompt << ", \"tokens\": " << f.tokens
        << ", \"seconds\": " << f.seconds << ", \"tok_s\": " << f.tok_s
        << ", \"roofline_tok_s\": " << f.roofline_tok_s << "}";
    }
    j << "]}\n";
    if (!j) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
  }
  return 0;
}
