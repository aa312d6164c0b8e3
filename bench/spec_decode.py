"""Text decoding benchmark of the product path: eager vs static (CUDA-graphed) vs compiled steps, plain vs
speculative (issues 9 and 21).

The real ``BagelModel`` at BAGEL-7B-MoT's shapes (Qwen2 MoT LLM: 28 layers, hidden 3584, 28/4 heads,
intermediate 18944, vocab 152064; SigLIP so400m) with random weights materialised on the device (meta
build, ``to_empty``, init in place: no host copy), batch 1, a ``--prompt-len`` (1024) token context.
Decoding goes through ``decoding.generate_text`` / ``speculative_generate`` with the model itself (eager),
its ``StaticTextDecoder`` (fixed shapes, one CUDA graph per block size) or the same decoder with its regions
compiled (``BagelPipeline(compile=...)``: what ``answer`` runs). The speculative drafter is an oracle that
proposes the target's own future greedy tokens, each wrong with probability 1 - alpha, so the mean accepted
length tau is set by alpha and k; the real Hyper-Bagel draft head (over a ``--draft-vocab`` reduced
vocabulary) runs alongside on every call (proposals discarded) so its cost counts. The oracle's bookkeeping
(re-deriving the reference after a bf16 near-tie flip) is timed and subtracted. One decode step of each path
is profiled (kernels per token); bytes read per token (und-expert weights + LM head + KV cache at the mean
length) times tokens/s against the card's datasheet bandwidth (``gpu_specs.py``) gives the % of the limit.

    python bench/spec_decode.py --out decode.json                         # CUDA, bf16
    python bench/spec_decode.py --shape medium --device cpu --paths eager,compiled --out d.json   # CPU anchor
    python bench/spec_decode.py --tiny --device cpu --threads 1 --out /tmp/d.json   # CPU smoke run
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_specs import card  # noqa: E402

from hyperbagel_core.config import BagelConfig, LLMConfig, ViTConfig  # noqa: E402
from hyperbagel_core.decoding import generate_text  # noqa: E402
from hyperbagel_core.model.bagel import BagelModel  # noqa: E402
from hyperbagel_core.model.compiled import RegionCompiler  # noqa: E402
from hyperbagel_core.model.static_decode import StaticTextDecoder, use_static_decoding  # noqa: E402
from hyperbagel_core.speculative import (DraftHead, DraftHeadDrafter, OracleDrafter,  # noqa: E402
                                         speculative_generate)
from hyperbagel_core.testing import tiny_config  # noqa: E402

BOS = 1
RESYNC = 32
BAGEL_7B = BagelConfig(llm=LLMConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
                       vit=ViTConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                     num_attention_heads=16))
SMALL = LLMConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=1024)
# the perf set's medium checkpoint (../shared/perf/set/README.md): the CPU anchor of issue 9 and 21
MEDIUM = LLMConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=1064)


def config_for(shape: str) -> BagelConfig:
    """"real" (BAGEL-7B-MoT), "medium" (the perf set's checkpoint), "tiny" (8 small layers)."""
    if shape == "real":
        return BAGEL_7B
    return BagelConfig(llm=MEDIUM if shape == "medium" else SMALL, vit=tiny_config().vit)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def build_model(cfg: BagelConfig, device, dtype, seed: int) -> BagelModel:
    """Random weights made on ``device`` directly: N(0, 0.02), norm weights 1, biases 0."""
    with torch.device("meta"):
        model = BagelModel(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0) if "norm" in name else p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=g)
    model.set_special_tokens(2, 3)
    return model.requires_grad_(False).eval()


def alpha_for(tau: float, k: int) -> float:
    """Per-token acceptance alpha with (1 - alpha^(k+1)) / (1 - alpha) = tau (chain of k drafts)."""
    if tau <= 1.0:
        return 0.0
    if tau >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        if (1 - a ** (k + 1)) / (1 - a) < tau:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


class Bench:
    def __init__(self, args):
        self.args, dev = args, args.device
        cfg = config_for(args.shape)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        t0 = time.perf_counter()
        self.model = build_model(cfg, dev, self.dtype, args.seed)
        sync(dev)
        self.build_s = time.perf_counter() - t0
        self.compiler = None if args.compile == "none" else RegionCompiler(args.compile)
        self.decoders = {"eager": self.model, "static": StaticTextDecoder(self.model),
                         "compiled": StaticTextDecoder(self.model, compiler=self.compiler)}
        self.path = "eager"                           # which path the current rows time
        self.V = cfg.llm.vocab_size
        g = torch.Generator().manual_seed(args.seed)
        self.prompt = torch.randint(4, self.V, (args.prompt_len,), generator=g)
        self.base = self.model.new_context()          # never decoded on: runs and resyncs fork it
        self.model.prefill_text(self.base, self.prompt)
        self.ctx = self.base.fork()
        self.head = None
        if args.draft_kind != "none":
            vocab = torch.arange(args.draft_vocab) if 0 < args.draft_vocab < self.V else None
            self.head = DraftHead.from_target(self.model, args.draft_kind, draft_vocab=vocab)

    def decoder(self, path: str | None = None):
        return self.decoders[path or self.path]

    def fresh_ctx(self):
        """The same context rolled back: its storage (and the graphs captured on it) is reused."""
        self.ctx.truncate(self.base.kv_len, self.base.rope)
        return self.ctx

    def resync(self, seq):
        """The next ``RESYNC`` greedy tokens after prompt + <bos> + seq, on a private context (the oracle
        asks again when the text runs past them, so a near-tie flip costs a chunk, not the whole answer)."""
        dec = self.model if self.path == "eager" else \
            StaticTextDecoder(self.model, compiler=self.compiler if self.path == "compiled" else None)
        ctx = self.base.fork()
        out = dec.forward_text(ctx, torch.tensor([BOS] + seq))
        ids = [int(out.logits[-1].argmax())]
        ids += generate_text(dec, ctx, bos_id=ids[-1], eos_id=-1, max_new_tokens=RESYNC - 1)
        sync(self.args.device)
        return ids

    def spec(self, drafter, k, adaptive=True):
        res = speculative_generate(self.decoder(), self.fresh_ctx(), drafter, bos_id=BOS, eos_id=-1,
                                   max_new_tokens=self.args.tokens, num_draft_tokens=k, adaptive=adaptive)
        return res, res.stats["seconds"] - getattr(drafter, "excluded_s", 0.0)

    def plain(self):
        ctx = self.fresh_ctx()
        sync(self.args.device)
        t0 = time.perf_counter()
        ids = generate_text(self.decoder(), ctx, bos_id=BOS, eos_id=-1, max_new_tokens=self.args.tokens)
        sync(self.args.device)
        return ids, time.perf_counter() - t0

    def first_answer_s(self) -> float:
        """A whole plain decode on a fresh fork, as every ``answer`` does: graph captures included."""
        dec = self.decoder()
        dec.release()
        ctx = self.base.fork()
        sync(self.args.device)
        t0 = time.perf_counter()
        generate_text(dec, ctx, bos_id=BOS, eos_id=-1, max_new_tokens=self.args.tokens)
        sync(self.args.device)
        dec.release()
        return time.perf_counter() - t0

    def median(self, fn):
        fn()                                     # warm-up (allocator, cuBLAS, compile, graph capture)
        runs = [fn() for _ in range(self.args.repeats)]
        return runs[0][0], statistics.median(r[1] for r in runs)

    def bytes_per_token(self) -> int:
        """What one decode step reads: the und expert's weights (all but the embedding table, of which one
        row), the LM head, and the KV cache at the decode's mean length."""
        lm = self.model.language_model
        w = sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                if "moe_gen" not in n and "embed_tokens" not in n)
        c = self.model.config.llm
        ctx = self.base.kv_len + 1 + self.args.tokens / 2
        kv = 2 * c.num_hidden_layers * ctx * c.num_key_value_heads * c.head_dim * self.model.dtype.itemsize
        return int(w + c.hidden_size * self.model.dtype.itemsize + kv)

    def profile_step(self, dec) -> dict:
        """Kernels and host launch calls of one single-token decode step of ``dec`` (after one warm step)."""
        from torch.profiler import ProfilerActivity, profile
        ctx = self.base.fork()
        dec.reserve_text(ctx, 8)
        dec.forward_text(ctx, torch.tensor([BOS]))
        sync(self.args.device)
        try:                                     # a profiler hiccup must not cost the timings of this run
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                dec.forward_text(ctx, torch.tensor([BOS]))
                sync(self.args.device)
            events = list(prof.events())
        except Exception as e:  # noqa: BLE001
            return dict(error=repr(e))
        finally:
            if hasattr(dec, "release"):
                dec.release()
        names = collections.Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        api = collections.Counter(e.name for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                       "cudaLaunchKernelExC", "cudaGraphLaunch"))
        attn = sorted({n for n in names if any(s in n.lower() for s in ("fmha", "flash", "attention", "attn",
                                                                         "softmax"))})
        return dict(kernels_per_step=sum(names.values()), launch_calls=dict(api), attention_kernels=attn,
                    top_kernels=dict(names.most_common(25)))


def verdicts(rows, fast: str, bandwidth_pct, kernels) -> list[str]:
    """Issue 21's decode targets, evaluated on this run (meaningful only on a GPU at real shapes)."""
    plain = {r["path"]: r["tok_s"] for r in rows if r["mode"] == "plain"}
    out = ["plain greedy tok/s: " + ", ".join(f"{p} {v:.1f}" for p, v in plain.items())]
    if bandwidth_pct is not None:
        out.append(f"plain decode at {bandwidth_pct:.1f} % of the card's bandwidth (target >= 70 %): "
                   f"{'PASS' if bandwidth_pct >= 70 else 'FAIL'}")
    if kernels is not None:
        out.append(f"{kernels} kernels per decoded token ({fast}) (target <= 400): {'PASS' if kernels <= 400 else 'FAIL'}")
    spec = [r for r in rows if r["mode"] != "plain" and r["path"] == fast]
    at377 = [r for r in spec if abs(r["tau_target"] - 3.77) < 1e-6]
    if at377:
        best = max(at377, key=lambda r: r["speedup"])
        out.append(f"tau 3.77 best speedup {best['speedup']}x over plain {fast} (k={best['k']}, adaptive="
                   f"{best['adaptive']}, measured tau {best['tau']}) (target >= 2.0): "
                   f"{'PASS' if best['speedup'] >= 2.0 else 'FAIL'}")
    adaptive = [r for r in spec if r["adaptive"]]
    if adaptive:
        worst = min(adaptive, key=lambda r: r["speedup"])
        out.append(f"adaptive k worst {worst['speedup']}x of plain {fast} (tau {worst['tau_target']}, k={worst['k']}) "
                   f"(target: never more than 5 % slower, >= 0.95x): {'PASS' if worst['speedup'] >= 0.95 else 'FAIL'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="= --shape tiny (8 layers, hidden 256, vocab 1024)")
    ap.add_argument("--shape", default="real", choices=["real", "medium", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--paths", default="eager,static,compiled",
                    help="decode paths to time, in this order: eager (the model), static (fixed shapes; CUDA graphs on "
                         "CUDA), compiled (the static step through torch.compile; + graphs on CUDA)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="= --paths eager")
    ap.add_argument("--compile", default="inductor", help="torch.compile backend of the compiled path, or none")
    ap.add_argument("--spec-paths", default="", help="paths that get the whole speculative grid (default: compiled, "
                    "else the last); the others get one point (tau 3.77 adaptive)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--k", default="4,10", help="draft lengths (comma list)")
    ap.add_argument("--taus", default="1,3.77", help="target mean accepted lengths (comma list; none: plain only)")
    ap.add_argument("--draft-kind", default="hyper-bagel", choices=["hyper-bagel", "eagle3", "none"])
    ap.add_argument("--draft-vocab", type=int, default=32768, help="the draft head's vocabulary (0 = full)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results (JSON) here")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and args.dtype == "bf16":
        args.dtype = "fp32"
    paths = ["eager"] if args.no_cuda_graphs else args.paths.split(",")
    if args.compile == "none":
        paths = [p for p in paths if p != "compiled"]
    torch.manual_seed(args.seed)
    cuda = args.device.startswith("cuda")
    b = Bench(args)
    spec_paths = args.spec_paths.split(",") if args.spec_paths else \
        (["compiled"] if "compiled" in paths else paths[-1:])
    taus = [] if args.taus in ("", "none") else args.taus.split(",")      # none: plain decoding only
    configs = [(float(t), int(k), ad) for t in taus for k in args.k.split(",")
               for ad in (False, True) if float(t) <= int(k) + 1]
    name = {"eager": "eager", "static": "graph" if cuda else "static", "compiled": "compiled"}
    rows, profiles, first_answer = [], {}, {}
    # plain decoding of every path in alternation (after one warm-up each: compile, capture), so that a
    # shared machine's load drifts into every path alike; medians
    refs, times = {}, {p: [] for p in paths}
    for path in paths:
        b.path = path
        b.plain()
    for _ in range(args.repeats):
        for path in paths:
            b.path = path
            refs[path], t = b.plain()
            times[path].append(t)
    for path in paths:
        rows.append(dict(mode="plain", path=name[path], tok_s=len(refs[path]) / statistics.median(times[path])))
    report(b, args, rows, profiles, first_answer, paths, name, cuda, final=False)
    for path in paths:
        b.path = path
        label, ref = name[path], refs[path]
        if path != "eager":
            first_answer[label] = round(b.first_answer_s(), 3)
        if cuda:
            profiles[label] = b.profile_step(b.decoder())
        shadow = None if b.head is None else DraftHeadDrafter(
            b.head, capacity=args.tokens + 64, static=path != "eager",
            compiler=b.compiler if path == "compiled" else None)
        # the whole grid on the fastest path(s); elsewhere one point (the tau 3.77 when asked, adaptive)
        todo = configs if path in spec_paths else sorted(configs, key=lambda c: (c[0] == 3.77, c[2], -c[1]))[-1:]
        # progress between timed runs only (rate and ETA on stderr)
        for tau, k, adaptive in tqdm(todo, desc=f"speculative configs ({label})", unit="config", dynamic_ncols=True):
            a = alpha_for(tau, k)
            oracle = OracleDrafter(ref, a, b.V, seed=args.seed, shadow=shadow, resync=b.resync)
            res, secs = b.median(lambda: b.spec(oracle, k, adaptive))
            s = res.stats
            rows.append(dict(mode=f"oracle+{args.draft_kind}", path=label, k=k, adaptive=adaptive, tau_target=tau,
                             alpha=round(a, 4), tau=round(s["tau"], 3), acceptance=round(s["acceptance_rate"], 3),
                             tokens_per_forward=round(s["tokens_per_target_forward"], 3),
                             tok_s=len(res.ids) / secs, resyncs=oracle.resyncs))
        if hasattr(b.decoder(), "release"):
            b.decoder().release()
        report(b, args, rows, profiles, first_answer, paths, name, cuda, final=False)   # as it goes
    report(b, args, rows, profiles, first_answer, paths, name, cuda, final=True)
    return 0


def report(b, args, rows, profiles, first_answer, paths, name, cuda: bool, final: bool) -> None:
    """Figures of the rows so far; printed when ``final``, written to ``--out`` every time (a run cut by the
    GPU check's timeout keeps what it measured)."""
    rows = [dict(r) for r in rows]
    plain_of = {r["path"]: r["tok_s"] for r in rows if r["mode"] == "plain"}
    for r in rows:
        r["speedup"] = round(r["tok_s"] / plain_of[r["path"]], 3)           # vs plain on the same path
        r["vs_eager_plain"] = round(r["tok_s"] / plain_of["eager"], 3) if "eager" in plain_of else None
        r["tok_s"] = round(r["tok_s"], 2)
    fast = name["compiled"] if "compiled" in paths else name[paths[-1]]
    device = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    spec = card(device) if cuda else None
    bpt = b.bytes_per_token()
    bandwidth = {p: round(bpt * plain_of[p] / 1e9, 1) for p in plain_of}          # GB/s achieved
    pct = round(100 * bandwidth[fast] / (spec["bandwidth_tbs"] * 1e3), 1) if spec and fast in bandwidth else None
    kernels = profiles.get(fast, {}).get("kernels_per_step")
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device, card=spec, torch=torch.__version__, args=vars(args), build_s=round(b.build_s, 2),
                threads=torch.get_num_threads(),
                pipeline_path="graph" if use_static_decoding(b.model, b.model.device) else "eager",
                first_answer_s=first_answer, bytes_per_token=bpt, achieved_GBps=bandwidth,
                bandwidth_pct=pct, kernels_per_token=kernels,
                compile=b.compiler.stats() if b.compiler else None)
    checks = verdicts(rows, fast, pct, kernels) if fast in plain_of else []
    smoke = args.shape != "real" or not cuda
    if smoke:
        checks = ["(smoke run: the checks below are only meaningful on a GPU at real shapes)"] + checks
    if args.out:
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows, profile=profiles, checks=checks, final=final,
                                                  summary=summary(rows, meta, profiles, fast, smoke)), indent=1))
    if not final:
        return
    cols = ["mode", "path", "k", "adaptive", "tau_target", "alpha", "tau", "acceptance", "tokens_per_forward",
            "tok_s", "speedup", "vs_eager_plain", "resyncs"]
    print(f"# decode bench {meta['date']} {meta['device']} {args.dtype} {args.shape} context={args.prompt_len} "
          f"tokens={args.tokens} (answer() would take the {meta['pipeline_path']} path without compile)")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    for path, p in profiles.items():
        print(f"{path}: {p.get('kernels_per_step')} kernels per step, host launches {p.get('launch_calls')}, "
              f"attention: {p.get('attention_kernels', p)}")
    print(f"bytes read per token {bpt / 1e9:.3f} GB; achieved GB/s {bandwidth}; % of bandwidth ({fast}): {pct}")
    print(f"first answer (fresh context, compile/capture included) s: {first_answer}; compile: {meta['compile']}")
    for line in checks:
        print(line)




def summary(rows, meta, profiles, fast: str, smoke: bool) -> list[dict]:
    """The GPU check's table rows (``gpu_check_merge.py``) with issue 21's targets."""
    def verdict(ok):
        return "smoke" if smoke else ("PASS" if ok else "FAIL")
    out = []
    for r in rows:
        if r["mode"] == "plain":
            out.append(dict(figure=f"plain decode tok/s ({r['path']})", value=r["tok_s"]))
    if meta["bandwidth_pct"] is not None:
        out.append(dict(figure=f"plain decode, % of bandwidth ({fast}; {meta['bytes_per_token'] / 1e9:.2f} GB/token)",
                        value=meta["bandwidth_pct"], target=">= 70", verdict=verdict(meta["bandwidth_pct"] >= 70)))
    for path, p in profiles.items():
        k = p.get("kernels_per_step")
        out.append(dict(figure=f"kernels per decoded token ({path})", value=k,
                        **(dict(target="<= 400", verdict=verdict(k is not None and k <= 400)) if path == fast else {})))
    spec = [r for r in rows if r["mode"] != "plain" and r["path"] == fast]
    at377 = [r for r in spec if abs(r["tau_target"] - 3.77) < 1e-6]
    if at377:
        best = max(at377, key=lambda r: r["speedup"])
        out.append(dict(figure=f"speculative, oracle at tau 3.77 vs plain ({fast}; k={best['k']}, adaptive="
                               f"{best['adaptive']}, measured tau {best['tau']})", value=best["speedup"],
                        target=">= 2.0", verdict=verdict(best["speedup"] >= 2.0)))
    adaptive = [r for r in spec if r["adaptive"]]
    if adaptive:
        worst = min(adaptive, key=lambda r: r["speedup"])
        out.append(dict(figure=f"adaptive k vs plain, worst ({fast}; tau {worst['tau_target']}, k={worst['k']})",
                        value=worst["speedup"], target=">= 0.95", verdict=verdict(worst["speedup"] >= 0.95)))
    if meta["compile"]:
        out.append(dict(figure="compile seconds (decode + draft regions, first calls)",
                        value=meta["compile"]["compile_s"]))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
