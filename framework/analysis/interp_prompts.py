"""The words of auto-interpretation: what the explainer and the simulator are shown, and parsing replies.

Explainer. Chat messages: a system line saying what the job is, then the examples, one per
line, each the window of tokens `sae analyze` stored around a firing, with every token whose
quantised activation is at least 1 marked `«token:N»` (N = floor(10 * activation / the unit's
max activation), capped at 9 -- the 0-9 scale of the simulator) -- and after them the tokens
the examples were chosen for, most frequent first: a 135M-parameter explainer names what it is
handed far more often than what it must infer. Newlines and tabs are written as `\\n` and `\\t`
so each example stays on one line. The reply is one phrase completing "The feature responds
to ...".

Simulator. Told the explanation, it gives each token of an unseen excerpt a digit 0-9:
- local models (all at once, as OpenAI's neuron simulator): the assistant turn is a listing,
  one line per token -- the token, a tab, and the placeholder `unknown` -- and one forward pass
  reads the model's next-token distribution over the digits "0".."9" at every tab; the
  prediction is the expected digit under it (probabilities renormalised over the ten digits).
  Placeholders carry nothing of the truth, so several excerpts can share one pass.
- chat endpoints: the tokens as numbered lines; the reply must give "number<TAB>digit" lines,
  parsed leniently (a token with no parsable line predicts 0, and the misses are counted).

`PROMPTS_DIGEST` hashes every template, so cached scores are redone when the words change.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

EXPLAIN_SYSTEM = (
    "You study one feature of a small language model trained on Python source code. You are shown "
    "excerpts where the feature is active and say, in a few words, what it responds to."
)
EXPLAIN_USER = (
    "In each excerpt, tokens where the feature is active are marked «token:N», N from 1 (weak) to 9 "
    "(strongest); unmarked tokens have activation 0.\n\n{examples}\n\n"
    "The tokens it is most active on, most frequent first: {peaks}.\n"
    "In one short phrase, what does the feature respond to?"
)
PEAK_TOKENS = 5  # most frequent peak tokens listed after the examples
EXPLAIN_PREFIX = "The feature responds to"
SIMULATE_SYSTEM = (
    "You predict how strongly one feature of a language model is active on each token of a text, as a "
    "digit from 0 (inactive) to 9 (strongest)."
)
SIMULATE_LISTING = (
    "The feature responds to {explanation}.\n\nFor each token of the excerpts below, write the token, a tab, "
    "and its activation."
)
SIMULATE_NUMBERED = (
    "The feature responds to {explanation}.\n\nTokens of an excerpt, one per line:\n{tokens}\n\n"
    "Reply with one line per token: its number, a tab, and its activation (a digit 0-9). Nothing else."
)
PLACEHOLDER = "unknown"
EXCERPT_HEADER = "Excerpt {i}:\n"
# One worked example before the real question, for both roles (what a small model most needs):
# a made-up feature on the keyword " return", its excerpts, explanation and activations.
DEMO_TOKENS = [("x", 0), (" =", 0), (" f", 0), ("(", 0), ("y", 0), (")", 0), ("\n", 0), ("    ", 0),
               (" return", 9), (" x", 1), (" +", 0), (" 1", 0)]
DEMO_EXCERPTS = [
    "    if not data:\\n        « return:9» None",
    "    x = f(y)\\n    « return:8» x« +:1» 1",
    "def g():\\n    « return:9» [i for i in range(3)]",
]
DEMO_PEAKS = "« return»"
DEMO_EXPLANATION = 'the keyword "return"'
PROMPTS_DIGEST = hashlib.sha256("\x00".join([
    EXPLAIN_SYSTEM, EXPLAIN_USER, EXPLAIN_PREFIX, SIMULATE_SYSTEM, SIMULATE_LISTING, SIMULATE_NUMBERED,
    PLACEHOLDER, EXCERPT_HEADER, repr(DEMO_TOKENS), repr(DEMO_EXCERPTS), DEMO_PEAKS, DEMO_EXPLANATION,
]).encode()).hexdigest()[:16]


def shown(token: str) -> str:
    """A token on one line: newlines and tabs as escapes."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def quantise(activation: float, max_activation: float) -> int:
    """The 0-9 scale: tenths of the unit's max activation, the top tenth being 9."""
    if max_activation <= 0 or not math.isfinite(activation) or activation <= 0:
        return 0
    return min(9, int(10 * activation / max_activation))


def marked_excerpt(tokens: list[str], activations: list[float], max_activation: float) -> str:
    parts = []
    for token, activation in zip(tokens, activations):
        q = quantise(activation or 0.0, max_activation)
        parts.append(f"«{shown(token)}:{q}»" if q else shown(token))
    return "".join(parts)


def explain_messages(examples: list[dict], max_activation: float) -> list[dict]:
    lines = [f"{i}. {marked_excerpt(e['tokens'], e['activations'], max_activation)}"
             for i, e in enumerate(examples, start=1)]
    peaks = Counter(e["tokens"][e["focus"]] for e in examples).most_common(PEAK_TOKENS)
    listed = ", ".join(f"«{shown(token)}»" for token, _ in peaks)
    demo = "\n".join(f"{i}. {line}" for i, line in enumerate(DEMO_EXCERPTS, start=1))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": EXPLAIN_USER.format(examples=demo, peaks=DEMO_PEAKS)},
            {"role": "assistant", "content": f"{EXPLAIN_PREFIX} {DEMO_EXPLANATION}."},
            {"role": "user", "content": EXPLAIN_USER.format(examples="\n".join(lines), peaks=listed)}]


def clean_explanation(reply: str) -> str:
    """The first line of a reply, without a repeated "The feature responds to" or a final period."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.lower().startswith(EXPLAIN_PREFIX.lower()):
        text = text[len(EXPLAIN_PREFIX):].strip()
    return text.rstrip(".").strip() or "nothing in particular"


def simulate_listing_messages(explanation: str) -> list[dict]:
    """Up to the assistant turn whose listing the local simulator fills with placeholders."""
    demo = EXCERPT_HEADER.format(i=1) + "".join(f"{shown(t)}\t{d}\n" for t, d in DEMO_TOKENS)
    return [{"role": "system", "content": SIMULATE_SYSTEM},
            {"role": "user", "content": SIMULATE_LISTING.format(explanation=DEMO_EXPLANATION)},
            {"role": "assistant", "content": demo},
            {"role": "user", "content": SIMULATE_LISTING.format(explanation=explanation)}]


def simulate_numbered_messages(explanation: str, tokens: list[str]) -> list[dict]:
    numbered = "\n".join(f"{i}\t{shown(t)}" for i, t in enumerate(tokens, start=1))
    demo_tokens = "\n".join(f"{i}\t{shown(t)}" for i, (t, _) in enumerate(DEMO_TOKENS, start=1))
    demo_reply = "\n".join(f"{i}\t{d}" for i, (_, d) in enumerate(DEMO_TOKENS, start=1))
    return [{"role": "system", "content": SIMULATE_SYSTEM},
            {"role": "user", "content": SIMULATE_NUMBERED.format(explanation=DEMO_EXPLANATION, tokens=demo_tokens)},
            {"role": "assistant", "content": demo_reply},
            {"role": "user", "content": SIMULATE_NUMBERED.format(explanation=explanation, tokens=numbered)}]


# A separator (tab, space, or one of :.)-=,) between the number and the digit is required: "12"
# alone is no answer, not token 1's digit 2.
LINE = re.compile(r"^[ \t]*(\d+)(?:[ \t]*[:.)\-=,][ \t]*|[ \t]+)(\d)[ \t]*$", re.MULTILINE)  # within a line


def parse_numbered(reply: str, n_tokens: int) -> tuple[list[float], int]:
    """(a digit per token, how many tokens had no parsable line) from "number<TAB>digit" lines;
    a number given twice keeps its first answer."""
    found: dict[int, float] = {}
    for i, d in LINE.findall(reply):
        if 1 <= int(i) <= n_tokens:
            found.setdefault(int(i), float(d))
    return [found.get(i, 0.0) for i in range(1, n_tokens + 1)], n_tokens - len(found)
