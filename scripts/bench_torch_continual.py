#!/usr/bin/env python3
"""PyTorch twin of `cmoe bench --continual`: the same continual work on the same shapes, with
standard PyTorch practice; float32 on the CPU, or on a GPU with `--device cuda` (the frozen base
in `--base-dtype bf16` as the 7B runs it; experts, routers and the VAE in f32; TF32 allowed for
f32 products, as Burn's CUDA matmul uses TF32 tensor cores for f32 inputs).

    python scripts/bench_torch_continual.py --config configs/bench/llava-mini.json --batch 8 \
        --text-tokens 57 --new-tokens 24 --repeats 3 --json

- (a) LLaVA-CMoE's training step for a task after the first: transformers' LLaVA (random
  weights, frozen); in every decoder layer an MoE-LoRA FFN with 4 frozen experts and the task's
  new one (LoRA r16 / alpha 32 on gate, up and down, dropout 0.05 once per layer input), the
  task's router over the 5 (top-2 softmax), standard sparse dispatch (index_select per expert,
  index_add); the Switch aux loss; the task's VAE (128 / 16, 8 draws) on the frozen base's
  last-layer state at the last prompt token, computed in a no-grad pass of the base in the
  first epoch and read from memory in the second; two AdamW (eps 1e-8); 2 epochs of 4 batches,
  labels on the last 6 tokens; mean seconds per step.
- (b) Plain LoRA with PEFT (r16 / alpha 32 / dropout 0.05 on gate, up and down), same batches.
- (c) One task's evaluation with 8 tasks learned: per batch of prompts (left-padded), the base's
  feature and 8 VAEs' scores (PTL), then one greedy generation of exactly --new-tokens per
  router group (the groups fixed as in the Rust bench: the last task's router for 4 questions
  of 5, another for the fifth).

Prints one JSON object with the fields of `cmoe bench --continual`'s `continual` object.
"""

import argparse
import json
import resource
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

ANSWER = 6
TASKS = 8
# Expert and VAE sizes: the Mini-CoIN preset's or the paper's (as `cmoe bench --settings`).
SETTINGS = {
    "mini": {"rank": 16, "alpha": 32.0, "experts": 4, "vae_hidden": 128, "vae_latent": 16},
    "paper": {"rank": 64, "alpha": 128.0, "experts": 8, "vae_hidden": 512, "vae_latent": 64},
}
S = SETTINGS["mini"]
DEVICE = torch.device("cpu")
BASE_DTYPE = torch.float32


class Lora(nn.Module):
    """A LoRA pair: `x A B` (A uniform in +-1/sqrt(d_in), B zero, as PEFT)."""

    def __init__(self, d_in, d_out, rank):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.a = nn.Parameter(torch.empty(d_in, rank).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(rank, d_out))

    def forward(self, x):
        return x @ self.a @ self.b


class Expert(nn.Module):
    def __init__(self, hidden, inter, rank):
        super().__init__()
        self.gate = Lora(hidden, inter, rank)
        self.up = Lora(hidden, inter, rank)
        self.down = Lora(inter, hidden, rank)


class MoeLoraMlp(nn.Module):
    """Paper Eq. 1 around a frozen LLaMA MLP, with per-task routers."""

    def __init__(self, mlp, experts, routers, dropout=0.05, top_k=2):
        super().__init__()
        self.mlp = mlp
        hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        rank, alpha = S["rank"], S["alpha"]
        self.experts = nn.ModuleList(Expert(hidden, inter, rank) for _ in range(experts))
        self.routers = nn.ParameterList(
            nn.Parameter(torch.empty(hidden, n).uniform_(-hidden**-0.5, hidden**-0.5)) for n in routers
        )
        self.scale = alpha / rank
        self.top_k = top_k
        self.dropout = nn.Dropout(dropout)
        self.task = len(routers) - 1
        self.bypass = False
        self.aux = []

    def forward(self, x):
        if self.bypass:
            return self.mlp(x)
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        # Routers and experts in f32 whatever the base's dtype; deltas cast back to it.
        flat32 = flat.float()
        router = self.routers[self.task]
        n_experts = router.shape[1]
        logits = flat32 @ router
        top_logits, top = logits.topk(min(self.top_k, n_experts), dim=1)
        weights = F.softmax(top_logits, dim=1)
        probs = F.softmax(logits, dim=1).mean(0)
        f = torch.bincount(top[:, 0], minlength=n_experts).float() / flat.shape[0]
        self.aux.append(n_experts * (f * probs).sum())
        groups = []
        for e in range(n_experts):
            rows, slot = (top == e).nonzero(as_tuple=True)
            if rows.numel():
                groups.append((e, rows, weights[rows, slot].unsqueeze(1) * self.scale))
        x_in = self.dropout(flat32)
        gate, up = self.mlp.gate_proj(flat), self.mlp.up_proj(flat)
        for e, rows, w in groups:
            xe = x_in.index_select(0, rows)
            gate = gate.index_add(0, rows, (self.experts[e].gate(xe) * w).to(gate.dtype))
            up = up.index_add(0, rows, (self.experts[e].up(xe) * w).to(up.dtype))
        h = self.mlp.act_fn(gate) * up
        h_in = self.dropout(h.float())
        out = self.mlp.down_proj(h)
        for e, rows, w in groups:
            delta = self.experts[e].down(h_in.index_select(0, rows)) * w
            out = out.index_add(0, rows, delta.to(out.dtype))
        return out.reshape(b, s, d)


class Vae(nn.Module):
    def __init__(self, d):
        super().__init__()
        hidden, latent = S["vae_hidden"], S["vae_latent"]
        self.encoder = nn.Linear(d, hidden)
        self.enc_mu = nn.Linear(hidden, latent)
        self.enc_sigma = nn.Linear(hidden, latent)
        self.decoder = nn.Linear(latent, hidden)
        self.dec_mu = nn.Linear(hidden, d)
        self.dec_sigma = nn.Linear(hidden, d)

    def encode(self, f):
        h = F.gelu(self.encoder(f))
        return self.enc_mu(h), F.softplus(self.enc_sigma(h)) + 1e-4

    def log_likelihood(self, f, mu, sigma, eps):
        reps = eps.shape[0]
        z = mu.unsqueeze(0) + sigma.unsqueeze(0) * eps.unsqueeze(1)  # [r, n, z]
        h = F.gelu(self.decoder(z))
        rec_mu, rec_sigma = self.dec_mu(h), F.softplus(self.dec_sigma(h)) + 1e-4
        per_dim = -0.5 * ((f.unsqueeze(0) - rec_mu) / rec_sigma) ** 2 - rec_sigma.log() - 0.5 * math.log(2 * math.pi)
        return torch.logsumexp(per_dim.sum(-1), dim=0) - math.log(reps)

    def loss(self, f, n_rep=8):
        mu, sigma = self.encode(f)
        eps = torch.randn(n_rep, mu.shape[1], device=f.device)
        rec = -self.log_likelihood(f, mu, sigma, eps).mean()
        kl = 0.5 * (mu**2 + sigma**2 - 1 - 2 * sigma.log()).sum(1).mean()
        return rec, kl


def synthetic_rows(config, rows, text_tokens, shift=0):
    vc = config.vision_config
    per_image = (vc.image_size // vc.patch_size) ** 2
    image = config.image_token_index
    text_range = min(config.text_config.vocab_size, image) - 3
    out = []
    for row in range(rows):
        ids = [1] + [image] * per_image
        ids += [3 + ((row * 7919 + t * 104729) % text_range + 31 * shift) % text_range for t in range(text_tokens)]
        out.append(ids)
    return torch.tensor(out)


def train_batches(config, args):
    vc = config.vision_config
    batches = []
    for b in range(4):
        ids = synthetic_rows(config, args.batch, args.text_tokens, shift=b)
        labels = torch.full_like(ids, -100)
        labels[:, -ANSWER:] = ids[:, -ANSWER:]
        pixels = torch.randn(args.batch, 3, vc.image_size, vc.image_size)
        batches.append((ids.to(DEVICE), pixels.to(DEVICE), labels.to(DEVICE)))
    return batches


def build(config, experts, routers):
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(BASE_DTYPE)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(DEVICE)
    layers = model.model.language_model.layers
    moes = []
    for layer in layers:
        moe = MoeLoraMlp(layer.mlp, experts, routers).to(DEVICE)
        layer.mlp = moe
        moes.append(moe)
    return model, moes


def answer_loss(model, ids, pixels, labels):
    """Cross-entropy of the answers, with logits computed only where they are read (the last
    ANSWER + 1 positions: `logits_to_keep`), as the Burn step computes them at the answer
    positions only."""
    logits = model(input_ids=ids, pixel_values=pixels.to(BASE_DTYPE), logits_to_keep=ANSWER + 1).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, -ANSWER:].reshape(-1))


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def cmoe_stage(config, batches):
    initial = S["experts"]
    model, moes = build(config, initial + 1, [initial, initial + 1])
    for moe in moes:
        for e in range(initial):
            moe.experts[e].requires_grad_(False)
        moe.routers[0].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    vae = Vae(config.text_config.hidden_size).to(DEVICE)
    opt = torch.optim.AdamW(trainable, lr=1e-3, eps=1e-8, weight_decay=0.0)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0)
    memory = {}
    model.train()
    start = time.perf_counter()
    steps = 0
    for _epoch in range(2):
        for i, (ids, pixels, labels) in enumerate(batches):
            if i not in memory:
                with torch.no_grad():
                    for moe in moes:
                        moe.bypass = True
                    hidden = model.model(input_ids=ids, pixel_values=pixels.to(BASE_DTYPE)).last_hidden_state.float()
                    for moe in moes:
                        moe.bypass = False
                    memory[i] = hidden[:, -ANSWER - 1].clone()
            for moe in moes:
                moe.aux = []
            ce = answer_loss(model, ids, pixels, labels)
            aux = torch.stack([a for moe in moes for a in moe.aux]).mean()
            rec, kl = vae.loss(memory[i])
            loss = ce + 1e-3 * (kl + rec) + 1e-3 * aux
            opt.zero_grad(set_to_none=True)
            vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            vae_opt.step()
            steps += 1
    sync()
    return (time.perf_counter() - start) / steps


def lora_stage(config, batches):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = LlavaForConditionalGeneration(config).to(BASE_DTYPE).to(DEVICE)
    model = get_peft_model(
        base,
        LoraConfig(
            r=S["rank"],
            lora_alpha=S["alpha"],
            lora_dropout=0.05,
            target_modules=["gate_proj", "up_proj", "down_proj"],
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-8, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    steps = 0
    for _epoch in range(2):
        for ids, pixels, labels in batches:
            loss = answer_loss(model, ids, pixels, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    sync()
    return (time.perf_counter() - start) / steps


def evaluation(config, args):
    initial = S["experts"]
    routers = [initial + t for t in range(TASKS)]
    model, moes = build(config, initial + TASKS - 1, routers)
    vaes = [Vae(config.text_config.hidden_size).to(DEVICE) for _ in range(TASKS)]
    eps = torch.randn(8, S["vae_latent"], device=DEVICE)
    model.eval()
    vc = config.vision_config
    per_image = (vc.image_size // vc.patch_size) ** 2
    image = config.image_token_index
    text_range = min(config.text_config.vocab_size, image) - 3
    prompts = []
    for q in range(args.eval_questions):
        length = args.text_tokens - q % 5
        ids = [1] + [image] * per_image + [3 + (q * 7919 + t * 104729) % text_range for t in range(length)]
        prompts.append(ids)
    pixels = torch.randn(args.eval_questions, 3, vc.image_size, vc.image_size, device=DEVICE).to(BASE_DTYPE)

    def router_of(q):
        return q % (TASKS - 1) if q % 5 == 0 else TASKS - 1

    def answer(questions):
        for first in range(0, len(questions), args.eval_batch):
            chunk = questions[first : first + args.eval_batch]
            width = max(len(prompts[q]) for q in chunk)
            ids = torch.tensor([[0] * (width - len(prompts[q])) + prompts[q] for q in chunk], device=DEVICE)
            mask = torch.tensor(
                [[0] * (width - len(prompts[q])) + [1] * len(prompts[q]) for q in chunk], device=DEVICE
            )
            px = pixels[chunk]
            # PTL: the base's feature, every task's VAE.
            for moe in moes:
                moe.bypass = True
            feature = model.model(input_ids=ids, pixel_values=px, attention_mask=mask).last_hidden_state[:, -1].float()
            for moe in moes:
                moe.bypass = False
            for vae in vaes:
                mu, sigma = vae.encode(feature)
                vae.log_likelihood(feature, mu, sigma, eps)
            groups = {}
            for row, q in enumerate(chunk):
                groups.setdefault(router_of(q), []).append(row)
            for router, rows in sorted(groups.items()):
                for moe in moes:
                    moe.task = router
                    moe.aux = []
                model.generate(
                    input_ids=ids[rows],
                    pixel_values=px[rows],
                    attention_mask=mask[rows],
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                    # As `cmoe`, never generate the <image> placeholder.
                    suppress_tokens=[config.image_token_index],
                )

    questions = list(range(args.eval_questions))
    with torch.no_grad():
        answer(questions[: args.eval_batch])
        times = []
        for _ in range(max(1, min(args.repeats, 2))):
            start = time.perf_counter()
            answer(questions)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=57)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-questions", type=int, default=60)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--settings", choices=sorted(SETTINGS), default="mini")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--base-dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--json", action="store_true")
    args, _ = ap.parse_known_args()
    global S, DEVICE, BASE_DTYPE
    S = SETTINGS[args.settings]
    DEVICE = torch.device(args.device)
    BASE_DTYPE = torch.bfloat16 if args.base_dtype == "bf16" else torch.float32
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    raw = json.load(open(args.config))
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    config = LlavaConfig(**raw)
    batches = train_batches(config, args)
    seq = batches[0][0].shape[1]
    cmoe_stage(config, batches[:1])  # warm-up
    cmoe = statistics.median(cmoe_stage(config, batches) for _ in range(args.repeats))
    lora_stage(config, batches[:1])
    lora = statistics.median(lora_stage(config, batches) for _ in range(args.repeats))
    eval_s = evaluation(config, args)
    where = "cuda" if DEVICE.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {
        "backend": f"pytorch {torch.__version__} {where}",
        "settings": args.settings,
        "base_dtype": args.base_dtype,
        "cmoe_step_s": cmoe,
        "lora_step_s": lora,
        "eval_s": eval_s,
        "eval_questions": args.eval_questions,
        "eval_new_tokens": args.new_tokens,
        "step_tokens": args.batch * seq,
        "cmoe_step_tok_s": args.batch * seq / cmoe,
        "lora_step_tok_s": args.batch * seq / lora,
        "eval_tok_s": args.eval_questions * args.new_tokens / eval_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None,
    }
    print(json.dumps(result) if args.json else result)


if __name__ == "__main__":
    main()
