"""Golden-set conformance runner.

    python -m hyperbagel_core.conformance --golden DIR --out OUT [--check] [--manifest manifest_taylorseer.json]

Reads ``DIR/manifest.json`` (or ``--manifest``: another index of the same folder) and reproduces every case
from its ``inputs`` (``input_list`` for the interleaved cases; named images for the VAE component case; one
image for the ViT component case) and ``hyperparameters`` alone (``enable_taylorseer``: the TaylorSeer feature
cache), injecting the recorded noise (outputs whose tolerance says "injected").
Writes ``OUT/cases/<case>.safetensors`` with the manifest's tensor names and ``OUT/timings.json``
(wall seconds per case, model loading excluded). ``--check`` compares with the golden tensors using each
output's ``tolerance`` rule and exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from . import image as im
from .generation import CFGSettings
from .tensor_io import aligned
from .pipeline import BagelPipeline


def _injected(case: dict, golden_case: Path) -> dict[str, torch.Tensor]:
    """The recorded tensors (noise) this case feeds in; aligned like every other file-backed tensor."""
    from safetensors.torch import load_file
    names = [o["name"] for o in case["outputs"] if "inject" in str(o.get("tolerance", {}).get("why", ""))]
    if not names:
        return {}
    data = load_file(str(golden_case))
    return {n: aligned(data[n]) for n in names if n in data}


def _ctx_tensors(prefix: str, ctx, with_kv: bool = True) -> dict:
    out = {f"{prefix}/kv_lens": torch.tensor([ctx.kv_len]), f"{prefix}/ropes": torch.tensor([ctx.rope])}
    if with_kv:
        for i in range(ctx.num_layers):
            if ctx.kv_len:
                out[f"{prefix}/layer{i}/key"] = ctx.keys(i).float().cpu()
                out[f"{prefix}/layer{i}/value"] = ctx.values(i).float().cpu()
    return out


def _layout(prefix: str, ctx) -> dict:
    types, ids, pos = [], [], []
    for b in ctx.layout:
        if b.kind == "text":
            types += [0] * b.n
            ids += list(b.ids)
            pos += list(range(b.rope, b.rope + b.n))
        else:
            types += [3] + [1 if b.kind == "vit" else 2] * (b.n - 2) + [3]
            ids += [b.ids[0]] + [-1] * (b.n - 2) + [b.ids[1]]
            pos += [b.rope] * b.n
    return {f"{prefix}/token_type": torch.tensor(types), f"{prefix}/token_id": torch.tensor(ids),
            f"{prefix}/position_id": torch.tensor(pos)}


def _ar(a: int, b: int) -> torch.Tensor:
    return torch.arange(a, b, dtype=torch.long)


def _image_pack(L: int, r: int, n: int, markers, pids) -> dict:
    """Index bookkeeping of an image query block of n entries (2 markers) at kv offset L, RoPE r."""
    return {"key_values_lens": torch.tensor([L]), "packed_indexes": _ar(L, L + n),
            "packed_key_value_indexes": _ar(0, L), "packed_position_ids": torch.full((n,), r),
            "packed_seqlens": torch.tensor([n]), "packed_text_ids": torch.tensor(markers),
            "packed_text_indexes": torch.tensor([0, n - 1]), "_pids": pids, "_body": _ar(1, n - 1)}


def _pack_calls(ctxs, record: dict, und: bool, think: bool, hw: tuple | None, bos: int) -> list[tuple]:
    """The official prepare_* calls of an interleaved case, in call order: (function name, outputs).

    Blocks of the gen and cfg_img contexts are merged by their global sequence number; every block's
    kv offset is what its own context held before it.
    """
    entries = {}
    for ctx in (ctxs.gen, ctxs.cfg_img):
        L = 0
        for b in ctx.layout:
            entries[b.seq] = (b, L, ctx is ctxs.gen)
            L += b.n
    vit_pids = [e.position_ids.cpu() for e in record.get("vit", [])]
    vae_hw = [(z.shape[-2] // 2, z.shape[-1] // 2) for z in record.get("vae_latents", [])]
    gen_text = [s for s, (b, _, g) in entries.items() if g and b.kind == "text"]
    calls = []
    for seq in sorted(entries):
        b, L, in_gen = entries[seq]
        if think and not und and in_gen and gen_text and seq == gen_text[-1]:
            calls.append(("prepare_start_tokens", _start(L, b.rope, bos)))
        if b.kind == "text":
            m = b.n
            calls.append(("prepare_prompts", {
                "key_values_lens": torch.tensor([L]), "packed_key_value_indexes": _ar(0, L),
                "packed_text_ids": torch.tensor(b.ids), "packed_text_indexes": _ar(L, L + m),
                "packed_text_position_ids": _ar(b.rope, b.rope + m), "text_token_lens": torch.tensor([m])}))
        elif b.kind == "vit":
            d = _image_pack(L, b.rope, b.n, b.ids, vit_pids.pop(0))
            d.update(packed_vit_position_ids=d.pop("_pids"), packed_vit_token_indexes=d.pop("_body"),
                     vit_token_seqlens=torch.tensor([b.n - 2]))
            calls.append(("prepare_vit_images", d))
        else:
            d = _image_pack(L, b.rope, b.n, b.ids, im.latent_position_ids(*vae_hw.pop(0)))
            d.update(packed_vae_position_ids=d.pop("_pids"), packed_vae_token_indexes=d.pop("_body"),
                     packed_timesteps=torch.tensor([0]))
            calls.append(("prepare_vae_images", d))
    g = ctxs.gen
    if und:
        calls.append(("prepare_start_tokens", _start(g.kv_len, g.rope, bos)))
        return calls
    n = hw[0] * hw[1] + 2
    d = _image_pack(g.kv_len, g.rope, n, record["markers"], im.latent_position_ids(*hw))
    d.update(packed_vae_position_ids=d.pop("_pids"), packed_vae_token_indexes=d.pop("_body"))
    calls.append(("prepare_vae_latent", d))
    for c in (ctxs.cfg_text, ctxs.cfg_img):
        calls.append(("prepare_vae_latent_cfg", {
            "cfg_key_values_lens": torch.tensor([c.kv_len]), "cfg_packed_key_value_indexes": _ar(0, c.kv_len),
            "cfg_packed_position_ids": torch.full((n,), c.rope), "cfg_packed_query_indexes": _ar(c.kv_len,
                                                                                                c.kv_len + n)}))
    return calls


def _start(L: int, r: int, bos: int) -> dict:
    return {"key_values_lens": torch.tensor([L]), "packed_key_value_indexes": _ar(0, L),
            "packed_query_position_ids": torch.tensor([r]), "packed_start_tokens": torch.tensor([bos])}


def _pack_tensors(calls: list[tuple]) -> dict:
    return {f"pack/{i:02d}_{fn}/{k}": v for i, (fn, d) in enumerate(calls) for k, v in d.items()}


def _parse_inputs(case: dict, golden: Path) -> list:
    items = []
    for entry in case["inputs"]["input_list"]:
        if isinstance(entry, str) and entry.startswith("<image ") and entry.endswith(">"):
            items.append(Image.open(golden / "images" / entry[len("<image "):-1]))
        else:
            items.append(entry)
    return items


def _decode_with_logits(pipe: BagelPipeline, ctx, max_length: int) -> tuple[list[int], torch.Tensor]:
    """The official loop: emit the current token, run it, pick the next; ``max_length`` counts the start."""
    tok, ids, rows = pipe.tokenizer.bos_id, [], []
    ctx = ctx.fork()
    for _ in range(max_length):
        ids.append(tok)
        logits = pipe.model.forward_text(ctx, torch.tensor([tok])).logits[-1].float().cpu()
        rows.append(logits)
        tok = int(torch.argmax(logits))
        if tok == pipe.tokenizer.eos_id:
            break
    return ids, torch.stack(rows)


def run_interleave_case(pipe: BagelPipeline, case: dict, golden: Path, injected: dict) -> dict:
    hp = dict(case.get("hyperparameters", {}))
    items = _parse_inputs(case, golden)
    und = bool(hp.get("understanding_output", False))
    vae_noise = [injected[k] for k in sorted(injected) if "vae_posterior_noise" in k] or None
    record: dict = {}
    ctxs = pipe.build_contexts(items, understanding_output=und, think=bool(hp.get("think", False)),
                               vae_noise=vae_noise, generator=torch.Generator().manual_seed(0), record=record)
    out: dict = {}
    if record.get("vit"):
        out["vit/llm_input"] = record["vit"][0].llm_input.float().cpu()
    if record.get("vae_latents"):
        out["input/vae_latent"] = record["vae_latents"][0].float().cpu()
        out["input/vae_moments"] = record["vae_moments"][0].float().cpu()
        out["input/vae_posterior_noise"] = vae_noise[0]
    max_len = int(hp.get("max_think_token_n", 1000))
    if und:
        ids, logits = _decode_with_logits(pipe, ctxs.gen, max_len)
        out.update({"generated_ids": torch.tensor(ids), "logits_step0": logits[0], "logits_all_steps": logits,
                    "greedy_argmax": logits.argmax(-1)})
        out.update(_ctx_tensors("ctx/gen", ctxs.gen))
        out.update(_layout("layout", ctxs.gen))
        out.update(_pack_tensors(_pack_calls(ctxs, record, True, bool(hp.get("think")), None,
                                             pipe.tokenizer.bos_id)))
        case_text = pipe.tokenizer.answer_text(ids)
        return out | {"__text__": case_text}
    if hp.get("think"):
        pipe._think(ctxs, max_len - 1, bool(hp.get("do_sample", False)), float(hp.get("text_temperature", 0.3)),
                    0, None)
    H, W = ctxs.image_shapes or tuple(hp.get("image_shapes", (1024, 1024)))
    cfg = CFGSettings(float(hp.get("cfg_text_scale", 3.0)), float(hp.get("cfg_img_scale", 1.5)),
                      tuple(hp.get("cfg_interval", (0.4, 1.0))), hp.get("cfg_renorm_type", "global"),
                      float(hp.get("cfg_renorm_min", 0.0)))
    trace: dict = {}
    res = pipe._sample_image(ctxs, H, W, generator=torch.Generator().manual_seed(0),
                             init_noise=injected.get("gen/init_noise"), cfg=cfg,
                             num_timesteps=int(hp.get("num_timesteps", 50)),
                             timestep_shift=float(hp.get("timestep_shift", 3.0)), schedule="teacher",
                             batch_cfg=True, callback=None, trace=trace,
                             cache="taylorseer" if hp.get("enable_taylorseer") else None)
    out.update(_gen_tensors(trace, res, H, W))
    out.update(_ctx_tensors("ctx/gen", ctxs.gen))
    out.update(_ctx_tensors("ctx/cfg_text", ctxs.cfg_text, with_kv=False))
    out.update(_ctx_tensors("ctx/cfg_img", ctxs.cfg_img))
    out.update(_layout("layout", ctxs.gen))
    out.update(_layout("layout_cfg_img", ctxs.cfg_img))
    record["markers"] = (pipe.tokenizer.start_of_image, pipe.tokenizer.end_of_image)
    hw = (H // pipe.config.latent_downsample, W // pipe.config.latent_downsample)
    out.update(_pack_tensors(_pack_calls(ctxs, record, False, bool(hp.get("think")), hw, pipe.tokenizer.bos_id)))
    return out


def _gen_tensors(trace: dict, res, H: int, W: int) -> dict:
    nan = float("nan")
    out = {"gen/init_noise": trace["init_noise"], "gen/timesteps": torch.stack(trace["timesteps"]),
           "gen/dts": torch.stack(trace["dts"]), "gen/cfg_active": torch.tensor(trace["cfg_active"]),
           "gen/x_steps": torch.stack(trace["x_steps"]), "gen/v_steps": torch.stack(trace["v_steps"]),
           "gen/final_latent": res.latent, "gen/final_latent_tokens": im.pack_latent(res.latent),
           "gen/decoded": res.decoded, "gen/image_u8": res.image_u8, "gen/image_shape_hw": torch.tensor([H, W])}
    if len(trace["x_steps"]) > 1:
        out["gen/x_step1"] = trace["x_steps"][1]
    for name in ("v_cond", "v_text_uncond", "v_img_uncond"):
        vs = trace[name + "_steps"]
        out[f"gen/{name}_norms"] = torch.tensor([nan if v is None else float(v.norm()) for v in vs])
        if all(v is not None for v in vs):
            out[f"gen/{name}_steps"] = torch.stack(vs)
        if vs[0] is not None:
            out[f"gen/step0/{name}"] = vs[0]
    out["gen/v_norms"] = torch.tensor([float(v.norm()) for v in trace["v_steps"]])
    out["gen/step0/v"] = trace["v_steps"][0]
    return out


def run_vae_case(pipe: BagelPipeline, case: dict, golden: Path, injected: dict) -> dict:
    out = {}
    for name, spec in case["inputs"].items():
        px = im.image_to_tensor(im.pil_to_rgb(Image.open(golden / spec["image"])))[None]
        moments = pipe.vae.encode_moments(px).float().cpu()
        mean = pipe.vae.encode(px, sample=False).float().cpu()
        noise = injected[f"{name}/posterior_noise"]
        decoded = pipe.vae.decode(mean).float().cpu()
        out.update({f"{name}/input": px, f"{name}/moments": moments, f"{name}/latent_mean": mean,
                    f"{name}/posterior_noise": noise,
                    f"{name}/latent_sample": pipe.vae.encode(px, noise=noise).float().cpu(),
                    f"{name}/decoded": decoded, f"{name}/decoded_u8": im.to_uint8(decoded)})
    return out


def run_vit_case(pipe: BagelPipeline, case: dict, golden: Path, injected: dict) -> dict:
    img = im.pil_to_rgb(Image.open(golden / case["inputs"]["image"]))
    ctx = pipe.model.new_context()
    emb = pipe.model.prefill_vit(ctx, im.vit_transform(img))
    out = {"vit/packed_vit_tokens": emb.tokens.float().cpu(), "vit/position_ids": emb.position_ids.cpu(),
           "vit/features": emb.features.float().cpu(), "vit/connector": emb.connector.float().cpu(),
           "vit/pos_embed": emb.pos_embed.float().cpu(), "vit/llm_input": emb.llm_input.float().cpu()}
    out.update(_ctx_tensors("ctx/after_vit", ctx))
    out.update(_layout("layout", ctx))
    return out


def run_case(pipe: BagelPipeline, case: dict, golden: Path) -> dict:
    injected = _injected(case, golden / case["file"]) if case.get("file") else {}
    inputs = case.get("inputs", {})
    if "input_list" in inputs:
        return run_interleave_case(pipe, case, golden, injected)
    if inputs and all(isinstance(v, dict) and "image" in v for v in inputs.values()):
        return run_vae_case(pipe, case, golden, injected)
    if isinstance(inputs.get("image"), str):
        return run_vit_case(pipe, case, golden, injected)
    raise ValueError(f"case {case.get('name')!r}: cannot tell its kind from its inputs {list(inputs)}")


# -- comparison ----------------------------------------------------------------------------------------------
def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: dict) -> str | None:
    """None if ``ours`` passes the manifest rule ``tol`` against ``ref``, else a short reason."""
    if tuple(ours.shape) != tuple(ref.shape):
        return f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    if tol.get("exact"):
        return None if torch.equal(ours.to(ref.dtype), ref) else f"{name}: not exactly equal"
    a, b = ours.double(), ref.double()
    if "max_abs_diff" in tol:
        d = (a - b).abs()
        frac = float((d > 0).double().mean()) if d.numel() else 0.0
        worst = float(d.max()) if d.numel() else 0.0
        if worst > tol["max_abs_diff"] or frac > tol.get("max_fraction_differing", 1.0):
            return f"{name}: max diff {float(d.max())}, {frac:.4%} differing"
        return None
    atol, rtol = float(tol.get("atol", 0.0)), float(tol.get("rtol", 0.0))
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = torch.where(both_nan, torch.zeros_like(a), (a - b).abs())
    bad = (d > atol + rtol * b.abs().nan_to_num(0)) | (torch.isnan(a) ^ torch.isnan(b))
    if bad.any():
        return f"{name}: {int(bad.sum())} values off, worst |a-b| = {float(d.nan_to_num(math.inf).max()):.3g}"
    return None


def check_case(case: dict, ours: dict, ref: dict) -> list[str]:
    """Failures of one case: every manifest output must be produced and pass its tolerance rule."""
    failures = []
    for o in case["outputs"]:
        n = o["name"]
        msg = f"{n}: not produced" if n not in ours else compare(n, ours[n], ref[n], o.get("tolerance", {}))
        if msg:
            failures.append(msg)
    return failures


def run(golden: Path, out: Path, device="cpu", dtype=torch.float32, check: bool = False,
        cases: list[str] | None = None, model: Path | None = None, manifest: str = "manifest.json",
        **load) -> dict:
    """Run (and with ``check`` compare) the golden cases of ``manifest`` (e.g. manifest_taylorseer.json);
    ``model``: load this checkpoint (any on-disk format of the golden weights, docs/loading.md) instead of the
    golden set's own folder; ``load``: more ``from_pretrained`` arguments (e.g. ``device_map``/``offload_dir``:
    a placed model)."""
    from safetensors.torch import load_file, save_file
    manifest = json.loads((golden / manifest).read_text())
    pipe = BagelPipeline.from_pretrained(model or golden / manifest["model"]["path"], device=device, dtype=dtype,
                                         **load)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    timings, report = {}, {}
    for case in manifest["cases"]:
        if cases and case["name"] not in cases:
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            result = run_case(pipe, case, golden)
        timings[case["name"]] = time.perf_counter() - t0
        text = result.pop("__text__", None)
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in result.items()}
        save_file(tensors, str(out / "cases" / f"{case['name']}.safetensors"))
        if text is not None:
            (out / "cases" / f"{case['name']}.txt").write_text(text, encoding="utf-8")
        if check:
            report[case["name"]] = check_case(case, tensors, load_file(str(golden / case["file"])))
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyperbagel_core.conformance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--golden", required=True, type=Path, help="golden folder with manifest.json")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--case", action="append", help="run only this case (repeatable)")
    ap.add_argument("--model", type=Path, help="load this checkpoint (folder or single file) instead of the golden "
                                               "set's own (the same weights in another on-disk format)")
    ap.add_argument("--check", action="store_true", help="compare with the golden tensors")
    ap.add_argument("--manifest", default="manifest.json", help="index file in the golden folder "
                    "(e.g. manifest_taylorseer.json)")
    ap.add_argument("--device-map", help="run a placed model: auto, a JSON object {module: device} or a JSON file")
    ap.add_argument("--max-memory", help="per-device budget, e.g. '0=20GiB,cpu=64GiB'")
    ap.add_argument("--offload-dir", type=Path, help="folder for modules placed on 'disk'")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    from .placement import parse_device_map
    load = dict(device_map=parse_device_map(args.device_map), max_memory=args.max_memory,
                offload_dir=args.offload_dir)
    report = run(args.golden, args.out, args.device, args.dtype, args.check, args.case, args.model, args.manifest,
                 **load)
    bad = 0
    for name, failures in report.items():
        bad += bool(failures)
        print(f"{'FAIL' if failures else 'PASS'} {name}")
        for f in failures:
            print("   ", f)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
