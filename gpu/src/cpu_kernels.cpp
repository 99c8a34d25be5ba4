// CPU float32 kernels. Dot products use eight independent accumulators so the compiler can
// vectorise them without -ffast-math; on x86-64 the hot loops are also compiled for AVX2/FMA and
// picked at run time (target_clones), so one binary runs everywhere.
#include "cpu_kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace triplane::gpu::cpu {

// Not under ThreadSanitizer: its instrumentation of the ifunc resolver runs before TSan is set up.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
#define TRIPLANE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TRIPLANE_MULTIVERSION
#endif

TRIPLANE_MULTIVERSION
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

namespace {

// Eight floats as one value: AVX registers in the x86-64-v3 clone, two SSE registers otherwise.
typedef float v8 __attribute__((vector_size(32)));

// Vectors pass by reference: by value their ABI would differ between the two clones.
inline void load8(v8& v, const float* p) { std::memcpy(&v, p, sizeof v); }

inline float hsum(const v8& v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// y[t][r] = dot(x[t], w[r]) for ROWS consecutive weight rows and TOKENS input rows: each weight
// load serves TOKENS products and each input load ROWS products.
template <int ROWS, int TOKENS>
TRIPLANE_MULTIVERSION void tile(const float* x, const float* w, float* y, int64_t in, int64_t out) {
  v8 acc[TOKENS][ROWS];
  for (int t = 0; t < TOKENS; ++t)
    for (int r = 0; r < ROWS; ++r) acc[t][r] = v8{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    v8 xv[TOKENS];
    for (int t = 0; t < TOKENS; ++t) load8(xv[t], x + t * in + i);
    for (int r = 0; r < ROWS; ++r) {
      v8 wv;
      load8(wv, w + r * in + i);
      for (int t = 0; t < TOKENS; ++t) acc[t][r] += xv[t] * wv;
    }
  }
  for (int t = 0; t < TOKENS; ++t)
    for (int r = 0; r < ROWS; ++r) {
      float s = hsum(acc[t][r]);
      for (int64_t k = i; k < in; ++k) s += x[t * in + k] * w[r * in + k];
      y[t * out + r] = s;
    }
}

} // namespace

void matmul(const float* x, const float* w, float* y, int64_t tokens, int64_t in, int64_t out, thread_pool& pool) {
  // Threads split the weight rows in chunks of 64 (192 KiB at in = 768: held in L2), so the
  // weights stream from memory once per call whatever the token count. Within a chunk, each pair
  // of input rows (in L1) meets the chunk four rows at a time.
  constexpr int64_t rows_per_chunk = 64;
  const int64_t chunks = (out + rows_per_chunk - 1) / rows_per_chunk;
  pool.parallel_for(chunks, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t r0 = c * rows_per_chunk;
      const int64_t r1 = std::min(out, r0 + rows_per_chunk);
      int64_t t = 0;
      for (; t + 2 <= tokens; t += 2) {
        int64_t o = r0;
        for (; o + 4 <= r1; o += 4) tile<4, 2>(x + t * in, w + o * in, y + t * out + o, in, out);
        for (; o < r1; ++o) tile<1, 2>(x + t * in, w + o * in, y + t * out + o, in, out);
      }
      if (t < tokens) {
        int64_t o = r0;
        for (; o + 4 <= r1; o += 4) tile<4, 1>(x + t * in, w + o * in, y + t * out + o, in, out);
        for (; o < r1; ++o) tile<1, 1>(x + t * in, w + o * in, y + t * out + o, in, out);
      }
    }
  });
}

void rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = out + r * n;
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    float variance = static_cast<float>(sum / static_cast<double>(n));
    float inv = 1.0f / std::sqrt(variance + eps);
    for (int64_t i = 0; i < n; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void apply_rope(float* v, int64_t heads, int64_t head_dim, int64_t position, const float* inv_freq) {
  const int64_t half = head_dim / 2;
  const float pos = static_cast<float>(position);
  for (int64_t i = 0; i < half; ++i) {
    float freq = pos * inv_freq[i];
    float c = std::cos(freq);
    float s = std::sin(freq);
    for (int64_t h = 0; h < heads; ++h) {
      float* head = v + h * head_dim;
      float x1 = head[i];
      float x2 = head[i + half];
      head[i] = x1 * c - x2 * s;
      head[i + half] = x2 * c + x1 * s;
    }
  }
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = (g / (1.0f + std::exp(-g))) * up[i];
  }
}

} // namespace triplane::gpu::cpu
