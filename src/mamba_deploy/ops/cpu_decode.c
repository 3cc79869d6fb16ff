/* A whole Mamba1 or Mamba2 block's decode step in one call, float32, for CPUs (used by cpu_decode.py).
 *
 * Why: at batch 1 a token is ~10 small ops per layer; from Python each op costs more than its
 * arithmetic, and torch's one-row matmul streams weights slower than a plain OpenMP dot loop
 * (measured 30-36 vs 37-39 GB/s on 2 cores). Here the four projections are GEMVs over the
 * weight rows (each weight row is read once for all batch rows), and the norm, conv, dt/B/C and
 * the selective state update run in between with no allocation.
 * Twin: Block.step with Mamba1Mixer.step / Mamba2Mixer.step (model.py) on the reference ops; tests
 * compare both with transformers. States are updated in place. */
#include <stddef.h>

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
    for (long row = 0; row < b; row++) rms_row(h + row * dm, P[0], xn + row * dm, dm, eps);
    gemv(P[1], P[2], xn, dm, xz, 2 * d, b, 2 * d, dm, nt);  /* (b, 2d): x | z */
    /* conv update in place of x: window (kc-1 taps) . w[:kc-1] + x . w[kc-1] + bias, then SiLU */
    for (long row = 0; row < b; row++) {
        float *xr = xz + row * 2 * d;
        for (long c = 0; c < d; c++) {
            float *s = conv_state + (row * d + c) * (kc - 1);
            xr[c] = silu(conv_channel(s, s, P[3] + c * kc, P[4] ? P[4][c] : 0.0f, xr[c], kc));
        }
    }
    gemv(P[5], NULL, xz, 2 * d, dbc, e, b, e, d, nt);  /* (b, r + 2n): dt | B | C */
    if (dt_bc_rms)  /* Falcon-Mamba: weightless RMSNorm on each of dt, B, C */
        for (long row = 0; row < b; row++) {
            float *q = dbc + row * e;
            rms_row(q, NULL, q, r, mixer_eps);
            rms_row(q + r, NULL, q + r, n, mixer_eps);
            rms_row(q + r + n, NULL, q + r + n, n, mixer_eps);
        }
    gemv(P[6], NULL, dbc, e, dt, d, b, d, r, nt);  /* (b, d), bias added with the softplus */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long q = 0; q < b * d; q++) {
        long row = q / d, i = q % d;
        const float *Bv = dbc + row * e + r;
        float x = xz[row * 2 * d + i], z = xz[row * 2 * d + d + i];
        float acc = selective_row(ssm + q * n, ssm + q * n, P[8] + i * n, Bv, Bv + n, softplus(dt[q] + P[7][i]), x, n);
        y[q] = (acc + P[9][i] * x) * silu(z);
    }
    gemv(P[10], P[11], y, d, out, dm, b, dm, d, nt);
    for (long q = 0; q < b * dm; q++) h[q] += out[q];
}

/* Mamba2's gated RMSNorm of one row, in place on y (d): groups of gs channels;
 * norm_before_gate 0: norm(y * silu(z)) * w, 1: norm(y) * w * silu(z). */
static void gated_rms_row(float *y, const float *z, const float *w, long d, long gs, float eps, int before) {
    for (long g0 = 0; g0 < d; g0 += gs) {
        float ss = 0.0f;
        for (long i = g0; i < g0 + gs; i++) {
            if (!before) y[i] *= silu(z[i]);
            ss += y[i] * y[i];
        }
        float s = 1.0f / sqrtf(ss / (float)gs + eps);
        for (long i = g0; i < g0 + gs; i++) y[i] = w[i] * (y[i] * s) * (before ? silu(z[i]) : 1.0f);
    }
}

/* P: the block's tensors in this order (NULL where absent):
 *   0 norm.weight (dm)        1 in_proj.weight (E, dm)    2 in_proj.bias (E)
 *   3 conv weight (cd, kc)    4 conv bias (cd)            5 dt_bias (nh)
 *   6 A = -exp(A_log) (nh)    7 D (nh)                    8 mixer norm.weight (d), NULL: plain gate
 *   9 out_proj.weight (dm, d) 10 out_proj.bias (dm)
 * with d = nh * p, cd = d + 2 g n (x | B | C), E = d + cd + nh (z | xBC | dt).
 * h (b, dm): the residual stream, in and out. conv_state (b, cd, kc-1), ssm (b, nh, p, n): in place.
 * work: at least b * (2 dm + E + d) floats. */
void mamba2_block_step_f32(const float *const *P, float *h, float *conv_state, float *ssm, float *work,
                           long b, long dm, long nh, long p, long g, long n, long kc, float eps, float norm_eps,
                           float dt_min, float dt_max, int norm_before_gate, int nt) {
    long d = nh * p, cd = d + 2 * g * n, E = d + cd + nh, rep = nh / g;
    float *xn = work, *zxd = xn + b * dm, *y = zxd + b * E, *out = y + b * d;
    for (long row = 0; row < b; row++) rms_row(h + row * dm, P[0], xn + row * dm, dm, eps);
    gemv(P[1], P[2], xn, dm, zxd, E, b, E, dm, nt);  /* (b, E): z | xBC | dt */
    for (long row = 0; row < b; row++) {  /* conv update in place of xBC, then SiLU */
        float *xr = zxd + row * E + d;
        for (long c = 0; c < cd; c++) {
            float *s = conv_state + (row * cd + c) * (kc - 1);
            xr[c] = silu(conv_channel(s, s, P[3] + c * kc, P[4] ? P[4][c] : 0.0f, xr[c], kc));
        }
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long r = 0; r < b * nh; r++) {  /* one head's (p, n) state per iteration */
        long row = r / nh, hh = r % nh, gi = hh / rep;
        const float *xBC = zxd + row * E + d, *dt = zxd + row * E + d + cd;
        float de = clampf(softplus(dt[hh] + P[5][hh]), dt_min, dt_max);
        ssd_head(ssm + r * p * n, ssm + r * p * n, xBC + hh * p, xBC + d + gi * n, xBC + d + g * n + gi * n, de,
                 P[6][hh], P[7][hh], y + row * d + hh * p, p, n);
    }
    for (long row = 0; row < b; row++) {
        float *yr = y + row * d;
        const float *z = zxd + row * E;
        if (P[8])
            gated_rms_row(yr, z, P[8], d, d / g, norm_eps, norm_before_gate);
        else
            for (long i = 0; i < d; i++) yr[i] *= silu(z[i]);
    }
    gemv(P[9], P[10], y, d, out, dm, b, dm, d, nt);
    for (long q = 0; q < b * dm; q++) h[q] += out[q];
}

/* y (b, n) = x (b, k) . W (n, k)^T + bias (n) or NULL, all contiguous: the GEMV above for the
 * module path's linears (ops.linear on CPU at decode) */
void gemv_f32(const float *W, const float *bias, const float *x, float *y, long b, long n, long k, int nt) {
    gemv(W, bias, x, k, y, n, b, n, k, nt);
}

/* logits (b, V) = lm_head (V, dm) . rmsnorm(h) with norm_f weight; work >= b * dm floats */
void lm_head_step_f32(const float *norm_w, const float *W, const float *h, float *logits, float *work,
                      long b, long dm, long V, float eps, int nt) {
    for (long row = 0; row < b; row++) rms_row(h + row * dm, norm_w, work + row * dm, dm, eps);
    gemv(W, NULL, work, dm, logits, V, b, V, dm, nt);
}
