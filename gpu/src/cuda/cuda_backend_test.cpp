// The CUDA backend's host-side parts, which need no GPU: option checks, the "no GPU" answer,
// status mapping, weight layout and packing per tensor-parallel rank, and a step's layout.
#include <catch2/catch.hpp>

#include <cstring>
#include <set>
#include <sstream>

#include "cuda_support.hpp"
#include "triplane/gpu/cuda_device.hpp"
#include "test_support.hpp"
#include "triplane/gpu/generate.hpp"

using namespace triplane::gpu;
using namespace triplane::gpu::testing;
using triplane::code_of;
using triplane::describe;
using triplane::errc;

namespace {

std::unique_ptr<checkpoint> open_fixture(const std::string& model) {
  auto ckpt = checkpoint::open(fixture_dir(model));
  REQUIRE(ckpt);
  return std::move(*ckpt);
}

uint16_t bits_at(const tensor_view& t, int64_t index) {
  uint16_t v;
  std::memcpy(&v, t.data + index * 2, 2);
  return v;
}

float float_at(const tensor_view& t, int64_t index) {
  float v = 0;
  convert_to_f32(t, index, 1, &v);
  return v;
}

} // namespace

TEST_CASE("the CUDA backend on a machine without a GPU answers unavailable with the reason", "[cuda]") {
  auto ckpt = open_fixture("tiny-llama-bf16");
  backend_options opts;
  opts.kind = backend_kind::cuda;
  opts.kv_cache_bytes = 1 << 20;
  const auto probe = cuda::probe_devices();
  auto b = make_backend(*ckpt, opts);
  if (probe.count > 0) {
    WARN("a GPU is present: checking that the CUDA backend starts instead");
    REQUIRE(b);
    CHECK((*b)->kind() == backend_kind::cuda);
    return;
  }
  INFO("probe: " << probe.why);
  CHECK_FALSE(probe.why.empty());
  REQUIRE_FALSE(b);
  CHECK(code_of(b.error()) == errc::unavailable);
  CHECK_THAT(describe(b.error()), Catch::Contains("no usable GPU"));
}

TEST_CASE("CUDA options the model cannot use are refused before any device is touched", "[cuda][options]") {
  auto ckpt = open_fixture("tiny-llama-bf16");
  const model_config& c = ckpt->config();
  backend_options good;
  good.kind = backend_kind::cuda;
  good.kv_cache_bytes = 1 << 20;
  CHECK_FALSE(cuda::check_cuda_options(c, good));

  struct bad_case {
    const char* what;
    backend_options options;
    const char* message;
  };
  std::vector<bad_case> cases;
  auto with = [&](const char* what, const char* message, auto change) {
    backend_options o = good;
    change(o);
    cases.push_back({what, o, message});
  };
  with("tp 3 does not divide 8 heads", "num_attention_heads", [](backend_options& o) { o.tensor_parallel = 3; });
  with("tp 0", "between 1 and 64", [](backend_options& o) { o.tensor_parallel = 0; });
  with("block size 0", "kv_block_size", [](backend_options& o) { o.kv_block_size = 0; });
  with("block size 5000", "kv_block_size", [](backend_options& o) { o.kv_block_size = 5000; });
  with("KV budget below one block", "below one block", [](backend_options& o) { o.kv_cache_bytes = 100; });
  with("negative threads", "threads", [](backend_options& o) { o.threads = -1; });
  for (const auto& k : cases) {
    INFO(k.what);
    auto err = cuda::check_cuda_options(c, k.options);
    REQUIRE(err);
    CHECK(code_of(err) == errc::invalid_argument);
    CHECK_THAT(describe(err), Catch::Contains(k.message));
    // Through the public entry point too: bad options are invalid_argument even without a GPU.
    auto b = make_backend(*ckpt, k.options);
    REQUIRE_FALSE(b);
    CHECK(code_of(b.error()) == errc::invalid_argument);
  }

  SECTION("a head_dim beyond the attention kernel's limit") {
    model_config wide = c;
    wide.head_dim = 512;
    auto err = cuda::check_cuda_options(wide, good);
    REQUIRE(err);
    CHECK(code_of(err) == errc::invalid_argument);
    CHECK_THAT(describe(err), Catch::Contains("head_dim 512"));
  }
}

TEST_CASE("tensor parallelism needs one GPU per rank", "[cuda][options]") {
  CHECK_FALSE(cuda::check_device_count(1, 1));
  CHECK_FALSE(cuda::check_device_count(2, 8));
  auto err = cuda::check_device_count(2, 1);
  REQUIRE(err);
  CHECK(code_of(err) == errc::invalid_argument);
  CHECK_THAT(describe(err), Catch::Contains("NCCL refuses two ranks on one GPU"));
}

TEST_CASE("CUDA, cuBLAS and NCCL statuses become triplane errors", "[cuda][errors]") {
  CHECK_FALSE(cuda::from_cuda(cudaSuccess, "x"));
  CHECK_FALSE(cuda::from_cublas(CUBLAS_STATUS_SUCCESS, "x"));
  CHECK_FALSE(cuda::from_nccl(ncclSuccess, "x"));

  auto oom = cuda::from_cuda(cudaErrorMemoryAllocation, "cudaMalloc of 5 bytes");
  CHECK(code_of(oom) == errc::overloaded);
  CHECK_THAT(describe(oom), Catch::Contains("cudaMalloc of 5 bytes") && Catch::Contains("cudaErrorMemoryAllocation"));
  CHECK(code_of(cuda::from_cuda(cudaErrorNoDevice, "probe")) == errc::unavailable);
  CHECK(code_of(cuda::from_cuda(cudaErrorInsufficientDriver, "probe")) == errc::unavailable);
  auto fault = cuda::from_cuda(cudaErrorIllegalAddress, "paged_attention");
  CHECK(code_of(fault) == errc::internal);
  CHECK_THAT(describe(fault), Catch::Contains("paged_attention") && Catch::Contains("cudaErrorIllegalAddress"));

  CHECK(code_of(cuda::from_cublas(CUBLAS_STATUS_ALLOC_FAILED, "gemm")) == errc::overloaded);
  auto gemm = cuda::from_cublas(CUBLAS_STATUS_EXECUTION_FAILED, "cublasGemmEx (o_proj)");
  CHECK(code_of(gemm) == errc::internal);
  CHECK_THAT(describe(gemm), Catch::Contains("o_proj") && Catch::Contains("CUBLAS_STATUS_EXECUTION_FAILED"));

  auto nccl = cuda::from_nccl(ncclSystemError, "ncclAllReduce");
  CHECK(code_of(nccl) == errc::internal);
  CHECK_THAT(describe(nccl), Catch::Contains("ncclAllReduce"));
}

TEST_CASE("weights live on the device as bf16, or as f16 for F16 checkpoints", "[cuda]") {
  CHECK(cuda::device_elem_type(dtype::bf16) == cuda::elem_type::bf16);
  CHECK(cuda::device_elem_type(dtype::f32) == cuda::elem_type::bf16);
  CHECK(cuda::device_elem_type(dtype::f16) == cuda::elem_type::f16);
}

TEST_CASE("each rank's weight arena holds exactly its shard of the checkpoint", "[cuda][tp]") {
  const std::string model = GENERATE(as<std::string>{}, "tiny-llama-bf16", "tiny-llama-f32");
  const int tp = GENERATE(1, 2, 4);
  INFO(model << " tp " << tp);
  auto ckpt = open_fixture(model);
  const auto& c = ckpt->config();
  const int64_t hidden = c.hidden_size, hd = c.head_dim;
  for (int rank = 0; rank < tp; ++rank) {
    INFO("rank " << rank);
    const tp_shard s = shard_for_rank(c, tp, rank);
    const auto layout = cuda::plan_weights(c, s);
    std::vector<uint16_t> arena(static_cast<size_t>(layout.total), 0xFFFF);
    std::set<int64_t> written;
    auto err = cuda::pack_weights(*ckpt, s, layout, cuda::elem_type::bf16,
                                  [&](int64_t offset, const std::vector<uint16_t>& values) -> caf::error {
                                    REQUIRE(offset % 128 == 0);
                                    REQUIRE(offset + static_cast<int64_t>(values.size()) <= layout.total);
                                    REQUIRE(written.insert(offset).second);
                                    std::copy(values.begin(), values.end(), arena.begin() + offset);
                                    return caf::none;
                                  });
    REQUIRE_FALSE(err);
    // The expected device value of element `index` of a checkpoint tensor.
    auto expect = [&](const std::string& name, int64_t index) -> uint16_t {
      const tensor_view& t = *ckpt->get(name).view;
      return t.type == dtype::bf16 ? bits_at(t, index) : f32_to_bf16(float_at(t, index));
    };
    // Spot-check every region at its corners and a middle element.
    auto check_block = [&](int64_t offset, const std::string& name, int64_t row_begin, int64_t rows, int64_t col_begin,
                           int64_t cols) {
      const tensor_view& t = *ckpt->get(name).view;
      const int64_t width = t.shape.size() == 2 ? t.shape[1] : t.numel();
      for (int64_t r : {int64_t{0}, rows / 2, rows - 1})
        for (int64_t col : {int64_t{0}, cols / 3, cols - 1}) {
          INFO(name << " row " << r << " col " << col);
          CHECK(arena[static_cast<size_t>(offset + r * cols + col)] == expect(name, (row_begin + r) * width + col_begin + col));
        }
    };
    check_block(layout.embed, tensor_names::embed_tokens(), 0, c.vocab_size, 0, hidden);
    check_block(layout.final_norm, tensor_names::final_norm(), 0, 1, 0, hidden);
    REQUIRE_FALSE(c.tie_word_embeddings);  // the fixtures have an untied head
    check_block(layout.lm_head, tensor_names::lm_head(), s.vocab_begin, s.vocab_size, 0, hidden);
    for (int64_t l = 0; l < c.num_layers; ++l) {
      using tensor_names::layer;
      const auto& L = layout.layers[static_cast<size_t>(l)];
      check_block(L.input_norm, layer(l, "input_layernorm.weight"), 0, 1, 0, hidden);
      check_block(L.post_norm, layer(l, "post_attention_layernorm.weight"), 0, 1, 0, hidden);
      check_block(L.qkv, layer(l, "self_attn.q_proj.weight"), s.q_head_begin * hd, s.q_heads * hd, 0, hidden);
      check_block(L.qkv + s.q_heads * hd * hidden, layer(l, "self_attn.k_proj.weight"), s.kv_head_begin * hd,
                  s.kv_heads * hd, 0, hidden);
      check_block(L.qkv + (s.q_heads + s.kv_heads) * hd * hidden, layer(l, "self_attn.v_proj.weight"),
                  s.kv_head_begin * hd, s.kv_heads * hd, 0, hidden);
      check_block(L.o, layer(l, "self_attn.o_proj.weight"), 0, hidden, s.q_head_begin * hd, s.q_heads * hd);
      check_block(L.gate_up, layer(l, "mlp.gate_proj.weight"), s.mlp_begin, s.mlp_size, 0, hidden);
      check_block(L.gate_up + s.mlp_size * hidden, layer(l, "mlp.up_proj.weight"), s.mlp_begin, s.mlp_size, 0, hidden);
      check_block(L.down, layer(l, "mlp.down_proj.weight"), 0, hidden, s.mlp_begin, s.mlp_size);
    }
  }
}

TEST_CASE("a tied head is read from the embedding rows of the rank, not stored twice", "[cuda][tp]") {
  model_config c = open_fixture("tiny-llama-bf16")->config();
  c.tie_word_embeddings = true;
  for (int tp : {1, 2, 4}) {
    for (int rank = 0; rank < tp; ++rank) {
      INFO("tp " << tp << " rank " << rank);
      const tp_shard s = shard_for_rank(c, tp, rank);
      const auto layout = cuda::plan_weights(c, s);
      CHECK(layout.lm_head == layout.embed + s.vocab_begin * c.hidden_size);
      CHECK(layout.layers.front().input_norm > layout.final_norm);
    }
  }
}

TEST_CASE("pack_block converts to f16 and copies same-typed tensors bit for bit", "[cuda]") {
  std::vector<float> values = {1.0f, -2.5f, 0.1f, 65504.0f, 3.0e-5f, 7.0f};
  auto f32 = make_f32_tensor("t", {2, 3}, values);
  tensor_view view{"t", dtype::f32, {2, 3}, f32.data.data(), f32.data.size()};
  std::vector<uint16_t> out(2);
  cuda::pack_block(view, 1, 1, 1, 2, cuda::elem_type::f16, out.data());  // row 1, columns 1..2
  CHECK(out[0] == f32_to_f16(3.0e-5f));
  CHECK(out[1] == f32_to_f16(7.0f));
  cuda::pack_block(view, 0, 2, 0, 1, cuda::elem_type::bf16, out.data());  // column 0 of both rows
  CHECK(out[0] == f32_to_bf16(1.0f));
  CHECK(out[1] == f32_to_bf16(65504.0f));

  // An F16 tensor packed as f16: the stored bits, unchanged, also from an unaligned address.
  std::vector<unsigned char> raw(1 + 4 * 2);
  const uint16_t halves[4] = {0x3C00, 0x8001, 0x7BFF, 0x0400};
  std::memcpy(raw.data() + 1, halves, sizeof halves);
  tensor_view h{"h", dtype::f16, {4}, raw.data() + 1, 8};
  std::vector<uint16_t> packed(4);
  cuda::pack_block(h, 0, 1, 0, 4, cuda::elem_type::f16, packed.data());
  CHECK(std::equal(packed.begin(), packed.end(), halves));
}

TEST_CASE("a step's block tables and output rows are laid out for the kernels", "[cuda]") {
  model_config c = open_fixture("tiny-llama-bf16")->config();
  kv_block_manager blocks(16, 4);
  REQUIRE_FALSE(blocks.add_sequence(7));
  REQUIRE_FALSE(blocks.add_sequence(9));
  auto first = prepare_step(c, blocks, {{7, {1, 2, 3, 4, 5}, false}});
  REQUIRE(first);
  blocks.commit(first->plan);  // sequence 7 holds 5 tokens (2 blocks)

  std::vector<step_item> items = {{9, {10, 11, 12, 13, 14, 15}, true}, {7, {42}, false}};
  auto step = prepare_step(c, blocks, items);
  REQUIRE(step);
  const auto t = cuda::build_step_tables(*step);
  CHECK(t.output_rows == std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6});
  REQUIRE(t.max_blocks == 2);
  const auto& t9 = *step->plan[0].block_table;
  const auto& t7 = *step->plan[1].block_table;
  CHECK(t.block_tables == std::vector<int32_t>{t9[0], t9[1], t7[0], t7[1]});
  // What the attention kernel computes for each token: the slot its position maps to through
  // its item's row of the matrix is the slot the token's K/V are written to.
  for (size_t i = 0; i < step->token_ids.size(); ++i) {
    const int64_t pos = step->positions[i];
    const int32_t block =
        t.block_tables[static_cast<size_t>(step->item_of_token[i] * t.max_blocks + pos / 4)];
    CHECK(step->slots[i] == int64_t{block} * 4 + pos % 4);
  }
  blocks.rollback(step->plan);

  SECTION("without all_logits only each item's last token is an output row") {
    items[0].all_logits = false;
    auto last = prepare_step(c, blocks, items);
    REQUIRE(last);
    CHECK(cuda::build_step_tables(*last).output_rows == std::vector<int32_t>{5, 6});
    blocks.rollback(last->plan);
  }
}

TEST_CASE("triplane generate --backend cuda without a GPU fails with the reason, not a crash", "[cuda][generate]") {
  if (cuda::probe_devices().count > 0) {
    WARN("SKIPPED: a GPU is present (this case is about machines without one)");
    return;
  }
  std::ostringstream out, err;
  const int code = run_generate_command({"--model", fixture_dir("tiny-llama-bf16"), "--tokens", "1,2,3",
                                         "--max-new-tokens", "2", "--backend", "cuda"},
                                        out, err);
  CHECK(code == 1);
  CHECK(out.str().empty());
  CHECK_THAT(err.str(), Catch::Contains("no usable GPU"));
}

TEST_CASE("device queries answer plainly where there is no GPU", "[cuda]") {
  const auto devices = query_cuda_devices();
  if (devices.count > 0) {
    WARN("SKIPPED: a GPU is present (" << devices.name << ")");
    return;
  }
  CHECK_THAT(devices.why, Catch::Contains("no usable GPU"));
  auto bandwidth = measure_copy_bandwidth(0, 1 << 20, 3);
  REQUIRE_FALSE(bandwidth);
  CHECK(code_of(bandwidth.error()) == errc::unavailable);
  auto bad = measure_copy_bandwidth(0, 0, 3);
  REQUIRE_FALSE(bad);
  CHECK(code_of(bad.error()) == errc::invalid_argument);
}
