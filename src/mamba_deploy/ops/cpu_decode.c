/* A whole Mamba1 block's decode step in one call, float32, for CPUs (used by cpu_decode.py).
 *
 * Why: at batch 1 a token is ~10 small ops per layer; from Python each op costs more than its
 * arithmetic, and torch's one-row matmul streams weights slower than a plain OpenMP dot loop
 * (measured 30-36 vs 37-39 GB/s on 2 cores). Here the four projections are GEMVs over the
 * weight rows (each weight row is read once for all batch rows), and the norm, conv, dt/B/C and
 * the selective state update run in between with no allocation.
 * Twin: Block.step with Mamba1Mixer.step (model.py) on the reference ops; tests compare both with
 * transformers. States are updated in place. */
#include <math.h>
#include <stddef.h>

static inline float softplus1(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
static inline float silu1(float v) { return v / (1.0f + expf(-v)); }

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

static void rms_rows(const float *x, long ldx, const float *w, float *y, long ldy, long b, long d, float eps) {
    for (long r = 0; r < b; r++) {
        const float *xr = x + r * ldx;
        float ss = 0.0f;
        for (long i = 0; i < d; i++) ss += xr[i] * xr[i];
        float s = 1.0f / sqrtf(ss / (float)d + eps);
        for (long i = 0; i < d; i++) y[r * ldy + i] = w ? w[i] * (xr[i] * s) : xr[i] * s;
    }
}

/* P: the block's tensors in this order (NULL where absent):
 *   0 norm.weight (dm)        1 in_proj.weight (2d, dm)   2 in_proj.bias (2d)
 *   3 conv weight (d, kc)     4 conv bias (d)             5 x_proj.weight (r + 2n, d)
 *   6 dt_proj.weight (d, r)   7 dt_proj.bias (d)          8 A = -exp(A_log) (d, n)
 *   9 D (d)                  10 out_proj.weight (dm, d)  11 out_proj.bias (dm)
 * h (b, dm): the residual stream, in and out. conv_state (b, d, kc-1), ssm (b, d, n): in place.
 * work: at least b * (dm + 2d + (r + 2n) + 2d + dm) floats. */
void mamba1_block_step_f32(const float *const *P, float *h, float *conv_state, float *ssm, float *work,
                           long b, long dm, long d, long n, long r, long kc, float eps, float mixer_eps,
                           int dt_bc_rms, int nt) {
    long e = r + 2 * n;
    float *xn = work, *xz = xn + b * dm, *dbc = xz + b * 2 * d, *dt = dbc + b * e, *y = dt + b * d,
          *out = y + b * d;
    rms_rows(h, dm, P[0], xn, dm, b, dm, eps);
    gemv(P[1], P[2], xn, dm, xz, 2 * d, b, 2 * d, dm, nt);  /* (b, 2d): x | z */
    /* conv update in place of x: window (kc-1 taps) . w[:kc-1] + x . w[kc-1] + bias, then SiLU */
    for (long row = 0; row < b; row++) {
        float *xr = xz + row * 2 * d;
        for (long c = 0; c < d; c++) {
            float *s = conv_state + (row * d + c) * (kc - 1);
            const float *wc = P[3] + c * kc;
            float acc = P[4] ? P[4][c] : 0.0f;
            for (long j = 0; j < kc - 1; j++) acc += s[j] * wc[j];
            acc += xr[c] * wc[kc - 1];
            for (long j = 0; j + 1 < kc - 1; j++) s[j] = s[j + 1];
            if (kc > 1) s[kc - 2] = xr[c];
            xr[c] = silu1(acc);
        }
    }
    gemv(P[5], NULL, xz, 2 * d, dbc, e, b, e, d, nt);  /* (b, r + 2n): dt | B | C */
    if (dt_bc_rms)  /* Falcon-Mamba: weightless RMSNorm on each of dt, B, C */
        for (long row = 0; row < b; row++) {
            float *q = dbc + row * e;
            rms_rows(q, e, NULL, q, e, 1, r, mixer_eps);
            rms_rows(q + r, e, NULL, q + r, e, 1, n, mixer_eps);
            rms_rows(q + r + n, e, NULL, q + r + n, e, 1, n, mixer_eps);
        }
    gemv(P[6], NULL, dbc, e, dt, d, b, d, r, nt);  /* (b, d), bias added with the softplus */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long q = 0; q < b * d; q++) {
        long row = q / d, i = q % d;
        const float *Bv = dbc + row * e + r, *Cv = Bv + n, *Ai = P[8] + i * n;
        float x = xz[row * 2 * d + i], z = xz[row * 2 * d + d + i];
        float de = softplus1(dt[q] + P[7][i]), dx = de * x, acc = 0.0f;
        float *hs = ssm + q * n;
        for (long k = 0; k < n; k++) {
            hs[k] = expf(de * Ai[k]) * hs[k] + dx * Bv[k];
            acc += hs[k] * Cv[k];
        }
        y[q] = (acc + P[9][i] * x) * silu1(z);
    }
    gemv(P[10], P[11], y, d, out, dm, b, dm, d, nt);
    for (long q = 0; q < b * dm; q++) h[q] += out[q];
}

/* logits (b, V) = lm_head (V, dm) . rmsnorm(h) with norm_f weight; work >= b * dm floats */
void lm_head_step_f32(const float *norm_w, const float *W, const float *h, float *logits, float *work,
                      long b, long dm, long V, float eps, int nt) {
    rms_rows(h, dm, norm_w, work, dm, b, dm, eps);
    gemv(W, NULL, work, dm, logits, V, b, V, dm, nt);
}
