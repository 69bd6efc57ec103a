#!/usr/bin/env python3
"""PyTorch reference for `cmoe bench`: the same model shapes, batch and work, in float32 on the CPU.

    python scripts/bench_torch.py --config configs/bench/llava-mini.json --batch 8 \
        --text-tokens 40 --new-tokens 16 --repeats 3 --json

Prints one JSON object with the fields of `cmoe bench --json` (forward / forward+backward /
generation seconds and tokens per second). Requires torch and transformers; `cargo xtask bench`
runs it when `--python` points at an interpreter that has them.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--name")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    raw = json.load(open(args.config))
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    config = LlavaConfig(**raw)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).float()
    vc = config.vision_config
    per_image = (vc.image_size // vc.patch_size) ** 2
    if config.vision_feature_select_strategy == "full":
        per_image += 1
    image = config.image_token_index
    text_range = min(config.text_config.vocab_size, image) - 3
    rows = []
    for row in range(args.batch):
        ids = [1] + [image] * per_image
        ids += [3 + (row * 7919 + t * 104729) % text_range for t in range(args.text_tokens)]
        rows.append(ids)
    input_ids = torch.tensor(rows)
    seq = input_ids.shape[1]
    pixels = torch.randn(args.batch, 3, vc.image_size, vc.image_size)
    tokens = args.batch * seq

    model.eval()
    with torch.no_grad():
        forward_s = timed(lambda: model(input_ids=input_ids, pixel_values=pixels).logits, args.repeats)

    model.train()
    vocab = config.text_config.vocab_size
    targets = torch.tensor([(i % 1000) + 3 for i in range(tokens)])

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(tokens, vocab), targets)
        loss.backward()

    train_s = timed(step, args.repeats)

    model.eval()
    with torch.no_grad():
        generate_s = timed(
            lambda: model.generate(
                input_ids=input_ids,
                pixel_values=pixels,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
                # As `cmoe`, never generate the <image> placeholder.
                suppress_tokens=[config.image_token_index],
            ),
            min(args.repeats, 2),
        )

    result = {
        "name": args.name or args.config.rsplit("/", 1)[-1].rsplit(".", 1)[0],
        "backend": f"pytorch {torch.__version__} cpu ({torch.get_num_threads()} threads)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "seq": seq,
        "forward_s": forward_s,
        "train_step_s": train_s,
        "generate_s": generate_s,
        "forward_tok_s": tokens / forward_s,
        "train_tok_s": tokens / train_s,
        "generate_tok_s": args.batch * args.new_tokens / generate_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result) if args.json else result)


if __name__ == "__main__":
    main()
