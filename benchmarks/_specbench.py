"""Held-out prompts by category, Spec-Bench style (Xia et al., "Unlocking Efficiency in Large Language Model
Inference: A Comprehensive Survey of Speculative Decoding", 2024: one benchmark, several kinds of request),
built from what is on this machine and never from anything a shipped drafter trained on.

Glossary:
    chat        the first user turn of ShareGPT dev-split conversations (positions 15,000-15,999, copies of
                training conversations dropped: :func:`mmspec.distill.conversations.iter_sharegpt`)
    multi-turn  the second user turn of a dev-split conversation, after its first exchange (the real answer as
                the assistant's history)
    code        "complete this function" from a standard-library function's signature and docstring (the
                shipped drafters train on ShareGPT, and no earlier drafter saw these modules' sources)
    rag         a long document (a standard-library module's docstring, 1,200-4,000 characters) and a question
                about it: long context, answers that quote it
    rewrite     a dev-split assistant answer to be rewritten (grammar, tone): copy-heavy output
    messages    every prompt is a list of OpenAI-style ``{"role", "content"}`` messages, rendered by the
                target's chat template
"""

from __future__ import annotations

import functools
import inspect
import random
import re
import sys
import warnings

CATEGORIES = ("chat", "multi-turn", "code", "rag", "rewrite")
_MAX_PROMPT_CHARS = 1500
# modules whose docstrings make the rag documents and whose functions make the code prompts (standard library)
_CODE_MODULES = ("textwrap", "shlex", "fnmatch", "colorsys", "bisect", "heapq", "statistics", "difflib", "calendar",
                 "ipaddress", "secrets", "string", "html", "base64", "glob", "posixpath")
_RAG_MODULES = ("argparse", "cmd", "configparser", "copy", "csv", "fileinput", "hashlib", "json", "pipes",
                "plistlib", "pyclbr", "re", "sched", "shelve", "site", "socket", "socketserver", "ssl", "statistics",
                "sys", "timeit", "unittest", "uuid", "wave")
_RAG_QUESTIONS = ("Summarize the document above in three sentences.",
                  "According to the document above, what is this module for, and how do you use it?",
                  "List the main functions or classes the document above describes, one line each.",
                  "Explain the document above to a beginner.")
_REWRITE = ("Fix the grammar and spelling of the following text, keeping everything else as it is:\n\n{t}",
            "Rewrite the following text in a more formal tone:\n\n{t}",
            "Rewrite the following text so that a beginner understands it:\n\n{t}")


@functools.lru_cache(maxsize=1)
def _dev_conversations() -> tuple:
    from mmspec.distill.conversations import iter_sharegpt

    return tuple(turns for _, turns in iter_sharegpt("dev"))


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat_prompts(n: int, seed: int) -> list[list[dict]]:
    turns = [t for t in _dev_conversations() if t[0].role == "user" and 20 <= len(t[0].text) <= _MAX_PROMPT_CHARS]
    random.Random(seed).shuffle(turns)
    return [_user(t[0].text) for t in turns[:n]]


def multi_turn_prompts(n: int, seed: int) -> list[list[dict]]:
    convs = [t for t in _dev_conversations() if len(t) >= 3 and t[0].role == "user" and t[2].role == "user"
             and len(t[0].text) + len(t[1].text) + len(t[2].text) <= 3 * _MAX_PROMPT_CHARS and len(t[2].text) >= 10]
    random.Random(seed + 1).shuffle(convs)
    return [[{"role": x.role, "content": x.text} for x in t[:3]] for t in convs[:n]]


def _functions(modules) -> list:
    out = []
    for name in modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = __import__(name, fromlist=["_"])
        for fname, obj in sorted(vars(mod).items()):
            if fname.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            try:
                sig = inspect.signature(obj)
            except (TypeError, ValueError):
                continue
            if doc and 40 <= len(doc) <= 800:
                out.append((name, fname, sig, doc))
    return out


def code_prompts(n: int, seed: int) -> list[list[dict]]:
    funcs = _functions(_CODE_MODULES)
    random.Random(seed + 2).shuffle(funcs)
    prompts = []
    for module, fname, sig, doc in funcs[:n]:
        body = "\n".join("    " + line if line else "" for line in doc.splitlines())
        prompts.append(_user(f"Complete this Python function (module {module}). Reply with the code only.\n\n"
                             f"```python\ndef {fname}{sig}:\n    \"\"\"\n{body}\n    \"\"\"\n```"))
    return prompts


def rag_prompts(n: int, seed: int) -> list[list[dict]]:
    docs = []
    for name in _RAG_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                mod = __import__(name, fromlist=["_"])
            except ImportError:  # pragma: no cover - a trimmed Python
                continue
        doc = inspect.getdoc(mod) or ""
        if len(doc) >= 1200:
            docs.append((name, doc[:4000]))
    rng = random.Random(seed + 3)
    rng.shuffle(docs)
    return [_user(f"Document (Python's {name} module):\n\n{doc}\n\n{rng.choice(_RAG_QUESTIONS)}") for name, doc in docs[:n]]


def rewrite_prompts(n: int, seed: int) -> list[list[dict]]:
    answers = [t[1].text for t in _dev_conversations() if len(t) >= 2 and t[1].role == "assistant"
               and 300 <= len(t[1].text) <= 1200 and not re.search(r"```", t[1].text)]
    rng = random.Random(seed + 4)
    rng.shuffle(answers)
    return [_user(rng.choice(_REWRITE).format(t=a)) for a in answers[:n]]


BUILDERS = {"chat": chat_prompts, "multi-turn": multi_turn_prompts, "code": code_prompts, "rag": rag_prompts,
            "rewrite": rewrite_prompts}


def category_prompts(n: int = 8, seed: int = 0, categories=CATEGORIES) -> dict[str, list[list[dict]]]:
    """``n`` prompts (message lists) per category, deterministic for ``seed``."""
    unknown = [c for c in categories if c not in BUILDERS]
    if unknown:
        raise ValueError(f"categories must be among {CATEGORIES}, got {unknown}")
    return {c: BUILDERS[c](n, seed) for c in categories}


if __name__ == "__main__":  # pragma: no cover - a look at the prompts
    for cat, prompts in category_prompts(int(sys.argv[1]) if len(sys.argv) > 1 else 2).items():
        for p in prompts:
            print(f"--- {cat} ({sum(len(m['content']) for m in p)} chars)\n{p[-1]['content'][:300]}\n")
