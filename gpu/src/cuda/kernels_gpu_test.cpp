// Each CUDA kernel against its float32 CPU twin on fresh random inputs, outputs poisoned first.
// Tolerances: a value stored as bf16 carries a relative rounding error of at most 2^-8 (half an
// ulp of 8 significant bits); we allow 1/250 relative plus a small absolute term for values near
// zero. Float32 outputs: 1e-5 relative.
// Label gpu: each case skips with a WARN where no GPU is present.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>

#include "../cpu_kernels.hpp"
#include "gpu_test_support.hpp"
#include "kernels.hpp"
#include "triplane/gpu/safetensors.hpp"

using namespace triplane::gpu;
using namespace triplane::gpu::testing;

namespace {

std::vector<float> random_floats(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> out(n);
  for (auto& v : out) v = d(rng);
  return out;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

std::vector<float> from_bf16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_to_f32(v[i]);
  return out;
}

// Every got[i] within rel * |want[i]| + abs of want[i]; NaN (unwritten) fails.
void check_close(const std::vector<float>& got, const std::vector<float>& want, float rel, float abs) {
  REQUIRE(got.size() == want.size());
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool ok = std::isfinite(got[i]) && std::fabs(got[i] - want[i]) <= rel * std::fabs(want[i]) + abs;
    if (!ok && bad++ < 5) {
      INFO("element " << i << ": got " << got[i] << ", want " << want[i]);
      CHECK(ok);
    }
  }
  CHECK(bad == 0);
}

// One bf16 rounding is at most half an ulp: 2^-8 of the value (exactly 2^-8 only at powers of
// two); 1/250 leaves room for the float32 differences before the rounding.
constexpr float bf16_rel = 1.0f / 250;

} // namespace

TEST_CASE("the embedding gather copies the rows of the token ids", "[gpu][kernels]") {
  if (skip_without_gpus()) return;
  std::mt19937 rng(1);
  const int64_t vocab = 50, hidden = 300;
  auto table = to_bf16(random_floats(static_cast<size_t>(vocab * hidden), rng));
  std::vector<int32_t> ids = {3, 49, 0, 3};
  device_vector<uint16_t> d_table(table);
  device_vector<int32_t> d_ids(ids);
  device_vector<float> d_x(ids.size() * hidden);
  REQUIRE(cuda::embed_gather(cuda::elem_type::bf16, d_table.get(), d_ids.get(), d_x.get(), 4, hidden, nullptr) ==
          cudaSuccess);
  auto x = d_x.to_host();
  std::vector<float> want;
  for (auto id : ids)
    for (int64_t i = 0; i < hidden; ++i) want.push_back(bf16_to_f32(table[static_cast<size_t>(id * hidden + i)]));
  check_close(x, want, 0, 0);
}

TEST_CASE("the fused residual add and RMSNorm kernel matches the CPU RMSNorm", "[gpu][kernels]") {
  if (skip_without_gpus()) return;
  std::mt19937 rng(2);
  const int64_t rows = 5, n = 2051;  // not a multiple of the block: the strided loops' tails
  auto x = random_floats(static_cast<size_t>(rows * n), rng, 3.0f);
  auto delta = random_floats(x.size(), rng);
  auto weight = to_bf16(random_floats(static_cast<size_t>(n), rng));
  const float eps = 1e-5f;
  device_vector<float> d_x(x), d_delta(delta);
  device_vector<uint16_t> d_weight(weight), d_out(x.size());

  SECTION("with the residual, every row") {
    REQUIRE(cuda::add_rms_norm(cuda::elem_type::bf16, d_x.get(), d_delta.get(), nullptr, d_weight.get(), d_out.get(),
                               rows, n, eps, nullptr) == cudaSuccess);
    std::vector<float> sum(x.size()), want(x.size());
    for (size_t i = 0; i < x.size(); ++i) sum[i] = x[i] + delta[i];
    cpu::rms_norm(sum.data(), from_bf16(weight).data(), want.data(), rows, n, eps);
    check_close(d_x.to_host(), sum, 0, 0);  // the residual stream is updated in place
    check_close(from_bf16(d_out.to_host()), want, bf16_rel, 1e-6f);
  }
  SECTION("without the residual, selected rows") {
    std::vector<int32_t> pick = {4, 1};
    device_vector<int32_t> d_rows(pick);
    REQUIRE(cuda::add_rms_norm(cuda::elem_type::bf16, d_x.get(), nullptr, d_rows.get(), d_weight.get(), d_out.get(), 2,
                               n, eps, nullptr) == cudaSuccess);
    std::vector<float> want(static_cast<size_t>(2 * n));
    cpu::rms_norm(x.data() + 4 * n, from_bf16(weight).data(), want.data(), 1, n, eps);
    cpu::rms_norm(x.data() + 1 * n, from_bf16(weight).data(), want.data() + n, 1, n, eps);
    auto out = from_bf16(d_out.to_host());
    out.resize(want.size());
    check_close(out, want, bf16_rel, 1e-6f);
    check_close(d_x.to_host(), x, 0, 0);  // untouched
  }
}

TEST_CASE("RoPE with the KV append rotates q in place and stores rotated k and v at the slots", "[gpu][kernels]") {
  if (skip_without_gpus()) return;
  std::mt19937 rng(3);
  const int64_t q_heads = 4, kv_heads = 2, hd = GENERATE(16, 64, 128);
  INFO("head_dim " << hd);
  const int64_t q_dim = q_heads * hd, kv_dim = kv_heads * hd, width = q_dim + 2 * kv_dim;
  std::vector<int64_t> positions = {0, 17, 1000, 131071};
  std::vector<int64_t> slots = {5, 0, 9, 2};
  const int64_t n = 4, num_slots = 12;
  std::vector<float> inv_freq(static_cast<size_t>(hd / 2));
  for (int64_t i = 0; i < hd / 2; ++i)
    inv_freq[static_cast<size_t>(i)] = 1.0f / std::pow(500000.0f, static_cast<float>(2 * i) / static_cast<float>(hd));
  auto qkv = random_floats(static_cast<size_t>(n * width), rng);
  device_vector<float> d_qkv(qkv), d_freq(inv_freq);
  device_vector<int64_t> d_pos(positions), d_slots(slots);
  device_vector<uint16_t> d_k(static_cast<size_t>(num_slots * kv_dim)), d_v(static_cast<size_t>(num_slots * kv_dim));
  REQUIRE(cuda::rope_append(cuda::elem_type::bf16, d_qkv.get(), d_pos.get(), d_slots.get(), d_freq.get(), d_k.get(),
                            d_v.get(), n, q_heads, kv_heads, hd, nullptr) == cudaSuccess);
  auto got_qkv = d_qkv.to_host();
  auto k = from_bf16(d_k.to_host()), v = from_bf16(d_v.to_host());
  std::vector<float> want_q, got_q, want_k, got_k, want_v, got_v;
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float> row(qkv.begin() + t * width, qkv.begin() + (t + 1) * width);
    cpu::apply_rope(row.data(), q_heads, hd, positions[static_cast<size_t>(t)], inv_freq.data());
    cpu::apply_rope(row.data() + q_dim, kv_heads, hd, positions[static_cast<size_t>(t)], inv_freq.data());
    want_q.insert(want_q.end(), row.begin(), row.begin() + q_dim);
    got_q.insert(got_q.end(), got_qkv.begin() + t * width, got_qkv.begin() + t * width + q_dim);
    want_k.insert(want_k.end(), row.begin() + q_dim, row.begin() + q_dim + kv_dim);
    want_v.insert(want_v.end(), row.begin() + q_dim + kv_dim, row.end());
    const int64_t s = slots[static_cast<size_t>(t)];
    got_k.insert(got_k.end(), k.begin() + s * kv_dim, k.begin() + (s + 1) * kv_dim);
    got_v.insert(got_v.end(), v.begin() + s * kv_dim, v.begin() + (s + 1) * kv_dim);
  }
  // cosf/sinf of large arguments may differ from the host's by an ulp of the argument reduction.
  check_close(got_q, want_q, 1e-5f, 1e-5f);
  check_close(got_k, want_k, bf16_rel, 1e-5f);
  check_close(got_v, want_v, bf16_rel, 0);
}

TEST_CASE("paged attention matches a float64 softmax over each token's context", "[gpu][kernels]") {
  if (skip_without_gpus()) return;
  std::mt19937 rng(4);
  struct shape {
    int64_t hd, q_heads, kv_heads, group, q_head_begin, kv_head_begin;
  };
  // Whole models (GQA 4:1, MHA) and rank 1 of a TP=2 split (heads 4..7 of 8, KV head 1 of 2).
  const shape sh = GENERATE(shape{16, 8, 2, 4, 0, 0}, shape{64, 8, 2, 4, 0, 0}, shape{128, 4, 4, 1, 0, 0},
                            shape{256, 2, 1, 2, 0, 0}, shape{64, 4, 1, 4, 4, 1});
  INFO("head_dim " << sh.hd << " q_heads " << sh.q_heads << " kv_heads " << sh.kv_heads << " q_head_begin "
                   << sh.q_head_begin);
  const int64_t hd = sh.hd, q_dim = sh.q_heads * hd, kv_dim = sh.kv_heads * hd, width = q_dim + 2 * kv_dim;
  const int64_t block_size = 16, num_blocks = 8;
  // Sequence 0: blocks {5, 2, 7} and 40 cached positions; sequence 1: block {3}, 1 position.
  std::vector<int32_t> tables = {5, 2, 7, 3, 0, 0};
  const int64_t max_blocks = 3;
  std::vector<int32_t> token_sequence = {0, 0, 0, 1};
  std::vector<int64_t> positions = {0, 16, 39, 0};  // the first, a block boundary, the last; one alone
  const int64_t n = 4;
  auto k = to_bf16(random_floats(static_cast<size_t>(num_blocks * block_size * kv_dim), rng));
  auto v = to_bf16(random_floats(k.size(), rng));
  auto qkv = random_floats(static_cast<size_t>(n * width), rng, 2.0f);
  device_vector<uint16_t> d_k(k), d_v(v), d_out(static_cast<size_t>(n * q_dim));
  device_vector<float> d_qkv(qkv);
  device_vector<int32_t> d_tables(tables), d_seq(token_sequence);
  device_vector<int64_t> d_pos(positions);
  cuda::attention_args a;
  a.qkv = d_qkv.get();
  a.k_cache = d_k.get();
  a.v_cache = d_v.get();
  a.block_tables = d_tables.get();
  a.token_sequence = d_seq.get();
  a.positions = d_pos.get();
  a.out = d_out.get();
  a.n = n;
  a.q_heads = sh.q_heads;
  a.kv_heads = sh.kv_heads;
  a.head_dim = hd;
  a.group = sh.group;
  a.q_head_begin = sh.q_head_begin;
  a.kv_head_begin = sh.kv_head_begin;
  a.max_blocks = max_blocks;
  a.block_size = block_size;
  a.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  REQUIRE(cuda::paged_attention(cuda::elem_type::bf16, a, nullptr) == cudaSuccess);
  auto got = from_bf16(d_out.to_host());

  const auto kf = from_bf16(k), vf = from_bf16(v);
  std::vector<float> want(static_cast<size_t>(n * q_dim));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < sh.q_heads; ++h) {
      const int64_t kvh = (sh.q_head_begin + h) / sh.group - sh.kv_head_begin;
      const float* q = qkv.data() + t * width + h * hd;
      const int64_t context = positions[static_cast<size_t>(t)] + 1;
      const int32_t* table = tables.data() + token_sequence[static_cast<size_t>(t)] * max_blocks;
      std::vector<double> score(static_cast<size_t>(context));
      double mx = -INFINITY;
      for (int64_t j = 0; j < context; ++j) {
        const int64_t slot = int64_t{table[j / block_size]} * block_size + j % block_size;
        double s = 0;
        for (int64_t d = 0; d < hd; ++d) s += double{q[d]} * kf[static_cast<size_t>(slot * kv_dim + kvh * hd + d)];
        score[static_cast<size_t>(j)] = s / std::sqrt(static_cast<double>(hd));
        mx = std::max(mx, score[static_cast<size_t>(j)]);
      }
      double sum = 0;
      for (auto& s : score) sum += (s = std::exp(s - mx));
      for (int64_t d = 0; d < hd; ++d) {
        double acc = 0;
        for (int64_t j = 0; j < context; ++j) {
          const int64_t slot = int64_t{table[j / block_size]} * block_size + j % block_size;
          acc += score[static_cast<size_t>(j)] * vf[static_cast<size_t>(slot * kv_dim + kvh * hd + d)];
        }
        want[static_cast<size_t>(t * q_dim + h * hd + d)] = static_cast<float>(acc / sum);
      }
    }
  check_close(got, want, bf16_rel, 1e-3f);
}

TEST_CASE("SwiGLU multiplies silu of the gate half with the up half", "[gpu][kernels]") {
  if (skip_without_gpus()) return;
  std::mt19937 rng(5);
  const int64_t n = 3, mlp = 1000;
  auto gate_up = random_floats(static_cast<size_t>(n * 2 * mlp), rng, 3.0f);
  device_vector<float> d_gu(gate_up);
  device_vector<uint16_t> d_act(static_cast<size_t>(n * mlp));
  REQUIRE(cuda::silu_mul(cuda::elem_type::bf16, d_gu.get(), d_act.get(), n, mlp, nullptr) == cudaSuccess);
  std::vector<float> want(static_cast<size_t>(n * mlp));
  for (int64_t t = 0; t < n; ++t)
    cpu::silu_mul(gate_up.data() + t * 2 * mlp, gate_up.data() + t * 2 * mlp + mlp, want.data() + t * mlp, mlp);
  check_close(from_bf16(d_act.to_host()), want, bf16_rel, 1e-6f);
}

TEST_CASE("the f16 variants store f16", "[gpu][kernels]") {
  if (skip_without_gpus()) return;
  std::mt19937 rng(6);
  const int64_t n = 2, mlp = 64;
  auto gate_up = random_floats(static_cast<size_t>(n * 2 * mlp), rng);
  device_vector<float> d_gu(gate_up);
  device_vector<uint16_t> d_act(static_cast<size_t>(n * mlp));
  REQUIRE(cuda::silu_mul(cuda::elem_type::f16, d_gu.get(), d_act.get(), n, mlp, nullptr) == cudaSuccess);
  auto act = d_act.to_host();
  std::vector<float> got(act.size()), want(act.size());
  for (size_t i = 0; i < act.size(); ++i) got[i] = f16_to_f32(act[i]);
  for (int64_t t = 0; t < n; ++t)
    cpu::silu_mul(gate_up.data() + t * 2 * mlp, gate_up.data() + t * 2 * mlp + mlp, want.data() + t * mlp, mlp);
  check_close(got, want, 1.0f / 2000, 1e-6f);  // f16: half an ulp is at most 2^-11
}
