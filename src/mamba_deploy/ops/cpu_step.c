/* One-token (decode) ops for CPUs, float32: twins of reference.py's causal_conv1d_update_ref,
 * selective_state_update_ref and ssd_step_ref. At batch 1 a decode step is a few hundred tiny
 * tensors; doing each mixer's elementwise work in one call removes most per-op overhead.
 * All tensors contiguous; states are read from *_in and written to *_out (never aliased, so the
 * inputs are not modified). */
#include "cpu_common.h"

/* x (b, c); w (c, k); bias (c) or NULL; state (b, c, k-1) -> y (b, c), state_out (b, c, k-1) */
void conv_update_f32(const float *x, const float *w, const float *bias, const float *state_in,
                     float *state_out, float *y, long b, long c, long k, int act) {
#pragma omp parallel for schedule(static) if (b * c > 4096)
    for (long r = 0; r < b * c; r++) {
        long ch = r % c;
        float acc = conv_channel(state_in + r * (k - 1), state_out + r * (k - 1), w + ch * k,
                                 bias ? bias[ch] : 0.0f, x[r], k);
        y[r] = act ? silu(acc) : acc;
    }
}

/* Mamba1: x, dt, z (b, d); A (d, n); B, C (b, n); D, dt_bias (d); h (b, d, n) -> y (b, d), h_out */
void selective_update_f32(const float *x, const float *dt, const float *A, const float *B, const float *C,
                          const float *D, const float *z, const float *dt_bias, const float *h_in,
                          float *h_out, float *y, long b, long d, long n) {
#pragma omp parallel for schedule(static) if (b * d * n > 16384)
    for (long r = 0; r < b * d; r++) {
        long bi = r / d, i = r % d;
        float de = softplus(dt[r] + dt_bias[i]), xv = x[r];
        float acc = selective_row(h_in + r * n, h_out + r * n, A + i * n, B + bi * n, C + bi * n, de, xv, n);
        acc += D[i] * xv;
        y[r] = z ? acc * silu(z[r]) : acc;
    }
}

/* Mamba2 state update after the conv: xBC (b, h*p + 2*g*n) already convolved; dt (b, h) raw;
 * A, D, dt_bias (h); h (b, h, p, n) -> y (b, h, p), h_out */
void ssd_update_f32(const float *xBC, const float *dt, const float *A, const float *D, const float *dt_bias,
                    const float *h_in, float *h_out, float *y, long b, long nh, long p, long g, long n,
                    float dt_min, float dt_max) {
    long conv_dim = nh * p + 2 * g * n, rep = nh / g;
#pragma omp parallel for schedule(static) if (b * nh * p * n > 16384)
    for (long r = 0; r < b * nh; r++) {
        long bi = r / nh, hh = r % nh, gi = hh / rep;
        const float *row = xBC + bi * conv_dim;
        const float *xh = row + hh * p, *Bg = row + nh * p + gi * n, *Cg = row + nh * p + g * n + gi * n;
        float de = clampf(softplus(dt[r] + dt_bias[hh]), dt_min, dt_max);
        ssd_head(h_in + r * p * n, h_out + r * p * n, xh, Bg, Cg, de, A[hh], D[hh], y + r * p, p, n);
    }
}

/* RMSNorm over the last dim: x (rows, d), w (d) -> y (rows, d); statistics in float32. */
void rmsnorm_f32(const float *x, const float *w, float *y, long rows, long d, float eps) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (long r = 0; r < rows; r++) rms_row(x + r * d, w, y + r * d, d, eps);
}
