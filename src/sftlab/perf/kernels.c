/* sftlab's CPU kernels (sftlab/perf/kernels.py builds this with -O3 -march=native -fopenmp).
 *
 * Dropout: element i is kept when the int16 lane (i % 4) of the 64-bit word
 * splitmix64(seed, i / 4) is >= threshold; kept elements become x * scale (rounded once, as
 * torch's x * scale), dropped ones 0. The mask is a pure function of (seed, i): the backward
 * recomputes it instead of storing it, and the result does not depend on the thread count.
 *
 * GELU (exact, erf form): y = x * Phi(x) and its derivative d = Phi(x) + x * phi(x) in one pass,
 * so the backward is grad * d. erfc from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, the
 * formula ATen's vectorised erf uses) and exp from the Cephes polynomial.
 *
 * Threads: OpenMP, the same libgomp (and thread count) as torch's, which is loaded first.
 * Built with -fno-trapping-math so that gcc vectorises the selects.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9e3779b97f4a7c15ULL
#define MIN_PARALLEL 32768 /* elements: below this one thread is faster */

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN (as torch) */
    uint32_t b;
    memcpy(&b, &f, 4);
    uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    return (b & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((b >> 16) | 0x40u) : (uint16_t)rounded;
}

/* the calling thread's share [*begin, *end) of n items, in multiples of 64 */
static inline void share(int64_t n, int64_t *begin, int64_t *end) {
    int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t per = ((n + nt - 1) / nt + 63) & ~(int64_t)63;
    *begin = t * per < n ? t * per : n;
    *end = *begin + per < n ? *begin + per : n;
}

static inline int keep(uint64_t word, int lane, int32_t threshold) {
    return (int32_t)(int16_t)(uint16_t)(word >> (16 * lane)) >= threshold;
}

static void dropout_f32_words(const float *restrict x, float *restrict y, int64_t w0, int64_t w1,
                              uint64_t seed, int32_t threshold, float scale) {
    for (int64_t w = w0; w < w1; ++w) {
        uint64_t r = mix64(seed + (uint64_t)(w + 1) * GOLDEN);
        for (int k = 0; k < 4; ++k) {
            float v = x[4 * w + k] * scale;
            y[4 * w + k] = keep(r, k, threshold) ? v : 0.0f;
        }
    }
}

static void dropout_bf16_words(const uint16_t *restrict x, uint16_t *restrict y, int64_t w0, int64_t w1,
                               uint64_t seed, int32_t threshold, float scale) {
    for (int64_t w = w0; w < w1; ++w) {
        uint64_t r = mix64(seed + (uint64_t)(w + 1) * GOLDEN);
        for (int k = 0; k < 4; ++k) {
            uint16_t v = f32_to_bf16(bf16_to_f32(x[4 * w + k]) * scale);
            y[4 * w + k] = keep(r, k, threshold) ? v : (uint16_t)0;
        }
    }
}

void sftlab_dropout_f32(const float *x, float *y, int64_t n, uint64_t seed, int32_t threshold, float scale) {
    int64_t words = n / 4;
#pragma omp parallel if (n >= MIN_PARALLEL)
    {
        int64_t w0, w1;
        share(words, &w0, &w1);
        dropout_f32_words(x, y, w0, w1, seed, threshold, scale);
    }
    uint64_t r = mix64(seed + (uint64_t)(words + 1) * GOLDEN);
    for (int64_t i = words * 4; i < n; ++i)
        y[i] = keep(r, (int)(i - words * 4), threshold) ? x[i] * scale : 0.0f;
}

void sftlab_dropout_bf16(const uint16_t *x, uint16_t *y, int64_t n, uint64_t seed, int32_t threshold, float scale) {
    int64_t words = n / 4;
#pragma omp parallel if (n >= MIN_PARALLEL)
    {
        int64_t w0, w1;
        share(words, &w0, &w1);
        dropout_bf16_words(x, y, w0, w1, seed, threshold, scale);
    }
    uint64_t r = mix64(seed + (uint64_t)(words + 1) * GOLDEN);
    for (int64_t i = words * 4; i < n; ++i)
        y[i] = keep(r, (int)(i - words * 4), threshold) ? f32_to_bf16(bf16_to_f32(x[i]) * scale) : (uint16_t)0;
}

static inline float exp_nonpositive(float x) { /* e^x for x <= 0 (Cephes expf) */
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, 4);
    return p * s;
}

static inline void gelu_one(float v, float *y, float *d) {
    float u = fabsf(v) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.3275911f * u);
    float e = exp_nonpositive(-u * u);
    float half_erfc = 0.5f * ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t
                              + 0.254829592f) * t * e;
    float cdf = v >= 0.0f ? 1.0f - half_erfc : half_erfc;
    *y = v * cdf;
    *d = cdf + v * e * 0.39894228040143268f;
}

static void gelu_f32_range(const float *restrict x, float *restrict y, float *restrict d, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) gelu_one(x[i], &y[i], &d[i]);
}

static void gelu_bf16_range(const uint16_t *restrict x, uint16_t *restrict y, float *restrict d, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
        float yi;
        gelu_one(bf16_to_f32(x[i]), &yi, &d[i]);
        y[i] = f32_to_bf16(yi);
    }
}

static void scale_bf16_range(const uint16_t *restrict g, const float *restrict d, uint16_t *restrict out,
                             int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = f32_to_bf16(bf16_to_f32(g[i]) * d[i]);
}

void sftlab_gelu_f32(const float *x, float *y, float *d, int64_t n) {
#pragma omp parallel if (n >= MIN_PARALLEL)
    {
        int64_t b, e;
        share(n, &b, &e);
        gelu_f32_range(x, y, d, b, e);
    }
}

void sftlab_gelu_bf16(const uint16_t *x, uint16_t *y, float *d, int64_t n) {
#pragma omp parallel if (n >= MIN_PARALLEL)
    {
        int64_t b, e;
        share(n, &b, &e);
        gelu_bf16_range(x, y, d, b, e);
    }
}

/* out = bf16(g * d): the GELU backward for bf16 activations (d kept in fp32) */
void sftlab_gelu_backward_bf16(const uint16_t *g, const float *d, uint16_t *out, int64_t n) {
#pragma omp parallel if (n >= MIN_PARALLEL)
    {
        int64_t b, e;
        share(n, &b, &e);
        scale_bf16_range(g, d, out, b, e);
    }
}
