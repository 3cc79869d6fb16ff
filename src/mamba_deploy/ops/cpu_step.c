/* One-token (decode) ops for CPUs, float32: twins of reference.py's causal_conv1d_update_ref,
 * selective_state_update_ref and ssd_step_ref. At batch 1 a decode step is a few hundred tiny
 * tensors; doing each mixer's elementwise work in one call removes most per-op overhead.
 * All tensors contiguous; states are read from *_in and written to *_out (never aliased, so the
 * inputs are not modified). */
#include <math.h>

static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* x (b, c); w (c, k); bias (c) or NULL; state (b, c, k-1) -> y (b, c), state_out (b, c, k-1) */
void conv_update_f32(const float *x, const float *w, const float *bias, const float *state_in,
                     float *state_out, float *y, long b, long c, long k, int act) {
#pragma omp parallel for schedule(static) if (b * c > 4096)
    for (long r = 0; r < b * c; r++) {
        long ch = r % c;
        const float *s = state_in + r * (k - 1), *wc = w + ch * k;
        float *so = state_out + r * (k - 1);
        float acc = bias ? bias[ch] : 0.0f;
        for (long j = 0; j < k - 1; j++) acc += s[j] * wc[j];
        acc += x[r] * wc[k - 1];
        for (long j = 0; j + 1 < k - 1; j++) so[j] = s[j + 1];
        if (k > 1) so[k - 2] = x[r];
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
        float de = softplus(dt[r] + dt_bias[i]), xv = x[r], dx = de * xv, acc = 0.0f;
        const float *hi = h_in + r * n, *Ai = A + i * n, *Bb = B + bi * n, *Cb = C + bi * n;
        float *ho = h_out + r * n;
        for (long k = 0; k < n; k++) {
            ho[k] = expf(de * Ai[k]) * hi[k] + dx * Bb[k];
            acc += ho[k] * Cb[k];
        }
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
        float de = softplus(dt[r] + dt_bias[hh]);
        de = de < dt_min ? dt_min : (de > dt_max ? dt_max : de);
        float a = expf(de * A[hh]);
        for (long pi = 0; pi < p; pi++) {
            const float *hi = h_in + (r * p + pi) * n;
            float *ho = h_out + (r * p + pi) * n;
            float dx = de * xh[pi], acc = 0.0f;
            for (long k = 0; k < n; k++) {
                ho[k] = a * hi[k] + dx * Bg[k];
                acc += ho[k] * Cg[k];
            }
            y[r * p + pi] = acc + D[hh] * xh[pi];
        }
    }
}

/* RMSNorm over the last dim: x (rows, d), w (d) -> y (rows, d); statistics in float32. */
void rmsnorm_f32(const float *x, const float *w, float *y, long rows, long d, float eps) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float ss = 0.0f;
        for (long i = 0; i < d; i++) ss += xr[i] * xr[i];
        float s = 1.0f / sqrtf(ss / (float)d + eps);
        for (long i = 0; i < d; i++) y[r * d + i] = w[i] * (xr[i] * s);
    }
}
