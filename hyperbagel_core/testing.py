"""Tiny random BAGEL checkpoints in the official on-disk format, for tests and the demo.

``make_tiny_checkpoint(path)`` writes llm_config.json, vit_config.json, ae_config.json, ema.safetensors
(bf16, the official key set), ae.safetensors (fp32, FLUX key names) and a Qwen2-style byte-level BPE
tokenizer (vocab.json, merges.txt, tokenizer_config.json, tokenizer.json) trained here on a built-in corpus,
with the Qwen2.5 special tokens appended in their usual order. Everything is deterministic in ``seed``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import BagelConfig, LLMConfig, ViTConfig

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")
_CORPUS = """A red circle and a blue square on a white background. A small house with a brown door under a blue sky.
Change the color of the ball to purple. What is in this picture? Describe it in detail. The cat sits on the mat.
A photo of a dog running in the green park at sunset, with trees and a lake. Make the sky darker and add stars.
There are two apples and three oranges on the wooden table. The answer is yes. The answer is no. It is a bird.
Generate an image of a mountain landscape with snow, a river and a cabin. Remove the person from the image.
<think> The user wants a picture of a cat. I will plan the colors and the layout first. </think>
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2025; punctuation: , . ! ? ; : ' " ( ) [ ] { } - + = * / % & @ #
""" * 4


def tiny_config(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                vit_hidden: int = 32, vit_layers: int = 2, vit_heads: int = 2, vit_intermediate: int = 64,
                vae_ch: int = 32, vocab_size: int | None = None) -> BagelConfig:
    """A BagelConfig of tiny sizes (``vit_layers`` = layers built; the JSON stores one more)."""
    llm = LLMConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size or 0)
    vit = ViTConfig(hidden_size=vit_hidden, intermediate_size=vit_intermediate, num_hidden_layers=vit_layers,
                    num_attention_heads=vit_heads)
    vae = dict(resolution=256, in_channels=3, downsample=8, ch=vae_ch, out_ch=3, ch_mult=[1, 1, 1, 1],
               num_res_blocks=2, z_channels=16, scale_factor=0.3611, shift_factor=0.1159)
    return BagelConfig(llm=llm, vit=vit, vae=vae)


def write_tokenizer(folder: Path, bpe_vocab: int = 600) -> int:
    """Train a byte-level BPE with Qwen2's pre-tokenisation on the built-in corpus; returns the vocab size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    n_bpe = tok.get_vocab_size()
    tok.add_special_tokens(QWEN_SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {str(n_bpe + i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                                  special=True) for i, t in enumerate(QWEN_SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        add_bos_token=False, add_prefix_space=False, added_tokens_decoder=added, bos_token=None,
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None, errors="replace",
        model_max_length=32768, clean_up_tokenization_spaces=False, split_special_tokens=False,
        tokenizer_class="Qwen2Tokenizer"), indent=1), encoding="utf-8")
    return n_bpe + len(QWEN_SPECIALS)


def _randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Fan-in scaled normals, norm weights 1 +- 0.1, small biases; the 2-D pos tables are the sin-cos ones."""
    from .model.embeddings import sincos_2d_table
    for name, p in model.named_parameters():
        if name.endswith("pos_embed"):
            grid = int(round(p.shape[0] ** 0.5))
            p.data.copy_(sincos_2d_table(grid, p.shape[1]))
        elif p.dim() == 1 and ("norm" in name or "layernorm" in name or "layer_norm" in name) \
                and name.endswith("weight"):
            p.data.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.dim() == 1:
            p.data.copy_(0.02 * torch.randn(p.shape, generator=gen))
        else:
            p.data.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def random_model(llm: LLMConfig, seed: int = 0, std: float = 0.02, dtype=torch.float32):
    """A BagelModel with the LLM ``llm`` (tiny ViT) and random weights, no checkpoint: norms 1 +- 0.1, the
    rest N(0, std) (a larger ``std`` gives peakier logits). Cheap text targets for decoding tests."""
    from .model.bagel import BagelModel
    cfg = tiny_config(vocab_size=llm.vocab_size)
    model = BagelModel(BagelConfig(llm=llm, vit=cfg.vit, vae=cfg.vae)).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_((1 + 0.1 * r) if "norm" in name and p.dim() == 1 else std * r)
    return model.requires_grad_(False).eval()


def write_configs(folder: Path, cfg: BagelConfig) -> None:
    """The official folder's llm_config.json, vit_config.json (one ViT layer more than built, as the
    release's) and ae_config.json for ``cfg``."""
    llm = cfg.llm
    (folder / "llm_config.json").write_text(json.dumps(dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads, num_key_value_heads=llm.num_key_value_heads,
        vocab_size=llm.vocab_size, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position_embeddings, rope_scaling=None, tie_word_embeddings=False,
        qk_norm=True, layer_module="Qwen2MoTDecoderLayer", torch_dtype="bfloat16"), indent=1))
    vit = cfg.vit
    (folder / "vit_config.json").write_text(json.dumps(dict(
        architectures=["SiglipVisionModel"], model_type="siglip_vision_model", hidden_size=vit.hidden_size,
        intermediate_size=vit.intermediate_size, num_hidden_layers=vit.num_hidden_layers + 1,
        num_attention_heads=vit.num_attention_heads, patch_size=vit.patch_size, image_size=vit.image_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=vit.layer_norm_eps, num_channels=3), indent=1))
    (folder / "ae_config.json").write_text(json.dumps(cfg.vae, indent=1))


def make_tiny_checkpoint(path, seed: int = 0, **sizes) -> Path:
    """Write a random BAGEL checkpoint folder of tiny sizes (see ``tiny_config``) and return its path."""
    from safetensors.torch import save_file
    from .model.bagel import BagelModel
    from .model.vae import FluxVAE
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    cfg = tiny_config(vocab_size=vocab, **sizes)
    write_configs(folder, cfg)
    gen = torch.Generator().manual_seed(seed)
    model = BagelModel(cfg)
    _randomise(model, gen)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              str(folder / "ema.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(seed)
    vae = FluxVAE.from_config(cfg.vae)
    with torch.no_grad():
        for name, p in vae.named_parameters():  # bias the log-variance low, as a trained VAE's is
            if name == "model.encoder.conv_out.bias":
                p[cfg.vae["z_channels"]:] = -8.0
    save_file({k: v.float().contiguous() for k, v in vae.official_state_dict().items()},
              str(folder / "ae.safetensors"), metadata={"format": "pt"})
    return folder


# ---------------------------------------------------------------- the other on-disk formats (docs/loading.md)

def single_file_metadata(folder, variant: str = "tiny-bagel") -> dict:
    """The ``comfyui_bagel`` record of an official folder's weights: configs, tokenizer fingerprint and the
    special-token ids, in the fields the ComfyUI-BAGEL converter writes."""
    from .formats import tokenizer_fingerprint
    from .tokenizer import SPECIAL, BagelTokenizer
    folder = Path(folder)
    vocab = BagelTokenizer.from_folder(folder).hf.get_vocab()
    return {"format": "comfyui_bagel", "format_version": 1, "architecture": "Bagel", "variant": variant,
            "dtype": "bf16", "quantization": "none", "latent_format": "flux",
            "tokenizer_fingerprint": tokenizer_fingerprint(folder),
            "special_token_ids": {t: vocab[t] for t in SPECIAL.values()},
            "model_configs": {n: json.loads((folder / n).read_text()) for n in ("llm_config.json", "vit_config.json")},
            "model_options": {}, "additional_special_tokens": [], "capabilities": ["text_to_image", "image_edit",
                                                                                   "image_understanding"]}


def make_single_file(folder, dst, sidecar: bool = False) -> Path:
    """An official folder's ``ema.safetensors`` as one BAGEL file: the record embedded in its header, or (with
    ``sidecar``) the file copied byte for byte and the record in ``<dst>.comfyui-bagel.json``."""
    import shutil

    from safetensors.torch import load_file, save_file
    from .formats import SIDECAR_FORMAT, SIDECAR_SUFFIX, file_sha256
    folder, dst = Path(folder), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    record = single_file_metadata(folder)
    if sidecar:
        shutil.copyfile(folder / "ema.safetensors", dst)
        (dst.parent / (dst.name + SIDECAR_SUFFIX)).write_text(json.dumps({
            "format": SIDECAR_FORMAT, "format_version": 1, "checkpoint_size": dst.stat().st_size,
            "checkpoint_sha256": file_sha256(dst), "metadata": record}, indent=1))
    else:
        save_file(load_file(str(folder / "ema.safetensors")), str(dst),
                  metadata={"format": "pt", "comfyui_bagel": json.dumps(record, sort_keys=True)})
    return dst


def make_df11_style_folder(folder, dst) -> Path:
    """A folder in DFloat11's BAGEL layout (config.json with ``dfloat11_config``, llm/vit configs, tokenizer,
    ``vae/ae.safetensors``, the weights with every decoder layer's linear weights in the package's compressed
    tensor names). The compressed tensors are placeholders of the right names: only the layout is real, enough
    to check how hyperbagel recognises and checks such a folder (decompressing needs the package's CUDA kernel)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from .formats import load_config
    from .model.bagel import BagelModel
    folder, dst = Path(folder), Path(dst)
    (dst / "vae").mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if p.suffix == ".json" or p.name == "merges.txt":
            shutil.copyfile(p, dst / p.name)
    shutil.copyfile(folder / "ae.safetensors", dst / "vae" / "ae.safetensors")
    with torch.device("meta"):
        layer = BagelModel(load_config(folder)).language_model.model.layers[0]
    subs = sorted(n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear))
    pattern = r"language_model\.model\.layers\.\d+"
    (dst / "config.json").write_text(json.dumps({"dfloat11_config": {
        "version": "0.2.0", "threads_per_block": [512], "bytes_per_thread": 8, "pattern_dict": {pattern: subs}}}))
    sd, gen = load_file(str(folder / "ema.safetensors")), torch.Generator().manual_seed(0)
    out = {}
    for name, t in sd.items():
        index, _, leaf = name.removeprefix("language_model.model.layers.").partition(".")
        if name.startswith("language_model.model.layers.") and leaf.endswith(".weight") \
                and leaf.rpartition(".")[0] in subs:
            base = f"language_model.model.layers.{index}"
            if f"{base}.encoded_exponent" not in out:
                out.update({f"{base}.encoded_exponent": torch.randint(0, 255, (64,), generator=gen, dtype=torch.uint8),
                            f"{base}.sign_mantissa": torch.randint(0, 255, (128,), generator=gen, dtype=torch.uint8),
                            f"{base}.luts": torch.randint(0, 255, (1, 256), generator=gen, dtype=torch.uint8),
                            f"{base}.output_positions": torch.arange(3, dtype=torch.int32),
                            f"{base}.gaps": torch.zeros(8, dtype=torch.uint8),
                            f"{base}.split_positions": torch.arange(1, len(subs), dtype=torch.int64)})
            continue
        out[name] = t
    save_file(out, str(dst / "model.safetensors"))
    return dst
