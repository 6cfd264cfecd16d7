"""Convert a Hugging Face GPT-2 into a :class:`bsbr.BSBRModel` that computes the same function.

GPT-2 (Radford et al., 2019) is a pre-norm decoder: ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``,
final ``ln_f``, LM head tied to the token embedding ``wte``, learned absolute positions ``wpe``.
:class:`bsbr.BSBRModel` is built on the same shell (``bsbr/causal_lm.py``), so everything but the token
mixer carries over weight for weight. The mixer is BSBR (README.md, "What BSBR computes"): inside a
chunk it is exactly causal softmax attention with scale ``1/sqrt(head_dim)``, so

* with ``chunk_size >= seq_len`` the converted model IS the GPT-2 (tests pin max |diff| <= 1e-4);
* with smaller chunks every chunk but the first sees its own chunk exactly and earlier chunks
  only through BSBR's retrieved term (chunk-level softmax over ``r_i . h_j`` mixing the per-chunk
  states ``F_j = K_j^T V_j``), which GPT-2 was never trained with. That is the approximation
  whose cost ``convert_example`` measures.

The weight map is declarative (in the manner of gpt-fast's ``convert_hf_checkpoint.py`` and
nanoGPT's ``from_pretrained``): each GPT-2 key names its BSBR key(s) and a transform.
Transforms:

* ``Conv1D`` weights are stored ``(in, out)``; ``nn.Linear`` wants ``(out, in)``: transpose.
* The fused ``c_attn`` ``(D, 3D)`` is transposed and split into ``q_proj, k_proj, v_proj``.

Keys that are intentionally dropped (``attn.bias`` / ``attn.masked_bias``: the causal-mask buffers
old checkpoints carry; BSBR builds its own masks) are listed in :data:`DROPPED`. Parameters GPT-2
does not have are either *derived* from mapped ones (:data:`DERIVED`) or left at BSBRModel's own
initialisation (:data:`NEW`). Conversion fails unless every source key and every target key is
accounted for, and every shape matches.

Meta projections: ``meta_query <- (W_Q, b_Q)`` and ``meta_key <- (W_K, b_K)``. Because the chunk
summary ``s_j`` is the mean of the mixer input over chunk ``j`` and a linear map commutes with a
mean, the meta query ``r_i = W_Q s_{i-1} + b_Q`` is the *mean query* of chunk ``i-1`` and the meta
key ``h_j`` the *mean key* of chunk ``j``: chunk-level retrieval starts as attention between
averaged tokens, using the very query/key geometry the GPT-2 learned.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

# ----------------------------------------------------------------------------- the weight map

Transform = Callable[[torch.Tensor], Union[torch.Tensor, tuple]]


def _same(w: torch.Tensor) -> torch.Tensor:
    return w


def _conv1d_to_linear(w: torch.Tensor) -> torch.Tensor:
    """GPT-2 Conv1D weight (in, out) -> nn.Linear weight (out, in)."""
    return w.t()


def _split_qkv_weight(w: torch.Tensor) -> tuple:
    """c_attn weight (D, 3D) -> q, k, v nn.Linear weights, each (D, D)."""
    return tuple(w.t().chunk(3, dim=0))  # (3D, D) -> 3 x (D, D); GPT-2 orders q | k | v


def _split_qkv_bias(b: torch.Tensor) -> tuple:
    """c_attn bias (3D,) -> q, k, v biases, each (D,)."""
    return tuple(b.chunk(3, dim=0))


@dataclass(frozen=True)
class Rule:
    """One GPT-2 key pattern -> one or more BSBR key patterns. ``{}`` is the layer index."""

    source: str
    targets: tuple
    transform: Transform = _same


_QKV = tuple(f"layers.{{}}.mixer.{p}_proj" for p in "qkv")

#: GPT-2 (``GPT2Model`` key names; ``GPT2LMHeadModel`` adds the ``transformer.`` prefix) -> BSBRModel.
WEIGHT_MAP: tuple = (
    Rule("wte.weight", ("embed.weight",)),
    Rule("wpe.weight", ("pos_embed.weight",)),
    Rule("h.{}.ln_1.weight", ("layers.{}.norm1.weight",)),
    Rule("h.{}.ln_1.bias", ("layers.{}.norm1.bias",)),
    Rule("h.{}.attn.c_attn.weight", tuple(t + ".weight" for t in _QKV), _split_qkv_weight),
    Rule("h.{}.attn.c_attn.bias", tuple(t + ".bias" for t in _QKV), _split_qkv_bias),
    Rule("h.{}.attn.c_proj.weight", ("layers.{}.mixer.out_proj.weight",), _conv1d_to_linear),
    Rule("h.{}.attn.c_proj.bias", ("layers.{}.mixer.out_proj.bias",)),
    Rule("h.{}.ln_2.weight", ("layers.{}.norm2.weight",)),
    Rule("h.{}.ln_2.bias", ("layers.{}.norm2.bias",)),
    Rule("h.{}.mlp.c_fc.weight", ("layers.{}.ffn.fc_in.weight",), _conv1d_to_linear),
    Rule("h.{}.mlp.c_fc.bias", ("layers.{}.ffn.fc_in.bias",)),
    Rule("h.{}.mlp.c_proj.weight", ("layers.{}.ffn.fc_out.weight",), _conv1d_to_linear),
    Rule("h.{}.mlp.c_proj.bias", ("layers.{}.ffn.fc_out.bias",)),
    Rule("ln_f.weight", ("norm.weight",)),
    Rule("ln_f.bias", ("norm.bias",)),
    # Only present in the state dict when the head is untied (tie_word_embeddings=False);
    # a tied head is the same tensor as wte and BSBRModel ties it the same way.
    Rule("lm_head.weight", ("lm_head.weight",)),
)

#: GPT-2 keys deliberately not carried over, and why.
DROPPED: dict = {
    "h.{}.attn.bias": "causal-mask buffer of older checkpoints; BSBR builds its own masks",
    "h.{}.attn.masked_bias": "masking constant buffer of older checkpoints; not a weight",
}

#: BSBR parameters GPT-2 lacks, initialised as a copy of an already mapped BSBR parameter.
DERIVED: dict = {
    "layers.{}.mixer.meta_query.weight": "layers.{}.mixer.q_proj.weight",  # r_i = mean query of chunk i-1
    "layers.{}.mixer.meta_query.bias": "layers.{}.mixer.q_proj.bias",
    "layers.{}.mixer.meta_key.weight": "layers.{}.mixer.k_proj.weight",    # h_j = mean key of chunk j
    "layers.{}.mixer.meta_key.bias": "layers.{}.mixer.k_proj.bias",
}

#: BSBR parameters with no GPT-2 counterpart, left at BSBRModel's initialisation.
NEW: dict = {
    "layers.{}.mixer.compress": "per-head compression map d -> d/f (only with compression_factor)",
}

# GPT-2 ``activation_function`` -> the shell's activation name (bsbr.causal_lm._ACTIVATIONS).
ACTIVATIONS: dict = {
    "gelu_new": "gelu_tanh",          # GPT-2's own: 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _pattern(p: str) -> re.Pattern:
    return re.compile("^" + re.escape(p).replace(r"\{\}", r"(\d+)") + "$")


def _match(patterns, key: str):
    """First pattern matching ``key`` and its layer index (None for non-layer keys)."""
    for p in patterns:
        m = _pattern(p).match(key)
        if m:
            return p, (m.group(1) if m.groups() else None)
    return None, None


# ----------------------------------------------------------------------------- validation


def _check_chunk_size(chunk_size) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _check_compression(compression_factor, head_dim: Optional[int] = None) -> None:
    if compression_factor is None:
        return
    if not isinstance(compression_factor, int) or isinstance(compression_factor, bool) or compression_factor <= 0:
        raise ValueError(f"compression_factor must be None or a positive integer, got {compression_factor!r}")
    if head_dim is not None and head_dim % compression_factor:
        raise ValueError(f"compression_factor ({compression_factor}) must divide the head size ({head_dim})")


def _gpt2_classes():
    try:
        from transformers import GPT2LMHeadModel, GPT2Model
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the GPT-2 converter needs transformers: pip install 'bsbr[convert]'") from e
    return GPT2Model, GPT2LMHeadModel


def _bsbr_model_class():
    from bsbr import BSBRModel
    return BSBRModel


def _check_gpt2(model) -> None:
    """Reject anything that is not a plain GPT-2 whose attention BSBR reproduces exactly."""
    GPT2Model, GPT2LMHeadModel = _gpt2_classes()
    if not isinstance(model, (GPT2Model, GPT2LMHeadModel)):
        raise ValueError(f"expected a transformers GPT2Model or GPT2LMHeadModel, got {type(model).__name__}")
    c = model.config
    if c.activation_function not in ACTIVATIONS:
        raise ValueError(f"GPT-2 activation_function {c.activation_function!r} is not supported; valid: {sorted(ACTIVATIONS)}")
    # These variants change the attention scores; BSBR's local term is plain softmax(q.k / sqrt(d)).
    if not getattr(c, "scale_attn_weights", True):
        raise ValueError("GPT-2 with scale_attn_weights=False is not supported (BSBR scales scores by 1/sqrt(head_dim))")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported")
    if getattr(c, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")


def _source_state_dict(model) -> dict:
    """GPT-2 state dict with the ``transformer.`` prefix of GPT2LMHeadModel stripped.

    A tied LM head is dropped here: it is the same tensor as ``wte`` and the converted model ties
    its head the same way, so mapping it twice would only hide a mistake.
    """
    sd = {}
    for k, v in model.state_dict().items():
        sd[k[len("transformer."):] if k.startswith("transformer.") else k] = v
    if "lm_head.weight" in sd and _head_is_tied(model):
        del sd["lm_head.weight"]
    return sd


def _head_is_tied(model) -> bool:
    head = getattr(model, "lm_head", None)
    if head is None:
        return True  # a bare GPT2Model: GPT-2's head is the embedding transposed
    wte = model.get_input_embeddings().weight
    return head.weight is wte or head.weight.data_ptr() == wte.data_ptr()


# ----------------------------------------------------------------------------- the converter


class TransformerToBSBRConverter:
    """Turn a transformers GPT-2 into a :class:`bsbr.BSBRModel` (see the module docstring).

    Args:
        chunk_size: BSBR chunk size ``c``; ``c >= seq_len`` reproduces GPT-2 exactly.
        compression_factor: BSBR state compression ``f`` (None: no compression). The map
            ``compress`` is new and keeps BSBRModel's initialisation.
        chunk_overlap: tokens of the previous chunk the local window reaches back (BSBRModel's option).
        gamma: scale of BSBR's retrieved term (None: BSBRModel's default).
        dropout: dropout of the converted model (None: GPT-2's ``resid_pdrop``). The returned
            model is in eval mode, like ``from_pretrained``'s, so this matters only for fine-tuning.
    """

    def __init__(self, chunk_size: int = 128, compression_factor: Optional[int] = None, *,
                 chunk_overlap: int = 0, gamma: Optional[float] = None, dropout: Optional[float] = None):
        _check_chunk_size(chunk_size)
        _check_compression(compression_factor)
        if not isinstance(chunk_overlap, int) or isinstance(chunk_overlap, bool) or chunk_overlap < 0:
            raise ValueError(f"chunk_overlap must be a non-negative integer, got {chunk_overlap!r}")
        self.chunk_size, self.compression_factor = chunk_size, compression_factor
        self.chunk_overlap, self.gamma, self.dropout = chunk_overlap, gamma, dropout

    def bsbr_kwargs(self, gpt2_config) -> dict:
        """BSBRModel constructor arguments for a GPT-2 config: the model's shape, GPT-2's
        activation and layer-norm epsilon, learned positions of ``n_positions`` rows, tied head."""
        c = gpt2_config
        D, H = c.n_embd, c.n_head
        if D % H:
            raise ValueError(f"GPT-2 n_embd ({D}) is not divisible by n_head ({H})")
        _check_compression(self.compression_factor, D // H)
        return dict(
            vocab_size=c.vocab_size, hidden_dim=D, num_layers=c.n_layer, num_heads=H,
            chunk_size=self.chunk_size, ff_dim=c.n_inner if c.n_inner is not None else 4 * D,
            dropout=float(c.resid_pdrop if self.dropout is None else self.dropout),
            compression_factor=self.compression_factor, chunk_overlap=self.chunk_overlap,
            use_checkpointing=False, bias=True, gamma=self.gamma,
            position="learned", max_positions=c.n_positions,
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            norm_eps=float(c.layer_norm_epsilon), activation=ACTIVATIONS[c.activation_function],
        )

    def convert_gpt2_model_to_bsbr(self, gpt2_model) -> nn.Module:
        """The converted :class:`bsbr.BSBRModel`, in eval mode, on the GPT-2's device and dtype."""
        _check_gpt2(gpt2_model)
        kwargs = self.bsbr_kwargs(gpt2_model.config)
        src = _source_state_dict(gpt2_model)
        p0 = next(gpt2_model.parameters())
        model = _bsbr_model_class()(**kwargs).to(device=p0.device, dtype=p0.dtype)
        target = model.state_dict()
        new_sd = map_state_dict(src, target)
        model.load_state_dict(new_sd, strict=True)
        model.eval()
        model.bsbr_config = kwargs  # what save_converted writes; BSBRModel(**bsbr_config) rebuilds it
        return model


def map_state_dict(src: dict, target: dict) -> dict:
    """Apply :data:`WEIGHT_MAP` / :data:`DROPPED` / :data:`DERIVED` / :data:`NEW`.

    Args:
        src: GPT-2 state dict (``GPT2Model`` key names).
        target: the freshly built BSBRModel's state dict (gives shapes and the NEW parameters).
    Returns:
        a complete state dict for the BSBRModel.
    Raises:
        ValueError: a source key that is neither mapped nor dropped, a target key nobody fills,
        or a shape mismatch.
    """
    out, unknown = {}, []
    sources = [r.source for r in WEIGHT_MAP]
    for key, value in src.items():
        pat, layer = _match(sources, key)
        if pat is None:
            if _match(DROPPED, key)[0] is None:
                unknown.append(key)
            continue
        rule = WEIGHT_MAP[sources.index(pat)]
        values = rule.transform(value)
        values = values if isinstance(values, tuple) else (values,)
        for tpat, v in zip(rule.targets, values, strict=True):
            tkey = tpat.format(layer) if layer is not None else tpat
            if tkey not in target:
                raise ValueError(f"GPT-2 key {key!r} maps to {tkey!r}, which BSBRModel does not have")
            if tuple(v.shape) != tuple(target[tkey].shape):
                raise ValueError(f"shape mismatch: GPT-2 {key!r} -> {tkey!r} gives {tuple(v.shape)}, "
                                 f"BSBRModel expects {tuple(target[tkey].shape)}")
            out[tkey] = v.detach().clone().contiguous()
    if unknown:
        raise ValueError(f"GPT-2 keys neither mapped nor listed as dropped: {sorted(unknown)}")

    missing = []
    for tkey, tval in target.items():
        if tkey in out:
            continue
        dpat, layer = _match(DERIVED, tkey)
        if dpat is not None:
            skey = DERIVED[dpat].format(layer)
            if skey not in out or out[skey].shape != tval.shape:
                raise ValueError(f"cannot derive {tkey!r} from {skey!r}")
            out[tkey] = out[skey].clone()
        elif _match(NEW, tkey)[0] is not None:
            out[tkey] = tval.clone()
        elif tkey == "lm_head.weight" and "embed.weight" in out:
            out[tkey] = out["embed.weight"]  # tied head: the same weight as the embedding
        else:
            missing.append(tkey)
    if missing:
        raise ValueError(f"BSBRModel keys not filled by the GPT-2 weight map: {sorted(missing)}")
    return out


# ----------------------------------------------------------------------------- loading, saving


def load_gpt2(model_name_or_path: str):
    """A ``GPT2LMHeadModel`` from a hub name or a local ``save_pretrained`` directory (eval mode).

    The config is read first so that a checkpoint of another architecture fails with a clear
    error instead of being half-loaded into GPT-2 classes.
    """
    _, GPT2LMHeadModel = _gpt2_classes()
    from transformers import AutoConfig

    local = _check_local(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except Exception as e:  # transformers raises OSError / ValueError variants
        raise ValueError(f"cannot load a model config from {model_name_or_path!r}: {_first_line(e)}") from None
    if getattr(config, "model_type", None) != "gpt2":
        raise ValueError(f"{model_name_or_path!r} is a {getattr(config, 'model_type', '?')!r} model; "
                         "only GPT-2 (model_type 'gpt2') can be converted")
    if local and not any((Path(model_name_or_path).expanduser() / w).is_file() for w in LOCAL_WEIGHTS):
        raise ValueError(f"{model_name_or_path} holds config.json but no weights ({' or '.join(LOCAL_WEIGHTS[:2])}); "
                         "save the model with save_pretrained into it")
    try:
        return GPT2LMHeadModel.from_pretrained(model_name_or_path).eval()
    except Exception as e:  # noqa: BLE001 - OSError, SafetensorError, a truncated pickle: one line each
        where = f"the weights in {model_name_or_path}" if local else f"the weights of {model_name_or_path!r}"
        raise ValueError(f"cannot load {where}: {type(e).__name__}: {_first_line(e)}") from None


LOCAL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:300]


def _check_local(name: str) -> bool:
    """Whether ``name`` is a local folder (checked: a GPT-2 folder holds config.json and weights);
    False for a hub name. A path that does not exist and cannot be a hub name (``./x``, ``/x``,
    ``x/y/z``) is one ValueError naming it, not the hub's "Repo id" message."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{name} holds no config.json; a local GPT-2 folder is what save_pretrained "
                             f"writes (config.json and {LOCAL_WEIGHTS[0]})")
        return True
    if path.exists():
        raise ValueError(f"{name} is a file; give a local GPT-2 folder (save_pretrained's) or a hub name like gpt2")
    if not HUB_ID.fullmatch(name):
        raise ValueError(f"{name}: no such folder, and not a hub name (like gpt2 or openai-community/gpt2)")
    return False


def convert_to_bsbr(model_name_or_path, chunk_size: int = 128, compression_factor: Optional[int] = None,
                     **kwargs) -> nn.Module:
    """Convert a GPT-2 (hub name, local path, or an already loaded transformers model) to BSBR.

    ``kwargs`` go to :class:`TransformerToBSBRConverter` (``chunk_overlap``, ``gamma``, ``dropout``).
    """
    converter = TransformerToBSBRConverter(chunk_size, compression_factor, **kwargs)
    gpt2 = load_gpt2(str(model_name_or_path)) if isinstance(model_name_or_path, (str, Path)) else model_name_or_path
    return converter.convert_gpt2_model_to_bsbr(gpt2)


CONFIG_NAME, WEIGHTS_NAME, FORMAT = "config.json", "model.safetensors", "bsbr-converted-gpt2"


def save_converted(model: nn.Module, path) -> Path:
    """Write ``config.json`` (BSBRModel arguments) and ``model.safetensors`` into directory ``path``.

    A tied head is stored once (as ``embed.weight``); :func:`load_converted` re-ties it.
    """
    from safetensors.torch import save_file

    kwargs = getattr(model, "bsbr_config", None)
    if kwargs is None:
        raise ValueError("save_converted expects a model returned by convert_to_bsbr / load_converted")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if kwargs["tie_embeddings"]:
        sd.pop("lm_head.weight")
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, "format_version": 1,
                                                "bsbr_model_kwargs": kwargs}, indent=2) + "\n")
    return path


def load_converted(path, device=None) -> nn.Module:
    """Rebuild a model written by :func:`save_converted` (eval mode); logits are bit-identical."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{str(path)!r} is not a converted-BSBR directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(cfg_file)!r} is not readable JSON: {_first_line(e)}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        cfg = cfg if isinstance(cfg, dict) else {}
        raise ValueError(f"{str(cfg_file)!r} has format {cfg.get('format')!r}, expected {FORMAT!r}")
    kwargs = cfg["bsbr_model_kwargs"]
    model = _bsbr_model_class()(**kwargs)
    try:
        sd = load_file(str(path / WEIGHTS_NAME), device=str(device) if device is not None else "cpu")
    except Exception as e:  # noqa: BLE001 - a corrupt or truncated file: SafetensorError, OSError
        raise ValueError(f"cannot read {path / WEIGHTS_NAME}: {type(e).__name__}: {_first_line(e)}") from None
    result = model.load_state_dict(sd, strict=False)
    expected_missing = ["lm_head.weight"] if kwargs["tie_embeddings"] else []
    if sorted(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise ValueError(f"{str(path)!r}: weights do not match the config (missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys})")
    if device is not None:
        model = model.to(device)
    model.eval()
    model.bsbr_config = kwargs
    return model
