"""Make the tiny default policy: a sentencepiece tokenizer trained on the task text, a tiny Llama, and a
short supervised warm start so pass@1 starts clearly above 0 and below 1; written as an HF model
directory, so the tiny default loads through exactly the path a real HF model takes.

    python tools/make_tiny_model.py --out runs/tiny-model            # ~1 min on 2 CPU cores
    python tools/make_tiny_model.py --out DIR --sft-steps 50         # faster, weaker (tests)
    python tools/make_tiny_model.py --scratchpad --config configs/tiny_scratchpad.yaml \
        --out runs/tiny-scratchpad-model                             # worked answers of 24-40 tokens

The task, template and answer format come from the run config (default configs/tiny.yaml), so the
warm start sees the same prompts the RL run will.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_oapl.checkpoint.convert import hf_config  # noqa: E402
from megatron_oapl.config import load_config  # noqa: E402
from megatron_oapl.data.prompts import load_prompts  # noqa: E402
from megatron_oapl.data.templates import apply_template  # noqa: E402
from megatron_oapl.data.tokenizer import encode_prompt, train_sentencepiece_tokenizer  # noqa: E402


def worked_scratchpad(expression: str, answer) -> str:
    """A chain_sum answer written out: the expression, each partial sum left to right, then the answer in the
    <answer> tags the reward reads (rewards/reasoning_gym.extract_answer), e.g. for "0 - 4 - 8":
    " 0 - 4 - 8 ; 0 - 4 is -4 ; -4 - 8 is -12 ; so <answer>-12</answer>" (24-40 tokens for 2-3 one-digit
    terms with the 128-piece tokenizer), so RL has a long completion to drift on, not an 8-token answer."""
    terms = expression.split()
    total, steps = int(terms[0]), []
    for op, number in zip(terms[1::2], terms[2::2]):
        if op not in "+-":
            raise ValueError(f"expression {expression!r}: operator {op!r} is not + or -")
        new = total + int(number) if op == "+" else total - int(number)
        steps.append(f"{total} {op} {number} is {new}")
        total = new
    if str(total) != str(answer):
        raise ValueError(f"expression {expression!r} sums to {total}, but the task's answer is {answer!r}")
    return f" {expression} ; " + " ; ".join(steps) + f" ; so <answer>{answer}</answer>"


def completion_text(prompt, scratchpad: bool) -> str:
    """What the warm start teaches the policy to write after the prompt: " answer", or a worked scratchpad
    (chain_sum only: the expression comes from the task's metadata)."""
    if not scratchpad:
        return " " + str(prompt.answer)
    expression = (prompt.metadata or {}).get("entry_metadata", {}).get("expression")
    if expression is None:
        raise SystemExit(f"error: --scratchpad needs chain_sum prompts (data.task=chain_sum); prompt "
                         f"{prompt.prompt_id} has no metadata expression")
    return worked_scratchpad(expression, prompt.answer)


def build_examples(cfg, tokenizer, scratchpad: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) for every training prompt."""
    examples = []
    for p in load_prompts(cfg.data, "train"):
        prompt = encode_prompt(tokenizer, apply_template(cfg.data.chat_template, p.text))
        answer = (tokenizer(completion_text(p, scratchpad), add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id])
        examples.append((prompt, answer))
    return examples


def supervised_warm_start(model, examples, steps: int, batch_size: int, lr: float, seed: int,
                          schedule: str = "cosine") -> list[float]:
    """Next-token cross entropy on the answer tokens only (prompt masked), AdamW with a short linear warm-up
    then a constant (or cosine-decayed) lr, gradients clipped at 1.

    Measured on single-digit chain_sum (pass@1 at T=1, 400 held-out prompts x 8): at lr 3e-3 without
    warm-up and clipping the loss stalls near 1.0; at 1e-3 with both, 300 constant-lr steps give pass@1
    ~0.26, from which 300 OAPL steps reach ~0.42. A model trained to a cosine-annealed optimum (600 steps,
    pass@1 0.65) is a poor RL start: no RL setting measured raised it (lr 1e-4 lowered it to 0.53, 2e-5
    left it flat, plain on-policy REINFORCE in PyTorch behaved the same)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (
            0.5 * (1 + math.cos(math.pi * s / steps)) if schedule == "cosine" else 1.0))
    losses = []
    model.train()
    for step in range(steps):
        picks = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        rows = [examples[i] for i in picks]
        length = max(len(p) + len(a) for p, a in rows)
        tokens = torch.zeros(batch_size, length, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        for r, (p, a) in enumerate(rows):
            seq = p + a
            tokens[r, : len(seq)] = torch.tensor(seq)
            labels[r, len(p) : len(seq)] = torch.tensor(a)
        loss = model(input_ids=tokens, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"  sft step {step:4d}/{steps}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="HF model directory to write")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="lr after the warm-up (constant: stop while still learning, a better RL start)")
    parser.add_argument("--vocab-size", type=int, default=128)
    parser.add_argument("--scratchpad", action="store_true",
                        help="teach a worked scratchpad before the answer (24-40 tokens; configs/tiny_scratchpad.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.num_train_prompts=500")
    args = parser.parse_args()

    import transformers

    torch.manual_seed(0)
    cfg = load_config(args.config, tuple(args.overrides))
    out = Path(args.out)
    start = time.time()
    prompts = load_prompts(cfg.data, "train")
    texts = [apply_template(cfg.data.chat_template, p.text) + completion_text(p, args.scratchpad) for p in prompts]
    tokenizer = train_sentencepiece_tokenizer(texts, out, vocab_size=args.vocab_size)
    # The same HF config `oapl convert` writes for this model section, with the tokenizer's vocabulary.
    config = hf_config(dataclasses.replace(cfg.model, vocab_size=len(tokenizer)), "fp32")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = transformers.AutoModelForCausalLM.from_config(config)
    print(f"tiny Llama: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    examples = build_examples(cfg, tokenizer, args.scratchpad)
    supervised_warm_start(model, examples, args.sft_steps, args.batch_size, args.lr, cfg.seed, args.schedule)
    model.generation_config.do_sample = True
    model.save_pretrained(out)
    print(f"wrote {out} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
