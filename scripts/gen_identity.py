"""Write the identity conversations SFT mixes in: short chats in which the model
says who it is, who made it and what it can do, built from the facts and topics of
scripts/identity_knowledge.md.

    python -m scripts.gen_identity                         # 1000 conversations, offline, deterministic
    python -m scripts.gen_identity --num=2000 --seed=1 --output=/tmp/identity.jsonl
    OPENAI_API_KEY=... python -m scripts.gen_identity --paraphrase --model=gpt-4o-mini
    python -m scripts.gen_identity --paraphrase --api-base=http://localhost:8000/v1 --api-key=local

Offline (the default) every conversation comes from templates over the knowledge file: the
same --seed and file give the same bytes, and conversation i does not depend on --num.
With --paraphrase, an OpenAI-compatible chat API rewrites each conversation in other words
(same turns, same facts); an answer that is not a valid conversation is retried, then the
template version is kept and counted in the summary. Output: base_dir/identity_conversations.jsonl
(each line a JSON array of messages alternating user/assistant), written atomically.
"""

import argparse
import json
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from nanochat.common import NanochatError, atomic_path, get_base_dir, print0, run_main

KNOWLEDGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "identity_knowledge.md")
PLACEHOLDER = re.compile(r"\{(\w+)\}")
TOPIC_COUNTS = [1, 1, 2, 2, 2, 3]  # topics per conversation, drawn uniformly from this list
GREETING_PROB = 0.3  # a conversation opens with small talk this often
LOWERCASE_PROB = 0.25  # users often type in lowercase ...
DROP_QMARK_PROB = 0.2  # ... and skip the question mark

PARAPHRASE_PROMPT = """You rewrite short chat conversations between a user and an AI assistant called {name}.
Rewrite every message in your own words: vary the wording and length a little, keep the same meaning, keep every fact the assistant states exactly as it is (names, numbers, URLs, licenses), and do not add new facts. Users may sound casual. Keep the same number of messages and the same roles in the same order.
Answer with only a JSON array of objects {{"role": ..., "content": ...}}, nothing else.

Facts the assistant may rely on:
{facts}

Conversation:
{conversation}"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--knowledge", default=KNOWLEDGE_FILE, help="the knowledge file (facts and topics)")
    p.add_argument("--output", default=None, help="default: base_dir/identity_conversations.jsonl")
    p.add_argument("--num", type=int, default=1000, help="number of conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paraphrase", action="store_true", help="rewrite each conversation with an OpenAI-compatible chat API")
    p.add_argument("--api-base", default="https://api.openai.com/v1", help="the API's base URL (ending in /v1)")
    p.add_argument("--api-key", default=None, help="the API key (implies --paraphrase; default: $OPENAI_API_KEY)")
    p.add_argument("--model", default="gpt-4o-mini", help="the chat model that paraphrases")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=8, help="concurrent API requests")
    p.add_argument("--retries", type=int, default=2, help="extra attempts per conversation when the API answer is bad")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per API request")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# The knowledge file


def load_knowledge(path):
    """{"facts": {key: value}, "greetings": [(q, a)], "topics": {name: {"q": [...], "a": [...]}}}.
    A line the format does not allow, or a placeholder with no fact, raises NanochatError
    naming the line."""
    if not os.path.isfile(path):
        raise NanochatError(f"knowledge file {path} does not exist; give one with --knowledge.")
    facts, greetings, topics = {}, [], {}
    section, pending_q = None, None
    lines = []  # (lineno, text) of every Q/A line, checked once all facts are known
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            where = f"{path} line {lineno}"
            if line.startswith("## "):
                title = line[3:].strip()
                if pending_q is not None:
                    raise NanochatError(f"{where}: the greeting on line {pending_q[0]} has no A: line after it.")
                if title == "Facts":
                    section = "facts"
                elif title == "Greetings":
                    section = "greetings"
                elif title.startswith("Topic:"):
                    name = title[len("Topic:"):].strip()
                    if not name or name in topics:
                        raise NanochatError(f"{where}: a topic needs a new, non-empty name.")
                    section = ("topic", name)
                    topics[name] = {"q": [], "a": []}
                else:
                    section = None
                continue
            if section is None or not line:
                continue
            if section == "facts":
                m = re.fullmatch(r"- (\w+):\s*(.+)", line)
                if not m:
                    raise NanochatError(f"{where}: expected a fact as `- key: value`.")
                facts[m.group(1)] = m.group(2).strip()
                continue
            kind, _, text = line.partition(":")
            text = text.strip()
            if kind not in ("Q", "A") or not text:
                raise NanochatError(f"{where}: expected a `Q: ...` or `A: ...` line.")
            lines.append((where, text))
            if section == "greetings":
                if kind == "Q":
                    if pending_q is not None:
                        raise NanochatError(f"{where}: two greeting Q: lines in a row; each needs its A: line.")
                    pending_q = (lineno, text)
                else:
                    if pending_q is None:
                        raise NanochatError(f"{where}: a greeting A: line must follow its Q: line.")
                    greetings.append((pending_q[1], text))
                    pending_q = None
            else:
                topics[section[1]][kind.lower()].append(text)
    if pending_q is not None:
        raise NanochatError(f"{path} line {pending_q[0]}: the greeting has no A: line after it.")
    for where, text in lines:
        for key in PLACEHOLDER.findall(text):
            if key not in facts:
                raise NanochatError(f"{where}: {{{key}}} is not a fact; add `- {key}: ...` under ## Facts.")
    for name, t in topics.items():
        if not t["q"] or not t["a"]:
            raise NanochatError(f"{path}: topic {name!r} needs at least one Q: and one A: line.")
    if not topics:
        raise NanochatError(f"{path} has no `## Topic:` sections.")
    return {"facts": facts, "greetings": greetings, "topics": topics}


# -----------------------------------------------------------------------------
# Templates


def _fill(text, facts):
    text = PLACEHOLDER.sub(lambda m: facts[m.group(1)], text)
    return text[:1].upper() + text[1:]


def _user_style(text, rng):
    if rng.random() < LOWERCASE_PROB:
        text = text[:1].lower() + text[1:]
    if text.endswith("?") and rng.random() < DROP_QMARK_PROB:
        text = text[:-1]
    return text


def make_conversation(knowledge, seed, index):
    """Conversation `index` for `seed`: its own RNG, so it does not depend on how many are made."""
    rng = random.Random(f"identity:{seed}:{index}")
    facts = knowledge["facts"]
    messages = []
    if knowledge["greetings"] and rng.random() < GREETING_PROB:
        q, a = rng.choice(knowledge["greetings"])
        messages += [{"role": "user", "content": _fill(q, facts)}, {"role": "assistant", "content": _fill(a, facts)}]
    names = sorted(knowledge["topics"])
    for name in rng.sample(names, min(rng.choice(TOPIC_COUNTS), len(names))):
        topic = knowledge["topics"][name]
        q = _user_style(_fill(rng.choice(topic["q"]), facts), rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": _fill(rng.choice(topic["a"]), facts)}]
    return messages


def is_valid_conversation(messages, like=None):
    """At least one user/assistant pair, alternating, non-empty string contents; with `like`,
    the same number of messages."""
    if not isinstance(messages, list) or len(messages) < 2 or len(messages) % 2:
        return False
    if like is not None and len(messages) != len(like):
        return False
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != ("user" if i % 2 == 0 else "assistant"):
            return False
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return False
    return True


# -----------------------------------------------------------------------------
# Paraphrasing through an OpenAI-compatible API


def _extract_json_array(text):
    """The JSON array in a model's answer, tolerating ```json fences and chatter around it."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None


def paraphrase(messages, knowledge, args, session):
    """(messages, ok): the API's rewrite when it is a valid conversation of the same shape,
    else the original after 1 + retries attempts. Network errors count as bad answers."""
    import requests

    facts = "\n".join(f"- {k}: {v}" for k, v in knowledge["facts"].items())
    prompt = PARAPHRASE_PROMPT.format(name=knowledge["facts"].get("name", "the assistant"), facts=facts,
                                      conversation=json.dumps(messages, ensure_ascii=False, indent=1))
    url = args.api_base.rstrip("/") + "/chat/completions"
    body = {"model": args.model, "temperature": args.temperature, "messages": [{"role": "user", "content": prompt}]}
    for _ in range(1 + args.retries):
        try:
            r = session.post(url, json=body, timeout=args.timeout,
                             headers={"Authorization": f"Bearer {args.api_key}"})
            if r.status_code in (401, 403, 404):
                raise NanochatError(f"{url} answered {r.status_code}: check --api-base, --api-key and --model.")
            r.raise_for_status()
            content = r.json()["choices"][0]["message"]["content"]
        except (requests.RequestException, KeyError, IndexError, TypeError, ValueError):
            continue
        rewritten = _extract_json_array(content or "")
        if is_valid_conversation(rewritten, like=messages):
            return [{"role": m["role"], "content": m["content"].strip()} for m in rewritten], True
    return messages, False


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.num < 1:
        raise NanochatError(f"--num must be at least 1, not {args.num}.")
    knowledge = load_knowledge(args.knowledge)
    output = args.output or os.path.join(get_base_dir(), "identity_conversations.jsonl")
    conversations = [make_conversation(knowledge, args.seed, i) for i in range(args.num)]

    paraphrased = fallbacks = 0
    if args.paraphrase or args.api_key:  # an explicit key asks for paraphrases; $OPENAI_API_KEY alone does not
        import requests
        from tqdm import tqdm

        args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
        if not args.api_key:
            raise NanochatError("--paraphrase needs an API key: pass --api-key or set OPENAI_API_KEY.")
        session = requests.Session()
        with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
            results = list(tqdm(pool.map(lambda m: paraphrase(m, knowledge, args, session), conversations),
                                total=len(conversations), desc="paraphrasing", file=sys.stderr))
        conversations = [m for m, _ in results]
        paraphrased = sum(ok for _, ok in results)
        fallbacks = len(results) - paraphrased
        if fallbacks:
            print0(f"warning: {fallbacks} of {len(results)} conversations kept their template wording "
                   f"(the API did not return a valid rewrite)")

    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps(messages, ensure_ascii=False) + "\n")
    summary = {"output": output, "conversations": len(conversations), "seed": args.seed,
               "topics": len(knowledge["topics"]), "facts": len(knowledge["facts"]),
               "paraphrased": paraphrased, "template_fallbacks": fallbacks}
    print0(json.dumps({"gen_identity": summary}))
    return summary


if __name__ == "__main__":
    run_main(main)
