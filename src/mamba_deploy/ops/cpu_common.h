/* Per-row pieces shared by the CPU decode kernels (cpu_step.c: one op per call; cpu_decode.c:
 * a whole Mamba1 or Mamba2 block per call), so both compute each step with the same expressions. */
#ifndef MAMBA_DEPLOY_CPU_COMMON_H
#define MAMBA_DEPLOY_CPU_COMMON_H
#include <math.h>
#include <stdint.h>

static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* One channel's causal-conv update: returns bias + window . w[:k-1] + x . w[k-1] (before the
 * activation) and writes the shifted window (taps 1.., x) to s_out, which may be s_in. */
static inline float conv_channel(const float *s_in, float *s_out, const float *wc, float bias, float x, long k) {
    float acc = bias;
    for (long j = 0; j < k - 1; j++) acc += s_in[j] * wc[j];
    acc += x * wc[k - 1];
    for (long j = 0; j + 1 < k - 1; j++) s_out[j] = s_in[j + 1];
    if (k > 1) s_out[k - 2] = x;
    return acc;
}

/* One Mamba1 channel's state row: h <- exp(de * A) h + de * x * B (h_out may be h_in);
 * returns h . C. */
static inline float selective_row(const float *h_in, float *h_out, const float *A, const float *B, const float *C,
                                  float de, float x, long n) {
    float dx = de * x, acc = 0.0f;
    for (long k = 0; k < n; k++) {
        h_out[k] = expf(de * A[k]) * h_in[k] + dx * B[k];
        acc += h_out[k] * C[k];
    }
    return acc;
}

/* One Mamba2 head's state update: h (p, n) <- a h + (de x) B^T with a = exp(de * A_h) (h_out
 * may be h_in); y (p) = h C + D_h x. de is the head's step size after softplus and clamping. */
static inline void ssd_head(const float *h_in, float *h_out, const float *x, const float *B, const float *C,
                            float de, float A_h, float D_h, float *y, long p, long n) {
    float a = expf(de * A_h);
    for (long pi = 0; pi < p; pi++) {
        const float *hi = h_in + pi * n;
        float *ho = h_out + pi * n;
        float dx = de * x[pi], acc = 0.0f;
        for (long k = 0; k < n; k++) {
            ho[k] = a * hi[k] + dx * B[k];
            acc += ho[k] * C[k];
        }
        y[pi] = acc + D_h * x[pi];
    }
}

/* NaN stays NaN (as torch.clamp keeps it): the kernels are built with -ffast-math, whose
 * finite-math assumption let the compiler turn the comparisons into min/max instructions that
 * return a bound for NaN, so a corrupt dt_bias decoded to finite logits while prefill gave NaN.
 * The bit test is not an arithmetic comparison, so that assumption cannot remove it. */
static inline int is_nanf(float v) {
    union { float f; uint32_t u; } b = {v};
    return (b.u & 0x7fffffffu) > 0x7f800000u;
}
static inline float clampf(float v, float lo, float hi) {
    return is_nanf(v) ? v : (v < lo ? lo : (v > hi ? hi : v));
}

/* RMSNorm of one row, statistics in float32: y = w * (x / rms(x)), or x / rms(x) when w is
 * NULL; y may be x. */
static inline void rms_row(const float *x, const float *w, float *y, long d, float eps) {
    float ss = 0.0f;
    for (long i = 0; i < d; i++) ss += x[i] * x[i];
    float s = 1.0f / sqrtf(ss / (float)d + eps);
    for (long i = 0; i < d; i++) y[i] = w ? w[i] * (x[i] * s) : x[i] * s;
}

/* One linear layer's weights for the decode GEMVs (cpu_gemv.c): float32, int8 with a scale per
 * output row, or int4 in groups of gs columns (quant/formats.py has the layouts). */
enum { LIN_F32 = 0, LIN_INT8 = 1, LIN_INT4 = 2 };
typedef struct {
    int kind;
    const void *w;          /* (n, k) float32 / int8, or (n, k/2) packed uint8 */
    const float *scales;    /* int8 (n); int4 (n, k/gs) */
    const float *zeros;     /* int4 asymmetric zero points (n, k/gs); NULL: symmetric */
    const float *bias;      /* (n) or NULL */
    const float *in_scale;  /* (k): x * in_scale first (AWQ / SmoothQuant smoothing), or NULL */
    long gs;
} Lin;

/* y (b, n), row stride ldy = x (b, k) rows of stride ldx through L; scratch >= b * 3k floats */
void lin_apply(const Lin *L, const float *x, long ldx, float *y, long ldy, long b, long n, long k, int nt,
               float *scratch);

#endif
