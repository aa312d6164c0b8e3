"""What is on disk, in one place: every checkpoint layout hyperbagel loads, resolved to one ``Checkpoint``.

``resolve(path)`` says where the BAGEL weights, the configs, the tokenizer and the FLUX autoencoder of what
the user points at come from (docs/loading.md has the formats, the search order and what was checked):

* an official folder (``llm_config.json``, ``vit_config.json``, ``ema.safetensors``, ``ae.safetensors``, the
  tokenizer files), a pre-quantized one (docs/quantization.md), or a fine-tune in that layout whose weights
  are named ``model_bf16.safetensors`` or ``model.safetensors``;
* one BAGEL ``.safetensors`` file holding the ``ema.safetensors`` keys, the single-file format of the
  ComfyUI-BAGEL pack: configs, tokenizer fingerprint and special-token ids in ``__metadata__["comfyui_bagel"]``
  or in a ``<file>.comfyui-bagel.json`` sidecar bound to the file's size and SHA-256; without either, the
  configs beside the file, else the BAGEL-7B-MoT release's, checked against the file's shapes;
* a DFloat11 folder (``config.json`` with ``dfloat11_config``), loaded by ``df11`` when the ``dfloat11``
  package and a CUDA device are there.

What a single file lacks is looked for where users keep it (``SearchPaths``); a file of another model (a FLUX
autoencoder, an SD or FLUX diffusion model, a Qwen LLM, a LoRA, a draft head) is refused with what it is and
where it belongs. Nothing is downloaded and nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import torch

from .config import FLUX_AE_DEFAULTS, BagelConfig, LLMConfig, ViTConfig
from .errors import CheckpointError
from .tensor_io import read_safetensors_header, read_safetensors_header_metadata
from .tokenizer import BagelTokenizer


REQUIRED_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")
WEIGHT_FILES = ("ema.safetensors", "model_bf16.safetensors", "model.safetensors")   # in this order of preference
AE_PLACES = ("ae.safetensors", "vae/ae.safetensors")   # in a folder; DFloat11's BAGEL keeps it under vae/
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")

METADATA_KEY = "comfyui_bagel"                 # the ComfyUI-BAGEL single-file format (format_version 1)
SIDECAR_SUFFIX = ".comfyui-bagel.json"
SIDECAR_FORMAT = "comfyui_bagel_sidecar"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")   # fingerprint order
TOKENIZER_SOURCE = "https://huggingface.co/ByteDance-Seed/BAGEL-7B-MoT"
OTHER_PACK_TOKENIZER = ("modeling", "qwen2", "tokenizer")   # ComfyUI-BAGEL's bundled copy, in custom_nodes/<pack>/


@dataclass(frozen=True)
class SearchPaths:
    """Where a checkpoint may find what it does not hold itself: ``bagel`` folders (a BAGEL sub-folder with the
    same tokenizer lends it), ``vae`` folders (``ae.safetensors``), ``custom_nodes`` folders (the ComfyUI-BAGEL
    pack's bundled tokenizer). ComfyUI passes its folders; ``around`` adds those of a ComfyUI layout."""
    bagel: tuple = ()
    vae: tuple = ()
    custom_nodes: tuple = ()

    @classmethod
    def around(cls, path: Path) -> "SearchPaths":
        """models/bagel/<entry> -> bagel: models/bagel; vae: models/bagel/vae, models/vae; custom_nodes:
        ComfyUI/custom_nodes (the folders of ComfyUI's tree, when the entry sits in one)."""
        root = Path(path).absolute().parent
        up = [root, *list(root.parents)[:2]]
        return cls(bagel=(root,), vae=tuple(a / "vae" for a in up),
                   custom_nodes=tuple(a / "custom_nodes" for a in up[1:]))

    def merged(self, other: "SearchPaths | None") -> "SearchPaths":
        if other is None:
            return self

        def union(a, b):
            return tuple(dict.fromkeys(Path(p) for p in (*b, *a)))   # the caller's first
        return SearchPaths(union(self.bagel, other.bagel), union(self.vae, other.vae),
                           union(self.custom_nodes, other.custom_nodes))


@dataclass
class Checkpoint:
    """What ``resolve`` found: everything ``BagelPipeline.from_pretrained`` needs, and where each part came from."""
    path: Path                      # what the user pointed at
    layout: str                     # "folder" | "single_file" | "df11"
    weights: Path                   # the BAGEL weights file (DFloat11: the folder)
    config: BagelConfig
    tokenizer: BagelTokenizer
    vae: "Path | Mapping | None"    # an ae.safetensors file, or a state dict under the official FLUX names
                                    # (None once loaded from one: the pipeline keeps no reference to it)
    metadata: dict | None = None    # the comfyui_bagel metadata of a single file
    sources: dict = field(default_factory=dict)   # part -> where it came from (logged; the loader node shows it)

    def describe(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in self.sources.items())


# ------------------------------------------------------------------------------------------------ folders

def check_folder(folder, weight_names=("ema.safetensors",), need_ae: bool = True) -> Path:
    """``folder`` as a Path after checking it holds the official layout (``weight_names``: the accepted names of
    the weights file; ``need_ae``: ``ae.safetensors`` must be in it, else it may also be found elsewhere)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; point to the BAGEL-7B-MoT checkpoint folder "
                              "(with llm_config.json, vit_config.json, ema.safetensors, ae.safetensors) "
                              "or to a single-file BAGEL .safetensors")
    places = {"ema.safetensors": weight_names, "ae.safetensors": ("ae.safetensors",) if need_ae else AE_PLACES}
    missing = [f for f in REQUIRED_FILES if not any((folder / n).exists() for n in places.get(f, (f,)))]
    if not need_ae and missing == ["ae.safetensors"]:
        missing = []   # the autoencoder alone may come from elsewhere (resolve looks for it)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if "ema.safetensors" in missing and (folder / "model.safetensors.index.json").exists():
        raise CheckpointError(f"{folder}: its weights are sharded (model.safetensors.index.json); hyperbagel reads "
                              "one weights file: merge the shards into one ema.safetensors (every tensor of every "
                              "shard, e.g. with safetensors.torch) and keep it in this folder")
    if "ema.safetensors" in missing and pickles:
        raise CheckpointError(f"{folder}: missing {', '.join(missing)}; found {', '.join(pickles)}, PyTorch pickle "
                              "files that hyperbagel never loads (unpickling can run code): download the "
                              "release's .safetensors files")
    if missing:
        raise CheckpointError(f"{folder}: missing {', '.join(missing)}; an official BAGEL folder has "
                              + ", ".join(REQUIRED_FILES) + " and the tokenizer files")
    return folder


def load_config(folder: Path) -> BagelConfig:
    try:
        return BagelConfig.from_folder(folder)
    except KeyError as e:
        raise CheckpointError(f"{folder}: a config JSON lacks the field {e}; re-download llm_config.json / "
                              "vit_config.json") from e
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def is_df11_folder(folder: Path) -> bool:
    """A DFloat11 folder: its config.json carries ``dfloat11_config`` (what the ``dfloat11`` package reads)."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "dfloat11_config" in json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def weights_file(folder: Path) -> Path:
    """The folder's BAGEL weights: ``ema.safetensors``, else a fine-tune's ``model_bf16`` / ``model`` file."""
    return next(folder / n for n in WEIGHT_FILES if (folder / n).is_file())


# ------------------------------------------------------------------------------------ what a file holds

@dataclass(frozen=True)
class Identified:
    kind: str       # "bagel", "dfloat11", "flux_ae", "vae", "lora", "sd_unet", "flux_dit", "llm", ...
    what: str       # what it is, for a message
    todo: str = ""  # what to do with it instead


def _first(keys, prefixes) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def identify(header: Mapping, metadata: Mapping | None = None) -> Identified:
    """What model a .safetensors file holds, from its tensor names and shapes (``read_safetensors_header``)."""
    from .distill.expert import FORMAT as DISTILLED_FORMAT
    from .speculative.draft_io import FORMAT as DRAFT_FORMAT

    keys, fmt = set(header), (metadata or {}).get("format")
    roots = {k.split(".", 1)[0] for k in keys}
    if fmt == DRAFT_FORMAT:
        return Identified("draft_head", "a hyperbagel draft head (speculative decoding)",
                          "put it in models/bagel/draft_heads and add it with 'BAGEL Apply Draft Head'")
    if fmt == DISTILLED_FORMAT:
        return Identified("distilled_expert", "a hyperbagel distilled generation expert",
                          "put it in models/bagel/distilled and add it with 'BAGEL Apply Distilled Expert'")
    if any(k.endswith(".encoded_exponent") for k in keys):
        return Identified("dfloat11", "DFloat11-compressed weights",
                          "keep the whole DFloat11 folder (config.json, llm_config.json, vit_config.json, tokenizer, "
                          "vae/) in models/bagel and pick the folder")
    if "language_model" in roots and (roots & {"vae2llm", "llm2vae", "time_embedder", "vit_model", "connector"}
                                      or any("_moe_gen." in k for k in keys)):   # the MoT generation expert
        return Identified("bagel", "BAGEL weights")
    if any(".lora_" in k or "lora_down" in k or "lora_up" in k for k in keys):
        return Identified("lora", "LoRA adapter weights, not a whole model",
                          "merge the LoRA into BAGEL's weights (the fine-tune's own merge step) and load the merged file")
    for prefix in ("", "first_stage_model.", "vae."):
        k = f"{prefix}decoder.conv_in.weight"
        if k in header and f"{prefix}encoder.conv_in.weight" in header:
            z = header[k][0][1]
            if z == 16 and len({m.group(1) for h in keys if (m := re.match(rf"{prefix}decoder\.up\.(\d+)\.", h))}) == 4:
                return Identified("flux_ae", "a FLUX autoencoder (VAE, like FLUX's ae.safetensors)",
                                  "put it in models/vae and connect core 'Load VAE' to the BAGEL loader's vae input "
                                  "(or keep it as ae.safetensors beside the BAGEL file)")
            return Identified("vae", f"an image autoencoder (VAE) with {z} latent channels",
                              "put it in models/vae; BAGEL itself needs the FLUX autoencoder (16 latent channels)")
    if _first(keys, ("model.diffusion_model.input_blocks.", "input_blocks.")):
        return Identified("sd_unet", "a Stable Diffusion / SDXL UNet or checkpoint",
                          "put it in models/checkpoints (or models/diffusion_models) and use core loaders")
    if _first(keys, ("double_blocks.", "model.diffusion_model.double_blocks.", "single_transformer_blocks.")):
        return Identified("flux_dit", "a FLUX diffusion model",
                          "put it in models/diffusion_models and load it with core 'Load Diffusion Model'")
    if "model.embed_tokens.weight" in keys or _first(keys, ("model.layers.",)):
        return Identified("llm", "a transformers language model (Qwen2/LLaMA layout)",
                          "BAGEL's weights start with language_model. and hold the generation expert (*_moe_gen), "
                          "the ViT and the connectors: use the BAGEL-7B-MoT release")
    if _first(keys, ("text_model.", "encoder.block.", "shared.weight")):
        return Identified("text_encoder", "a text encoder (CLIP / T5)", "put it in models/text_encoders")
    if _first(keys, ("vision_model.",)):
        return Identified("vision_encoder", "a vision encoder (SigLIP / CLIP vision)", "put it in models/clip_vision")
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return Identified("unknown", f"an unknown model (first tensors: {sample})",
                      "point to the BAGEL-7B-MoT folder or a single-file BAGEL .safetensors")


def _refuse_other(path: Path, header: Mapping, metadata: Mapping, in_folder: bool = False) -> None:
    found = identify(header, metadata)
    if found.kind != "bagel":
        where = (f"; the folder mixes files of different models: re-download {path.name} of the BAGEL release"
                 if in_folder else "")
        raise CheckpointError(f"{path}: this file holds {found.what}, not BAGEL: {found.todo}{where}")


def check_bagel_weights(path: Path, header: Mapping, config: BagelConfig, origin: str, shapes_too: bool = True) -> None:
    """Say why the weights cannot be BAGEL with ``config`` (``origin``: where the configs came from) before any
    tensor is read: unmerged LoRA tensors, no ViT, a partial checkpoint (a quarter or more of the tensors
    missing: only the trained parts were saved), and with ``shapes_too`` shapes the configs do not describe.
    Anything else (a few keys off) is left to ``loading``'s strict check, which lists every key and shape."""
    from .model.bagel import BagelModel

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in BagelModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    shapes = [f"{k}: file {list(header[k][0])} vs {list(expected[k])}"
              for k in sorted(set(header) & set(expected)) if tuple(header[k][0]) != expected[k]]
    vit = ("vit_model.", "connector.", "vit_pos_embed.")
    reasons = []
    lora = [k for k in unexpected if ".lora_" in k]
    if lora:
        reasons.append(f"it holds {len(lora)} unmerged LoRA tensors (e.g. {lora[0]}): merge the LoRA into the base "
                       "weights first and load the merged file")
    if missing and all(k.startswith(vit) for k in missing) and len(missing) == sum(k.startswith(vit) for k in expected):
        reasons.append("it has no ViT (vit_model.*, connector.*): a generation-only BAGEL (visual_und=False), "
                       "which hyperbagel does not run")
    elif len(missing) >= len(expected) // 4 and not unexpected and len(missing) < len(expected):
        reasons.append(f"it holds {len(expected) - len(missing)} of the model's {len(expected)} tensors (missing "
                       f"{len(missing)}, e.g. {missing[0]}): a partial checkpoint with only the trained parts; fill "
                       "the rest from the base model's ema.safetensors (e.g. Echo-4o's scripts/merge_safetensors.py) "
                       "and load the merged file")
    if shapes and shapes_too:
        reasons.append(f"{len(shapes)} tensor shapes differ from {origin} (e.g. {shapes[0]}): the configs "
                       "do not describe these weights")
    if reasons:
        raise CheckpointError(f"{path}: cannot be loaded as BAGEL: " + "; ".join(reasons))


# ------------------------------------------------------------------------------ the single-file format

_SHA256: dict = {}   # (path, size, mtime_ns) -> digest: a 29 GB file is hashed once per process


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def _metadata_record(raw, where: str) -> dict:
    try:
        record = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: the '{METADATA_KEY}' metadata is not JSON ({e}); re-create it") from e
    if not isinstance(record, dict) or record.get("format", METADATA_KEY) != METADATA_KEY:
        raise CheckpointError(f"{where}: the '{METADATA_KEY}' metadata is not a {METADATA_KEY} record; re-create it")
    if int(record.get("format_version", 1)) != 1:
        raise CheckpointError(f"{where}: {METADATA_KEY} format_version {record.get('format_version')} is not the "
                              "version 1 hyperbagel reads; update hyperbagel or re-create the file")
    return record


def read_metadata(path: Path, meta: Mapping) -> tuple[dict | None, str]:
    """The comfyui_bagel record of a single file and where it came from: its header's ``meta`` first, then its
    sidecar, whose recorded size and SHA-256 must be the file's (the sidecar belongs to that file only)."""
    if METADATA_KEY in meta:
        return _metadata_record(meta[METADATA_KEY], str(path)), "the file's comfyui_bagel metadata"
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return None, ""
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{sidecar}: not valid JSON ({e}); re-create the sidecar") from e
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or data.get("format_version") != 1:
        raise CheckpointError(f"{sidecar}: not a {SIDECAR_FORMAT} (format_version 1) sidecar; re-create it")
    size = path.stat().st_size
    if data.get("checkpoint_size") != size:
        raise CheckpointError(f"{sidecar}: made for a file of {data.get('checkpoint_size')} bytes, but {path.name} has "
                              f"{size}: the sidecar belongs to another file (or the download is incomplete); "
                              "re-download the file or re-create the sidecar for it")
    want = data.get("checkpoint_sha256")
    if want and want != file_sha256(path):
        raise CheckpointError(f"{sidecar}: the SHA-256 it records is not {path.name}'s: the sidecar belongs to "
                              "another file (or the file is corrupt); re-download the file or re-create the sidecar")
    return _metadata_record(data.get("metadata"), str(sidecar)), f"the sidecar {sidecar.name}"


def release_config() -> BagelConfig:
    """BAGEL-7B-MoT's configs (spec 1.2-1.4), for a single file that carries none; checked against its shapes."""
    llm = LLMConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6,
                    max_position_embeddings=32768)
    vit = ViTConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                    patch_size=14, image_size=980, layer_norm_eps=1e-6)
    return BagelConfig(llm=llm, vit=vit)


def _configs_of(record: dict) -> BagelConfig | None:
    cfgs = record.get("model_configs") or {}
    if not isinstance(cfgs.get("llm_config.json"), dict) or not isinstance(cfgs.get("vit_config.json"), dict):
        return None
    try:
        return BagelConfig(llm=LLMConfig.from_json(cfgs["llm_config.json"]),
                           vit=ViTConfig.from_json(cfgs["vit_config.json"]))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"the embedded llm/vit configs are not usable ({e}); re-create the metadata") from e


def _refuse_variant(path: Path, record: dict) -> None:
    """What the format records but hyperbagel does not run (the other pack refuses the same)."""
    if (record.get("quantization") or "none") not in ("none", ""):
        raise CheckpointError(f"{path}: its metadata says quantization {record['quantization']!r}; hyperbagel loads "
                              "single files in bf16/fp32 only: use the BF16 file (and weight_dtype int8 / fp8_e4m3fn "
                              "/ nf4 to quantize on load), or the DFloat11 folder")
    if record.get("additional_special_tokens"):
        raise CheckpointError(f"{path}: a BAGEL variant with extra tokens {record['additional_special_tokens'][:4]}; "
                              "its prompts are not the base model's, which is what hyperbagel runs")
    if (record.get("model_options") or {}).get("visual_und", True) is False:
        raise CheckpointError(f"{path}: a generation-only BAGEL variant (model_options visual_und false), which "
                              "hyperbagel does not run")
    if (record.get("latent_format") or "flux") != "flux":
        raise CheckpointError(f"{path}: latent_format {record['latent_format']!r}; BAGEL uses the FLUX autoencoder")


# ----------------------------------------------------------------------------------------- tokenizer

def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))


def tokenizer_fingerprint(folder: Path) -> str:
    """The comfyui_bagel tokenizer fingerprint: SHA-256 over the name and bytes of each present file of
    ``TOKENIZER_FILES``, in that order (the format's definition)."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = Path(folder) / name
        if p.is_file():
            h.update(name.encode("utf-8"))
            h.update(p.read_bytes())
    return h.hexdigest()


def _tokenizer_candidates(beside: list, explicit, search: SearchPaths):
    """(folder, how, strict) in search order; ``strict``: the user put it there, so a mismatch is an error."""
    seen = set()

    def new(p):
        key = Path(p).absolute()
        if key in seen:
            return False
        seen.add(key)
        return True

    if explicit is not None:
        seen.add(Path(explicit).absolute())
        yield Path(explicit), f"{explicit} (given)", True
    for d in beside:
        if has_tokenizer(d) and new(d):
            yield d, f"{d} (beside the weights)", True
    for root in search.bagel:
        root = Path(root)
        subs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        for sub in subs + [s2 for s in subs for s2 in sorted(s.iterdir()) if s2.is_dir()]:
            if (sub / "llm_config.json").is_file() and has_tokenizer(sub) and new(sub):
                yield sub, f"the BAGEL folder {sub}", False
    for cn in search.custom_nodes:
        cn = Path(cn)
        for pack in (sorted(p for p in cn.iterdir() if p.is_dir()) if cn.is_dir() else []):
            t = pack.joinpath(*OTHER_PACK_TOKENIZER)
            if has_tokenizer(t) and new(t):
                yield t, f"the tokenizer bundled with the {pack.name} pack ({t})", False


def find_tokenizer(beside: list, config: BagelConfig, record: dict | None, explicit, search: SearchPaths,
                   what: Path) -> tuple[BagelTokenizer, str]:
    """The first tokenizer that fits: the fingerprint and special-token ids the file records (when it does),
    the four BAGEL special tokens, and a vocabulary no larger than the model's."""
    record = record or {}
    fingerprint = record.get("tokenizer_fingerprint") or ""
    specials = record.get("special_token_ids") or {}
    skipped = []
    for folder, how, strict in _tokenizer_candidates(beside, explicit, search):
        problem = None
        found = tokenizer_fingerprint(folder) if fingerprint else ""
        if found != fingerprint:
            problem = (f"{folder}: its tokenizer files are not the ones {what.name} was made with (fingerprint "
                       f"{found[:12]}..., the file records {fingerprint[:12]}...)")
        if problem is None:
            try:
                tok = BagelTokenizer.from_folder(folder)
            except CheckpointError as e:
                if strict:
                    raise
                skipped.append(str(e))
                continue
            vocab = tok.hf.get_vocab()
            wrong = {t: (vocab.get(t), i) for t, i in specials.items() if vocab.get(t) != i}
            if wrong:
                problem = f"{folder}: special-token ids {wrong} (found, recorded) differ from the file's metadata"
            elif len(tok) > config.llm.vocab_size:
                problem = (f"{folder}: tokenizer has {len(tok)} tokens but the model's vocab is {config.llm.vocab_size}; "
                           "the tokenizer files belong to another model")
            else:
                return tok, how
        if strict:
            raise CheckpointError(problem + "; use the tokenizer files of the BAGEL release the weights come from")
        skipped.append(problem)
    where = ", ".join(str(p) for p in beside) or str(what.parent)
    raise CheckpointError(
        f"{what}: no tokenizer found for it. hyperbagel never downloads: put the BAGEL-7B-MoT tokenizer files "
        f"({', '.join(TOKENIZER_FILES)}, from {TOKENIZER_SOURCE}) beside it ({where}) or in a 'tokenizer' folder "
        "beside it, or keep the BAGEL-7B-MoT folder in models/bagel"
        + (". Looked at and skipped: " + " | ".join(skipped[:4]) if skipped else ""))


# ----------------------------------------------------------------------------------------- autoencoder

def find_ae(beside: list, search: SearchPaths) -> Path | None:
    """FLUX's ``ae.safetensors``: beside the weights (or under vae/ there), then in the vae folders."""
    for d in [*beside, *search.vae]:
        for name in AE_PLACES if d in beside else ("ae.safetensors",):
            p = Path(d) / name
            if p.is_file():
                return p
    return None


def _vae_shapes(vae) -> dict:
    if isinstance(vae, Mapping):
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in vae.items()}
    return read_safetensors_header(vae)


def vae_config(vae, base: dict, what: str) -> dict:
    """The autoencoder's config: ``base`` (ae_config.json, or FLUX's values) with its structure read off the
    tensor shapes, so a FLUX-architecture file of any width loads; not the FLUX layout -> a clear error."""
    shapes = {k: s for k, (s, _) in _vae_shapes(vae).items()}
    try:
        ch, cin = shapes["encoder.conv_in.weight"][:2]
        levels = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        mult = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels)]
        blocks = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
        z, out = shapes["decoder.conv_in.weight"][1], shapes["decoder.conv_out.weight"][0]
    except (KeyError, ValueError) as e:
        found = identify({k: (s, "") for k, s in shapes.items()})
        raise CheckpointError(f"{what}: not the FLUX autoencoder BAGEL uses ({found.what}); use FLUX's "
                              "ae.safetensors (16 latent channels)") from e
    if z != 16:
        raise CheckpointError(f"{what}: an autoencoder with {z} latent channels; BAGEL uses the FLUX autoencoder "
                              "(ae.safetensors, 16 latent channels)")
    derived = dict(ch=ch, in_channels=cin, ch_mult=mult, num_res_blocks=blocks, z_channels=z, out_ch=out,
                   downsample=2 ** (levels - 1))
    return {**FLUX_AE_DEFAULTS, **base, **derived}


# ------------------------------------------------------------------------------------------- resolve

def resolve(path, *, tokenizer=None, vae=None, search: SearchPaths | None = None) -> Checkpoint:
    """What ``path`` (a folder or a single .safetensors file) is, with its configs, tokenizer and autoencoder.

    ``tokenizer``: a folder of tokenizer files to use; ``vae``: an ``ae.safetensors`` path or a state dict under
    the official FLUX names (ComfyUI's core VAE) to use instead of the one found; ``search``: folders to look in
    besides those around ``path``.
    """
    path = Path(path)
    search = SearchPaths.around(path).merged(search)
    if path.is_dir():
        if is_df11_folder(path):
            return _df11_folder(path, tokenizer, vae, search)
        return _folder(path, tokenizer, vae, search)
    if path.is_file():
        return _single_file(path, tokenizer, vae, search)
    return check_folder(path)   # raises: not a folder


def _with_vae(config: BagelConfig, vae, beside: list, search: SearchPaths, what: Path, sources: dict,
              folder_ae_config: bool = False):
    """(config with the autoencoder's structure, the autoencoder source). ``folder_ae_config``: the folder's
    ae_config.json describes its ae.safetensors (strict, as before)."""
    if vae is not None:
        src, how = (vae, "the VAE given") if isinstance(vae, Mapping) else (Path(vae), f"{vae} (given)")
    else:
        src = find_ae(beside, search)
        if src is None:
            raise CheckpointError(
                f"{what}: missing ae.safetensors, the FLUX autoencoder (an official BAGEL folder has "
                + ", ".join(REQUIRED_FILES) + " and the tokenizer files). Put FLUX's ae.safetensors beside it or in "
                "models/vae, or connect core 'Load VAE' to the loader's vae input (vae= in Python, --vae on the "
                "command line); hyperbagel never downloads")
        how = str(src)
    sources["vae"] = how
    if folder_ae_config and not isinstance(src, Mapping) and src.parent == what and (what / "ae_config.json").exists():
        return config, src
    base = dict(FLUX_AE_DEFAULTS)
    cfg_file = None if isinstance(src, Mapping) else src.parent / "ae_config.json"
    if cfg_file is not None and cfg_file.is_file():
        try:
            base.update(json.loads(cfg_file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e}); re-download it or delete it") from e
    return replace(config, vae=vae_config(src, base, str(src) if not isinstance(src, Mapping) else "the VAE given")), src


def _folder(folder: Path, tokenizer, vae, search: SearchPaths) -> Checkpoint:
    folder = check_folder(folder, WEIGHT_FILES, need_ae=False)
    weights = weights_file(folder)
    config = load_config(folder)
    sources = {"weights": weights.name if weights.name == "ema.safetensors" else f"{weights.name} (a fine-tune's name)",
               "configs": "llm_config.json, vit_config.json"}
    header, meta = read_safetensors_header_metadata(weights)
    _refuse_other(weights, header, meta, in_folder=True)
    from .quant import read_quantized_metadata
    if read_quantized_metadata(weights) is None:   # a pre-quantized file holds codes: loading checks it
        check_bagel_weights(weights, header, config, "the folder's configs", shapes_too=False)
    config, vae_src = _with_vae(config, vae, [folder], search, folder, sources, folder_ae_config=True)
    tok, how = find_tokenizer([folder] if has_tokenizer(folder) else [], config, None, tokenizer, search, folder)
    sources["tokenizer"] = how
    return Checkpoint(folder, "folder", weights, config, tok, vae_src, None, sources)


def _df11_folder(folder: Path, tokenizer, vae, search: SearchPaths) -> Checkpoint:
    check_folder(folder, ("config.json",), need_ae=False)
    config = load_config(folder)
    sources = {"weights": "DFloat11-compressed (config.json dfloat11_config)",
               "configs": "llm_config.json, vit_config.json"}
    config, vae_src = _with_vae(config, vae, [folder], search, folder, sources, folder_ae_config=True)
    tok, how = find_tokenizer([folder] if has_tokenizer(folder) else [], config, None, tokenizer, search, folder)
    sources["tokenizer"] = how
    return Checkpoint(folder, "df11", folder, config, tok, vae_src, None, sources)


def _single_file(path: Path, tokenizer, vae, search: SearchPaths) -> Checkpoint:
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path}: not a .safetensors file; point to a BAGEL folder or a single-file BAGEL "
                              ".safetensors (hyperbagel never unpickles .bin/.pt/.ckpt files)")
    header, meta = read_safetensors_header_metadata(path)
    _refuse_other(path, header, meta)
    from .quant import read_quantized_metadata
    if read_quantized_metadata(path) is not None:
        raise CheckpointError(f"{path}: hyperbagel pre-quantized weights, which need the folder they were written "
                              "in ('python -m hyperbagel_core quantize'): pick that folder")
    record, meta_how = read_metadata(path, meta)
    sources = {"weights": f"{path.name} (single file)"}
    folder = path.parent
    config, origin = None, ""
    if record is not None:
        _refuse_variant(path, record)
        try:
            config = _configs_of(record)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        origin = f"the configs in {meta_how}"
    if config is None and all((folder / f).is_file() for f in ("llm_config.json", "vit_config.json")):
        config, origin = load_config(folder), f"llm_config.json / vit_config.json beside {path.name}"
    if config is None:
        config, origin = release_config(), "BAGEL-7B-MoT's configs (the file carries none)"
        try:
            check_bagel_weights(path, header, config, origin)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}. The file carries no configs (no '{METADATA_KEY}' metadata, no {path.name}{SIDECAR_SUFFIX} "
                "sidecar, no llm_config.json / vit_config.json beside it), so it was read as BAGEL-7B-MoT: add "
                "the sidecar or the two config files of the release it comes from") from e
    else:
        check_bagel_weights(path, header, config, origin)
    sources["configs"] = origin
    if meta_how:
        sources["metadata"] = meta_how
    config, vae_src = _with_vae(config, vae, [folder], search, path, sources)
    beside = [d for d in (folder, folder / "tokenizer") if has_tokenizer(d)]
    tok, how = find_tokenizer(beside, config, record, tokenizer, search, path)
    sources["tokenizer"] = how
    return Checkpoint(path, "single_file", path, config, tok, vae_src, record, sources)
