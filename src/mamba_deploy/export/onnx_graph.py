"""Build the Mamba1 / Mamba2 ONNX graph directly with `onnx.helper`.

Why not `torch.onnx.export`: tracing the PyTorch model unrolls its Python loop over time chunks
into a fixed length, and the graph must serve any sequence length. Writing the graph by hand
keeps every linear layer one `MatMul` against a named initializer, built in one place
(`linear`, where a quantized model's layers become MatMulNBits instead: `quant/onnx_nbits.py`),
and uses only standard-domain operators (the allow-list in `onnx.py`).

Layout: the weights are top-level initializers and the whole network sits in one top-level
`If(seq == 1 and all(attention_mask == 1))` whose two branches read them from the outer scope
(one copy in memory):
- then (one token, `onnx_step.py`): a decode step with 2-D activations, no loop, no shape
  arithmetic, no masking. Against the earlier one-If-per-layer graph (130m shapes, 2 threads,
  interleaved session runs): Mamba1 19.5 -> 18.0 ms, Mamba2 20.1 -> 19.4 ms per token. The same network as
  a separate decode-only graph ran within noise (<= 0.3 ms) of this branch, and a second ORT
  session would hold its own prepacked weights (703 MB per 130m session here).
- else (any length, this module), formulations (b batch, l time, d d_inner, n d_state, h heads,
  p headdim, g groups, r = h/g):
  - Mamba1: one ONNX `Scan` over time per layer, state laid out (b, n, d) so every per-step op
    runs over contiguous d-long rows (measured faster than (b, d, n), and than blocks of 4-16
    steps per iteration with vectorised decays: ORT's Split/Concat copies cost more than they
    save). Only decays exp(dt*A) <= 1 are formed: stable at any length. ~33 us per step and
    layer; precomputing exp(dt*A) and dt*x*B for all steps outside the Scan was slower (prefill
    512: 1.14 -> 1.25 / 1.41 s: the (b, l, n, d) tensors stream through memory), a Scan over
    chunks of 8-32 steps with an inner Scan was within noise, and so was the outer product (dt x) B
    as a K=1 MatMul inside the Scan body in place of the broadcast Mul (prefill 512: 0.999 -> 0.985 s).
    Two Scans over halves of d, for ORT's parallel executor to run side by side, were slower:
    1.03 -> 1.09 s sequential, 1.66-2.03 s with ORT_PARALLEL (decode 23 -> 32-48 ms).
    That Scan over tokens is the default. `scan_chunk` = Q > 1 (opt-in, `--scan-chunk`) makes
    each iteration take Q tokens at once in the SSD dual form (`_m1_chunk_scan`): Q times fewer
    iterations, so fewer kernel launches on a GPU, for more passes over the state per token. On
    ORT's CUDA provider (H200, 130m shapes, prefill 512, fp32) 413.8 ms -> 181.6 ms (Q = 8) ->
    118.2 ms (Q = 16) (benchmarks/gpu_ort_m1_chunk.py); on 2 CPU threads 2.99x (Q = 4) and 3.76x
    (Q = 8) slower, a Hillis-Steele form over the steps' affine maps 1.33-3.26x slower there and
    only 0.74-0.93x the per-token time on the GPU (benchmarks/onnx_m1_chunk.py keeps it).
  - Mamba2: chunked SSD with no loop. The chunk length is min(chunk_size, l), computed from the
    input shape. Decays are exp of segment sums summed directly (masked cumsum) or exp of
    in-chunk cumsums of dt*A <= 0: never exp(cumsum) divided out later, so large dt and
    strongly negative A cannot overflow.
  - The depthwise conv is k shifted multiply-adds in the time-major layout (an ONNX Conv with
    group=c was within 1% at 512 tokens, so the op set stays smaller).
Both branches write the same outputs (logits and every present_* state, same ranks) under
branch-specific names; the If node maps them onto the graph outputs.
All recurrences, norms and residuals run in float32; in an fp16 export only the MatMul/Gather
weights are float16 (activations are cast around them).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..config import MambaConfig
from ..errors import ExportError
from .onnx_builder import INT64_MAX, Builder, _ir_for_opset, move_initializers
from .onnx_meta import IDS, KEEP, LOGITS, MASK, ONE_TOKEN_IF, PAST_CONV, PAST_SSM, PRESENT_CONV, PRESENT_SSM
from .onnx_step import StepNetwork

# Longest Mamba2 chunk inside the graph (the math does not depend on it). Measured on 130m shapes,
# prefill 512 on 2 threads: chunk 256 / 128 / 64 / 32 took 1.0 / 1.14 / 1.28 / 1.36 x the time of
# 256 (fewer chunks = fewer large (b, c, h, p, n) state tensors), so the config's chunk is kept.
SSD_CHUNK = 256


class MambaGraph(StepNetwork):
    """Turns a MambaConfig + state dict into the ONNX ModelProto described in the module doc."""

    def __init__(self, cfg: MambaConfig, weights, wdtype=np.float32, opset: int = 17,
                 chunk: int | None = None, scan_chunk: int = 1, linear_hook=None, external=None):
        """weights: a mapping of checkpoint key -> tensor, read once per key as the graph needs it.
        linear_hook(graph, x, key, out) -> output name, or None for the plain MatMul: how a
        quantized model's linear layers are written (quant/onnx_nbits.py). external: an
        onnx_builder.ExternalData that the weights are written to as they are made (big models)."""
        self.cfg, self.w, self.wdtype, self.opset = cfg, weights, np.dtype(wdtype), opset
        self.linear_hook = linear_hook
        self.chunk = min(cfg.chunk_size, chunk or SSD_CHUNK)
        self.root = self.g = Builder(opset, external=external)  # g: where nodes go now (the root or a branch)
        self.tag = ""  # the branch being built: its outputs are named "<output>.<tag>"
        self._weights: set[str] = set()
        self._conv_ends: dict[int, str] = {}  # tap j -> l + j, shared by all layers
        self.scan_chunk = scan_chunk  # Mamba1 prefill: tokens per Scan iteration (1 = _m1_scan)
        self._m1_pads: str | None = None  # _m1_chunk_scan's time padding, shared by all layers

    # ---- weights: top-level initializers, shared by both branches ----------------------------
    def _np(self, key: str, dtype=np.float32) -> np.ndarray:
        a = self.w[key].detach().float().cpu().numpy()
        with np.errstate(over="ignore"):
            out = a.astype(dtype, copy=False)  # from_array copies anyway
        if dtype == np.float16 and not np.isfinite(out).all() and np.isfinite(a).all():
            raise ExportError(f"{key} has values up to {float(np.abs(a).max()):.4g}, beyond float16's range "
                              "(65504): they would be stored as inf; export with --dtype fp32")
        return out

    def weight(self, name: str, make) -> str:
        """The top-level initializer `name`, created from make() on first use."""
        if name not in self._weights:
            self._weights.add(name)
            self.root.init(name, make())
        return name

    def param(self, key: str, shape=None) -> str:
        """A float32 parameter (norm weights, biases, A, D, conv)."""
        return self.weight(key, lambda: self._np(key) if shape is None else self._np(key).reshape(shape))

    def linear(self, x: str, key: str, bias_key: str | None = None, out: str | None = None) -> str:
        """x @ W^T as MatMul against the initializer `key` stored [in, out] (float32 in and out);
        `out` names the result (a branch output; never with a bias)."""
        g = self.g
        y = self.linear_hook(self, x, key, out) if self.linear_hook is not None else None
        if y is None:
            w = self.weight(key, lambda: self._np(key, self.wdtype).T)
            to = (lambda *a, **kw: g.op_to(out, *a, **kw)) if out else g.op
            if self.wdtype == np.float16:
                y = to("Cast", g.op("MatMul", g.op("Cast", x, to=TensorProto.FLOAT16), w), to=TensorProto.FLOAT)
            else:
                y = to("MatMul", x, w)
        if bias_key is not None and bias_key in self.w:
            y = g.op("Add", y, self.param(bias_key))
        return y

    # ---- interface -------------------------------------------------------------------------
    def build(self, name="mamba") -> onnx.ModelProto:
        g = self.root
        # optional inputs: an initializer of the same name is the default when not fed
        g.init(MASK, np.ones((1, 1), np.int64))
        g.init(KEEP, np.zeros((1,), np.int64))
        self.L = g.dim(g.op("Shape", IDS), 1)  # (1,) int64
        self.maskf = g.op("Cast", MASK, to=TensorProto.FLOAT)  # (b|1, l|1)
        self._embed_weights()
        then = self._branch("step", self._step_network)
        other = self._branch("seq", self._seq_network)
        # the one-token branch has no mask: a fed mask with a zero (a padded one-token prompt,
        # rare) takes the multi-token branch, which handles any length
        unmasked = g.op("Equal", g.op("ReduceMin", self.maskf, keepdims=0), g.const(1.0, np.float32))
        one_token = g.op("And", g.op("Equal", self.L, g.const([1])), unmasked)
        g.nodes.append(helper.make_node("If", [one_token], [v.name for v in self._outputs()], name=ONE_TOKEN_IF,
                                        then_branch=then, else_branch=other))
        # the weights are moved in last: make_graph and make_model copy what they are given
        graph = helper.make_graph(g.nodes, name, self._inputs(), self._outputs())
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="mamba-deploy")
        del graph
        model.ir_version = min(model.ir_version, _ir_for_opset(self.opset))
        move_initializers(g.inits, model.graph.initializer)
        return model

    def _branch(self, tag: str, network) -> onnx.GraphProto:
        """network() built into a fresh subgraph whose outputs are the graph outputs renamed
        "<name>.<tag>" (TensorRT wants the two branches' outputs named apart)."""
        self.g, self.tag = Builder(self.opset, self.root._counter), tag
        network()
        sub, self.g = self.g, self.root
        outs = [helper.make_tensor_value_info(self.out(v.name), TensorProto.FLOAT,
                                              [d.dim_value or f"{self.out(v.name)}_{j}"
                                               for j, d in enumerate(v.type.tensor_type.shape.dim)])
                for v in self._outputs()]
        return helper.make_graph(sub.nodes, f"{tag}_branch", [], outs, sub.inits)

    def out(self, name: str) -> str:
        """The current branch's name for the graph output `name`."""
        return f"{name}.{self.tag}"

    def _inputs(self):
        ins = [helper.make_tensor_value_info(IDS, TensorProto.INT64, ["batch", "seq"]),
               helper.make_tensor_value_info(MASK, TensorProto.INT64, ["mask_batch", "mask_seq"]),
               helper.make_tensor_value_info(KEEP, TensorProto.INT64, [1])]
        return ins + self._state_infos(PAST_CONV, PAST_SSM)

    def _state_infos(self, conv_name, ssm_name):
        """Per-layer state value infos, conv then ssm for each layer, batch axis dynamic."""
        cfg = self.cfg
        return [helper.make_tensor_value_info(name.format(i), TensorProto.FLOAT, ["batch", *shape])
                for i in range(cfg.n_layer)
                for name, shape in ((conv_name, cfg.conv_state_shape), (ssm_name, cfg.ssm_state_shape))]

    def _outputs(self):
        cfg = self.cfg
        outs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "logits_seq", cfg.padded_vocab_size])]
        return outs + self._state_infos(PRESENT_CONV, PRESENT_SSM)

    def _embed_weights(self) -> None:
        """Tied models keep one matrix, stored [d_model, vocab] for the lm_head MatMul; the
        embedding then gathers its columns (axis 1) instead of keeping a transposed copy."""
        if self.cfg.tie_embeddings:
            self.head_w = self.weight("lm_head.weight", lambda: self._np("backbone.embeddings.weight", self.wdtype).T)
        else:
            self.weight("backbone.embeddings.weight", lambda: self._np("backbone.embeddings.weight", self.wdtype))
            self.head_w = self.weight("lm_head.weight", lambda: self._np("lm_head.weight", self.wdtype).T)

    # ---- the multi-token branch ----------------------------------------------------------------
    def _seq_network(self) -> None:
        cfg, g = self.cfg, self.g
        mask = g.op("Unsqueeze", self.maskf, g.const([-1]))  # (b|1, l|1, 1)
        h = self._embed()
        if cfg.arch == "mamba2":
            self._ssd_shapes()
        for i in range(cfg.n_layer):
            p = f"backbone.layers.{i}."
            xn = g.rms(h, cfg.rms_norm_eps, self.param(p + "norm.weight"))
            mix = self._mamba1 if cfg.arch == "mamba1" else self._mamba2
            h = g.op("Add", h, mix(xn, mask, p + "mixer.", i))
        self._head(h)

    def _embed(self) -> str:
        """input_ids (b, l) -> (b, l, D) float32."""
        g = self.g
        if self.cfg.tie_embeddings:
            h = g.op("Transpose", g.op("Gather", self.head_w, IDS, axis=1), perm=[1, 2, 0])  # (b, l, D)
        else:
            h = g.op("Gather", "backbone.embeddings.weight", IDS, axis=0)
        return g.op("Cast", h, to=TensorProto.FLOAT) if self.wdtype == np.float16 else h

    def _head(self, h: str) -> str:
        """Optionally keep only the last `num_logits_to_keep` positions (0 = all)."""
        g = self.g
        keep = g.op("Greater", KEEP, g.const([0]))
        start = g.op("Where", keep, g.op("Max", g.op("Sub", self.L, KEEP), g.const([0])), g.const([0]))
        h = g.op("Slice", h, start, g.const([INT64_MAX]), g.const([1]))
        h = g.rms(h, self.cfg.rms_norm_eps, self.param("backbone.norm_f.weight"))
        return self.linear(h, self.head_w, out=self.out(LOGITS))

    def _conv(self, x: str, mask: str, p: str, i: int, channels: int) -> str:
        """Depthwise causal conv continuing from past_conv.i; x (b, l, c) -> silu(conv) (b, l, c).
        Written as k shifted multiply-adds in the time-major layout (b, k-1+l, c)."""
        g, k = self.g, self.cfg.d_conv
        x = g.op("Mul", x, mask)
        xt = g.op("Concat", g.op("Transpose", PAST_CONV.format(i), perm=[0, 2, 1]), x, axis=1)  # (b, k-1+l, c)
        # the last k-1 steps; for k = 1 none (a start of -0 would keep them all)
        tail = g.op("Slice", xt, g.const([-(k - 1) if k > 1 else INT64_MAX]), g.const([INT64_MAX]), g.const([1]))
        g.op_to(self.out(PRESENT_CONV.format(i)), "Transpose", tail, perm=[0, 2, 1])
        w = self._np(p + "conv1d.weight").reshape(channels, k).T  # (k, c)
        y = self.param(p + "conv1d.bias") if p + "conv1d.bias" in self.w else None
        for j in range(k):
            if j not in self._conv_ends:
                self._conv_ends[j] = g.op("Add", self.L, g.const([j]))
            tap = g.op("Mul", g.op("Slice", xt, g.const([j]), self._conv_ends[j], g.const([1])),
                       self.weight(f"{p}conv1d.weight.{j}", lambda j=j: w[j]))
            y = tap if y is None else g.op("Add", y, tap)
        return g.op("Mul", g.silu(y), mask)

    # ---- Mamba1 ---------------------------------------------------------------------------------
    def _mamba1(self, xn: str, mask: str, p: str, i: int) -> str:
        cfg, g = self.cfg, self.g
        d, n, r = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
        x, z = g.op("Split", self.linear(xn, p + "in_proj.weight", p + "in_proj.bias"), g.const([d, d]),
                    axis=2, n_out=2)  # (b, l, d) each
        x = self._conv(x, mask, p, i, d)
        dt, B, C = g.op("Split", self.linear(x, p + "x_proj.weight"), g.const([r, n, n]), axis=2, n_out=3)
        if cfg.dt_bc_rms:
            dt, B, C = (g.rms(t, cfg.mixer_rms_eps) for t in (dt, B, C))
        dt = g.softplus(g.op("Add", self.linear(dt, p + "dt_proj.weight"), self.param(p + "dt_proj.bias")))  # (b, l, d)
        A = self.weight(p + "A", lambda: -np.exp(self._np(p + "A_log")).T)  # (n, d)
        scan = self._m1_scan if self.scan_chunk == 1 else self._m1_chunk_scan
        y = scan(dt, x, B, C, A, i)  # (b, l, d)
        y = g.op("Add", y, g.op("Mul", x, self.param(p + "D")))
        y = g.op("Mul", y, g.silu(z))
        return self.linear(y, p + "out_proj.weight", p + "out_proj.bias")

    def _m1_scan(self, dt, x, B, C, A: str, i: int) -> str:
        """Scan over time in the (b, n, d) layout -> y (b, l, d); the last state, transposed back
        to (b, d, n), is present_ssm.i. The inputs are made time-major here (a reshape when b == 1)
        and scanned along axis 0: ORT's Scan copies inputs scanned along another axis into fresh
        buffers itself, and a first 512-token prefill then faulted in 130 MB instead of 90 MB
        (1.05 -> 0.96 s for Mamba1 130m; later runs equal)."""
        g = self.g
        h0 = g.op("Transpose", PAST_SSM.format(i), perm=[0, 2, 1])  # (b, n, d)

        def time_major(t, axis):  # (b, l, ...) -> unsqueeze axis -> (l, b, ...)
            return g.op("Transpose", g.op("Unsqueeze", t, g.const([axis])), perm=[1, 0, 2, 3])

        h_last, ys = g.op("Scan", h0,
                          time_major(dt, 2),  # (l, b, 1, d)
                          time_major(g.op("Mul", dt, x), 2),  # (l, b, 1, d)
                          time_major(B, 3),  # (l, b, n, 1)
                          time_major(C, 2),  # (l, b, 1, n)
                          n_out=2, body=self._scan_body(A), num_scan_inputs=4)  # ys (l, b, 1, d)
        g.op_to(self.out(PRESENT_SSM.format(i)), "Transpose", h_last, perm=[0, 2, 1])
        return g.op("Reshape", g.op("Transpose", ys, perm=[1, 0, 2, 3]), g.const([0, 0, -1]))

    def _scan_body(self, A: str) -> onnx.GraphProto:
        """One time step: h = h * exp(dt A) + (dt x) B ; y = C h. Shapes (b, n, d) / (b, 1, d)."""
        sb = Builder(self.opset, self.g._counter)
        names = {k: sb._name(k) for k in ("h", "dt", "dtx", "B", "C")}
        dA = sb.op("Exp", sb.op("Mul", names["dt"], A))  # (b, n, d)
        h = sb.op("Add", sb.op("Mul", names["h"], dA), sb.op("Mul", names["dtx"], names["B"]))
        y = sb.op("MatMul", names["C"], h)  # (b, 1, n) @ (b, n, d) -> (b, 1, d)
        f = TensorProto.FLOAT
        ins = [helper.make_tensor_value_info(names[k], f, [f"{names[k]}_{j}" for j in range(3)]) for k in names]
        outs = [helper.make_tensor_value_info(v, f, [f"{v}_{j}" for j in range(3)]) for v in (h, y)]
        return helper.make_graph(sb.nodes, sb._name("scan_body"), ins, outs, sb.inits)

    # ---- Mamba1, Q = scan_chunk > 1 tokens per Scan iteration ------------------------------------
    def _m1_chunk_scan(self, dt, x, B, C, A: str, i: int) -> str:
        """_m1_scan over chunks of Q tokens, each done at once by _chunk_body. dt, x (b, l, d); B, C
        (b, l, n) -> y (b, l, d); present_ssm.i as in _m1_scan. The time axis is padded to a
        multiple of Q with dt = 0 (decay 1, input 0: the state passes padded steps unchanged) and
        the padded outputs are dropped."""
        g, Q, d, n = self.g, self.scan_chunk, self.cfg.d_inner, self.cfg.d_state
        if self._m1_pads is None:
            c = g.op("Div", g.op("Add", self.L, g.const([Q - 1])), g.const([Q]))  # ceil(l / Q) chunks
            pad = g.op("Sub", g.op("Mul", c, g.const([Q])), self.L)
            self._m1_pads = g.cat(g.const([0, 0, 0, 0]), pad, g.const([0]))  # the end of axis 1 of (b, l, w)

        def chunked(t, width, axis):  # (b, l, w) -> (c, b, Q, w), a unit axis inserted at `axis`
            t = g.op("Reshape", g.op("Pad", t, self._m1_pads), g.const([0, -1, Q, width]))  # (b, c, Q, w)
            return g.op("Unsqueeze", g.op("Transpose", t, perm=[1, 0, 2, 3]), g.const([axis]))

        h_last, ys = g.op("Scan", g.op("Transpose", PAST_SSM.format(i), perm=[0, 2, 1]),  # (b, n, d)
                          chunked(dt, d, 3),  # (c, b, Q, 1, d)
                          chunked(g.op("Mul", dt, x), d, 3),  # (c, b, Q, 1, d)
                          chunked(B, n, 4),  # (c, b, Q, n, 1)
                          chunked(C, n, 3),  # (c, b, Q, 1, n)
                          n_out=2, body=self._chunk_body(A), num_scan_inputs=4)  # ys (c, b, Q, 1, d)
        g.op_to(self.out(PRESENT_SSM.format(i)), "Transpose", h_last, perm=[0, 2, 1])
        y = g.op("Reshape", g.op("Transpose", ys, perm=[1, 0, 2, 3, 4]), g.const([0, -1, d]))  # (b, c*Q, d)
        return g.op("Slice", y, g.const([0]), self.L, g.const([1]))  # drop the padded tail

    def _chunk_body(self, A: str) -> onnx.GraphProto:
        """One chunk of Q steps in the SSD dual form. In: h (b, n, d); dt, dtx (b, Q, 1, d); B (b, Q,
        n, 1); C (b, Q, 1, n). Out: h (b, n, d), y (b, Q, 1, d). With s = the in-chunk cumsum of
        dt A (<= 0, non-increasing along Q):
            y_t = sum_j (sum_n C_tn B_jn exp(s_tn - s_jn)) dtx_j + C_t . (exp(s_t) h)
            h'  = exp(s_Q) h + sum_j exp(s_Q - s_j) dtx_j B_j
        The exponents s_t - s_j are summed directly over j < k <= t (_chunk_exponents), <= 0 on
        and below the diagonal and -inf above it (exp gives exact zeros): only decays <= 1 are
        formed and no exp(-s) is divided out later, so large dt and strongly negative A cannot
        overflow at any length. A difference of two cumsums would cancel float32's digits after
        one large-dt step (5e-4 relative at Q = 64). W and the few
        tensors it is made from are (b, Q, Q, n, d) float32: 4 Q^2 n d bytes each per batch row
        (25 MB at Q = 16 on 130m shapes, d = 1536, n = 16)."""
        sb, Q, n = Builder(self.opset, self.g._counter), self.scan_chunk, self.cfg.d_state
        h, dt, dtx, B, C = names = [sb._name(k) for k in ("h", "dt", "dtx", "B", "C")]
        mask = np.where(np.tri(Q, dtype=bool), 0.0, -np.inf).astype(np.float32).reshape(Q, Q, 1, 1)  # [t, j]
        a = sb.op("Mul", dt, A)  # (b, Q, n, d)
        s = sb.op("CumSum", a, sb.const(1))
        W = sb.op("Exp", sb.op("Add", self._chunk_exponents(sb, a, s), sb.const(mask, np.float32)))  # (b, Qt, Qj, n, d)
        CB = sb.op("Mul", C, sb.op("Reshape", B, sb.const([0, 1, Q, n])))  # (b, Q_t, Q_j, n)
        G = sb.op("MatMul", sb.op("Unsqueeze", CB, sb.const([3])), W)  # (b, Q_t, Q_j, 1, d): n contracted
        y = sb.reduce("ReduceSum", sb.op("Mul", G, sb.op("Unsqueeze", dtx, sb.const([1]))), [2], keepdims=0)
        E = sb.op("Exp", s)  # decay from the chunk start (b, Q, n, d)
        y = sb.op("Add", y, sb.op("MatMul", C, sb.op("Mul", E, sb.op("Unsqueeze", h, sb.const([1])))))  # (b, Q, 1, d)
        w_last, e_last = (sb.op("Squeeze", sb.op("Slice", t, sb.const([Q - 1]), sb.const([Q]), sb.const([1])),
                                sb.const([1])) for t in (W, E))  # (b, Q_j, n, d), (b, n, d)
        u = sb.op("Mul", dtx, B)  # (b, Q, n, d)
        h_new = sb.op("Add", sb.op("Mul", e_last, h), sb.reduce("ReduceSum", sb.op("Mul", w_last, u), [1], keepdims=0))
        f = TensorProto.FLOAT
        ins = [helper.make_tensor_value_info(v, f, [f"{v}_{j}" for j in range(3 if v == h else 4)]) for v in names]
        outs = [helper.make_tensor_value_info(v, f, [f"{v}_{j}" for j in range(r)]) for v, r in ((h_new, 3), (y, 4))]
        return helper.make_graph(sb.nodes, sb._name("chunk_body"), ins, outs, sb.inits)

    def _chunk_exponents(self, sb: Builder, a: str, s: str) -> str:
        """a = dt A (b, Q, n, d), s its cumsum along Q -> (b, Q_t, Q_j, n, d) holding s_t - s_j for
        t >= j, summed directly over j < k <= t (as _segsum_exp), not as a difference: one MatMul
        of a 0/1 (Q*Q, Q) matrix with a, Q multiply-adds per element. A masked CumSum of the same
        sum ran Q = 32 at 2x the time on ONNX Runtime's CUDA provider (its CumSum re-reads the axis
        per element), the difference of cumsums lost float32's digits (benchmarks/onnx_m1_chunk.py)."""
        Q, n = self.scan_chunk, self.cfg.d_state
        t, j, k = np.ogrid[:Q, :Q, :Q]
        M = ((j < k) & (k <= t)).astype(np.float32).reshape(Q * Q, Q)  # [t*Q + j, k]
        flat = sb.op("Reshape", a, sb.const([0, Q, -1]))  # (b, Q, n*d)
        return sb.op("Reshape", sb.op("MatMul", sb.const(M, np.float32), flat), sb.const([0, Q, Q, n, -1]))

    # ---- Mamba2 ---------------------------------------------------------------------------------
    def _ssd_shapes(self):
        """Shape arithmetic shared by all layers: chunk length Q = min(chunk_size, l), chunks c."""
        g = self.g
        self.Q = g.op("Min", self.L, g.const([self.chunk]))
        self.c = g.op("Div", g.op("Sub", g.op("Add", self.L, self.Q), g.const([1])), self.Q)
        self.pad = g.op("Sub", g.op("Mul", self.c, self.Q), self.L)
        self.time_pads = {rank: g.cat(g.const([0] * (rank + 1)), self.pad, g.const([0] * (rank - 2)))
                          for rank in (3, 4)}  # pad the end of axis 1 of a rank-3/4 tensor

    def _mamba2_dt_A(self, dt: str, p: str) -> tuple[str, str]:
        """softplus(dt + dt_bias), clamped to time_step_limit when either bound is set, and the
        initializer A = -exp(A_log) (h,): one definition for the prefill graph and the one-token
        branch, which share A by name (the branch built first creates it)."""
        g, (lo, hi) = self.g, self.cfg.dt_limit
        dt = g.op("Softplus", g.op("Add", dt, self.param(p + "dt_bias")))
        if lo > 0.0 or hi != float("inf"):
            dt = g.op("Clip", dt, g.const(lo, np.float32), g.const(min(hi, 3.0e38), np.float32))
        return dt, self.weight(p + "A", lambda: -np.exp(self._np(p + "A_log")))

    def _mamba2(self, xn: str, mask: str, p: str, i: int) -> str:
        cfg, g = self.cfg, self.g
        d, h, P, G, N = cfg.d_inner, cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        z, xBC, dt = g.op("Split", self.linear(xn, p + "in_proj.weight", p + "in_proj.bias"),
                          g.const([d, cfg.conv_dim, h]), axis=2, n_out=3)
        xBC = self._conv(xBC, mask, p, i, cfg.conv_dim)
        dt, A = self._mamba2_dt_A(dt, p)  # (b, l, h), (h,)
        x, B, C = g.op("Split", xBC, g.const([d, G * N, G * N]), axis=2, n_out=3)
        x4 = g.op("Reshape", x, g.const([0, 0, h, P]))  # (b, l, h, p)
        y = self._ssd(x4, dt, B, C, A, i)  # (b, l, h, p)
        y = g.op("Add", y, g.op("Mul", x4, self.param(p + "D", (h, 1))))
        y, gate = g.op("Reshape", y, g.const([0, 0, d])), g.silu(z)  # (b, l, d)
        after = cfg.rmsnorm and cfg.norm_before_gate  # gate the normalised y (mamba_ssm's option)
        if not after:
            y = g.op("Mul", y, gate)
        if cfg.rmsnorm:
            y = g.rms(g.op("Reshape", y, g.const([0, 0, G, d // G])), cfg.rms_norm_eps)
            y = g.op("Mul", g.op("Reshape", y, g.const([0, 0, d])), self.param(p + "norm.weight"))
        if after:
            y = g.op("Mul", y, gate)
        return self.linear(y, p + "out_proj.weight", p + "out_proj.bias")

    def _segsum_exp(self, a: str) -> str:
        """a (..., T) -> exp(segsum) (..., T, T): [i, j] = exp(sum_{k=j+1..i} a_k) for j <= i, else 0.
        Summed directly as a masked cumsum, never as a difference of cumsums."""
        g = self.g
        T = g.dim(g.op("Shape", a), -1)
        xr = g.op("Expand", g.op("Unsqueeze", a, g.const([-1])), g.cat(g.op("Shape", a), T))  # [.., i, j] = a_i
        ones = g.op("ConstantOfShape", g.cat(T, T), value=numpy_helper.from_array(np.ones(1, np.float32)))
        strict = g.op("Trilu", ones, g.const(-1), upper=0)
        seg = g.op("CumSum", g.op("Mul", xr, strict), g.const(-2))
        return g.op("Mul", g.op("Exp", seg), g.op("Trilu", ones, upper=0))

    def _ssd(self, x4: str, dt: str, B: str, C: str, A: str, i: int) -> str:
        """Chunked SSD from past_ssm.i. x4 (b, l, h, p); dt (b, l, h); B, C (b, l, g*n) -> y
        (b, l, h, p); the last state is present_ssm.i."""
        cfg, g = self.cfg, self.g
        H, P, G, N = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        R = H // G
        Q = self.Q
        dtp = g.op("Pad", dt, self.time_pads[3])  # dt = 0 in the tail: no decay, no input
        X = g.op("Pad", g.op("Mul", x4, g.op("Unsqueeze", dt, g.const([-1]))), self.time_pads[4])
        X = g.op("Transpose", g.op("Reshape", X, g.cat(g.const([0, -1]), Q, g.const([G, R, P]))),
                 perm=[0, 1, 3, 4, 2, 5])  # (b, c, g, r, Q, p)
        Bc, Cc = (g.op("Transpose", g.op("Reshape", g.op("Pad", t, self.time_pads[3]),
                                         g.cat(g.const([0, -1]), Q, g.const([G, N]))),
                       perm=[0, 1, 3, 2, 4]) for t in (B, C))  # (b, c, g, Q, n)
        Adt = g.op("Transpose", g.op("Reshape", g.op("Mul", dtp, A), g.cat(g.const([0, -1]), Q, g.const([H]))),
                   perm=[0, 1, 3, 2])  # (b, c, h, Q)
        six = g.cat(g.const([0, 0, G, R]), Q)  # reshape (b, c, h, Q[, Q]) -> (b, c, g, r, Q[, Q])

        # 1. inside each chunk: y_diag = (C B^T * L) X
        Lm = g.op("Reshape", self._segsum_exp(Adt), g.cat(six, Q))  # (b, c, g, r, Q, Q)
        CB = g.op("Unsqueeze", g.op("MatMul", Cc, g.op("Transpose", Bc, perm=[0, 1, 2, 4, 3])), g.const([3]))
        y = g.op("MatMul", g.op("Mul", CB, Lm), X)  # (b, c, g, r, Q, p)

        # 2. each chunk's final state from zero: decay to the chunk end is an exclusive reverse cumsum
        to_end = g.op("Exp", g.op("CumSum", Adt, g.const(-1), exclusive=1, reverse=1))
        Xd = g.op("Mul", X, g.op("Reshape", to_end, g.cat(six, g.const([1]))))
        states = g.op("MatMul", g.op("Transpose", Xd, perm=[0, 1, 2, 3, 5, 4]),
                      g.op("Unsqueeze", Bc, g.const([3])))  # (b, c, g, r, p, n)
        states = g.op("Reshape", states, g.const([0, 0, H, P, N]))

        # 3. carry states across chunks from past_ssm.i
        csum = g.op("Transpose", g.reduce("ReduceSum", Adt, [-1], keepdims=0), perm=[0, 2, 1])  # (b, h, c)
        decay = self._segsum_exp(g.op("Pad", csum, g.const([0, 0, 1, 0, 0, 0])))  # (b, h, c+1, c+1)
        allst = g.op("Concat", g.op("Unsqueeze", PAST_SSM.format(i), g.const([1])), states, axis=1)
        allst = g.op("Reshape", g.op("Transpose", allst, perm=[0, 2, 1, 3, 4]), g.const([0, 0, -1, P * N]))
        new = g.op("MatMul", decay, allst)  # (b, h, c+1, p*n)
        last = g.op("Slice", new, g.const([-1]), g.const([INT64_MAX]), g.const([2]))
        g.op_to(self.out(PRESENT_SSM.format(i)), "Reshape", last, g.const([0, H, P, N]))
        starts = g.op("Slice", new, g.const([0]), g.const([-1]), g.const([2]))  # (b, h, c, p*n)
        starts = g.op("Transpose", g.op("Reshape", starts, g.const([0, 0, 0, P, N])), perm=[0, 2, 1, 4, 3])
        starts = g.op("Reshape", starts, g.const([0, 0, G, R, N, P]))  # (b, c, g, r, n, p)

        # 4. chunk-start states -> outputs, decayed by exp(inclusive cumsum) <= 1
        from_start = g.op("Reshape", g.op("Exp", g.op("CumSum", Adt, g.const(-1))), g.cat(six, g.const([1])))
        y_off = g.op("Mul", g.op("MatMul", g.op("Unsqueeze", Cc, g.const([3])), starts), from_start)
        y = g.op("Transpose", g.op("Add", y, y_off), perm=[0, 1, 4, 2, 3, 5])  # (b, c, Q, g, r, p)
        y = g.op("Reshape", y, g.const([0, -1, H, P]))
        return g.op("Slice", y, g.const([0]), self.L, g.const([1]))  # drop the padded tail
