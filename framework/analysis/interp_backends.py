"""The language models that explain and simulate: SmolLM2 on this machine, or any chat endpoint.

Both answer the same two calls (prompts in interp_prompts.py):

    explain(messages)                 -> an explanation (one phrase)
    simulate(explanation, excerpts)   -> a predicted activation (0-9) for every token of each excerpt

`LocalBackend` runs SmolLM2-135M-Instruct offline (framework.lm.smollm2) with its chat template:
greedy generation for the explanation, and for the simulation one forward pass per few
excerpts reading next-token probabilities over the digits at every token -- no sampling, so
scores are deterministic. It is weak (135M parameters) but real, and needs no network.

`HTTPBackend` posts to an OpenAI-compatible `/chat/completions` URL. The API key is read from
the environment variable `analyze.autointerp_api_key_env` names, sent only in the request's
Authorization header, and never logged, cached or written: error messages carry the URL and
status only. `identity` (what cached scores are keyed by) names the URL and model, not the key.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request

import torch

from framework.analysis.interp_prompts import (
    EXCERPT_HEADER,
    EXPLAIN_PREFIX,
    PLACEHOLDER,
    clean_explanation,
    parse_numbered,
    shown,
    simulate_listing_messages,
    simulate_numbered_messages,
)
from framework.config import AnalyzeConfig, RecipeError
from framework.errors import FrameworkError

log = logging.getLogger(__name__)
EXPLANATION_TOKENS = 32  # generated at most; greedy, no 3-gram repeated
EXCERPTS_PER_PASS = 4  # local simulation: excerpts sharing one forward pass (and its prompt)
DIGITS = torch.arange(10, dtype=torch.float32)


class AutointerpError(FrameworkError):
    pass


class LocalBackend:
    def __init__(self, device: str = "cpu"):
        from framework.lm.smollm2 import GGUF_FILE, load_smollm2

        self.lm = load_smollm2(device)
        self.tokenizer = self.lm.tokenizer.hf
        self.identity = f"smollm2/{GGUF_FILE}"
        self.digit_ids = [self._single_id(str(d)) for d in range(10)]
        self.tab_id, self.newline_id = self._single_id("\t"), self._single_id("\n")
        self.stop_ids = [self.newline_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def _single_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise AutointerpError(f"SmolLM2's tokenizer splits {text!r} into {len(ids)} tokens; the simulator "
                                  f"reads one token per digit")
        return ids[0]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prompt_ids(self, messages: list[dict], assistant_start: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._ids(text + assistant_start)

    @torch.no_grad()
    def explain(self, messages: list[dict]) -> str:
        ids = torch.tensor([self._prompt_ids(messages, EXPLAIN_PREFIX)], device=self.lm.device)
        out = self.lm.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=EXPLANATION_TOKENS, do_sample=False,
            no_repeat_ngram_size=3, eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[-1], use_cache=True,
        )
        return clean_explanation(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    @torch.no_grad()
    def simulate(self, explanation: str, excerpts: list[list[str]]) -> list[list[float]]:
        prompt = self._prompt_ids(simulate_listing_messages(explanation), "")
        predictions: list[list[float]] = []
        for start in range(0, len(excerpts), EXCERPTS_PER_PASS):
            ids, reads = list(prompt), []
            for i, tokens in enumerate(excerpts[start : start + EXCERPTS_PER_PASS], start=start + 1):
                ids += self._ids(EXCERPT_HEADER.format(i=i))
                for token in tokens:
                    ids += self._ids(shown(token)) or self._ids(" ")
                    reads.append(len(ids))  # the tab's position: what follows it is the digit
                    ids += [self.tab_id, *self._ids(PLACEHOLDER), self.newline_id]
            expected = self._expected_digits(ids, reads)
            for tokens in excerpts[start : start + EXCERPTS_PER_PASS]:
                predictions.append(expected[: len(tokens)])
                expected = expected[len(tokens):]
        return predictions

    def _expected_digits(self, ids: list[int], positions: list[int]) -> list[float]:
        """Σ d·p(d) at each position, p renormalised over the digit tokens."""
        model = self.lm.model
        hidden = model.model(input_ids=torch.tensor([ids], device=self.lm.device)).last_hidden_state[0]
        digit_rows = model.get_output_embeddings().weight[self.digit_ids]  # (10, d_model)
        logits = hidden[positions].float() @ digit_rows.float().T  # (n, 10): only the digits' logits
        return (logits.softmax(dim=-1).cpu() @ DIGITS).tolist()


class HTTPBackend:
    def __init__(self, url: str, model: str, api_key: str | None, timeout_s: float = 120.0, attempts: int = 3):
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self.identity = f"{self.url}#{model}"  # first: __repr__ reads it, in a traceback of the check below too
        if not model:
            raise RecipeError("analyze.autointerp_model is a URL, so analyze.autointerp_api_model must name the "
                              "model to request (e.g. analyze.autointerp_api_model=gpt-4o-mini)")
        self.model, self._api_key, self.timeout_s, self.attempts = model, api_key, timeout_s, attempts
        self.parse_misses = 0

    def __repr__(self) -> str:  # never show the key
        return f"HTTPBackend({self.identity})"

    def explain(self, messages: list[dict]) -> str:
        return clean_explanation(self._chat(messages, max_tokens=60))

    def simulate(self, explanation: str, excerpts: list[list[str]]) -> list[list[float]]:
        predictions = []
        for tokens in excerpts:
            reply = self._chat(simulate_numbered_messages(explanation, tokens), max_tokens=8 * len(tokens) + 16)
            digits, misses = parse_numbered(reply, len(tokens))
            self.parse_misses += misses
            predictions.append(digits)
        return predictions

    def _chat(self, messages: list[dict], max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempt = 0
        while True:
            attempt += 1
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as err:
                retry = err.code == 429 or err.code >= 500
                problem = f"HTTP {err.code} {err.reason}"
            except (urllib.error.URLError, TimeoutError) as err:
                retry, problem = True, f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except (KeyError, IndexError, json.JSONDecodeError) as err:
                retry, problem = False, f"a reply that is not an OpenAI chat completion ({type(err).__name__})"
            if not retry or attempt >= self.attempts:
                raise AutointerpError(f"autointerp request to {self.url} failed after {attempt} attempt(s): {problem}")
            log.warning("autointerp request to %s: %s; retrying", self.url, problem)
            time.sleep(2**attempt)


def make_backend(cfg: AnalyzeConfig, device: str = "cpu") -> LocalBackend | HTTPBackend:
    """`analyze.autointerp_model`: "smollm2" (local, offline) or an OpenAI-compatible URL."""
    if cfg.autointerp_model == "smollm2":
        return LocalBackend(device)
    if cfg.autointerp_model.startswith(("http://", "https://")):
        key = os.environ.get(cfg.autointerp_api_key_env) or None
        if key is None:
            log.warning("no API key in $%s; sending autointerp requests without one", cfg.autointerp_api_key_env)
        return HTTPBackend(cfg.autointerp_model, cfg.autointerp_api_model, key)
    raise RecipeError(f"analyze.autointerp_model={cfg.autointerp_model!r} is neither 'smollm2' nor an "
                      f"http(s):// URL of an OpenAI-compatible chat endpoint")
