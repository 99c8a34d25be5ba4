// The CUDA backend: the Llama forward of cpu_backend.cpp on GPUs, one tensor-parallel rank per GPU
// and one host thread per rank. Weights are bf16 (f16 for F16 checkpoints; F32 checkpoints are
// rounded to bf16 on upload), the KV cache holds the same 16-bit type, and everything else (the
// residual stream, projections' outputs, softmax, norms, logits) is float32: cuBLAS multiplies
// 16-bit operands with float32 accumulation and float32 output.
//
// A step runs in two phases so that one rank's failure never leaves the others waiting in a
// collective: (1) every rank makes sure its scratch memory is large enough (failure: overloaded,
// nothing changed); (2) every rank uploads the step's layout and runs the model. A failure in
// phase 2 is a device failure: the step is rolled back, the backend answers internal from then
// on, and its owner (the supervised worker) makes a new one. Not handled yet: a rank failing in
// phase 2 between two all-reduces while the other ranks wait in NCCL leaves them waiting (the fix
// is an ncclCommAbort of the whole group from the failing rank); such failures are device faults
// or launch errors that hit every rank alike.
#include <cuda_runtime_api.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "../thread_pool.hpp"
#include "cuda_support.hpp"
#include "kernels.hpp"
#include "triplane/gpu/checkpoint.hpp"

namespace triplane::gpu {

namespace {

using cuda::elem_type;
using cuda::from_cublas;
using cuda::from_cuda;

#define TRY(expr)                  \
  do {                             \
    if (auto err_ = (expr)) return err_; \
  } while (false)

// Bump allocation inside one device buffer (256-byte aligned pieces).
class arena_cursor {
public:
  explicit arena_cursor(char* base) : base_(base) {}
  // With a null base only the size is measured (and null pointers returned).
  template <typename T> T* take(int64_t count) {
    char* at = base_ != nullptr ? base_ + used_ : nullptr;
    used_ += (static_cast<int64_t>(sizeof(T)) * count + 255) / 256 * 256;
    return reinterpret_cast<T*>(at);
  }
  int64_t used() const { return used_; }

private:
  char* base_;
  int64_t used_ = 0;
};

// Device pointers of one step's working set, carved from the rank's scratch buffer.
struct step_buffers {
  float *x, *qkv, *proj, *gate_up, *logits, *gathered;
  void *h, *attn, *act, *normed;
  int32_t *ids, *token_sequence, *output_rows, *block_tables;
  int64_t *positions, *slots;
};

struct step_sizes {
  int64_t tokens = 0, rows = 0, table_entries = 0;
};

// One rank: its GPU, stream, cuBLAS handle, collective, weights, KV cache and scratch.
struct rank_state {
  int device = 0;
  tp_shard shard;
  cuda::weight_layout layout;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  std::unique_ptr<collective> comm;  // null when tp == 1
  void* weights = nullptr;           // 16-bit arena per layout
  void* kv = nullptr;                // per layer: K [slots, kv_heads, hd] then V
  float* inv_freq = nullptr;
  void* scratch = nullptr;
  int64_t scratch_bytes = 0;
  std::vector<float> host_gathered;

  // Runs on the rank's thread (the device must be current for the frees to be ordered after the
  // stream's work).
  void release() {
    cudaSetDevice(device);
    if (stream != nullptr) cudaStreamSynchronize(stream);
    comm.reset();
    if (blas != nullptr) cublasDestroy(blas);
    for (void* p : {weights, kv, static_cast<void*>(inv_freq), scratch})
      if (p != nullptr) cudaFree(p);
    if (stream != nullptr) cudaStreamDestroy(stream);
    blas = nullptr;
    stream = nullptr;
    weights = kv = scratch = nullptr;
    inv_freq = nullptr;
    cudaGetLastError();
  }

  const uint16_t* w(int64_t offset) const { return static_cast<const uint16_t*>(weights) + offset; }
};

class cuda_backend final : public backend {
public:
  cuda_backend(model_config config, const backend_options& options)
      : config_(std::move(config)), tp_(options.tensor_parallel), blocks_(1, 1) {}

  ~cuda_backend() override {
    if (rank_threads_ == nullptr) return;
    rank_threads_->run_on_each([&](int r) {
      if (static_cast<size_t>(r) < ranks_.size()) ranks_[static_cast<size_t>(r)]->release();
    });
  }

  caf::error init(const checkpoint& weights, const backend_options& options) {
    const auto& c = config_;
    elem_ = cuda::device_elem_type(weights.weight_dtype());
    geometry_.num_layers = c.num_layers;
    geometry_.head_dim = c.head_dim;
    geometry_.block_size = options.kv_block_size;
    for (int r = 0; r < tp_; ++r)
      geometry_.num_kv_heads = std::max(geometry_.num_kv_heads, shard_for_rank(c, tp_, r).kv_heads);
    const int64_t num_blocks = options.kv_cache_bytes / geometry_.bytes_per_block(2);  // checked >= 1
    blocks_ = kv_block_manager(num_blocks, options.kv_block_size);
    slots_ = num_blocks * options.kv_block_size;
    const std::vector<float> inv_freq = rope_inv_freq(c);

    rank_threads_ = std::make_unique<thread_pool>(tp_);
    for (int r = 0; r < tp_; ++r) {
      auto rank = std::make_unique<rank_state>();
      rank->device = r;
      rank->shard = shard_for_rank(c, tp_, r);
      rank->layout = cuda::plan_weights(c, rank->shard);
      ranks_.push_back(std::move(rank));
    }
    // Each rank sets up its own GPU on its own thread (uploads run side by side).
    std::vector<caf::error> errors(static_cast<size_t>(tp_));
    rank_threads_->run_on_each([&](int r) {
      try {  // packing stages each tensor in host memory; no exception may leave a rank thread
        errors[static_cast<size_t>(r)] = init_rank(*ranks_[static_cast<size_t>(r)], weights, inv_freq);
      } catch (const std::bad_alloc&) {
        errors[static_cast<size_t>(r)] =
            make_error(errc::limit_exceeded, "cuda backend: out of host memory staging the weights for GPU " +
                                                 std::to_string(r));
      }
    });
    for (auto& err : errors)
      if (err) return std::move(err);
    if (tp_ > 1) {
      std::vector<int> devices;
      std::vector<cudaStream_t> streams;
      for (auto& rank : ranks_) {
        devices.push_back(rank->device);
        streams.push_back(rank->stream);
      }
      auto comms = cuda::make_nccl_group(devices, streams, *rank_threads_);
      if (!comms) return comms.error();
      for (int r = 0; r < tp_; ++r) ranks_[static_cast<size_t>(r)]->comm = std::move((*comms)[static_cast<size_t>(r)]);
    }
    return caf::none;
  }

  backend_kind kind() const override { return backend_kind::cuda; }
  const model_config& config() const override { return config_; }
  int tensor_parallel() const override { return tp_; }
  caf::error add_sequence(sequence_id id) override { return blocks_.add_sequence(id); }
  void free_sequence(sequence_id id) override { blocks_.free_sequence(id); }
  int64_t sequence_length(sequence_id id) const override { return blocks_.length(id); }
  kv_cache_stats kv_stats() const override { return {blocks_.num_blocks(), blocks_.free_blocks(), blocks_.block_size()}; }

  expected<std::vector<step_logits>> forward(const std::vector<step_item>& items) override {
    if (items.empty()) return std::vector<step_logits>{};
    if (broken_) return make_error(errc::internal, "cuda backend: an earlier step failed on the device (" + broken_why_ +
                                                       "); make a new backend");
    auto prepared = prepare_step(config_, blocks_, items);
    if (!prepared) return prepared.error();
    const prepared_step& step = *prepared;
    const cuda::step_tables tables = cuda::build_step_tables(step);
    step_sizes sizes;
    sizes.tokens = static_cast<int64_t>(step.token_ids.size());
    sizes.rows = static_cast<int64_t>(step.output_tokens.size());
    sizes.table_entries = static_cast<int64_t>(tables.block_tables.size());

    // Phase 1: memory. A failure here changes nothing and is retryable (overloaded).
    std::vector<caf::error> errors(static_cast<size_t>(tp_));
    rank_threads_->run_on_each([&](int r) {
      errors[static_cast<size_t>(r)] = reserve_scratch(*ranks_[static_cast<size_t>(r)], sizes);
    });
    for (auto& err : errors)
      if (err) {
        blocks_.rollback(step.plan);
        return std::move(err);
      }

    // Phase 2: the model. Host memory is taken here, on the calling thread: running out of it is
    // this step's error, not an exception inside a rank thread.
    std::vector<float> logits;
    try {
      logits.resize(static_cast<size_t>(sizes.rows * config_.vocab_size));
      if (ranks_.front()->shard.vocab_split) ranks_.front()->host_gathered.resize(logits.size());  // rank 0's
    } catch (const std::bad_alloc&) {
      blocks_.rollback(step.plan);
      return make_error(errc::overloaded, "cuda backend: out of host memory for the logits of " +
                                              std::to_string(sizes.rows) + " rows");
    }
    rank_threads_->run_on_each([&](int r) {
      errors[static_cast<size_t>(r)] = run_rank(*ranks_[static_cast<size_t>(r)], step, tables, sizes, logits);
    });
    for (auto& err : errors)
      if (err) {
        blocks_.rollback(step.plan);
        broken_ = true;
        broken_why_ = describe(err);
        return make_error(errc::internal, "cuda backend step failed: " + broken_why_);
      }
    blocks_.commit(step.plan);

    return split_logits(items, logits, config_.vocab_size);
  }

private:
  caf::error init_rank(rank_state& R, const checkpoint& weights, const std::vector<float>& inv_freq) {
    const std::string where = "GPU " + std::to_string(R.device) + ": ";
    TRY(from_cuda(cudaSetDevice(R.device), where + "cudaSetDevice"));
    TRY(from_cuda(cudaStreamCreateWithFlags(&R.stream, cudaStreamNonBlocking), where + "cudaStreamCreate"));
    TRY(from_cublas(cublasCreate(&R.blas), where + "cublasCreate"));
    TRY(from_cublas(cublasSetStream(R.blas, R.stream), where + "cublasSetStream"));
    const int64_t weight_bytes = R.layout.total * 2;
    TRY(device_alloc(&R.weights, weight_bytes, where + "weights"));
    const int64_t kv_bytes = 2 * config_.num_layers * slots_ * R.shard.kv_heads * config_.head_dim * 2;
    TRY(device_alloc(&R.kv, kv_bytes, where + "KV cache"));
    void* freq = nullptr;
    TRY(device_alloc(&freq, static_cast<int64_t>(inv_freq.size() * sizeof(float)), where + "RoPE table"));
    R.inv_freq = static_cast<float*>(freq);
    TRY(from_cuda(cudaMemcpy(R.inv_freq, inv_freq.data(), inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice),
                  where + "upload RoPE table"));
    uint16_t* base = static_cast<uint16_t*>(R.weights);
    TRY(cuda::pack_weights(weights, R.shard, R.layout, elem_,
                           [&](int64_t offset, const std::vector<uint16_t>& values) -> caf::error {
                             return from_cuda(cudaMemcpy(base + offset, values.data(), values.size() * 2,
                                                         cudaMemcpyHostToDevice),
                                              where + "upload weights");
                           }));
    // cudaMemcpy from pageable memory may return before its DMA has landed, and the rank's stream
    // does not synchronise with the legacy default stream: wait here, once.
    return from_cuda(cudaDeviceSynchronize(), where + "finishing the uploads");
  }

  static caf::error device_alloc(void** ptr, int64_t bytes, const std::string& what) {
    cudaError_t status = cudaMalloc(ptr, static_cast<size_t>(std::max<int64_t>(bytes, 1)));
    if (status == cudaSuccess) return caf::none;
    *ptr = nullptr;
    cudaGetLastError();  // allocation failures are not sticky; leave the runtime clean
    return from_cuda(status, "cudaMalloc of " + std::to_string(bytes) + " bytes for " + what);
  }

  // Lays the step's buffers out in `base` (nullptr: only measures).
  step_buffers carve(void* base, const rank_state& R, const step_sizes& z, int64_t* bytes) const {
    const auto& c = config_;
    const auto& s = R.shard;
    const int64_t n = z.tokens, hidden = c.hidden_size, hd = c.head_dim;
    const int64_t qkv_dim = (s.q_heads + 2 * s.kv_heads) * hd;
    arena_cursor cur(static_cast<char*>(base));
    step_buffers b{};
    b.x = cur.take<float>(n * hidden);
    b.qkv = cur.take<float>(n * qkv_dim);
    b.proj = cur.take<float>(n * hidden);
    b.gate_up = cur.take<float>(n * 2 * s.mlp_size);
    b.logits = cur.take<float>(z.rows * s.vocab_size);
    b.gathered = s.vocab_split ? cur.take<float>(tp_ * z.rows * s.vocab_size) : nullptr;
    b.h = cur.take<uint16_t>(n * hidden);
    b.attn = cur.take<uint16_t>(n * s.q_heads * hd);
    b.act = cur.take<uint16_t>(n * s.mlp_size);
    b.normed = cur.take<uint16_t>(z.rows * hidden);
    b.ids = cur.take<int32_t>(n);
    b.token_sequence = cur.take<int32_t>(n);
    b.output_rows = cur.take<int32_t>(z.rows);
    b.block_tables = cur.take<int32_t>(z.table_entries);
    b.positions = cur.take<int64_t>(n);
    b.slots = cur.take<int64_t>(n);
    *bytes = cur.used();
    return b;
  }

  caf::error reserve_scratch(rank_state& R, const step_sizes& z) {
    int64_t needed = 0;
    carve(nullptr, R, z, &needed);
    if (needed <= R.scratch_bytes) return caf::none;
    TRY(from_cuda(cudaSetDevice(R.device), "cudaSetDevice"));
    TRY(from_cuda(cudaStreamSynchronize(R.stream), "GPU " + std::to_string(R.device) + ": cudaStreamSynchronize"));
    if (R.scratch != nullptr) cudaFree(R.scratch);
    R.scratch = nullptr;
    R.scratch_bytes = 0;
    const int64_t bytes = (needed + (int64_t{1} << 20) - 1) >> 20 << 20;  // whole MiB: kept for later steps
    caf::error err = device_alloc(&R.scratch, bytes, "the scratch of a step of " + std::to_string(z.tokens) +
                                                         " tokens on GPU " + std::to_string(R.device));
    if (err) return make_error(errc::overloaded, describe(err) + ": retry with a smaller step");
    R.scratch_bytes = bytes;
    return caf::none;
  }

  // y[tokens, out] (float32) = x[tokens, in] (16-bit) * w[out, in]^T (16-bit), float32 accumulation.
  // cuBLAS is column-major: y^T (out x tokens) = op(w) (w's row-major [out, in] is column-major
  // [in, out], transposed) * x^T ([in, tokens] column-major).
  caf::error gemm(rank_state& R, const void* w, const void* x, float* y, int64_t tokens, int64_t in, int64_t out,
                  const char* what) {
    if (tokens == 0) return caf::none;
    const float one = 1.0f, zero = 0.0f;
    const cudaDataType_t dt = elem_ == elem_type::bf16 ? CUDA_R_16BF : CUDA_R_16F;
    return from_cublas(cublasGemmEx(R.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(tokens),
                                    static_cast<int>(in), &one, w, dt, static_cast<int>(in), x, dt,
                                    static_cast<int>(in), &zero, y, CUDA_R_32F, static_cast<int>(out),
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       std::string("cublasGemmEx (") + what + ")");
  }

  template <typename T>
  static caf::error upload(rank_state& R, T* dst, const std::vector<T>& src, const char* what) {
    if (src.empty()) return caf::none;
    return from_cuda(cudaMemcpyAsync(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice, R.stream),
                     std::string("upload ") + what);
  }

  // One rank's share of the step (LlamaForCausalLM.forward, as cpu_backend.cpp's run_rank).
  caf::error run_rank(rank_state& R, const prepared_step& st, const cuda::step_tables& tables, const step_sizes& z,
                      std::vector<float>& logits) {
    const auto& c = config_;
    const auto& s = R.shard;
    const int64_t n = z.tokens, hidden = c.hidden_size, hd = c.head_dim;
    const int64_t q_dim = s.q_heads * hd, kv_dim = s.kv_heads * hd;
    const float eps = static_cast<float>(c.rms_norm_eps);
    const std::string where = "GPU " + std::to_string(R.device) + ": ";
    TRY(from_cuda(cudaSetDevice(R.device), where + "cudaSetDevice"));
    int64_t unused = 0;
    step_buffers b = carve(R.scratch, R, z, &unused);
    TRY(upload(R, b.ids, st.token_ids, "token ids"));
    TRY(upload(R, b.token_sequence, st.item_of_token, "token sequences"));
    TRY(upload(R, b.output_rows, tables.output_rows, "output rows"));
    TRY(upload(R, b.block_tables, tables.block_tables, "block tables"));
    TRY(upload(R, b.positions, st.positions, "positions"));
    TRY(upload(R, b.slots, st.slots, "slots"));
    auto launched = [&](cudaError_t status, const char* what) { return from_cuda(status, where + what); };

    // LlamaModel.embed_tokens
    TRY(launched(cuda::embed_gather(elem_, R.w(R.layout.embed), b.ids, b.x, n, hidden, R.stream), "embed_gather"));
    const int64_t layer_kv = slots_ * kv_dim;  // elements of one layer's K (or V) cache
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const auto& L = R.layout.layers[static_cast<size_t>(l)];
      // input_layernorm, with the previous layer's MLP residual added first
      TRY(launched(cuda::add_rms_norm(elem_, b.x, l == 0 ? nullptr : b.proj, nullptr, R.w(L.input_norm), b.h, n,
                                      hidden, eps, R.stream),
                   "input rms_norm"));
      TRY(gemm(R, R.w(L.qkv), b.h, b.qkv, n, hidden, q_dim + 2 * kv_dim, "qkv_proj"));
      uint16_t* k_cache = static_cast<uint16_t*>(R.kv) + 2 * l * layer_kv;
      uint16_t* v_cache = k_cache + layer_kv;
      TRY(launched(cuda::rope_append(elem_, b.qkv, b.positions, b.slots, R.inv_freq, k_cache, v_cache, n, s.q_heads,
                                     s.kv_heads, hd, R.stream),
                   "rope_append"));
      cuda::attention_args a;
      a.qkv = b.qkv;
      a.k_cache = k_cache;
      a.v_cache = v_cache;
      a.block_tables = b.block_tables;
      a.token_sequence = b.token_sequence;
      a.positions = b.positions;
      a.out = b.attn;
      a.n = n;
      a.q_heads = s.q_heads;
      a.kv_heads = s.kv_heads;
      a.head_dim = hd;
      a.group = c.num_heads / c.num_kv_heads;
      a.q_head_begin = s.q_head_begin;
      a.kv_head_begin = s.kv_head_begin;
      a.max_blocks = tables.max_blocks;
      a.block_size = blocks_.block_size();
      a.scale = 1.0f / std::sqrt(static_cast<float>(hd));
      TRY(launched(cuda::paged_attention(elem_, a, R.stream), "paged_attention"));
      TRY(gemm(R, R.w(L.o), b.attn, b.proj, n, q_dim, hidden, "o_proj"));
      if (R.comm) TRY(R.comm->all_reduce_sum(b.proj, static_cast<size_t>(n * hidden)));
      // residual, post_attention_layernorm
      TRY(launched(cuda::add_rms_norm(elem_, b.x, b.proj, nullptr, R.w(L.post_norm), b.h, n, hidden, eps, R.stream),
                   "post-attention rms_norm"));
      TRY(gemm(R, R.w(L.gate_up), b.h, b.gate_up, n, hidden, 2 * s.mlp_size, "gate_up_proj"));
      TRY(launched(cuda::silu_mul(elem_, b.gate_up, b.act, n, s.mlp_size, R.stream), "silu_mul"));
      TRY(gemm(R, R.w(L.down), b.act, b.proj, n, s.mlp_size, hidden, "down_proj"));
      if (R.comm) TRY(R.comm->all_reduce_sum(b.proj, static_cast<size_t>(n * hidden)));
    }
    // Last residual and LlamaModel.norm on the rows whose logits are wanted, then lm_head: on
    // every rank when the head is split by vocab, else on rank 0 alone.
    const bool leader = &R == ranks_.front().get();  // rank 0 hands the logits back
    if (!s.vocab_split && !leader) return from_cuda(cudaStreamSynchronize(R.stream), where + "step");
    TRY(launched(cuda::add_rms_norm(elem_, b.x, b.proj, b.output_rows, R.w(R.layout.final_norm), b.normed, z.rows,
                                    hidden, eps, R.stream),
                 "final rms_norm"));
    TRY(gemm(R, R.w(R.layout.lm_head), b.normed, b.logits, z.rows, hidden, s.vocab_size, "lm_head"));
    if (!s.vocab_split) {
      TRY(from_cuda(cudaMemcpyAsync(logits.data(), b.logits, logits.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                    R.stream),
                    where + "download logits"));
      return from_cuda(cudaStreamSynchronize(R.stream), where + "step");
    }
    const size_t local = static_cast<size_t>(z.rows * s.vocab_size);
    TRY(R.comm->all_gather(b.logits, local, b.gathered));
    if (leader) {
      TRY(from_cuda(cudaMemcpyAsync(R.host_gathered.data(), b.gathered, R.host_gathered.size() * sizeof(float),
                                    cudaMemcpyDeviceToHost, R.stream),
                    where + "download logits"));
    }
    TRY(from_cuda(cudaStreamSynchronize(R.stream), where + "step"));
    if (!leader) return caf::none;
    // [rank][rows][vocab/tp] -> [rows][vocab]
    for (int r = 0; r < tp_; ++r)
      for (int64_t i = 0; i < z.rows; ++i)
        std::memcpy(logits.data() + i * c.vocab_size + r * s.vocab_size,
                    R.host_gathered.data() + (r * z.rows + i) * s.vocab_size,
                    static_cast<size_t>(s.vocab_size) * sizeof(float));
    return caf::none;
  }

  model_config config_;
  int tp_;
  elem_type elem_ = elem_type::bf16;
  kv_cache_geometry geometry_;
  kv_block_manager blocks_;
  int64_t slots_ = 0;
  bool broken_ = false;
  std::string broken_why_;
  std::unique_ptr<thread_pool> rank_threads_;
  std::vector<std::unique_ptr<rank_state>> ranks_;
};

} // namespace

expected<std::unique_ptr<backend>> make_cuda_backend(const checkpoint& weights, const backend_options& options) {
  if (auto err = cuda::check_cuda_options(weights.config(), options)) return err;
  const cuda::device_probe probe = cuda::probe_devices();
  if (probe.count == 0) return make_error(errc::unavailable, "cuda backend: " + probe.why);
  if (auto err = cuda::check_device_count(options.tensor_parallel, probe.count)) return err;
  try {
    auto b = std::make_unique<cuda_backend>(weights.config(), options);
    if (auto err = b->init(weights, options)) return err;
    return std::unique_ptr<backend>(std::move(b));
  } catch (const std::bad_alloc&) {
    return make_error(errc::limit_exceeded, "cuda backend: out of host memory setting up " + weights.directory());
  }
}

} // namespace triplane::gpu
