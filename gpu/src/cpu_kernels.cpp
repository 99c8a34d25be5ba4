// CPU float32 kernels. Dot products use eight independent accumulators so the compiler can
// vectorise them without -ffast-math; on x86-64 the hot loops are also compiled for AVX2/FMA and
// picked at run time (target_clones), so one binary runs everywhere.
#include "cpu_kernels.hpp"

#include <cmath>

namespace triplane::gpu::cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
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

// Four weight rows against one input row: the input row is loaded once for four outputs.
TRIPLANE_MULTIVERSION
void dot4(const float* x, const float* w0, const float* w1, const float* w2, const float* w3, int64_t n,
          float* out) {
  float a0[8] = {}, a1[8] = {}, a2[8] = {}, a3[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      float xv = x[i + j];
      a0[j] += xv * w0[i + j];
      a1[j] += xv * w1[i + j];
      a2[j] += xv * w2[i + j];
      a3[j] += xv * w3[i + j];
    }
  }
  auto reduce = [](const float* a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  };
  float s0 = reduce(a0), s1 = reduce(a1), s2 = reduce(a2), s3 = reduce(a3);
  for (; i < n; ++i) {
    s0 += x[i] * w0[i];
    s1 += x[i] * w1[i];
    s2 += x[i] * w2[i];
    s3 += x[i] * w3[i];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

} // namespace

void matmul(const float* x, const float* w, float* y, int64_t tokens, int64_t in, int64_t out, thread_pool& pool) {
  // Rows of the weight are split across threads; each group of 4 rows (12 KiB for in = 768) stays
  // in cache while every token row passes over it.
  const int64_t groups = (out + 3) / 4;
  pool.parallel_for(
      groups,
      [&](int64_t g_begin, int64_t g_end) {
        for (int64_t g = g_begin; g < g_end; ++g) {
          int64_t o = g * 4;
          if (o + 4 <= out) {
            const float* w0 = w + o * in;
            for (int64_t t = 0; t < tokens; ++t) {
              float r[4];
              dot4(x + t * in, w0, w0 + in, w0 + 2 * in, w0 + 3 * in, in, r);
              float* yt = y + t * out + o;
              yt[0] = r[0];
              yt[1] = r[1];
              yt[2] = r[2];
              yt[3] = r[3];
            }
          } else {
            for (int64_t oo = o; oo < out; ++oo)
              for (int64_t t = 0; t < tokens; ++t) y[t * out + oo] = dot(x + t * in, w + oo * in, in);
          }
        }
      },
      8);
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
