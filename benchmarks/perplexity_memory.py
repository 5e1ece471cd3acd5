"""Peak memory of perplexity at a 262,144-token vocabulary (Gemma, Llama-3 class), batch 8 x 512.

A 2-layer Llama-shaped model of width 64 with a 262,144-token vocabulary (its weights about
70 MB), random, so nothing is downloaded. Each side runs in a fresh subprocess, which
reports its peak resident memory (on CUDA: peak allocation):

- chunked: `ckpt_trace.scoring.loss.perplexity`, which applies the LM head a chunk of
  positions at a time (`ckpt_trace.scoring.loss.next_token_losses`);
- full: the model's own full [8, 512, 262144] float32 logits, then cross-entropy.

    python benchmarks/perplexity_memory.py [--vocab 262144] [--batch 8] [--seq-len 512] [--device cpu]

The last line is ``peak_memory_ratio=<chunked/full>  chunked_peak_gib=<GiB>``; the target is a chunked peak
under 2.5 GiB.
"""

from __future__ import annotations

import argparse
import math

import torch
import transformers
from measure import in_fresh_process, peak_memory

from ckpt_trace.calibration.sets import CalibrationSet
from ckpt_trace.scoring.loss import perplexity


def model_and_data(vocab: int, batch: int, seq_len: int, device: str):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(1)).tolist()
    return model, CalibrationSet.from_ids(ids)


def child(side: str, vocab: int, batch: int, seq_len: int, device: str) -> None:
    model, data = model_and_data(vocab, batch, seq_len, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if side == "chunked":
        ppl, _ = perplexity(model, data, batch_size=batch)
    else:
        ids, mask = next(data.batches(batch))
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:])
        ppl = math.exp(float(nll))
    print(f"{ppl} {peak_memory(device)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["chunked", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.vocab, args.batch, args.seq_len, args.device)
        return
    print(f"vocabulary {args.vocab:,}, batch {args.batch} x {args.seq_len}, {args.device}, torch {torch.__version__}")
    results = {}
    for side in ("chunked", "full"):
        ppl, peak = in_fresh_process(__file__, "--child", side, "--vocab", str(args.vocab), "--batch",
                                     str(args.batch), "--seq-len", str(args.seq_len), "--device", args.device)
        results[side] = (float(ppl), int(peak))
        print(f"{side:8s} perplexity {float(ppl):,.1f}  peak memory {int(peak) / 2**30:.2f} GiB")
    chunked, full = results["chunked"][1], results["full"][1]
    print(f"peak_memory_ratio={chunked / full:.3f}  chunked_peak_gib={chunked / 2**30:.2f}")


if __name__ == "__main__":
    main()
