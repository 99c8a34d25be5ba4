// Host-side parts of the CUDA backend: probing, status mapping, checks, weight packing, step
// layout and the NCCL group. Nothing here launches a kernel.
#include "cuda_support.hpp"

#include <algorithm>
#include <climits>
#include <cstring>

#include "../thread_pool.hpp"
#include "triplane/gpu/checkpoint.hpp"

namespace triplane::gpu::cuda {

device_probe probe_devices() {
  device_probe probe;
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // the runtime keeps the failure as its last error; callers start clean
    probe.why = std::string("no usable GPU: cudaGetDeviceCount failed: ") + cudaGetErrorName(status) + ": " +
                cudaGetErrorString(status);
    return probe;
  }
  if (count <= 0) {
    probe.why = "no usable GPU: the CUDA driver reports no device";
    return probe;
  }
  // The kernels are built for sm_90 (Hopper); older devices cannot run them.
  int usable = 0;
  for (int d = 0; d < count; ++d) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) == cudaSuccess && major >= 9) ++usable;
    else if (probe.why.empty())
      probe.why = "GPU " + std::to_string(d) + " has compute capability " + std::to_string(major) +
                  ".x, below the 9.0 this build targets";
  }
  cudaGetLastError();
  probe.count = usable;
  if (usable > 0) probe.why.clear();
  return probe;
}

caf::error from_cuda(cudaError_t status, const std::string& what) {
  if (status == cudaSuccess) return caf::none;
  std::string msg = what + ": " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status);
  switch (status) {
    case cudaErrorMemoryAllocation:
      return make_error(errc::overloaded, msg + " (device memory exhausted)");
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorDevicesUnavailable:
      return make_error(errc::unavailable, msg);
    default:
      return make_error(errc::internal, msg);
  }
}

caf::error from_cublas(cublasStatus_t status, const std::string& what) {
  if (status == CUBLAS_STATUS_SUCCESS) return caf::none;
  std::string msg = what + ": " + cublasGetStatusName(status) + ": " + cublasGetStatusString(status);
  switch (status) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return make_error(errc::overloaded, msg + " (device memory exhausted)");
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return make_error(errc::unavailable, msg);
    default:
      return make_error(errc::internal, msg);
  }
}

caf::error from_nccl(ncclResult_t status, const std::string& what) {
  if (status == ncclSuccess) return caf::none;
  return make_error(errc::internal, what + ": NCCL error " + std::to_string(static_cast<int>(status)) + ": " +
                                        ncclGetErrorString(status));
}

caf::error check_cuda_options(const model_config& c, const backend_options& options) {
  if (auto err = check_tensor_parallel(c, options.tensor_parallel)) return err;
  auto bad = [](const std::string& why) { return make_error(errc::invalid_argument, "cuda backend: " + why); };
  if (options.kv_block_size < 1 || options.kv_block_size > 4096) return bad("kv_block_size must be in [1, 4096]");
  if (options.threads < 0) return bad("threads must be >= 0");
  if (c.head_dim > max_head_dim)
    return bad("head_dim " + std::to_string(c.head_dim) + " exceeds the " + std::to_string(max_head_dim) +
               " the attention kernel supports");
  // cuBLAS takes int dimensions; the largest operands are [vocab, hidden] and [intermediate, hidden].
  const int64_t widest = std::max({c.vocab_size, 2 * c.intermediate_size, c.q_size() + 2 * c.kv_size(), c.hidden_size});
  if (widest > INT_MAX) return bad("a weight matrix has more than INT_MAX rows");
  kv_cache_geometry g;
  g.num_layers = c.num_layers;
  g.head_dim = c.head_dim;
  g.block_size = options.kv_block_size;
  for (int r = 0; r < options.tensor_parallel; ++r)
    g.num_kv_heads = std::max(g.num_kv_heads, shard_for_rank(c, options.tensor_parallel, r).kv_heads);
  const int64_t per_block = g.bytes_per_block(2);
  if (options.kv_cache_bytes < per_block)
    return bad("kv_cache_bytes " + std::to_string(options.kv_cache_bytes) + " is below one block (" +
               std::to_string(per_block) + " bytes)");
  if (options.kv_cache_bytes / per_block > (int64_t{1} << 30)) return bad("kv_cache_bytes is too large");
  return caf::none;
}

caf::error check_device_count(int tensor_parallel, int device_count) {
  if (tensor_parallel > device_count)
    return make_error(errc::invalid_argument,
                      "cuda backend: tensor parallelism " + std::to_string(tensor_parallel) + " needs one GPU per rank, " +
                          std::to_string(device_count) + " usable GPU(s) present (NCCL refuses two ranks on one GPU)");
  return caf::none;
}

elem_type device_elem_type(dtype checkpoint_dtype) {
  return checkpoint_dtype == dtype::f16 ? elem_type::f16 : elem_type::bf16;
}

weight_layout plan_weights(const model_config& c, const tp_shard& s) {
  weight_layout w;
  int64_t next = 0;
  auto take = [&](int64_t elements) {
    int64_t at = next;
    next += (elements + 127) / 128 * 128;
    return at;
  };
  const int64_t hd = c.head_dim, hidden = c.hidden_size;
  w.embed = take(c.vocab_size * hidden);
  w.final_norm = take(hidden);
  // Tied and not split: the head is the embedding itself; tied and split: rank r's vocab rows of it.
  if (c.tie_word_embeddings) w.lm_head = w.embed + s.vocab_begin * hidden;
  else w.lm_head = take(s.vocab_size * hidden);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    layer_offsets L;
    L.input_norm = take(hidden);
    L.post_norm = take(hidden);
    L.qkv = take((s.q_heads + 2 * s.kv_heads) * hd * hidden);
    L.o = take(hidden * s.q_heads * hd);
    L.gate_up = take(2 * s.mlp_size * hidden);
    L.down = take(hidden * s.mlp_size);
    w.layers.push_back(L);
  }
  w.total = next;
  return w;
}

void pack_block(const tensor_view& t, int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols,
                elem_type elem, uint16_t* out) {
  const int64_t width = t.shape.size() == 2 ? t.shape[1] : t.numel();
  const bool same = (elem == elem_type::bf16 && t.type == dtype::bf16) || (elem == elem_type::f16 && t.type == dtype::f16);
  std::vector<float> row;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first = (row_begin + r) * width + col_begin;
    uint16_t* dst = out + r * cols;
    if (same) {
      std::memcpy(dst, t.data + first * 2, static_cast<size_t>(cols) * 2);  // unaligned-safe
      continue;
    }
    row.resize(static_cast<size_t>(cols));
    convert_to_f32(t, first, cols, row.data());
    for (int64_t i = 0; i < cols; ++i)
      dst[i] = elem == elem_type::bf16 ? f32_to_bf16(row[static_cast<size_t>(i)]) : f32_to_f16(row[static_cast<size_t>(i)]);
  }
}

caf::error pack_weights(const checkpoint& weights, const tp_shard& s, const weight_layout& layout, elem_type elem,
                        const std::function<caf::error(int64_t, const std::vector<uint16_t>&)>& sink) {
  const auto& c = weights.config();
  const int64_t hd = c.head_dim, hidden = c.hidden_size;
  std::vector<uint16_t> buf;
  // Appends a block of a tensor to buf.
  auto add = [&](const std::string& name, int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols) {
    size_t base = buf.size();
    buf.resize(base + static_cast<size_t>(rows * cols));
    pack_block(*weights.get(name).view, row_begin, rows, col_begin, cols, elem, buf.data() + base);
  };
  auto flush = [&](int64_t offset) {
    caf::error err = sink(offset, buf);
    buf.clear();
    return err;
  };
  using tensor_names::layer;
  add(tensor_names::embed_tokens(), 0, c.vocab_size, 0, hidden);
  if (auto err = flush(layout.embed)) return err;
  add(tensor_names::final_norm(), 0, 1, 0, hidden);
  if (auto err = flush(layout.final_norm)) return err;
  if (!c.tie_word_embeddings) {
    add(tensor_names::lm_head(), s.vocab_begin, s.vocab_size, 0, hidden);
    if (auto err = flush(layout.lm_head)) return err;
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const auto& L = layout.layers[static_cast<size_t>(l)];
    add(layer(l, "input_layernorm.weight"), 0, 1, 0, hidden);
    if (auto err = flush(L.input_norm)) return err;
    add(layer(l, "post_attention_layernorm.weight"), 0, 1, 0, hidden);
    if (auto err = flush(L.post_norm)) return err;
    add(layer(l, "self_attn.q_proj.weight"), s.q_head_begin * hd, s.q_heads * hd, 0, hidden);
    add(layer(l, "self_attn.k_proj.weight"), s.kv_head_begin * hd, s.kv_heads * hd, 0, hidden);
    add(layer(l, "self_attn.v_proj.weight"), s.kv_head_begin * hd, s.kv_heads * hd, 0, hidden);
    if (auto err = flush(L.qkv)) return err;
    add(layer(l, "self_attn.o_proj.weight"), 0, hidden, s.q_head_begin * hd, s.q_heads * hd);
    if (auto err = flush(L.o)) return err;
    add(layer(l, "mlp.gate_proj.weight"), s.mlp_begin, s.mlp_size, 0, hidden);
    add(layer(l, "mlp.up_proj.weight"), s.mlp_begin, s.mlp_size, 0, hidden);
    if (auto err = flush(L.gate_up)) return err;
    add(layer(l, "mlp.down_proj.weight"), 0, hidden, s.mlp_begin, s.mlp_size);
    if (auto err = flush(L.down)) return err;
  }
  return caf::none;
}

step_tables build_step_tables(const prepared_step& step) {
  step_tables t;
  for (const auto& p : step.plan) t.max_blocks = std::max(t.max_blocks, static_cast<int64_t>(p.block_table->size()));
  t.block_tables.assign(step.plan.size() * static_cast<size_t>(t.max_blocks), 0);
  for (size_t i = 0; i < step.plan.size(); ++i) {
    const auto& table = *step.plan[i].block_table;
    std::copy(table.begin(), table.end(),
              t.block_tables.begin() + static_cast<std::ptrdiff_t>(i * static_cast<size_t>(t.max_blocks)));
  }
  t.output_rows.assign(step.output_tokens.begin(), step.output_tokens.end());
  return t;
}

namespace {

class nccl_collective final : public collective {
public:
  nccl_collective(ncclComm_t comm, cudaStream_t stream, int device, int rank, int size)
      : comm_(comm), stream_(stream), device_(device), rank_(rank), size_(size) {}
  /// Destroys the communicator; ranks destroy theirs side by side (see make_nccl_group).
  ~nccl_collective() override {
    if (comm_ == nullptr) return;
    cudaSetDevice(device_);
    ncclCommDestroy(comm_);
  }
  /// Tears the communicator down without waiting for the other ranks (error paths).
  void abort() {
    if (comm_ == nullptr) return;
    cudaSetDevice(device_);
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  caf::error all_reduce_sum(float* data, size_t count) override {
    return from_nccl(ncclAllReduce(data, data, count, ncclFloat32, ncclSum, comm_, stream_), "ncclAllReduce");
  }
  caf::error all_gather(const float* send, size_t count, float* recv) override {
    return from_nccl(ncclAllGather(send, recv, count, ncclFloat32, comm_, stream_), "ncclAllGather");
  }

private:
  ncclComm_t comm_;
  cudaStream_t stream_;
  int device_, rank_, size_;
};

} // namespace

expected<std::vector<std::unique_ptr<collective>>> make_nccl_group(const std::vector<int>& devices,
                                                                   const std::vector<cudaStream_t>& streams,
                                                                   thread_pool& rank_threads) {
  const int ranks = static_cast<int>(devices.size());
  if (ranks < 1 || streams.size() != devices.size() || rank_threads.size() != ranks)
    return make_error(errc::invalid_argument, "make_nccl_group: devices, streams and threads differ in number");
  ncclUniqueId id;
  if (auto err = from_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId")) return err;
  std::vector<ncclComm_t> comms(static_cast<size_t>(ranks), nullptr);
  std::vector<caf::error> errors(static_cast<size_t>(ranks));
  // ncclCommInitRank blocks until every rank has joined: one thread per rank.
  rank_threads.run_on_each([&](int r) {
    const auto i = static_cast<size_t>(r);
    if (auto err = from_cuda(cudaSetDevice(devices[i]), "cudaSetDevice")) {
      errors[i] = std::move(err);
      return;
    }
    errors[i] = from_nccl(ncclCommInitRank(&comms[i], ranks, id, r),
                          "ncclCommInitRank (rank " + std::to_string(r) + ", GPU " + std::to_string(devices[i]) + ")");
  });
  caf::error first;
  for (auto& err : errors)
    if (err && !first) first = err;
  if (first) {
    // Some rank failed: the others' communicators may wait for it forever; abort them (local).
    for (size_t i = 0; i < comms.size(); ++i)
      if (comms[i] != nullptr) nccl_collective(comms[i], streams[i], devices[i], static_cast<int>(i), ranks).abort();
    return first;
  }
  std::vector<std::unique_ptr<collective>> out;
  for (int r = 0; r < ranks; ++r) {
    const auto i = static_cast<size_t>(r);
    out.push_back(std::make_unique<nccl_collective>(comms[i], streams[i], devices[i], r, ranks));
  }
  return out;
}

} // namespace triplane::gpu::cuda
