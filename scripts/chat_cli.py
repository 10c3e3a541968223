"""Talk to a model in the terminal.

    python -m scripts.chat_cli                       # the latest SFT model, interactive
    python -m scripts.chat_cli -i base -p "hello"    # one question, one streamed answer, exit
    python -m scripts.chat_cli -i rl -g d20 -s 300 -t 0.8 -k 40

Commands in the interactive mode: `clear` starts a new conversation, `quit` or `exit` (or
EOF / Ctrl-C) leaves. The conversation is kept within the model's context: when the next turn
plus --max-tokens would not fit, the oldest turns are dropped (a note says so).
"""

import argparse
import os
import sys

import torch

from nanochat.common import NanochatError, autodetect_device_type, run_main


class Conversation:
    """The token history: <|bos|> then one token list per finished turn (user + assistant)."""

    def __init__(self, tokenizer, sequence_len, max_tokens):
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_start, self.assistant_end = map(tokenizer.encode_special, ("<|assistant_start|>", "<|assistant_end|>"))
        self.sequence_len = sequence_len
        self.max_tokens = max_tokens
        self.turns = []

    def clear(self):
        self.turns = []

    def prompt_for(self, text):
        """The prompt that asks for a reply to `text`, dropping the oldest turns until it leaves
        room for max_tokens (or at least one token). Returns (prompt, turns dropped); prompt is
        None when the message alone does not fit."""
        turn = self.tokenizer.render_message({"role": "user", "content": text})[0] + [self.assistant_start]
        if 1 + len(turn) >= self.sequence_len:
            return None, 0  # refused as it is: the history stays
        dropped = 0
        room = min(self.max_tokens, self.sequence_len - 1 - len(turn))

        def length():
            return 1 + sum(len(t) for t in self.turns) + len(turn)

        while self.turns and length() + room > self.sequence_len:
            self.turns.pop(0)
            dropped += 1
        return [self.bos, *[t for past in self.turns for t in past], *turn], dropped

    def add_turn(self, prompt, reply):
        """Record the user turn at the end of `prompt` and the assistant's reply, closed by <|assistant_end|>."""
        history = 1 + sum(len(t) for t in self.turns)
        reply = [t for t in reply if t != self.bos]
        if not reply or reply[-1] != self.assistant_end:
            reply.append(self.assistant_end)
        self.turns.append(prompt[history:] + reply)


def stream_reply(engine, tokenizer, prompt, args, out):
    """Generate a reply, printing text as it is decoded; returns the reply's tokens."""
    terminal = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    reply, shown = [], ""
    # one row of a session, kept when it ends: the next turn reuses the conversation's cached keys/values
    sess = engine.session()
    sess.add(prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             seed=args.seed, keep=True)
    while len(sess):
        ((_, token, _, _),) = sess.step()
        reply.append(token)
        if token in terminal:
            break
        text = tokenizer.decode([t for t in reply if t not in terminal])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode([t for t in reply if t not in terminal])
    out.write(text[len(shown):] + "\n")
    out.flush()
    return reply


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", choices=["sft", "rl", "base"], help="which checkpoints to load")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="step (default: the last)")
    p.add_argument("--hf-path", default=None, help="an exported model folder (scripts/export.py) to load instead of a checkpoint")
    p.add_argument("-p", "--prompt", default="", help="ask one question, print the answer and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this mass")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--compile", type=int, default=None, choices=[0, 1],
                   help="compile the decode step (default: the engine's choice, NANOCHAT_ENGINE_COMPILE)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty: autodetect)")
    args = p.parse_args(argv)
    if args.temperature < 0:
        raise NanochatError(f"--temperature must be >= 0, not {args.temperature}.")
    if not 0.0 < args.top_p <= 1.0:
        raise NanochatError(f"--top-p must be in (0, 1], not {args.top_p}.")
    if args.max_tokens < 1:
        raise NanochatError(f"--max-tokens must be at least 1, not {args.max_tokens}.")

    from nanochat.checkpoint import load_model
    from nanochat.engine import Engine

    device = torch.device(args.device_type or autodetect_device_type())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanochatError("--device-type=cuda was asked for but no CUDA device is visible; use --device-type=cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NanochatError("--device-type=mps was asked for but MPS is not available; use --device-type=cpu.")
    model_tag = os.path.abspath(args.hf_path) if args.hf_path else args.model_tag
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=model_tag, step=args.step)
    engine = Engine(model, tokenizer, compile=None if args.compile is None else bool(args.compile))
    conversation = Conversation(tokenizer, model.config.sequence_len, args.max_tokens)
    out = sys.stdout

    def answer(text):
        prompt, dropped = conversation.prompt_for(text)
        if dropped:
            print(f"(dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to stay within the "
                  f"{conversation.sequence_len}-token context)")
        if prompt is None:
            print(f"(that message is too long for the {conversation.sequence_len}-token context; send a shorter one)")
            return
        reply = stream_reply(engine, tokenizer, prompt, args, out)
        conversation.add_turn(prompt, reply)

    with torch.inference_mode():
        if args.prompt:
            answer(args.prompt)
            return
        print(f"nanochat ({args.source} model) - type 'clear' for a new conversation, 'quit' or 'exit' to leave")
        while True:
            try:
                text = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if not text:
                continue
            if text in ("quit", "exit"):
                return
            if text == "clear":
                conversation.clear()
                print("(conversation cleared)")
                continue
            out.write("\nAssistant: ")
            out.flush()
            try:
                answer(text)
            except KeyboardInterrupt:
                print()
                return


if __name__ == "__main__":
    run_main(main)
