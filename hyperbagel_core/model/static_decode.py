"""Fixed-shape text decoding steps of the product ``BagelModel``, captured as CUDA graphs.

Eager decoding launches ~2000 kernels per token (plus ComfyUI's cast wrappers on every layer), which at
batch 1 costs more than reading the weights. A step here has static shapes: the query block is padded
to a bucket (1, 2, 4, 8, 16 rows), its K/V rows are written with ``index_copy_`` at device-tensor slots
into the context's own storage, and attention runs over the storage's whole capacity with a length mask
(slot j is visible to query row i iff j <= slot[i]). So one CUDA graph per (bucket, want_layers) replays
every token of a decode, as long as the storage does not move; ``reserve_text`` sizes it once up front.
On CPU the same step runs eagerly, so CPU tests exercise exactly the function that is captured.

The length mask is the one masked attention of the model: scores are [rows, capacity], rows = one or
k+1 queries per kv head, which is tiny. Every other attention call (prefill, images, denoising) is
mask-free/fused in ``attention.py``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .attention import gqa_folded_attention
from .bagel import TextStep
from .compiled import mark_dynamic
from .llm import rope_cos_sin

log = logging.getLogger(__name__)
BUCKETS = (1, 2, 4, 8, 16)


def capture_cuda_graph(fn, example, copy_inputs: bool = True):
    """CUDA-graph ``fn(*inputs)``. With ``copy_inputs`` the graph reads static copies of ``example`` and the
    returned callable takes new inputs to copy in; without, it reads ``example`` itself (the caller writes
    into those tensors) and the callable takes no arguments. Outputs are static buffers, overwritten by
    the next replay."""
    static_in = [t.clone() for t in example] if copy_inputs else list(example)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):                           # warm-up (allocator, cuBLAS handles)
            fn(*static_in)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):   # other threads (a server) may use CUDA
        static_out = fn(*static_in)

    def replay(*args):
        for dst, src in zip(static_in, args):
            dst.copy_(src)
        graph.replay()
        return static_out
    return replay


def und_parameters(model):
    """The parameters text decoding reads: the LLM's und expert (the gen expert is never touched)."""
    return (p for n, p in model.language_model.named_parameters() if "moe_gen" not in n)


def weights_resident(model, device: torch.device, experts: str = "und") -> bool:
    """All und-expert weights (``experts="all"``: every LLM weight) sit on ``device`` and no module patches them
    per call: ComfyUI's low-VRAM partial load streams weights (and applies LoRA patches) inside each forward,
    which a graph cannot replay and a compiled region would recompile for."""
    device = torch.device(device)

    def on(d):
        return d.type == device.type and (device.index is None or d.index == device.index)
    params = und_parameters(model) if experts == "und" else model.language_model.parameters()
    if not all(on(p.device) for p in params):
        return False
    return not any(getattr(m, "weight_function", None) or getattr(m, "bias_function", None)
                   for m in model.language_model.modules())


def use_static_decoding(model, device: torch.device, enabled: bool = True) -> bool:
    """The graph path pays on CUDA with resident weights; everything else decodes eagerly."""
    return enabled and torch.device(device).type == "cuda" and weights_resident(model, torch.device(device))


def length_bias(slots: torch.Tensor, capacity: int, group: int, dtype) -> torch.Tensor:
    """Additive mask [group * rows, capacity] in GQA-folded row order: slot j is visible to row i iff
    j <= slots[i]."""
    visible = torch.arange(capacity, device=slots.device)[None, :] <= slots[:, None]
    # eagerly the last dim is padded to 16 elements (SDPA's fused kernels want an aligned bias stride); a
    # compiled region leaves that to inductor, which aligns SDPA's inputs itself (a padded view would tie
    # the graph to capacities that are multiples of 16)
    width = capacity if torch.compiler.is_compiling() else -(-capacity // 16) * 16
    bias = torch.zeros(group * slots.shape[0], width, dtype=dtype, device=slots.device)
    return bias[:, :capacity].masked_fill_(~visible.repeat(group, 1), float("-inf"))


# The regions of one step (``model/compiled.py``): [embedding, layer 0 up to its K/V write], then per layer
# [attention over the cache, the rest of layer i, layer i+1 up to its K/V write], then [attention and the rest
# of the last layer, final norm, LM head, argmax]. Compiled or not, the step runs exactly these functions.
def _write_kv(layer, x, cos, sin, kc, vc, slots):
    q, k, v = layer.attention_inputs(x, cos, sin, False)
    kc.index_copy_(0, slots, k[0])
    vc.index_copy_(0, slots, v[0])
    return q


def _attend(layer, x, q, kc, vc, bias):
    return layer.finish(x, gqa_folded_attention(q[0], kc, vc, bias)[None].flatten(2), False)


def decode_first(embed, layer, ids, pos, slots, kc, vc, dtype, head_dim: int, theta: float, group: int):
    x = embed(ids[None]).to(dtype)     # [1, b, D], not a view: the next region sees the same kind of input
    cos, sin = rope_cos_sin(pos[None], head_dim, theta, dtype)
    bias = length_bias(slots, kc.shape[0], group, dtype)
    return x, _write_kv(layer, x, cos, sin, kc, vc, slots), cos, sin, bias


def decode_middle(layer, nxt, x, q, kc, vc, kc_next, vc_next, slots, bias, cos, sin):
    x = _attend(layer, x, q, kc, vc, bias)
    return x, _write_kv(nxt, x, cos, sin, kc_next, vc_next, slots)


def decode_last(layer, norm, lm_head, x, q, kc, vc, bias):
    x = _attend(layer, x, q, kc, vc, bias)
    h = norm(x[0])
    logits = lm_head(h)
    return x, h, logits, logits.argmax(-1)


def _bucket(n: int, smallest: int = 1) -> int | None:
    return next((b for b in BUCKETS if b >= max(n, smallest)), None)


class StaticTextDecoder:
    """``forward_text`` of a BagelModel at fixed shapes over the context's storage; drop-in for the model in
    ``decoding.generate_text`` and ``speculative.speculative_generate``.

    Graphs capture the storage tensors' addresses: they are keyed by the storage and dropped when a
    context with other storage decodes (or on ``release``). Outputs are fresh tensors (not graph buffers).
    """

    def __init__(self, model, cuda_graphs: bool = True, compiler=None):
        """``compiler``: a ``compiled.RegionCompiler`` whose regions the step runs through (None: the same
        region functions uncompiled)."""
        self.model, self.cuda_graphs, self.compiler = model, cuda_graphs, compiler
        self.config = model.config
        self._graphs: dict = {}
        self._storage = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def parameters(self):
        return self.model.parameters()

    def reserve_text(self, ctx, n: int) -> None:
        """Fix the storage for ``n`` more tokens (plus bucket padding) before a decode, so graphs survive it."""
        self.model.reserve_text(ctx, n + BUCKETS[-1])

    def release(self) -> None:
        """Free the captured graphs (and with them the storage they pin)."""
        self._graphs.clear()
        self._storage = None

    min_rows: int | None = None   # rows a step is padded to at least; None: ``smallest_block``'s choice

    def smallest_block(self) -> int:
        """Rows a step is padded to at least. Compiled on CUDA: 2, so that one graph (rows dynamic, >= 2)
        serves plain decoding and every verification block (a memory-bound GPU reads the weights once for
        either). Elsewhere 1: a CPU matrix product of 2 rows costs about twice one row's (measured), and the
        extra graph for one row costs only compile time there."""
        if self.min_rows is not None:
            return self.min_rows
        return 2 if self.compiler is not None and self.model.device.type == "cuda" else 1

    def _region(self, fn):
        return fn if self.compiler is None else self.compiler.region(fn.__name__, fn)

    @torch.no_grad()
    def step(self, inputs: torch.Tensor, ks, vs, want_layers: bool):
        """The captured function. inputs [3, b] (ids, RoPE positions, cache slots) on the model's device.
        Returns (logits [b, V], hidden [b, D] after the final norm, layer outputs [b, L, D] or None, argmax [b])."""
        m, c = self.model, self.config.llm
        lm = m.language_model
        layers = lm.model.layers
        ids, pos, slots = (mark_dynamic(t, 0) for t in inputs)
        for t in (*ks, *vs):
            mark_dynamic(t, 0)
        x, q, cos, sin, bias = self._region(decode_first)(
            lm.model.embed_tokens, layers[0], ids, pos, slots, ks[0], vs[0], m.dtype, c.head_dim, c.rope_theta,
            c.num_attention_heads // c.num_key_value_heads)
        mark_dynamic(bias, 0, 1)
        middle, outs = self._region(decode_middle), []
        for i in range(len(layers) - 1):
            x, q = middle(layers[i], layers[i + 1], mark_dynamic(x, 1), mark_dynamic(q, 1), ks[i], vs[i],
                          ks[i + 1], vs[i + 1], slots, bias, mark_dynamic(cos, 1), mark_dynamic(sin, 1))
            outs.append(x[0])
        x, h, logits, argmax = self._region(decode_last)(layers[-1], lm.model.norm, lm.lm_head, mark_dynamic(x, 1),
                                                          mark_dynamic(q, 1), ks[-1], vs[-1], bias)
        outs.append(x[0])
        return logits, h, (torch.stack(outs, 1) if want_layers else None), argmax

    @torch.no_grad()
    def forward_text(self, ctx, ids, return_all_hidden: bool = False) -> TextStep:
        """Same contract as ``BagelModel.forward_text`` (plus ``argmax``); blocks longer than the largest bucket
        run eagerly. ``ids`` may be a device tensor (drafted tokens): nothing waits for it on the host."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        n = ids.numel()
        b = _bucket(n, self.smallest_block())
        if b is None:
            return self.model.forward_text(ctx, ids, return_all_hidden)
        self.model.reserve_text(ctx, b)          # in place unless the storage is shared or full
        ks, vs = ctx._store.k, ctx._store.v
        if self._storage is not ks:              # new storage: old graphs are stale; its tail must be finite
            self.release()
            self._storage = ks
            for t in (*ks, *vs):
                t[ctx.kv_len:].zero_()           # masked slots still enter the weighted sum (0 * NaN)
        rows = torch.arange(b, device=ids.device)
        inputs = torch.stack([F.pad(ids, (0, b - n)), ctx.rope + rows, ctx.kv_len + rows])
        logits, h, layers, argmax = self._run(inputs, ks, vs, return_all_hidden)
        ctx.advance(n, n)
        return TextStep(logits[:n].clone(), h[:n].clone(),
                        None if layers is None else tuple(layers[:n].clone().unbind(1)), argmax[:n].clone())

    graphs_wanted = True     # the pipeline's ``cuda_graphs`` (``cuda_graphs`` turns False when a capture fails)

    def _graphs_on(self, device: torch.device) -> bool:
        return self.cuda_graphs and self.graphs_wanted and device.type == "cuda"

    def _run(self, inputs, ks, vs, want_layers: bool):
        dev = ks[0].device
        if not self._graphs_on(dev):
            return self.step(inputs.to(dev), ks, vs, want_layers)
        key = (inputs.shape[1], want_layers)
        if key not in self._graphs:
            try:
                self._graphs[key] = capture_cuda_graph(lambda x: self.step(x, ks, vs, want_layers),
                                                       [inputs.to(dev)])
            except RuntimeError as e:            # e.g. ops that sync or switch streams inside a forward
                log.warning("CUDA-graph capture of the text decode step failed (%s); decoding eagerly", e)
                self.cuda_graphs = False
                return self.step(inputs.to(dev), ks, vs, want_layers)
        return self._graphs[key](inputs)
