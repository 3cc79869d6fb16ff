/* Matrix-vector products for decode on CPUs, float32 activations: float32, weight-only int8
 * and int4 weights, each behind one descriptor (`Lin`, cpu_common.h) so a block step takes any
 * mix of them.
 *
 * Why: decode streams every weight once per token, so its speed is bytes / bandwidth. Here each
 * weight row is read once for all (few) batch rows, split over threads; quantized weights are
 * read as codes (converting them to a float weight first reads 1 or 0.5 byte per weight and then
 * writes and reads 4). Compiled with -O3 -ffast-math -march=native the inner loops vectorise.
 * Measured on a 2-core AVX2 machine, 130m head shape (50280 x 768): float32 5.3-5.5 ms; with the
 * plain loops int8 2.4-3.2 ms and int4 3.1-3.2 ms, with explicit AVX2 accumulators (below) int8
 * 2.1 ms and int4 3.0 ms (26816 x 768: int8 1.0 vs 1.4-1.7, int4 1.4 vs 1.6). A 32-lane
 * partial-sum array, left to the vectoriser, left int8 unchanged and made int4 2.2x slower.
 * Twins: F.linear, reference.int8_linear_ref and reference.int4_linear_ref. */
#include <stddef.h>
#include <stdint.h>

#include "cpu_common.h"

/* y (b, n), row stride ldy = W (n, k) . x (b, k) rows of stride ldx, + bias (n) or NULL */
static void gemv(const float *W, const float *bias, const float *x, long ldx, float *y, long ldy,
                 long b, long n, long k, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long i = 0; i < n; i++) {
        const float *w = W + i * k;
        for (long r = 0; r < b; r++) {  /* the weight row stays in L1 across the few batch rows */
            const float *xr = x + r * ldx;
            float acc = 0.0f;
            for (long j = 0; j < k; j++) acc += w[j] * xr[j];
            y[r * ldy + i] = bias ? acc + bias[i] : acc;
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* int8 codes . float32 x: 32 codes per step into four independent 8-wide accumulators. The plain
 * loop below vectorises too, but with one accumulator every FMA waits on the previous one:
 * measured on 2 AVX2 cores, 130m head shape, 11.7 -> 15.0 GMAC/s (in cache 9.5 -> 13.0). */
static float dot_i8(const int8_t *w, const float *x, long k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long j = 0;
    for (; j + 32 <= k; j += 32) {
        __m256i q = _mm256_loadu_si256((const __m256i *)(w + j));
        __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                             _mm256_loadu_ps(x + j + 24), a3);
    }
    float acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < k; j++) acc += (float)w[j] * x[j];
    return acc;
}
#else
static float dot_i8(const int8_t *w, const float *x, long k) {
    float acc = 0.0f;
    for (long j = 0; j < k; j++) acc += (float)w[j] * x[j];
    return acc;
}
#endif

/* the same with int8 codes W and one scale per output row */
static void gemv_i8(const int8_t *W, const float *s, const float *bias, const float *x, long ldx, float *y,
                    long ldy, long b, long n, long k, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long i = 0; i < n; i++) {
        const int8_t *w = W + i * k;
        for (long r = 0; r < b; r++) {
            float acc = dot_i8(w, x + r * ldx, k);
            y[r * ldy + i] = bias ? acc * s[i] + bias[i] : acc * s[i];
        }
    }
}

/* sum_j u(2j) e[j] + u(2j+1) o[j] over `half` bytes p, u the unsigned nibbles of p ^ flip */
#if defined(__AVX2__) && defined(__FMA__)
static float dot_u4(const uint8_t *p, uint8_t flip, const float *e, const float *o, long half) {
    /* 16 bytes a step: low and high nibbles widened 8 at a time, four accumulators in flight
     * (the plain loop: one accumulator; 130m head shape 3.1-3.2 ms before) */
    const __m128i fl = _mm_set1_epi8((char)flip), m4 = _mm_set1_epi8(15);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long j = 0;
    for (; j + 16 <= half; j += 16) {
        __m128i u = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(p + j)), fl);
        __m128i lo = _mm_and_si128(u, m4), hi = _mm_and_si128(_mm_srli_epi16(u, 4), m4);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(e + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(o + j), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_loadu_ps(e + j + 8), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                             _mm256_loadu_ps(o + j + 8), a3);
    }
    float acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < half; j++) {
        uint8_t u = p[j] ^ flip;
        acc += (float)(u & 15) * e[j] + (float)(u >> 4) * o[j];
    }
    return acc;
}
#else
static float dot_u4(const uint8_t *p, uint8_t flip, const float *e, const float *o, long half) {
    float acc = 0.0f;
    for (long j = 0; j < half; j++) {
        uint8_t u = p[j] ^ flip;
        acc += (float)(u & 15) * e[j] + (float)(u >> 4) * o[j];
    }
    return acc;
}
#endif

/* Packed 4-bit codes P (n, k/2) (element 2j in the low nibble of byte j), group scales s (n, G)
 * and zero points z (n, G) (NULL: symmetric, two's complement codes, zero 8 once flipped to
 * unsigned). Per group: s * (sum_j u_j x_j - z * sum_j x_j) with unsigned codes u. x arrives
 * split into its even and odd columns xe, xo (b, k/2), so each byte's two nibbles multiply two
 * contiguous streams; xsum (b, G) holds each group's sum of x. */
static void gemv_u4(const uint8_t *P, const float *s, const float *z, const float *bias, const float *xe,
                    const float *xo, const float *xsum, float *y, long ldy, long b, long n, long k, long gs,
                    int nt) {
    long G = k / gs, half = gs / 2;
    uint8_t flip = z ? 0 : 0x88;  /* symmetric: q in [-7, 7] -> u = q + 8 in both nibbles */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long i = 0; i < n; i++) {
        for (long r = 0; r < b; r++) {
            float acc = 0.0f;
            for (long g = 0; g < G; g++) {
                const uint8_t *p = P + i * (k / 2) + g * half;
                const float *e = xe + r * (k / 2) + g * half, *o = xo + r * (k / 2) + g * half;
                float part = dot_u4(p, flip, e, o, half);
                acc += s[i * G + g] * (part - (z ? z[i * G + g] : 8.0f) * xsum[r * G + g]);
            }
            y[r * ldy + i] = bias ? acc + bias[i] : acc;
        }
    }
}

/* xe, xo (b, k/2): the even and odd columns of x (b, k) rows of stride ldx; xsum (b, k/gs) */
static void split_x(const float *x, long ldx, float *xe, float *xo, float *xsum, long b, long k, long gs) {
    for (long r = 0; r < b; r++) {
        const float *xr = x + r * ldx;
        for (long j = 0; j < k / 2; j++) {
            xe[r * (k / 2) + j] = xr[2 * j];
            xo[r * (k / 2) + j] = xr[2 * j + 1];
        }
        for (long g = 0; g < k / gs; g++) {
            float t = 0.0f;
            for (long j = g * gs; j < (g + 1) * gs; j++) t += xr[j];
            xsum[r * (k / gs) + g] = t;
        }
    }
}

void lin_apply(const Lin *L, const float *x, long ldx, float *y, long ldy, long b, long n, long k, int nt,
               float *scratch) {
    if (L->in_scale) {  /* AWQ / SmoothQuant smoothing: x * in_scale first */
        for (long r = 0; r < b; r++)
            for (long j = 0; j < k; j++) scratch[r * k + j] = x[r * ldx + j] * L->in_scale[j];
        x = scratch;
        ldx = k;
        scratch += b * k;
    }
    if (L->kind == LIN_F32) {
        gemv((const float *)L->w, L->bias, x, ldx, y, ldy, b, n, k, nt);
    } else if (L->kind == LIN_INT8) {
        gemv_i8((const int8_t *)L->w, L->scales, L->bias, x, ldx, y, ldy, b, n, k, nt);
    } else {
        float *xe = scratch, *xo = xe + b * (k / 2), *xsum = xo + b * (k / 2);
        split_x(x, ldx, xe, xo, xsum, b, k, L->gs);
        gemv_u4((const uint8_t *)L->w, L->scales, L->zeros, L->bias, xe, xo, xsum, y, ldy, b, n, k, L->gs, nt);
    }
}

/* Entry points for the module path (ops.linear / int8_linear / int4_linear at decode): x (b, k)
 * and y (b, n) contiguous; scratch >= b * (2k + k / gs) floats for int4. */
/* 1 when the explicit AVX2 + FMA loops were compiled in, 0 for the plain loops (-march without AVX2) */
int md_simd_level(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

void gemv_f32(const float *W, const float *bias, const float *x, float *y, long b, long n, long k, int nt) {
    gemv(W, bias, x, k, y, n, b, n, k, nt);
}

void int8_gemv_f32(const int8_t *W, const float *s, const float *x, float *y, long b, long n, long k, int nt) {
    gemv_i8(W, s, NULL, x, k, y, n, b, n, k, nt);
}

void int4_gemv_f32(const uint8_t *P, const float *s, const float *z, const float *x, float *y, float *scratch,
                   long b, long n, long k, long gs, int nt) {
    Lin L = {LIN_INT4, P, s, z, NULL, NULL, gs};
    lin_apply(&L, x, k, y, n, b, n, k, nt, scratch);
}
