"""The one-token branch of the ONNX graph (the `If` then-branch, taken when seq == 1 and the
attention mask is all ones, as in every decode step; see `onnx_graph.py`), so it has no masking.

A decode step of the whole network with no loop and no shape arithmetic: ids (b, 1) are
flattened to (b,) and every activation is 2-D (b, features), so ONNX Runtime fuses the dt
MatMul + bias + Softplus into one Gemm, the RMSNorms into SimplifiedLayerNormalization and
x * sigmoid(x) into QuickGelu. The states keep their interface layouts: conv (b, c, k-1),
Mamba1 ssm (b, d, n), Mamba2 ssm (b, h, p, n).

Broadcasts in ORT are cheap when the broadcast operand spans the innermost axis and slow when
it repeats one value over a short inner axis (a (b, d, 1) * (d, n=16) Mul took ~20 us, the
same product as a K=1 MatMul ~5 us), so outer products are written as K=1 MatMuls (exact: one
product per element, nothing summed). Measured on the 130m-shaped Mamba1, 2 threads: the
state update went from 2.7 ms to 1.4 ms per token over 24 layers.

Shapes: b batch, D d_model, c conv channels, k d_conv, d d_inner, n d_state, h heads,
p headdim, g groups, r = h/g.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .onnx_builder import INT64_MAX
from .onnx_meta import IDS, LOGITS, PAST_CONV, PAST_SSM, PRESENT_CONV, PRESENT_SSM


class StepNetwork:
    """Mixed into MambaGraph: builds the one-token network into `self.g`, writing the branch
    outputs `self.out(LOGITS)`, `self.out(PRESENT_CONV.format(i))`, ..."""

    def _step_network(self) -> None:
        cfg, g = self.cfg, self.g
        ids = g.op("Reshape", IDS, g.const([-1]))  # (b,)
        h = self._embed_step(ids)  # (b, D)
        from tqdm.auto import tqdm

        # the first branch built: it converts every weight (the second reuses them), ~1 s per 100 MB
        for i in tqdm(range(cfg.n_layer), desc="converting weights", unit="layer", disable=cfg.n_layer < 8):
            p = f"backbone.layers.{i}."
            xn = g.rms(h, cfg.rms_norm_eps, self.param(p + "norm.weight"))
            mix = self._m1_step if cfg.arch == "mamba1" else self._m2_step
            h = g.op("Add", h, mix(xn, p + "mixer.", i))
        h = g.rms(g.op("Unsqueeze", h, g.const([1])), cfg.rms_norm_eps, self.param("backbone.norm_f.weight"))
        self.linear(h, self.head_w, out=self.out(LOGITS))  # (b, 1, V)

    def _embed_step(self, ids: str) -> str:
        """ids (b,) -> (b, D). Tied weights: columns of the [D, V] lm_head matrix."""
        g = self.g
        if self.cfg.tie_embeddings:
            h = g.op("Transpose", g.op("Gather", self.head_w, ids, axis=1), perm=[1, 0])
        else:
            h = g.op("Gather", "backbone.embeddings.weight", ids, axis=0)
        return g.op("Cast", h, to=TensorProto.FLOAT) if self.wdtype == np.float16 else h

    def _conv_step(self, x: str, p: str, i: int, channels: int) -> str:
        """x (b, c) -> silu(conv) (b, c) in the state's (b, c, k) layout: append the new column,
        multiply by the (c, k) kernel, sum over k. present_conv.i = the last k-1 columns."""
        g, k = self.g, self.cfg.d_conv
        xt = g.op("Concat", PAST_CONV.format(i), g.op("Unsqueeze", x, g.const([2])), axis=2)  # (b, c, k)
        g.op_to(self.out(PRESENT_CONV.format(i)), "Slice", xt, g.const([1]), g.const([INT64_MAX]), g.const([2]))
        w = self.weight(p + "conv1d.weight.ck", lambda: self._np(p + "conv1d.weight").reshape(channels, k))
        # sum over k as a MatMul with ones: OpenVINO 2026.4 (CPU) got ReduceSum + Add wrong inside
        # this If branch at batch > 1, while the same nodes in a standalone graph were right
        ones = g.const(np.ones((k, 1)), np.float32)
        y = g.op("Reshape", g.op("MatMul", g.op("Mul", xt, w), ones), g.const([0, channels]))
        if p + "conv1d.bias" in self.w:
            y = g.op("Add", y, self.param(p + "conv1d.bias"))
        return g.silu(y)

    def _m1_step(self, xn: str, p: str, i: int) -> str:
        """h = h * exp(dt A) + (dt x) B ; y = h C + D x, gated by silu(z). State (b, d, n)."""
        cfg, g = self.cfg, self.g
        d, n, r = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
        x, z = g.op("Split", self.linear(xn, p + "in_proj.weight", p + "in_proj.bias"), g.const([d, d]),
                    axis=1, n_out=2)  # (b, d) each
        x = self._conv_step(x, p, i, d)
        dt, B, C = g.op("Split", self.linear(x, p + "x_proj.weight"), g.const([r, n, n]), axis=1, n_out=3)
        if cfg.dt_bc_rms:
            dt, B, C = (g.rms(t, cfg.mixer_rms_eps) for t in (dt, B, C))
        dt = g.op("Softplus", self.linear(dt, p + "dt_proj.weight", p + "dt_proj.bias"))  # (b, d)
        A = self.weight(p + "A.step", lambda: -np.exp(self._np(p + "A_log")))  # (d, n)
        ones = g.const(np.ones((1, n)), np.float32)
        dt_n = g.op("MatMul", g.op("Unsqueeze", dt, g.const([2])), ones)  # (b, d, 1) @ (1, n): dt per (d, n)
        dA = g.op("Exp", g.op("Mul", dt_n, A))  # <= 1
        dBx = g.op("MatMul", g.op("Unsqueeze", g.op("Mul", dt, x), g.const([2])),
                   g.op("Unsqueeze", B, g.const([1])))  # (b, d, 1) @ (b, 1, n)
        h = g.op_to(self.out(PRESENT_SSM.format(i)), "Add", g.op("Mul", PAST_SSM.format(i), dA), dBx)
        y = g.op("MatMul", h, g.op("Unsqueeze", C, g.const([2])))  # (b, d, n) @ (b, n, 1)
        y = g.op("Add", g.op("Reshape", y, g.const([0, d])), g.op("Mul", x, self.param(p + "D")))
        return self.linear(g.op("Mul", y, g.silu(z)), p + "out_proj.weight", p + "out_proj.bias")

    def _m2_step(self, xn: str, p: str, i: int) -> str:
        """Per head: h = h * exp(dt A) + (dt x) B^T ; y = h C + D x ; gated RMSNorm. State (b, h, p, n)."""
        cfg, g = self.cfg, self.g
        d, H, P, G, N = cfg.d_inner, cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        z, xBC, dt = g.op("Split", self.linear(xn, p + "in_proj.weight", p + "in_proj.bias"),
                          g.const([d, cfg.conv_dim, H]), axis=1, n_out=3)
        xBC = self._conv_step(xBC, p, i, cfg.conv_dim)
        dt, A = self._mamba2_dt_A(dt, p)  # (b, h), (h,)
        x, B, C = g.op("Split", xBC, g.const([d, G * N, G * N]), axis=1, n_out=3)
        decay = g.op("Reshape", g.op("Exp", g.op("Mul", dt, A)), g.const([0, H, 1, 1]))  # (b, h, 1, 1), <= 1
        xdt = g.op("Mul", g.op("Reshape", x, g.const([0, H, P])), g.op("Unsqueeze", dt, g.const([2])))  # (b, h, p)
        u = g.op("MatMul", g.op("Reshape", xdt, g.const([0, G, d // G, 1])),
                 g.op("Reshape", B, g.const([0, G, 1, N])))  # (b, g, r*p, 1) @ (b, g, 1, n)
        h = g.op_to(self.out(PRESENT_SSM.format(i)), "Add", g.op("Mul", PAST_SSM.format(i), decay),
                    g.op("Reshape", u, g.const([0, H, P, N])))
        y = g.op("MatMul", g.op("Reshape", h, g.const([0, G, d // G, N])),
                 g.op("Reshape", C, g.const([0, G, N, 1])))  # (b, g, r*p, 1)
        D = self.weight(p + "D.step", lambda: np.repeat(self._np(p + "D"), P))  # (h,) -> one per channel (d,)
        y, gate = g.op("Add", g.op("Reshape", y, g.const([0, d])), g.op("Mul", x, D)), g.silu(z)
        after = cfg.rmsnorm and cfg.norm_before_gate  # gate the normalised y (mamba_ssm's option)
        if not after:
            y = g.op("Mul", y, gate)
        if cfg.rmsnorm and G == 1:  # on (b, d) with its weight: ORT fuses it into one SimplifiedLayerNormalization
            y = g.rms(y, cfg.rms_norm_eps, self.param(p + "norm.weight"))
        elif cfg.rmsnorm:  # per group: (b, g, d/g), then the per-channel weight on (b, d)
            y = g.rms(g.op("Reshape", y, g.const([0, G, d // G])), cfg.rms_norm_eps)
            y = g.op("Mul", g.op("Reshape", y, g.const([0, d])), self.param(p + "norm.weight"))
        if after:
            y = g.op("Mul", y, gate)
        return self.linear(y, p + "out_proj.weight", p + "out_proj.bias")
