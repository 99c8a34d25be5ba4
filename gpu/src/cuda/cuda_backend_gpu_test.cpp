// The CUDA backend end to end on the reference fixtures: logits and greedy tokens against
// transformers, against the CPU backend, alone vs batched, KV-cached vs recomputed, TP=1 vs TP=N,
// KV-pool exhaustion, and NCCL with one rank. Label gpu: each case skips with a WARN where no
// (or too few) GPUs are present.
//
// Tolerance. The reference is float32 math on the stored weights. The CUDA backend rounds to bf16
// (8 significant bits: relative error at most 2^-8 = 0.4%, about 0.1% root-mean-square) the inputs
// of every matrix product (the normalised hidden states, the attention output, the SwiGLU
// activation) and the cached K and V: about seven roundings per layer, three layers here.
// Independent roundings add like a random walk: sqrt(21) * 0.1% ~ 0.5% of the magnitude of a
// typical logit, and a prompt's logit range spans several typical magnitudes, so the expected
// error is well under 1% of the range. We allow 2e-2 of the range (the ceiling), which a
// real bug (a wrong rotation, a wrong head, a missing residual) exceeds many times over, and print
// the measured error so the device run records how much of the allowance is used.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "../thread_pool.hpp"
#include "gpu_test_support.hpp"
#include "test_support.hpp"
#include "triplane/gpu/generate.hpp"
#include "triplane/gpu/random_model.hpp"

using namespace triplane::gpu;
using namespace triplane::gpu::testing;
using triplane::code_of;
using triplane::describe;
using triplane::errc;

namespace {

constexpr float bf16_tolerance = 2e-2f;  // of a prompt's logit range: see the file comment

std::unique_ptr<backend> make_cuda(const std::string& model_dir, int tp = 1, int64_t kv_bytes = int64_t{64} << 20) {
  auto ckpt = checkpoint::open(model_dir);
  REQUIRE(ckpt);
  backend_options opts;
  opts.kind = backend_kind::cuda;
  opts.tensor_parallel = tp;
  opts.kv_cache_bytes = kv_bytes;
  auto b = make_backend(**ckpt, opts);
  INFO((b ? std::string("ok") : describe(b.error())));
  REQUIRE(b);
  return std::move(*b);
}

struct greedy_run {
  std::vector<int32_t> tokens;
  std::vector<float> margins;  // top-1 minus top-2 logit at each step
};

float margin_of(const std::vector<float>& logits, size_t offset, int64_t vocab) {
  float best = -INFINITY, second = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = logits[offset + static_cast<size_t>(i)];
    if (v > best) {
      second = best;
      best = v;
    } else if (v > second) {
      second = v;
    }
  }
  return best - second;
}

// Greedy decoding with the KV cache, recording each step's margin.
greedy_run run_greedy(backend& b, const std::vector<int32_t>& prompt, int steps, sequence_id id) {
  greedy_run out;
  REQUIRE_FALSE(b.add_sequence(id));
  const int64_t vocab = b.config().vocab_size;
  auto step = b.forward({{id, prompt, false}});
  for (int i = 0; i < steps; ++i) {
    INFO("step " << i << ": " << (step ? std::string("ok") : describe(step.error())));
    REQUIRE(step);
    const auto& logits = (*step)[0].values;
    out.tokens.push_back(argmax(logits.data(), vocab));
    out.margins.push_back(margin_of(logits, 0, vocab));
    if (i + 1 < steps) step = b.forward({{id, {out.tokens.back()}, false}});
  }
  b.free_sequence(id);
  return out;
}

// got == want at every step up to the first whose margin (in `margins`) is within `tie`.
void check_tokens(const std::vector<int32_t>& got, const std::vector<int32_t>& want, const std::vector<float>& margins,
                  float tie) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (margins[i] <= tie) return;  // a near-tie may flip, and the continuation diverge after it
    INFO("step " << i << " margin " << margins[i] << " tie tolerance " << tie);
    REQUIRE(got[i] == want[i]);
  }
}

// A random bf16 Llama like Llama 3.2's family in small: tied embeddings, llama3 RoPE scaling,
// head_dim 64 (the fixtures are untied with standard RoPE and head_dim 16).
void write_random_llama3(const std::string& dir) {
  random_llama_spec spec;
  spec.vocab_size = 1000;
  spec.hidden_size = 256;
  spec.intermediate_size = 512;
  spec.num_layers = 2;
  spec.num_heads = 4;
  spec.num_kv_heads = 2;
  spec.head_dim = 64;
  spec.max_position_embeddings = 131072;
  spec.llama3_rope_scaling = true;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  REQUIRE_FALSE(write_random_llama(dir, spec, [&](bool norm) { return norm ? 1.0f + normal(rng) : normal(rng); }));
}

} // namespace

TEST_CASE("the CUDA backend reproduces the bf16 fixture's reference logits and greedy tokens", "[gpu][fixture]") {
  if (skip_without_gpus()) return;
  auto engine = make_cuda(fixture_dir("tiny-llama-bf16"));
  const auto expected = load_expected("tiny-llama-bf16");
  for (size_t k = 0; k < expected.size(); ++k) {
    const auto& e = expected[k];
    INFO("prompt " << k);
    const auto logits = prompt_logits(*engine, e.ids);
    const float range = value_range(e.logits);
    const float err = max_abs_diff(logits, e.logits);
    WARN("bf16 fixture prompt " << k << ": max |logit error| " << err << " = " << err / range
                                << " of the logit range (tolerance " << bf16_tolerance << ")");
    CHECK(err <= bf16_tolerance * range);
    auto got = run_greedy(*engine, e.ids, static_cast<int>(e.greedy.size()), 50 + k);
    check_tokens(got.tokens, e.greedy, e.margin, 2 * bf16_tolerance * range);
  }
}

TEST_CASE("the CUDA backend agrees with the CPU backend on the same prompts", "[gpu][fixture]") {
  if (skip_without_gpus()) return;
  // bf16 weights: both backends see the same weights, the GPU only rounds activations. f32
  // weights: the GPU also rounds the weights to bf16, one more rounding per product.
  const std::string model = GENERATE(as<std::string>{}, "tiny-llama-bf16", "tiny-llama-f32");
  const float tolerance = model == "tiny-llama-bf16" ? bf16_tolerance : 2 * bf16_tolerance;
  INFO(model);
  auto gpu = make_cuda(fixture_dir(model));
  auto cpu = make_cpu(model);
  for (const auto& e : load_expected(model)) {
    const auto a = prompt_logits(*cpu, e.ids);
    const auto b = prompt_logits(*gpu, e.ids);
    const float range = value_range(a);
    const float err = max_abs_diff(a, b);
    WARN(model << " prompt of " << e.ids.size() << " tokens: CUDA vs CPU max |diff| " << err / range
               << " of the range");
    CHECK(err <= tolerance * range);
    auto on_cpu = run_greedy(*cpu, e.ids, 12, 7);
    auto on_gpu = run_greedy(*gpu, e.ids, 12, 7);
    check_tokens(on_gpu.tokens, on_cpu.tokens, on_cpu.margins, 2 * tolerance * range);
  }
}

TEST_CASE("on CUDA a prompt gives the same tokens alone and inside a batch of other prompts", "[gpu][batch]") {
  if (skip_without_gpus()) return;
  auto engine = make_cuda(fixture_dir("tiny-llama-bf16"));
  const auto expected = load_expected("tiny-llama-bf16");
  const int64_t vocab = engine->config().vocab_size;
  std::vector<greedy_run> alone;
  for (size_t s = 0; s < expected.size(); ++s) alone.push_back(run_greedy(*engine, expected[s].ids, 12, 100 + s));
  // Together: prompts 0 and 2 prefill in one step, prompt 1 joins a step later (a prefill mixed
  // with decodes), then all decode in lock-step.
  std::vector<std::vector<int32_t>> together(expected.size());
  std::vector<bool> started(expected.size(), false);
  for (sequence_id s = 0; s < expected.size(); ++s) REQUIRE_FALSE(engine->add_sequence(10 + s));
  for (int step = 0; step < 14; ++step) {
    std::vector<step_item> items;
    std::vector<size_t> who;
    for (size_t s = 0; s < expected.size(); ++s) {
      if ((s == 1 && step == 0) || together[s].size() == 12) continue;
      if (!started[s]) items.push_back({10 + s, expected[s].ids, false});
      else items.push_back({10 + s, {together[s].back()}, false});
      started[s] = true;
      who.push_back(s);
    }
    if (items.empty()) break;
    auto out = engine->forward(items);
    REQUIRE(out);
    for (size_t i = 0; i < who.size(); ++i)
      together[who[i]].push_back(argmax((*out)[i].values.data(), vocab));
  }
  // Batched products may sum in another order than single ones; only near-ties may flip.
  for (size_t s = 0; s < expected.size(); ++s) {
    INFO("prompt " << s);
    const float range = value_range(expected[s].logits);
    check_tokens(together[s], alone[s].tokens, alone[s].margins, 2e-2f * range);
  }
}

TEST_CASE("on CUDA KV-cached decoding matches recomputing the whole sequence", "[gpu][kv]") {
  if (skip_without_gpus()) return;
  auto engine = make_cuda(fixture_dir("tiny-llama-bf16"));
  const auto e = load_expected("tiny-llama-bf16")[2];
  const int64_t vocab = engine->config().vocab_size;
  std::vector<int32_t> sequence = e.ids;
  for (int i = 0; i < 5; ++i) sequence.push_back(e.greedy[static_cast<size_t>(i)]);
  const auto full = prompt_logits(*engine, sequence);
  REQUIRE_FALSE(engine->add_sequence(5));
  std::vector<float> cached;
  size_t pos = 0;
  for (size_t c : {5, 1, 11, 6}) {  // 23 prompt tokens in uneven chunks (block size 16: crosses a block)
    std::vector<int32_t> part(sequence.begin() + static_cast<std::ptrdiff_t>(pos),
                              sequence.begin() + static_cast<std::ptrdiff_t>(pos + c));
    auto out = engine->forward({{5, part, true}});
    REQUIRE(out);
    cached.insert(cached.end(), (*out)[0].values.begin(), (*out)[0].values.end());
    pos += c;
  }
  for (; pos < sequence.size(); ++pos) {
    auto out = engine->forward({{5, {sequence[pos]}, false}});
    REQUIRE(out);
    cached.insert(cached.end(), (*out)[0].values.begin(), (*out)[0].values.end());
  }
  CHECK(engine->sequence_length(5) == static_cast<int64_t>(sequence.size()));
  REQUIRE(cached.size() == sequence.size() * static_cast<size_t>(vocab));
  // The same math on the same cached values; products over fewer rows may round differently.
  const float err = max_abs_diff(cached, full);
  WARN("KV-cached vs recomputed: max |diff| " << err / value_range(full) << " of the range");
  CHECK(err <= 1e-2f * value_range(full));
}

TEST_CASE("CUDA tensor parallelism over NCCL gives the single-GPU result", "[gpu][tp]") {
  const int gpus = cuda::probe_devices().count;
  const int tp = gpus >= 4 ? 4 : 2;
  if (skip_without_gpus(2)) return;
  INFO("tp " << tp);
  auto single = make_cuda(fixture_dir("tiny-llama-bf16"), 1);
  auto split = make_cuda(fixture_dir("tiny-llama-bf16"), tp);
  CHECK(split->tensor_parallel() == tp);
  for (const auto& e : load_expected("tiny-llama-bf16")) {
    const auto a = prompt_logits(*single, e.ids);
    const auto b = prompt_logits(*split, e.ids);
    const float range = value_range(a);
    CHECK(max_abs_diff(a, b) <= 1e-2f * range);  // all-reduce sums in another order
    auto ta = run_greedy(*single, e.ids, 12, 3);
    auto tb = run_greedy(*split, e.ids, 12, 3);
    check_tokens(tb.tokens, ta.tokens, ta.margins, 2e-2f * range);
  }
}

TEST_CASE("asking for more CUDA ranks than GPUs is refused", "[gpu][tp]") {
  if (skip_without_gpus()) return;
  const int gpus = cuda::probe_devices().count;
  auto ckpt = checkpoint::open(fixture_dir("tiny-llama-bf16"));
  REQUIRE(ckpt);
  backend_options opts;
  opts.kind = backend_kind::cuda;
  opts.tensor_parallel = gpus * 2 <= 8 ? gpus * 2 : 16;  // 8 heads: tp 2, 4 and 8 are valid shapes
  if (opts.tensor_parallel > 8) {
    WARN("SKIPPED: " << gpus << " GPUs: no valid TP degree above the GPU count for this model");
    return;
  }
  auto b = make_backend(**ckpt, opts);
  REQUIRE_FALSE(b);
  CHECK(code_of(b.error()) == errc::invalid_argument);
  CHECK_THAT(describe(b.error()), Catch::Contains("one GPU per rank"));
}

TEST_CASE("a full CUDA KV pool answers overloaded and the backend stays usable", "[gpu][kv]") {
  if (skip_without_gpus()) return;
  auto ckpt = checkpoint::open(fixture_dir("tiny-llama-bf16"));
  REQUIRE(ckpt);
  const auto& c = (*ckpt)->config();
  kv_cache_geometry g{c.num_layers, c.num_kv_heads, c.head_dim, 16};
  auto engine = make_cuda(fixture_dir("tiny-llama-bf16"), 1, 4 * g.bytes_per_block(2));  // 4 blocks = 64 tokens
  REQUIRE(engine->kv_stats().num_blocks == 4);
  const auto e = load_expected("tiny-llama-bf16")[2];  // 23 tokens: 2 blocks
  const auto reference = prompt_logits(*engine, e.ids);
  REQUIRE_FALSE(engine->add_sequence(1));
  REQUIRE_FALSE(engine->add_sequence(2));
  REQUIRE_FALSE(engine->add_sequence(3));
  REQUIRE(engine->forward({{1, e.ids, true}}));
  REQUIRE(engine->forward({{2, e.ids, true}}));
  CHECK(engine->kv_stats().free_blocks == 0);
  auto full = engine->forward({{3, e.ids, true}});
  REQUIRE_FALSE(full);
  CHECK(code_of(full.error()) == errc::overloaded);
  CHECK(engine->sequence_length(3) == 0);
  // A step mixing a sequence that fits with one that does not changes nothing at all.
  auto mixed = engine->forward({{1, {e.greedy[0]}, false}, {3, e.ids, false}});
  REQUIRE_FALSE(mixed);
  CHECK(code_of(mixed.error()) == errc::overloaded);
  CHECK(engine->sequence_length(1) == static_cast<int64_t>(e.ids.size()));
  engine->free_sequence(1);
  auto retry = engine->forward({{3, e.ids, true}});
  REQUIRE(retry);
  CHECK(max_abs_diff((*retry)[0].values, reference) <= 1e-2f * value_range(reference));
}

TEST_CASE("bad CUDA steps are refused without touching the cache", "[gpu]") {
  if (skip_without_gpus()) return;
  auto engine = make_cuda(fixture_dir("tiny-llama-bf16"));
  REQUIRE_FALSE(engine->add_sequence(1));
  auto bad_token = engine->forward({{1, {1, 384}, false}});
  REQUIRE_FALSE(bad_token);
  CHECK(code_of(bad_token.error()) == errc::invalid_argument);
  auto unknown = engine->forward({{2, {1}, false}});
  REQUIRE_FALSE(unknown);
  CHECK(code_of(unknown.error()) == errc::not_found);
  CHECK(engine->sequence_length(1) == 0);
  CHECK(engine->forward({{1, {1, 2, 3}, false}}));
}

TEST_CASE("on a tied-embedding llama3-RoPE model the CUDA backend agrees with the CPU backend", "[gpu][fixture]") {
  // The model and the CPU side need no GPU: checked everywhere.
  temp_dir dir;
  write_random_llama3(dir.path());
  auto ckpt = checkpoint::open(dir.path());
  REQUIRE(ckpt);
  REQUIRE((*ckpt)->config().rope.kind == rope_kind::llama3);
  backend_options cpu_opts;
  auto cpu = make_backend(**ckpt, cpu_opts);
  REQUIRE(cpu);
  CHECK(value_range(prompt_logits(**cpu, {1, 2, 3})) > 1.0f);  // logits spread enough to compare
  if (skip_without_gpus()) return;
  auto gpu = make_cuda(dir.path());
  std::unique_ptr<backend> split;  // TP=2: the tied head split by vocab rows of the embedding
  if (cuda::probe_devices().count >= 2) split = make_cuda(dir.path(), 2);
  else WARN("TP=2 part SKIPPED: one GPU");
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> token(0, 999);
  for (size_t length : {1, 9, 40}) {  // 40: past two KV blocks
    std::vector<int32_t> prompt(length);
    for (auto& t : prompt) t = token(rng);
    INFO("prompt of " << length << " tokens");
    const auto a = prompt_logits(**cpu, prompt);
    const auto b = prompt_logits(*gpu, prompt);
    const float range = value_range(a);
    const float err = max_abs_diff(a, b);
    WARN("tied llama3 model, prompt of " << length << ": CUDA vs CPU max |diff| " << err / range << " of the range");
    CHECK(err <= bf16_tolerance * range);
    auto on_cpu = run_greedy(**cpu, prompt, 8, 1);
    auto on_gpu = run_greedy(*gpu, prompt, 8, 1);
    check_tokens(on_gpu.tokens, on_cpu.tokens, on_cpu.margins, 2 * bf16_tolerance * range);
    if (split) {
      const auto c = prompt_logits(*split, prompt);
      CHECK(max_abs_diff(b, c) <= 1e-2f * range);
    }
  }
}

TEST_CASE("an F16 checkpoint runs in f16 and reproduces the reference", "[gpu][fixture]") {
  if (skip_without_gpus()) return;
  // The bf16 fixture's weights are exactly representable in f16 when in f16's range (8 bits of
  // precision fit in 11); converting gives an F16 checkpoint of the same model.
  temp_dir dir;
  auto src = safetensors_file::open(fixture_dir("tiny-llama-bf16") + "/model.safetensors");
  REQUIRE(src);
  std::vector<tensor_to_write> tensors;
  for (const auto& t : (*src)->tensors()) {
    auto values = tensor_to_f32(t, "model.safetensors");
    REQUIRE(values);
    tensor_to_write w{t.name, dtype::f16, t.shape, std::vector<unsigned char>(values->size() * 2)};
    for (size_t i = 0; i < values->size(); ++i) {
      const uint16_t h = f32_to_f16((*values)[i]);
      std::memcpy(w.data.data() + 2 * i, &h, 2);
    }
    tensors.push_back(std::move(w));
  }
  REQUIRE_FALSE(write_safetensors(dir.file("model.safetensors"), tensors));
  std::filesystem::copy_file(fixture_dir("tiny-llama-bf16") + "/config.json", dir.file("config.json"));
  auto engine = make_cuda(dir.path());
  for (const auto& e : load_expected("tiny-llama-bf16")) {
    const auto logits = prompt_logits(*engine, e.ids);
    const float range = value_range(e.logits);
    CHECK(max_abs_diff(logits, e.logits) <= bf16_tolerance * range);  // f16 rounds finer than bf16
  }
}

TEST_CASE("an NCCL group of one rank all-reduces and all-gathers device buffers", "[gpu][nccl]") {
  if (skip_without_gpus()) return;
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  {
    thread_pool threads(1);
    auto group = cuda::make_nccl_group({0}, {stream}, threads);
    INFO((group ? std::string("ok") : describe(group.error())));
    REQUIRE(group);
    REQUIRE(group->size() == 1);
    collective& comm = *group->front();
    CHECK(comm.size() == 1);
    CHECK(comm.rank() == 0);
    device_vector<float> data(std::vector<float>{1.5f, -2.0f, 3.25f});
    device_vector<float> gathered(3);
    REQUIRE_FALSE(comm.all_reduce_sum(data.get(), 3));
    REQUIRE_FALSE(comm.all_gather(data.get(), 3, gathered.get()));
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    CHECK(data.to_host() == std::vector<float>{1.5f, -2.0f, 3.25f});
    CHECK(gathered.to_host() == std::vector<float>{1.5f, -2.0f, 3.25f});
  }
  cudaStreamDestroy(stream);
}
