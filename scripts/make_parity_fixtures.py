#!/usr/bin/env python3
"""Generate the HF-transformers reference fixtures for the LLaVA parity tests.

Writes, under tests/fixtures/ (paths relative to the repository root):

  tiny-llava/            transformers' own `save_pretrained` output: fp16 weights, sharded
                         (model.safetensors.index.json), transformers v5 key layout
                         (`vision_tower.*`), GQA decoder, 4 CLIP layers with feature layer -2,
                         "default" feature strategy (CLS dropped), CLIP image processor.
  tiny-llava/reference.safetensors + reference.json
                         pixel values, full logits, batched last-token logits, prompt ids and
                         greedy tokens computed by transformers in float32.
  tiny-llava-b/          a second, differently shaped checkpoint: bf16, a single
                         model.safetensors, the legacy key layout (`vision_tower.vision_model.*`),
                         no GQA, feature layer -1, "full" strategy (CLS kept), LLaVA's pad-to-square
                         image processor; with its own reference files.
  clip-336-pixels.safetensors
                         CLIPImageProcessor output at LLaVA-1.5's real 336 px settings.
  grace_hopper.jpg       the input photo (public domain; shipped with matplotlib).
  photo-crop.png + png-pixels.safetensors
                         a lossless crop of it and the processors' output at 64 (down), 150 (up)
                         and 96 with pad-to-square: resampling parity without JPEG decoding.

Requires: torch, transformers (>= 5), safetensors, pillow, matplotlib (for the photo).
Run:  python scripts/make_parity_fixtures.py
The script is deterministic (fixed seeds); only its outputs are committed, CI never runs it.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.clip import CLIPImageProcessorPil
from transformers.models.llava import LlavaImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
LLAMA_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer.json"

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROMPT = "USER: <image>\nWhat is shown in this picture? ASSISTANT:"
BATCH_PROMPTS = [
    "USER: <image>\nDescribe the image. ASSISTANT:",
    f"{SYSTEM} USER: <image>\nWho is the person in the photo and what is she wearing? ASSISTANT:",
]
MAX_NEW_TOKENS = 12

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def photo_path() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def make_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    """The LLaMA-2 tokenizer with LLaVA-1.5's added tokens: <image> = 32000, <pad> = 32001."""
    # LLaVA-1.5 uses <image> = 32000 and <pad> = 32001: add <image> first.
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(LLAMA_TOKENIZER), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids("<image>") == 32000, tok.convert_tokens_to_ids("<image>")
    assert tok.convert_tokens_to_ids("<pad>") == 32001
    assert tok("Hello world!").input_ids == [1, 15043, 3186, 29991]
    tok.padding_side = "left"
    tok.save_pretrained(model_dir)
    return tok


def scale_init(model: torch.nn.Module, std: float, seed: int) -> None:
    """Re-draw every weight with a larger std so that logits are O(1) and parity is meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def expand_prompt(tok, text: str, n_image_tokens: int) -> list[int]:
    """What LlavaProcessor does: repeat <image> in the text, then tokenize."""
    return tok(text.replace("<image>", "<image>" * n_image_tokens)).input_ids


def build(
    name: str,
    config: LlavaConfig,
    processor,
    dtype: torch.dtype,
    seed: int,
    legacy_vision_keys: bool,
    shard: str | None,
    logits_tail: int | None,
):
    """Save `name` and its reference outputs; `logits_tail` keeps only the last N positions' logits."""
    model_dir = OUT / name
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    scale_init(model, 0.08, seed)
    model = model.to(dtype)
    if shard:
        model.save_pretrained(model_dir, max_shard_size=shard)
    else:
        model.save_pretrained(model_dir)
    if legacy_vision_keys:
        # transformers 4.x layout: vision_tower.vision_model.*
        files = sorted(model_dir.glob("*.safetensors"))
        assert len(files) == 1, files
        tensors = load_file(files[0])
        renamed = {
            (k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
            for k, v in tensors.items()
        }
        save_file(renamed, files[0], metadata={"format": "pt"})
    tok = make_tokenizer(model_dir)
    if name != "tiny-llava":
        # Same tokenizer as tiny-llava: ship it once.
        (model_dir / "tokenizer.json").unlink()
        os.symlink("../tiny-llava/tokenizer.json", model_dir / "tokenizer.json")
    processor.save_pretrained(model_dir)

    # The reference runs in float32 on the stored (fp16/bf16-rounded) weights.
    ref = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()

    image = Image.open(photo_path()).convert("RGB")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"].float()
    vc = config.vision_config
    n_patches = (vc.image_size // vc.patch_size) ** 2
    n_image_tokens = n_patches + 1 if config.vision_feature_select_strategy == "full" else n_patches

    ids = expand_prompt(tok, PROMPT, n_image_tokens)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = ref(input_ids=input_ids, pixel_values=pixel_values).logits.float()
        gen = ref.generate(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=32001,
        )
    generated = gen[0, input_ids.shape[1]:].tolist()

    # Batched, left-padded inputs with an attention mask.
    batch_ids = [expand_prompt(tok, p, n_image_tokens) for p in BATCH_PROMPTS]
    width = max(len(b) for b in batch_ids)
    padded = torch.tensor([[32001] * (width - len(b)) + b for b in batch_ids])
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch_ids])
    batch_pixels = pixel_values.repeat(2, 1, 1, 1)
    # Second image: the photo flipped, so the two rows see different pixels.
    batch_pixels[1] = torch.flip(pixel_values[0], dims=[2])
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        batch_logits = ref(
            input_ids=padded, pixel_values=batch_pixels, attention_mask=mask, position_ids=pos
        ).logits.float()
        batch_gen = ref.generate(
            input_ids=padded,
            pixel_values=batch_pixels,
            attention_mask=mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=32001,
        )
    batch_generated = []
    for row in batch_gen[:, width:].tolist():
        out = []
        for t in row:
            out.append(t)
            if t == 2:
                break
        batch_generated.append(out)

    logits_from = 0 if logits_tail is None else logits.shape[1] - logits_tail
    save_file(
        {
            "pixel_values": pixel_values.contiguous(),
            "logits": logits[:, logits_from:, :].contiguous(),
            "batch_pixel_values": batch_pixels.contiguous(),
            "batch_last_logits": batch_logits[:, -1, :].contiguous(),
        },
        model_dir / "reference.safetensors",
    )
    (model_dir / "reference.json").write_text(
        json.dumps(
            {
                "generator": f"scripts/make_parity_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
                "image": "../grace_hopper.jpg",
                "prompt": PROMPT,
                "prompt_ids": ids,
                "num_image_tokens": n_image_tokens,
                "logits_from": logits_from,
                "greedy_max_new_tokens": MAX_NEW_TOKENS,
                "greedy_ids": generated,
                "batch_prompts": BATCH_PROMPTS,
                "batch_input_ids": padded.tolist(),
                "batch_attention_mask": mask.tolist(),
                "batch_greedy_ids": batch_generated,
                "logits_abs_max": float(logits.abs().max()),
                "logits_std": float(logits.std()),
            },
            indent=1,
        )
        + "\n"
    )
    print(
        f"{name}: {sum(p.numel() for p in model.parameters())} params, logits std {logits.std():.3f}, "
        f"greedy {generated}, batch greedy {batch_generated}"
    )


def main() -> None:
    if not LLAMA_TOKENIZER.exists():
        sys.exit(f"missing {LLAMA_TOKENIZER}")
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(photo_path(), OUT / "grace_hopper.jpg")

    # A: v5 layout, fp16, sharded, GQA, feature layer -2 of 4, CLS dropped.
    config_a = LlavaConfig(
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=32064,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_index=32000,
        pad_token_id=32001,
    )
    proc_a = CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    build("tiny-llava", config_a, proc_a, torch.float16, 1, legacy_vision_keys=False, shard="1MB", logits_tail=None)

    # B: legacy layout, bf16, one file, no GQA, feature layer -1, CLS kept, pad-to-square.
    config_b = LlavaConfig(
        text_config=LlamaConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=6,
            vocab_size=32064,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            rope_theta=5000.0,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
        ),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_token_index=32000,
        pad_token_id=32001,
    )
    proc_b = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    build("tiny-llava-b", config_b, proc_b, torch.bfloat16, 2, legacy_vision_keys=True, shard=None, logits_tail=8)

    # LLaVA-1.5's real image settings, for the preprocessing test at full size.
    proc_336 = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    image = Image.open(photo_path()).convert("RGB")
    pv = proc_336(images=image, return_tensors="pt")["pixel_values"].float().contiguous()
    pad_336 = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    pv_pad = pad_336(images=image, return_tensors="pt")["pixel_values"].float().contiguous()
    save_file({"pixel_values": pv, "pixel_values_pad": pv_pad}, OUT / "clip-336-pixels.safetensors")
    print("clip-336:", tuple(pv.shape), "pad:", tuple(pv_pad.shape))

    # A lossless PNG isolates resampling from JPEG decoding (decoders differ by a few levels):
    # a 160 x 120 crop of the photo, processed down (64), up (150) and padded (96).
    png = image.crop((100, 100, 260, 220))
    png.save(OUT / "photo-crop.png")
    png = Image.open(OUT / "photo-crop.png").convert("RGB")
    def clip(edge, pad=False):
        cls = LlavaImageProcessorPil if pad else CLIPImageProcessorPil
        extra = {"do_pad": True} if pad else {}
        proc = cls(size={"shortest_edge": edge}, crop_size={"height": edge, "width": edge},
                   image_mean=CLIP_MEAN, image_std=CLIP_STD, **extra)
        return proc(images=png, return_tensors="pt")["pixel_values"].float().contiguous()
    save_file({"down_64": clip(64), "up_150": clip(150), "pad_96": clip(96, pad=True)},
              OUT / "png-pixels.safetensors")


if __name__ == "__main__":
    main()
