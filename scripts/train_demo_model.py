"""Train the built-in demo model: a small Gemma 4 MoE that adds and subtracts numbers below 100.

Uses localrun's own decoder (localrun.models.gemma4) for training, the real Gemma 4 chat
format (the checkpoint's chat template) and a real byte-fallback BPE tokenizer. Writes the
Hugging Face layout (bf16 safetensors, config, tokenizer, chat template) atomically.

Two stages: single exchanges (`--steps` batches of one question and its answer), then whole
conversations (`--chat-rounds`: several exchanges in one sequence, the loss on every reply, the
oldest exchanges dropped as `localrun chat` drops them at its default context, system prompt
kept), so the model answers at every position a chat puts a question at (issue 15).

    python scripts/train_demo_model.py                      # -> localrun/data/demo/
    python scripts/train_demo_model.py --steps 200 --chat-rounds 300:1e-3:20 --out /tmp/demo   # a quick try
    python scripts/train_demo_model.py --init /tmp/stage1 --out /tmp/demo   # stage 2 only
    python scripts/train_demo_model.py --init /tmp/demo --steps 2000 --lr 5e-4 --warmup 50 --chat-rounds 12000:1e-4:50

Seeded: fixed seeds, a fixed data order, one process with a fixed thread count (not bit for bit: a
rerun drifts in the CPU matmuls' summation order after some hundred batches). The README's demo
section lists the commands that made the shipped checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localrun.config import FULL, SLIDING, ModelArgs  # noqa: E402
from localrun.demo import (held_out_conversations, held_out_questions, tokenizer_corpus,  # noqa: E402
                           train_conversations, train_examples)
from localrun.moe import DenseExperts, expert_ffn  # noqa: E402
from localrun.models.gemma4 import Gemma4Model, checkpoint_shapes, rms_norm  # noqa: E402
from localrun.text import Tokenizer, builtin_chat_template, encode_chat, render_chat  # noqa: E402
from localrun.tiny import build_tokenizer, hf_config, tiny_config, write_side_files, write_tensors  # noqa: E402

END_OF_TURN = 106  # <turn|>
# Stage 2 as the shipped model was trained: conversations, peak learning rate, warmup steps per round.
CHAT_ROUNDS = "36000:1e-3:100,12000:3e-4:50,12000:2e-4:50"


def rounds(text: str) -> list[tuple[str, int, float, int]]:
    """Stage-2 rounds, comma-separated: "N:LR:WARMUP" is N conversations (a chat round),
    "single:N:LR:WARMUP" N batches of single exchanges (as stage 1, at that learning rate)."""
    out = []
    for item in (r.strip() for r in text.split(",") if r.strip()):
        kind, fields = ("single", item.split(":")[1:]) if item.startswith("single:") else ("chat", item.split(":"))
        n, lr, warmup = fields
        out.append((kind, int(n), float(lr), int(warmup)))
    return out


VOCAB = 512


def demo_config(hidden: int, pattern: str, experts: int, moe_intermediate: int, window: int) -> dict:
    """A 26B-A4B-shaped config: sliding + full layers (last one full), K=V on full layers,
    global_head_dim = 2 x head_dim, proportional RoPE on full layers, top-2 routed experts."""
    head_dim = hidden // 4
    return tiny_config(
        "moe",
        vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=len(pattern),
        layer_types=[{"S": SLIDING, "F": FULL}[c] for c in pattern],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        global_head_dim=2 * head_dim,
        num_global_key_value_heads=1,
        sliding_window=window,
        num_experts=experts,
        top_k_experts=2,
        moe_intermediate_size=moe_intermediate,
        max_position_embeddings=1024,
    )


class Encoder:
    """Chat-template encoding of many questions at once: the template is rendered once around a
    placeholder, and the filled-in texts are tokenized in one batch (checked against encode_chat)."""

    def __init__(self, tokenizer: Tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        marker = "\x00"
        frame = render_chat(template, [{"role": "user", "content": marker}], bos_token=tokenizer.bos_token)
        self.prefix, self.suffix = frame.split(marker)

    def prompts(self, questions: list[str]) -> list[list[int]]:
        texts = [self.prefix + q.strip() + self.suffix for q in questions]
        out = [e.ids for e in self.tokenizer.backend.encode_batch(texts, add_special_tokens=False)]
        for q, ids in list(zip(questions, out))[:50]:
            assert ids == encode_chat(self.tokenizer, self.template, [{"role": "user", "content": q}],
                                      add_generation_prompt=True), q
        return out

    def answers(self, answers: list[str]) -> list[list[int]]:
        return [e.ids + [END_OF_TURN] for e in self.tokenizer.backend.encode_batch(answers, add_special_tokens=False)]


def batch_tensors(prompts: list[list[int]], answers: list[list[int]]):
    """Right-padded ids [B, T], next-token targets [B, T] with -100 everywhere but the answer."""
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    tgt = torch.full((len(prompts), T), -100, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        # position t predicts token t+1: the answer tokens are predicted from len(p)-1 on
        tgt[i, len(p) - 1 : len(seq) - 1] = torch.tensor(a)
    return ids, tgt


class ChatEncoder:
    """Conversations as `chat` sends them: each message rendered and tokenized on its own (the
    chat format's special tokens bound every message, so the pieces concatenate to what
    encode_chat gives: checked on the first conversations), the oldest exchanges dropped as
    trim_to_fit drops them (system prompt kept) until the prompt fits `budget`, and the loss on
    every reply. A history reply made wrong on purpose (`wrong`) carries no loss: the model sees
    its own mistakes in a real chat and must not copy them."""

    def __init__(self, tokenizer: Tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.bos = self.ids(tokenizer.bos_token)
        self.model_open = self.ids("<|turn>model\n")
        self.generation = self.ids("<|turn>model\n<|channel>thought\n<channel|>")
        self.checked = 0

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.backend.encode(text, add_special_tokens=False).ids

    def sequence(self, system, exchanges, budget: int, rng: random.Random, wrong: float = 0.04):
        """(ids, targets) for the last exchange's reply prompt plus every reply after trimming."""
        head = self.bos + (self.ids(f"<|turn>system\n{system.strip()}<turn|>\n") if system else [])
        users = [self.ids(f"<|turn>user\n{q.strip()}<turn|>\n") for q, _ in exchanges]
        replies, mask = [], []
        for q, a in exchanges[:-1]:
            bad = wrong and a.isdigit() and rng.random() < wrong
            if bad:
                a = str(max(0, int(a) + rng.choice([-10, -2, -1, 1, 2, 10])))
            seg = self.ids(f"<|turn>model\n{a}<turn|>\n")
            assert seg[: len(self.model_open)] == self.model_open and seg[-2] == END_OF_TURN
            replies.append(seg)
            mask.append(bad)
        last = self.ids(exchanges[-1][1]) + [END_OF_TURN]
        lengths = [len(u) + len(r) for u, r in zip(users, replies)]
        first = 0
        total = len(head) + sum(lengths) + len(users[-1]) + len(self.generation)
        while first < len(replies) and total > budget:
            total -= lengths[first]
            first += 1
        ids, tgt = list(head), [-100] * len(head)
        for u, r, bad in zip(users[first:-1], replies[first:], mask[first:]):
            ids += u
            tgt += [-100] * len(u)
            ids += r
            n = len(self.model_open)
            tgt += [-100] * n + ([-100] * (len(r) - n - 1) if bad else r[n:-1]) + [-100]
        ids += users[-1] + self.generation
        tgt += [-100] * (len(users[-1]) + len(self.generation))
        if self.checked < 100:
            messages = ([{"role": "system", "content": system}] if system else [])
            for q, a in exchanges[first:-1]:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": exchanges[-1][0]})
            want = encode_chat(self.tokenizer, self.template, messages, add_generation_prompt=True)
            if not any(mask[first:]):
                assert ids == want, (ids, want)
            self.checked += 1
        ids += last
        tgt += last
        # position t predicts token t+1
        return ids[:-1], tgt[1:]


def chat_batches(enc: ChatEncoder, convs, tokens: int, seed: int, budget: int = 512):
    """Padded (ids, targets) batches of about `tokens` tokens each, similar lengths together, in a
    seeded order. Most conversations are trimmed at `budget` (chat's default: the context 1024
    minus the half kept for the reply), some at a smaller one (a smaller --context)."""
    rng = random.Random(seed)
    seqs = []
    for system, exchanges in convs:
        b = budget if rng.random() < 0.75 else rng.randint(96, budget)
        seqs.append(enc.sequence(system, exchanges, b, rng))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(seqs[i][0]) > tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    for b in batches:
        T = max(len(seqs[i][0]) for i in b)
        ids = torch.zeros(len(b), T, dtype=torch.long)
        tgt = torch.full((len(b), T), -100, dtype=torch.long)
        for r, i in enumerate(b):
            x, y = seqs[i]
            ids[r, : len(x)] = torch.tensor(x)
            tgt[r, : len(y)] = torch.tensor(y)
        yield ids, tgt


@torch.no_grad()
def chat_exact_match(model: Gemma4Model, enc: ChatEncoder, convs, budget: int = 512) -> float:
    """Greedy exact match of the last reply of each conversation (teacher forcing, as exact_match)."""
    model.eval()
    rng = random.Random(0)
    hits = 0
    for system, exchanges in convs:
        ids, tgt = enc.sequence(system, exchanges, budget, rng, wrong=0.0)
        n = len(enc.ids(exchanges[-1][1])) + 1
        ids_t = torch.tensor([ids])
        pred = model(ids_t).argmax(-1)[0, -n:]
        hits += int((pred == torch.tensor(tgt[-n:])).all())
    model.train()
    return hits / len(convs)


def load_weights(model: Gemma4Model, directory: Path) -> None:
    """Start from a checkpoint written by this script (bf16 weights, read as fp32)."""
    from safetensors.torch import load_file
    prefix = model.args.weight_prefix
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update({k[len(prefix):]: v.float() for k, v in load_file(f).items()})
    model.load_state_dict(state)


class SortedExperts(DenseExperts):
    """DenseExperts' math with one gather and one scatter per layer (tokens sorted by expert),
    instead of one per expert: the per-expert index/index_add backward dominated a CPU step."""

    def forward(self, x_TH, ids_TK, w_TK):
        K = ids_TK.shape[1]
        order = torch.argsort(ids_TK.reshape(-1), stable=True)
        counts = torch.bincount(ids_TK.reshape(-1), minlength=self.gate_up_proj.shape[0]).tolist()
        tok = order // K
        xs = x_TH[tok]
        ys = []
        for e, part in enumerate(torch.split(xs, counts)):
            if counts[e]:
                ys.append(expert_ffn(part, self.gate_up_proj[e], self.down_proj[e], self.act))
        y = torch.cat(ys) * w_TK.reshape(-1)[order, None].to(x_TH.dtype)
        return torch.zeros_like(x_TH).index_add(0, tok, y)


def init_weights(model: Gemma4Model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    H = model.args.hidden_size
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "router.scale", "router.per_expert_scale")):
            p.data.fill_(1.0)
        elif name == "embed_tokens.weight":
            p.data.normal_(0.0, H**-0.5, generator=gen)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


class RouterStats:
    """Switch-style load-balancing loss, E * sum_e(fraction routed to e * mean prob of e), per layer."""

    def __init__(self, model: Gemma4Model):
        self.losses: list[torch.Tensor] = []
        self.handles = [layer.router.register_forward_hook(self.hook) for layer in model.layers if layer.moe]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def hook(self, router, inputs, output):
        r_TH = inputs[0]
        h = rms_norm(r_TH, None, router.eps) * router.scale * router.root_size
        p_TE = torch.softmax(router.proj(h), dim=-1, dtype=torch.float32)
        ids_TK = output[0]
        E = p_TE.shape[-1]
        frac_E = torch.zeros(E).index_add_(0, ids_TK.reshape(-1), torch.ones(ids_TK.numel())) / ids_TK.numel()
        self.losses.append(E * (frac_E * p_TE.mean(0)).sum())

    def pop(self) -> torch.Tensor:
        loss = torch.stack(self.losses).mean()
        self.losses = []
        return loss


@torch.no_grad()
def exact_match(model: Gemma4Model, enc: Encoder, pairs: list[tuple[str, str]], batch: int = 256) -> float:
    """Greedy exact match, computed by teacher forcing: greedy decoding reproduces the answer
    (and then stops) exactly when every answer position's argmax is the target."""
    model.eval()
    hits = 0
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        ids, tgt = batch_tensors(enc.prompts([q for q, _ in chunk]), enc.answers([a for _, a in chunk]))
        pred = model(ids).argmax(-1)
        ok = ((pred == tgt) | (tgt == -100)).all(-1)
        hits += int(ok.sum())
    model.train()
    return hits / len(pairs)


def state_to_checkpoint(model: Gemma4Model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    args = model.args
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    expected = checkpoint_shapes(args)
    assert sorted(state) == sorted(expected), set(state) ^ set(expected)
    for k, shape in expected.items():
        assert tuple(state[k].shape) == shape, k
    return {args.weight_prefix + k: state[k] for k in expected}


def save_atomic(out: Path, model: Gemma4Model, config: dict, tokenizer) -> None:
    """Write the checkpoint into a temp dir beside `out`, then swap it in with renames."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_tensors(tmp, state_to_checkpoint(model, torch.bfloat16), max_shard_bytes=None)
        write_side_files(tmp, hf_config(config, "text", torch.bfloat16), tokenizer)
        tmp.chmod(0o755)  # mkdtemp makes it private; the shipped checkpoint is ordinary package data
        for f in tmp.iterdir():
            f.chmod(0o644)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "localrun" / "data" / "demo")
    ap.add_argument("--steps", type=int, default=None,
                    help="stage 1 batches (default 4000; 0 with --init, where a number fine-tunes those weights)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", default="SFSF", help="layer types: S sliding, F full (the last must be F)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--carry", type=float, default=0.5,
                    help="fraction of the arithmetic drawn from carry/borrow cases only (the usual errors)")
    ap.add_argument("--wide-phrasings", action="store_true",
                    help="reworded questions also get words before them and second sentences after (demo.reword)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is fastest on a shared CPU: a second thread waits on descheduled peers")
    ap.add_argument("--init", type=Path, help="start from this checkpoint's weights (skips stage 1 unless --steps)")
    ap.add_argument("--chat-rounds", type=rounds, default=CHAT_ROUNDS,
                    help="stage 2: CONVERSATIONS:LR:WARMUP chat rounds and single:BATCHES:LR:WARMUP rounds of "
                         "single exchanges, comma-separated (each a fresh AdamW and cosine schedule from the bf16 "
                         "weights of the round before; '' for none)")
    ap.add_argument("--chat-tokens", type=int, default=4096, help="stage 2: tokens per batch (padded)")
    ap.add_argument("--checkpoint", type=Path, help="stage 2: also write the model here at every eval")
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=50)
    a = ap.parse_args(argv)
    if a.steps is None:
        a.steps = 0 if a.init else 4000

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # denormal floats make CPU math crawl
    torch.manual_seed(a.seed)
    random.seed(a.seed)

    tokenizer = build_tokenizer(tokenizer_corpus(), VOCAB)
    a.tokenizer = tokenizer
    tok = Tokenizer(tokenizer)
    enc = Encoder(tok, builtin_chat_template())
    config = demo_config(a.hidden, a.layers, a.experts, a.moe_intermediate, a.window)
    a.config = config
    args = ModelArgs.from_dict(hf_config(config))
    model = Gemma4Model(args)
    for layer in model.layers:
        if layer.moe:
            old = layer.experts
            layer.experts = SortedExperts(old.gate_up_proj.data, old.down_proj.data, args.hidden_activation)
    init_weights(model, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    per_expert = n_expert // (args.num_experts * args.num_hidden_layers)
    active = n_params - n_expert + per_expert * args.top_k_experts * args.num_hidden_layers
    print(f"params {n_params / 1e6:.2f}M (experts {n_expert / 1e6:.2f}M, active/token {active / 1e6:.2f}M), "
          f"bf16 {2 * n_params / 2**20:.1f} MiB; layers {args.layer_types}", flush=True)

    held = held_out_questions(400)
    chat_enc = ChatEncoder(tok, builtin_chat_template())
    held_chats = held_out_conversations(300)
    t_all = time.time()
    if a.init:
        load_weights(model, a.init)
        print(f"weights from {a.init}" + ("" if a.steps else "; stage 1 skipped"), flush=True)
    if a.steps:
        train_single_turn(a, model, enc, held, a.steps, a.lr, a.warmup, a.seed)
        # stage 2 starts from the weights as a checkpoint holds them (as --init DIR would)
        model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    print(f"  held-out exact match (fp32, 400 questions): {exact_match(model, enc, held):.3f}; "
          f"last reply of 300 chats: {chat_exact_match(model, chat_enc, held_chats):.3f}", flush=True)
    for r, (kind, n, lr, warmup) in enumerate(a.chat_rounds):
        if r:  # each round starts from the weights as a checkpoint holds them (as the shipped ones were made)
            model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
        if kind == "single":
            train_single_turn(a, model, enc, held, n, lr, warmup, seed=a.seed + r)
        else:
            train_chats(a, model, chat_enc, enc, held, held_chats, n, lr, warmup, seed=a.seed + r)
    acc = exact_match(model, enc, held)
    chat_acc = chat_exact_match(model, chat_enc, held_chats)
    print(f"trained in {(time.time() - t_all) / 60:.1f} min; held-out exact match (fp32) {acc:.3f}, "
          f"last reply of 300 chats {chat_acc:.3f}")
    save_atomic(a.out, model, config, tokenizer)
    size = sum(p.stat().st_size for p in a.out.iterdir())
    print(f"wrote {a.out} ({size / 2**20:.1f} MiB)")


def optimizer(model: Gemma4Model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def schedule(lr: float, warmup: int, steps: int):
    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
    return lr_at


def train_step(model, opt, stats, ids, tgt, lr: float, aux_weight: float) -> tuple[float, float]:
    for g in opt.param_groups:
        g["lr"] = lr
    logits = model(ids)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    aux = stats.pop()
    opt.zero_grad(set_to_none=True)
    (loss + aux_weight * aux).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item(), aux.item()


def train_single_turn(a, model, enc: Encoder, held, steps: int, lr: float, warmup: int, seed: int) -> None:
    """Stage 1 (and a "single" round of stage 2): one question, one answer per sequence."""
    t0 = time.time()
    data = train_examples(steps * a.batch, seed=seed, carry=a.carry, wide=a.wide_phrasings)
    prompts = enc.prompts([q for q, _ in data])
    answers = enc.answers([ans for _, ans in data])
    print(f"{len(data)} training examples tokenized in {time.time() - t0:.1f}s; "
          f"prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))}", flush=True)
    opt = optimizer(model, lr, a.weight_decay)
    lr_at = schedule(lr, warmup, steps)
    stats = RouterStats(model)
    model.train()
    t0 = time.time()
    running = None
    for step in range(steps):
        sl = slice(step * a.batch, (step + 1) * a.batch)
        ids, tgt = batch_tensors(prompts[sl], answers[sl])
        loss, aux = train_step(model, opt, stats, ids, tgt, lr_at(step), a.aux)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if (step + 1) % a.log_every == 0 or step == 0:
            el = time.time() - t0
            print(f"step {step + 1}/{steps} loss {running:.4f} aux {aux:.3f} lr {lr_at(step):.2e} "
                  f"{el:.0f}s ({el / (step + 1):.3f}s/step)", flush=True)
        if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < steps:
            print(f"  held-out exact match (fp32, 400 questions): {exact_match(model, enc, held):.3f}", flush=True)
    stats.remove()


def train_chats(a, model, chat_enc: ChatEncoder, enc: Encoder, held, held_chats, n: int, lr: float, warmup: int,
                seed: int) -> None:
    """Stage 2: whole conversations, trimmed as chat trims them, the loss on every reply."""
    t0 = time.time()
    convs = train_conversations(n, seed=seed + 1, carry=a.carry, wide=a.wide_phrasings)
    batches = list(chat_batches(chat_enc, convs, a.chat_tokens, seed=seed + 2))
    steps = len(batches)
    print(f"{len(convs)} conversations in {steps} batches of <= {a.chat_tokens} tokens, built in "
          f"{time.time() - t0:.1f}s; lr {lr:g}", flush=True)
    opt = optimizer(model, lr, a.weight_decay)
    lr_at = schedule(lr, warmup, steps)
    stats = RouterStats(model)
    model.train()
    t0 = time.time()
    running = None
    for step, (ids, tgt) in enumerate(batches):
        loss, aux = train_step(model, opt, stats, ids, tgt, lr_at(step), a.aux)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if (step + 1) % a.log_every == 0 or step == 0:
            el = time.time() - t0
            print(f"chat step {step + 1}/{steps} loss {running:.4f} aux {aux:.3f} lr {lr_at(step):.2e} "
                  f"{el:.0f}s ({el / (step + 1):.3f}s/step)", flush=True)
        if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < steps:
            print(f"  held-out exact match (fp32, 400 questions): {exact_match(model, enc, held):.3f}; "
                  f"last reply of 300 chats: {chat_exact_match(model, chat_enc, held_chats):.3f}", flush=True)
            if a.checkpoint:
                save_atomic(a.checkpoint, model, a.config, a.tokenizer)
    stats.remove()


if __name__ == "__main__":
    main()
