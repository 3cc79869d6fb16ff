/* Mamba1 selective scan for CPUs, float32: the twin of ops/reference.py::selective_scan_ref.
 *
 * On CPUs the scan is bound by memory traffic, not parallelism: a sequential pass over time
 * keeps h (d_inner x d_state) in cache and touches each input once, where every parallel
 * (log-depth or chunked closed-form) formulation costs several extra passes over a
 * (l, d_inner, d_state) tensor. Threads split the channels d, which are independent.
 * softplus(dt) and the silu gate are separate passes over contiguous rows so they vectorise
 * (libmvec expf/logf); the main loop walks time outermost and a block of channels inside,
 * so every row read is contiguous and the block's h stays in L1.
 *
 * Layouts (contiguous, row-major):
 *   x, dt, z, y: (b, l, d)   A: (d, n)   B, C: (b, l, n)   D, dt_bias: (d)   h: (b, d, n) in/out
 *   work: (l, d) scratch for the step sizes
 */
#include <math.h>
#include <stddef.h>

#define DBLOCK 16

static void step_sizes(const float *dt, const float *dt_bias, float *delta, long l, long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < l; t++) {
        const float *in = dt + t * d;
        float *out = delta + t * d;
        for (long i = 0; i < d; i++) {
            float v = in[i] + dt_bias[i];
            /* softplus through log1p: log(1 + e^v) rounds 1 + e^v and loses e^v's digits for
             * v < ~-8 (2e-1 relative at v = -15), the long-memory channels' step sizes */
            out[i] = v > 20.0f ? v : log1pf(expf(v));
        }
    }
}

static void scan_block(const float *x, const float *delta, const float *A, const float *B, const float *C,
                       const float *D, float *h, float *y, long l, long d, long n, long d0, long d1) {
    float hs[DBLOCK * 256]; /* d_state <= 256, checked by the caller */
    for (long i = d0; i < d1; i++)
        for (long k = 0; k < n; k++) hs[(i - d0) * n + k] = h[i * n + k];
    for (long t = 0; t < l; t++) {
        const float *Bt = B + t * n, *Ct = C + t * n;
        for (long i = d0; i < d1; i++) {
            float de = delta[t * d + i], xv = x[t * d + i], dx = de * xv, acc = 0.0f;
            float *hp = hs + (i - d0) * n;
            const float *Ai = A + i * n;
            for (long k = 0; k < n; k++) {
                hp[k] = expf(de * Ai[k]) * hp[k] + dx * Bt[k];
                acc += hp[k] * Ct[k];
            }
            y[t * d + i] = acc + D[i] * xv;
        }
    }
    for (long i = d0; i < d1; i++)
        for (long k = 0; k < n; k++) h[i * n + k] = hs[(i - d0) * n + k];
}

static void gate(float *y, const float *z, long count) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < count; i++) y[i] *= z[i] / (1.0f + expf(-z[i]));
}

void selective_scan_f32(const float *x, const float *dt, const float *A, const float *B,
                        const float *C, const float *D, const float *z, const float *dt_bias,
                        float *h, float *y, float *work, long b, long l, long d, long n) {
    for (long bi = 0; bi < b; bi++) {
        const float *xb = x + bi * l * d, *Bb = B + bi * l * n, *Cb = C + bi * l * n;
        float *yb = y + bi * l * d, *hb = h + bi * d * n;
        step_sizes(dt + bi * l * d, dt_bias, work, l, d);
#pragma omp parallel for schedule(static)
        for (long d0 = 0; d0 < d; d0 += DBLOCK)
            scan_block(xb, work, A, Bb, Cb, D, hb, yb, l, d, n, d0, d0 + DBLOCK < d ? d0 + DBLOCK : d);
        if (z) gate(yb, z + bi * l * d, l * d);
    }
}
