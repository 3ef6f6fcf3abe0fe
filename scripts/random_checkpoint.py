"""Write a Hugging Face checkpoint with random weights and a word-level tokenizer, plus a prompts file:
a model to serve for the load test on a machine without model downloads (the device machine).

    python scripts/random_checkpoint.py OUT_DIR [--shape llama3.2-1b] [--vocab 8192]

Greedy outputs of random weights are gibberish but deterministic, which is all the load test's
"same answer as alone" check needs; the prompts are random words of the tokenizer's vocabulary
(``OUT_DIR/prompts.txt``), so every prompt is distinct token for token.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # Llama-3.2-1B's layers with a small vocabulary (a word-level tokenizer of `vocab` words)
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="llama3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=64)
    args = ap.parse_args()
    import torch
    import transformers

    from tests.tiny_models import save_tiny_tokenizer

    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=args.vocab, max_position_embeddings=4096, rope_theta=500000.0,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **SHAPES[args.shape])
    model = transformers.LlamaForCausalLM(conf).to(torch.float16)
    out = Path(args.out)
    model.save_pretrained(out)
    save_tiny_tokenizer(out, args.vocab)
    rng = random.Random(0)
    lines = [" ".join(f"w{rng.randrange(3, args.vocab)}" for _ in range(rng.randrange(8, 200)))
             for _ in range(args.prompts)]
    (out / "prompts.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters) and prompts.txt")


if __name__ == "__main__":
    main()
