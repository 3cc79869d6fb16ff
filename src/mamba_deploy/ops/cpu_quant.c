/* Weight-only int8 / int4 matrix-vector products for decode on CPUs, float32 activations.
 *
 * Why: decode streams every weight once per token, so its speed is bytes / bandwidth. Converting
 * the codes to a float weight first (the reference twins in reference.py) reads 1 or 0.5 byte
 * per weight and then writes and reads 4; these loops read only the codes.
 * Twins: reference.int8_linear_ref and reference.int4_linear_ref. */
#include <stdint.h>

/* Compiled with -O3 -ffast-math -march=native, these loops vectorise (8 codes per AVX2 step).
 * Measured on this project's 2-core AVX2 CI-class machine, 130m head shape (50280 x 768): int8
 * 3.1-3.2 ms, int4 3.1 ms, the float32 GEMV 5.5 ms. Splitting the sums over 32 lanes (four
 * vector accumulators) left int8 unchanged and made int4 2.2x slower, so the plain loops stay. */
static float dot_i8(const int8_t *w, const float *x, long k) {
    float acc = 0.0f;
    for (long j = 0; j < k; j++) acc += (float)w[j] * x[j];
    return acc;
}

/* sum_j u(2j) e[j] + u(2j+1) o[j] over `half` bytes, u the unsigned nibbles of p ^ flip */
static float dot_u4(const uint8_t *p, uint8_t flip, const float *e, const float *o, long half) {
    float acc = 0.0f;
    for (long j = 0; j < half; j++) {
        uint8_t u = p[j] ^ flip;
        acc += (float)(u & 15) * e[j] + (float)(u >> 4) * o[j];
    }
    return acc;
}

/* y (b, n) = (x (b, k) . W (n, k)^T) * s (n): int8 codes, one scale per output row */
void int8_gemv_f32(const int8_t *W, const float *s, const float *x, float *y, long b, long n, long k, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long i = 0; i < n; i++) {
        const int8_t *w = W + i * k;
        for (long r = 0; r < b; r++) {  /* the weight row stays in L1 across the few batch rows */
            y[r * n + i] = dot_i8(w, x + r * k, k) * s[i];
        }
    }
}

/* y (b, n) from packed 4-bit codes P (n, k/2) (element 2j in the low nibble of byte j), group
 * scales s (n, G) and zero points z (n, G) (NULL: symmetric, two's complement codes, zero 8 once
 * flipped to unsigned). Per group: s * (sum_j u_j x_j - z * sum_j x_j) with unsigned codes u.
 * x arrives split into its even and odd columns xe, xo (b, k/2), so each byte's two nibbles
 * multiply two contiguous streams; xsum (b, G) holds each group's sum of x. */
void int4_gemv_f32(const uint8_t *P, const float *s, const float *z, const float *xe, const float *xo,
                   const float *xsum, float *y, long b, long n, long k, long gs, int nt) {
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
            y[r * n + i] = acc;
        }
    }
}
