/* Mamba1 selective scan for CPUs, float32: the twin of ops/reference.py::selective_scan_ref.
 *
 * On CPUs the scan is bound by memory traffic, not parallelism: a sequential pass over time
 * keeps h (d_inner x d_state) in L1/L2 and touches each input once, where every parallel
 * (log-depth or chunked closed-form) formulation costs several extra passes over a
 * (l, d_inner, d_state) tensor. Threads split the channels d, which are independent.
 *
 * Layouts (contiguous, row-major):
 *   x, dt, z, y: (b, l, d)   A: (d, n)   B, C: (b, l, n)   D, dt_bias: (d)   h: (b, d, n) in/out
 */
#include <math.h>
#include <stddef.h>

static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

void selective_scan_f32(const float *x, const float *dt, const float *A, const float *B,
                        const float *C, const float *D, const float *z, const float *dt_bias,
                        float *h, float *y, long b, long l, long d, long n) {
    for (long bi = 0; bi < b; bi++) {
#pragma omp parallel for schedule(static)
        for (long di = 0; di < d; di++) {
            float hs[256];  /* d_state <= 256, checked by the caller */
            float *hp = h + (bi * d + di) * n;
            const float *Ad = A + di * n;
            for (long k = 0; k < n; k++) hs[k] = hp[k];
            for (long t = 0; t < l; t++) {
                long row = (bi * l + t);
                float xv = x[row * d + di];
                float delta = softplus(dt[row * d + di] + dt_bias[di]);
                const float *Bt = B + row * n, *Ct = C + row * n;
                float dx = delta * xv, acc = 0.0f;
                for (long k = 0; k < n; k++) {
                    hs[k] = expf(delta * Ad[k]) * hs[k] + dx * Bt[k];
                    acc += hs[k] * Ct[k];
                }
                float out = acc + D[di] * xv;
                if (z) {
                    float zv = z[row * d + di];
                    out *= zv / (1.0f + expf(-zv));
                }
                y[row * d + di] = out;
            }
            for (long k = 0; k < n; k++) hp[k] = hs[k];
        }
    }
}
