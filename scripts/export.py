"""Export a checkpoint as a Hugging Face model folder (transformers, the hub, lm-evaluation-harness).

    python -m scripts.export -i sft -o out/nanochat-d20                 # the latest SFT model
    python -m scripts.export -i base -g d12 -s 5000 -o out/d12-base --dtype bfloat16

The folder loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)`, and back into nanochat with `--hf-path DIR` (chat_cli,
chat_web, chat_eval, base_eval) or `-g DIR`. Share it with `huggingface-cli upload USER/NAME DIR`.
Needs the [hf] extra (safetensors). Prints a final JSON line {"export": {...}}.
"""

import argparse
import json
import os
import time

from nanochat.common import run_main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", choices=["base", "sft", "rl"], help="which checkpoints to export")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="step (default: the last)")
    p.add_argument("-o", "--output", required=True, help="the folder to write (replaced if it holds an earlier export)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights in the file: float32 (exact) or bfloat16 (half the size)")
    args = p.parse_args(argv)

    from nanochat.checkpoint import build_model, resolve_checkpoint
    from nanochat.common import require
    from nanochat.hf_export import export_model

    require("safetensors", "hf", "exporting a model")  # before loading anything
    t0 = time.time()
    checkpoint_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    print(f"Loading {args.source} model from {checkpoint_dir} at step {step}")
    model, tokenizer, meta = build_model(checkpoint_dir, step, "cpu", "eval")
    out = export_model(model, tokenizer, meta, args.output, dtype=args.dtype, source=args.source,
                       model_tag=os.path.basename(os.path.normpath(checkpoint_dir)))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    summary = {"source": args.source, "checkpoint": checkpoint_dir, "step": step, "output": out, "dtype": args.dtype,
               "bytes": size, "seconds": round(time.time() - t0, 2)}
    print(f"Wrote {out} ({size / 2**20:.1f} MiB)")
    print(json.dumps({"export": summary}))
    return summary


if __name__ == "__main__":
    run_main(main)
