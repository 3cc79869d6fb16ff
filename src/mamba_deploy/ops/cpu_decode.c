/* A whole Mamba1 or Mamba2 block's decode step in one call, float32, for CPUs (used by cpu_decode.py).
 *
 * Why: at batch 1 a token is ~10 small ops per layer; from Python each op costs more than its
 * arithmetic, and torch's one-row matmul streams weights slower than a plain OpenMP dot loop
 * (measured 30-36 vs 37-39 GB/s on 2 cores). Here the projections are GEMVs over the weight rows
 * (float32, int8 or int4: a `Lin` each, cpu_gemv.c), and the norm, conv, dt/B/C and the state
 * update run in between with no allocation.
 * Twin: Block.step with Mamba1Mixer.step / Mamba2Mixer.step (model.py) on the reference ops; tests
 * compare both with transformers. States are updated in place. */
#include <stddef.h>

#include "cpu_common.h"

/* The decode conv in place on x (b rows of c channels, row stride ldx): window (kc-1 taps) .
 * w[:kc-1] + x . w[kc-1] + bias, then SiLU; conv_state (b, c, kc-1) shifted in place. */
static void conv_rows(float *x, long ldx, float *conv_state, const float *cw, const float *cb, long b, long c,
                      long kc) {
    for (long row = 0; row < b; row++) {
        float *xr = x + row * ldx;
        for (long ch = 0; ch < c; ch++) {
            float *s = conv_state + (row * c + ch) * (kc - 1);
            xr[ch] = silu(conv_channel(s, s, cw + ch * kc, cb ? cb[ch] : 0.0f, xr[ch], kc));
        }
    }
}

/* P: the block's tensors in this order (NULL where absent; Lin * for the projections):
 *   0 norm.weight (dm)        1 in_proj (2d, dm)          2 conv weight (d, kc)
 *   3 conv bias (d)           4 x_proj (r + 2n, d)        5 dt_proj (d, r), its bias in the Lin
 *   6 A = -exp(A_log) (d, n)  7 D (d)                     8 out_proj (dm, d)
 * h (b, dm): the residual stream, in and out. conv_state (b, d, kc-1), ssm (b, d, n): in place.
 * work: at least b * (dm + 2d + (r + 2n) + 2d + dm) + SCRATCH(b, max(dm, d)) floats. */
void mamba1_block_step_f32(const void *const *P, float *h, float *conv_state, float *ssm, float *work,
                           long b, long dm, long d, long n, long r, long kc, float eps, float mixer_eps,
                           int dt_bc_rms, int nt) {
    const float *norm_w = P[0], *cw = P[2], *cb = P[3], *A = P[6], *D = P[7];
    long e = r + 2 * n;
    float *xn = work, *xz = xn + b * dm, *dbc = xz + b * 2 * d, *dt = dbc + b * e, *y = dt + b * d,
          *out = y + b * d, *scratch = out + b * dm;
    for (long row = 0; row < b; row++) rms_row(h + row * dm, norm_w, xn + row * dm, dm, eps);
    lin_apply(P[1], xn, dm, xz, 2 * d, b, 2 * d, dm, nt, scratch);  /* (b, 2d): x | z */
    conv_rows(xz, 2 * d, conv_state, cw, cb, b, d, kc);  /* x */
    lin_apply(P[4], xz, 2 * d, dbc, e, b, e, d, nt, scratch);  /* (b, r + 2n): dt | B | C */
    if (dt_bc_rms)  /* Falcon-Mamba: weightless RMSNorm on each of dt, B, C */
        for (long row = 0; row < b; row++) {
            float *q = dbc + row * e;
            rms_row(q, NULL, q, r, mixer_eps);
            rms_row(q + r, NULL, q + r, n, mixer_eps);
            rms_row(q + r + n, NULL, q + r + n, n, mixer_eps);
        }
    lin_apply(P[5], dbc, e, dt, d, b, d, r, nt, scratch);  /* (b, d) with dt_proj's bias */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long q = 0; q < b * d; q++) {
        long row = q / d, i = q % d;
        const float *Bv = dbc + row * e + r;
        float x = xz[row * 2 * d + i], z = xz[row * 2 * d + d + i];
        float acc = selective_row(ssm + q * n, ssm + q * n, A + i * n, Bv, Bv + n, softplus(dt[q]), x, n);
        y[q] = (acc + D[i] * x) * silu(z);
    }
    lin_apply(P[8], y, d, out, dm, b, dm, d, nt, scratch);
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

/* P: the block's tensors in this order (NULL where absent; Lin * for the projections):
 *   0 norm.weight (dm)        1 in_proj (E, dm)           2 conv weight (cd, kc)
 *   3 conv bias (cd)          4 dt_bias (nh)              5 A = -exp(A_log) (nh)
 *   6 D (nh)                  7 mixer norm.weight (d), NULL: plain gate    8 out_proj (dm, d)
 * with d = nh * p, cd = d + 2 g n (x | B | C), E = d + cd + nh (z | xBC | dt).
 * h (b, dm): the residual stream, in and out. conv_state (b, cd, kc-1), ssm (b, nh, p, n): in place.
 * work: at least b * (2 dm + E + d) + SCRATCH(b, max(dm, d)) floats. */
void mamba2_block_step_f32(const void *const *P, float *h, float *conv_state, float *ssm, float *work,
                           long b, long dm, long nh, long p, long g, long n, long kc, float eps, float norm_eps,
                           float dt_min, float dt_max, int norm_before_gate, int nt) {
    const float *norm_w = P[0], *cw = P[2], *cb = P[3], *dt_bias = P[4], *A = P[5], *D = P[6], *gate_w = P[7];
    long d = nh * p, cd = d + 2 * g * n, E = d + cd + nh, rep = nh / g;
    float *xn = work, *zxd = xn + b * dm, *y = zxd + b * E, *out = y + b * d, *scratch = out + b * dm;
    for (long row = 0; row < b; row++) rms_row(h + row * dm, norm_w, xn + row * dm, dm, eps);
    lin_apply(P[1], xn, dm, zxd, E, b, E, dm, nt, scratch);  /* (b, E): z | xBC | dt */
    conv_rows(zxd + d, E, conv_state, cw, cb, b, cd, kc);  /* xBC */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long r = 0; r < b * nh; r++) {  /* one head's (p, n) state per iteration */
        long row = r / nh, hh = r % nh, gi = hh / rep;
        const float *xBC = zxd + row * E + d, *dt = zxd + row * E + d + cd;
        float de = clampf(softplus(dt[hh] + dt_bias[hh]), dt_min, dt_max);
        ssd_head(ssm + r * p * n, ssm + r * p * n, xBC + hh * p, xBC + d + gi * n, xBC + d + g * n + gi * n, de,
                 A[hh], D[hh], y + row * d + hh * p, p, n);
    }
    for (long row = 0; row < b; row++) {
        float *yr = y + row * d;
        const float *z = zxd + row * E;
        if (gate_w)
            gated_rms_row(yr, z, gate_w, d, d / g, norm_eps, norm_before_gate);
        else
            for (long i = 0; i < d; i++) yr[i] *= silu(z[i]);
    }
    lin_apply(P[8], y, d, out, dm, b, dm, d, nt, scratch);
    for (long q = 0; q < b * dm; q++) h[q] += out[q];
}

/* logits (b, V) = lm_head (V, dm) . rmsnorm(h) with norm_f weight; work >= b * dm + SCRATCH(b, dm) */
void lm_head_step_f32(const float *norm_w, const Lin *head, const float *h, float *logits, float *work,
                      long b, long dm, long V, float eps, int nt) {
    for (long row = 0; row < b; row++) rms_row(h + row * dm, norm_w, work + row * dm, dm, eps);
    lin_apply(head, work, dm, logits, V, b, V, dm, nt, work + b * dm);
}
