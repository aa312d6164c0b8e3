"""Peak memory of BAGEL-7B-MoT's real-shape passes, measured on CPU with fake tensors (no weights, no GPU).

The real code runs under ``FakeTensorMode`` (shapes, dtypes and storages without data) and a dispatch mode
that counts the bytes of every storage an op creates until it is freed, as the CUDA caching allocator would
see them (PyTorch's ``MemTracker`` does the same but is built for training: it refuses a module called twice). Off the GPU SDPA dispatches to other kernels
than on CUDA, so each attention call is replaced by what the fused kernel allocates: its output plus the
fp32 log-sum-exp ([B, H, n_q]); ``tests/test_attention_kernels.py`` proves every call is eligible for it.

Measured (bf16, 1024x1024 edit: VAE block 64x64 latents, ViT block 70x70 patches, a 24-token prompt):
  * prefill of the image block (VAE latents, then ViT patches) into the LLM context;
  * one denoising pass with 3 CFG branches (main, text-free, image-free), and with 1 and 2;
  * one decode step after the edit context (a VQA-style token), after the decode's one-off reservation
    (``reserve_text``: a forked context copies its cache once per answer, reported apart);
  * the TaylorSeer feature cache (issue 20) over 20 guided steps with 2 branches (text-to-image) and 3 (edit):
    its bytes once every order is filled (19 steps), the peak of a cached step, against the official layout's
    bytes (every decoder layer keeps max_order + 1 tensors of query tokens x hidden per branch: arithmetic).
Each figure is the peak above what was alive before the call (weights + KV caches + inputs).

    python bench/memory_real_shapes.py [--out mem.json] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampler import REAL, TINY  # noqa: E402  (the benches' shared real and tiny shapes)

from hyperbagel_core.config import BagelConfig, LLMConfig, ViTConfig  # noqa: E402
from hyperbagel_core.generation import CFGSettings, guided_velocity  # noqa: E402
from hyperbagel_core.model import attention as attn_mod  # noqa: E402
from hyperbagel_core.model.bagel import BagelModel  # noqa: E402
from hyperbagel_core.sampling.taylorseer import TaylorSeerSettings, TaylorSeerState, cache_bytes  # noqa: E402

GiB = 2 ** 30


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What the fused kernel allocates: the output and an fp32 log-sum-exp [..., H, n_q]."""
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    del lse  # freed when the kernel returns, but it was alive at the peak
    return out


@contextmanager
def fused_attention_accounting():
    """Route every SDPA call (and flash-attn, absent here) through ``_fused_sdpa`` for the duration."""
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa), \
            mock.patch.object(attn_mod.F, "scaled_dot_product_attention", _fused_sdpa), \
            mock.patch.object(attn_mod, "causal_lower_right", lambda n_q, n_k: None):
        yield  # the lower-right bias is a flag to the fused kernel (no tensor); fake mode cannot build it


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = id(t.untyped_storage())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def context_bytes(*ctxs) -> int:
    out = []
    for c in ctxs:
        st = c._store
        out += list(st.k) + list(st.v)
    return storage_bytes(out)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops while active, alive now and at the peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) not in ins and st not in self._seen:   # views and in-place results allocate nothing
                    n = st.nbytes()
                    self._seen[st] = n
                    self.live += n
                    weakref.finalize(st, self._free, n)
        self.peak = max(self.peak, self.live)
        return out


def peak_above(fn) -> tuple[int, object]:
    """Peak bytes of the storages ``fn`` creates (on top of everything alive before it), and its result."""
    mode = LiveBytes()
    with mode:
        res = fn()
    return mode.peak, res


def build(spec: dict, dtype: torch.dtype) -> BagelModel:
    cfg = BagelConfig(llm=LLMConfig(**spec["llm"]), vit=ViTConfig(**spec["vit"]))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)                    # the loader stores every tensor in ``dtype`` too
    try:
        model = BagelModel(cfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(old)
    model.set_special_tokens(start_of_image=cfg.llm.vocab_size - 2, end_of_image=cfg.llm.vocab_size - 1)
    return model


def measure(spec: dict, size: int, vit_side: int, prompt_tokens: int, dtype=torch.bfloat16) -> dict:
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    ids, tok = torch.arange(prompt_tokens) % 1000, torch.tensor([7])   # real ids: the layout reads them
    res: dict = {}
    with fake, fused_attention_accounting(), torch.no_grad():
        model = build(spec, dtype)
        cfg = model.config
        weights = storage_bytes(list(model.parameters()) + list(model.buffers()))
        p = cfg.latent_patch_size
        lat_side = size // cfg.latent_downsample                       # 64 latent tokens a side at 1024^2
        latent = torch.empty(cfg.vae["z_channels"], lat_side * p, lat_side * p, dtype=torch.float32)
        pixels = torch.empty(3, vit_side, vit_side, dtype=torch.float32)
        gen, cfg_img = model.new_context(), model.new_context()

        def prefill_image():
            model.prefill_vae(gen, latent)
            model.prefill_vit(gen, pixels)
        res["prefill_image_block"] = dict(peak_above_GiB=peak_above(prefill_image)[0] / GiB,
                                          kv_tokens=gen.kv_len)
        cfg_text = gen.fork()
        model.forward_text(gen, ids, logits=False)     # prefill_text minus its layout bookkeeping (reads ids)
        model.forward_text(cfg_img, ids, logits=False)
        kv = context_bytes(gen, cfg_text, cfg_img)
        h = w = lat_side
        x = torch.empty(h * w, cfg.patch_latent_dim, dtype=torch.float32)
        for branches in (1, 2, 3):
            s = CFGSettings(4.0, 2.0 if branches == 3 else 1.0, (0.0, 1.0), "text_channel", 0.0)
            if branches == 1:
                s = CFGSettings(1.0, 1.0, (0.0, 1.0), "global", 0.0)
            run = lambda: guided_velocity(model, gen, cfg_text, cfg_img, x, 0.5, h, w, s)  # noqa: E731
            first, _ = peak_above(run)                                    # may copy-on-write a fork's cache once
            kv_after = context_bytes(gen, cfg_text, cfg_img)
            steady, _ = peak_above(run)
            res[f"denoise_pass_{branches}_branches"] = dict(peak_above_GiB=steady / GiB,
                                                            first_pass_peak_above_GiB=first / GiB,
                                                            kv_GiB=kv_after / GiB)
        dec = gen.fork()                                                   # what answer() decodes on
        first, _ = peak_above(lambda: (model.reserve_text(dec, 64), model.forward_text(dec, tok)))
        steady, _ = peak_above(lambda: model.forward_text(dec, tok))
        res["decode_step"] = dict(peak_above_GiB=steady / GiB, kv_tokens=dec.kv_len,
                                  first_step_with_reservation_GiB=first / GiB)  # the fork's one copy
        res["taylorseer"] = taylorseer_cache(model, gen, cfg_text, cfg_img, x, h, w)
        res["weights_GiB"] = weights / GiB
        res["kv_caches_GiB"] = kv / GiB
        res["kv_tokens"] = dict(gen=gen.kv_len, cfg_text=cfg_text.kv_len, cfg_img=cfg_img.kv_len)
    return res


def taylorseer_cache(model, gen, cfg_text, cfg_img, x, h: int, w: int, steps: int = 20) -> dict:
    """The TaylorSeer cache's bytes (ours, measured) against the official layout's (arithmetic) at this shape."""
    st_ = TaylorSeerSettings()
    llm = model.config.llm
    e = torch.empty((), dtype=model.dtype).element_size()
    out = {}
    for name, branches, s in (("text_to_image", 2, CFGSettings(4.0, 1.0, (0.0, 1.0), "global", 0.0)),
                              ("edit", 3, CFGSettings(4.0, 2.0, (0.0, 1.0), "text_channel", 0.0))):
        state = TaylorSeerState(st_)
        peaks = []
        for _ in range(steps):
            run = lambda: guided_velocity(model, gen, cfg_text, cfg_img, x, 0.5, h, w, s, cache=state)  # noqa: E731
            peaks.append(peak_above(run)[0])
        ours = storage_bytes([f for b in state.branches.values() for f in b.factors])
        official = branches * llm.num_hidden_layers * (st_.max_order + 1) * (h * w + 2) * llm.hidden_size * e
        out[name] = dict(branches=branches, ours_cache_GiB=ours / GiB, official_layout_GiB=official / GiB,
                         ratio_official_over_ours=official / ours, estimate_GiB=cache_bytes(
                             st_, h * w, llm.hidden_size, branches, e) / GiB,
                         orders=len(state.branches["main"].factors),
                         step_peak_above_GiB=max(peaks) / GiB,
                         full_steps=state.branches["main"].activated[1:], passes=state.passes)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--size", type=int, default=1024, help="edit image side (square)")
    ap.add_argument("--vit-side", type=int, default=980, help="ViT input side (980 = 70x70 patches)")
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    spec = TINY if a.tiny else REAL
    size, vit_side = (64, 56) if a.tiny else (a.size, a.vit_side)
    t0 = time.perf_counter()
    res = measure(spec, size, vit_side, a.prompt_tokens)
    res.update(shapes="tiny" if a.tiny else "BAGEL-7B-MoT", dtype="bf16", size=size, vit_side=vit_side,
               torch=torch.__version__, seconds=time.perf_counter() - t0,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
