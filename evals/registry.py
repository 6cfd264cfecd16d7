"""The registry: every architecture the suite can run, built-in or brought by a user.

An architecture is a token-mixer class that follows the contract in ``bsbr.mixer`` (docs/plugins.md),
registered under a name, and built the same way whoever wrote it: the shared shell
(``bsbr.causal_lm.CausalLM``: embedding, positions, pre-norm blocks with a feed-forward layer,
tied head) with one mixer per layer, each made by the class's ``from_config(config)``.

Three ways in, one path:

- the seven built-ins, listed in ``BUILTINS`` (name, the class's import path, and their
  descriptions, kept here so that ``bsbr-eval models`` lists them without importing torch);
- an installed package's entry point in the group ``bsbr.architectures`` (``name = "pkg.mod:Class"``),
  found on first use;
- an import path given wherever a model name is taken (``--models pkg.mod:Class``).

Every one becomes a ``ModelSpec`` in ``REGISTRY`` (``resolve_model`` registers import paths and
entry points as it meets them). Bad input is one ``ValueError`` line naming what is wrong: an
unknown name (with the valid ones), an import path that does not import or names nothing, a
class that is not a token mixer, an entry point whose name clashes with a built-in. A plugin
named by import path is registered under that path, so it resolves in any process and clashes
with nothing.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:  # the registry is read by --help and `models`, which must not load torch
    from torch import nn

MODES = ("forward", "train", "decode")
LEVELS = ("model", "layer", "op")
ENTRY_POINT_GROUP = "bsbr.architectures"


@dataclass(frozen=True)
class ModelConfig:
    """Every hyperparameter the suite sets; a mixer's ``from_config`` reads the fields it takes."""

    vocab_size: int = 1000
    hidden_dim: int = 256
    num_layers: int = 2
    num_heads: int = 4
    ff_dim: int = 512
    dropout: float = 0.0
    chunk_size: int = 64          # BSBR, Linear, DeltaNet, GAU
    chunk_overlap: int = 0        # BSBR
    compression_factor: Optional[int] = None  # BSBR
    window_size: int = 64         # SlidingWindow
    hopfield_beta: Optional[float] = None     # Hopfield; None -> 1/sqrt(head size)
    update_steps: int = 1         # Hopfield
    expansion_factor: int = 2     # GAU
    qk_dim: int = 128             # GAU (the paper's s)

    def with_(self, **kw) -> "ModelConfig":
        return replace(self, **kw)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture: its name, its mixer class (an import path), where it came
    from, and what it is (the published method, the cost, what its cache holds, its departures)."""

    name: str
    target: str                      # "module:MixerClass"
    source: str = "built-in"         # "built-in", "entry point <dist> <version>", "import path"
    method: str = ""
    complexity: str = ""             # parallel-form cost, per head
    time_class: str = "n"            # expected growth in n of the parallel form: "n" or "n^2"
    state: str = ""                  # what its decoding cache holds
    departures: str = ""             # every way the code departs from the published method
    declared_modes: Optional[tuple] = None  # built-ins: ``modes`` without importing the class
    declared_forms: Optional[tuple] = None  # built-ins: ``forms`` likewise (a test holds both to the class)

    def mixer_class(self):
        return load_class(self.target, self.name)

    @property
    def modes(self) -> tuple:
        """forward and train always; decode when the mixer keeps a cache (``init_cache``)."""
        if self.declared_modes is not None:
            return self.declared_modes
        return modes_of(self.mixer_class())

    @property
    def forms(self) -> tuple:
        """The op's forms: "parallel", plus "recurrent" if the mixer has ``op_recurrent``."""
        if self.declared_forms is not None:
            return self.declared_forms
        return self.mixer_class().forms()

    def build(self, cfg: ModelConfig, **shell) -> "nn.Module":
        """The whole model (embedding, layers, head) for ``cfg``: the shared shell around this mixer
        (``shell``: the shell's own options, e.g. ``position="learned"``; see ``CausalLM``)."""
        from bsbr.causal_lm import CausalLM

        mixer = self.mixer_class()
        return CausalLM(cfg.vocab_size, cfg.hidden_dim, cfg.num_layers, cfg.ff_dim, cfg.dropout,
                        mixer_factory=lambda i: mixer.from_config(cfg), **shell)

    def build_mixer(self, cfg: ModelConfig) -> "nn.Module":
        """One token-mixing layer with its projections (the ``layer`` level), initialised as in a model."""
        return self.build(cfg.with_(num_layers=1)).layers[0].mixer


def modes_of(cls) -> tuple:
    """The modes a mixer class supports: decode needs ``init_cache`` (the base class has none)."""
    return MODES if callable(getattr(cls, "init_cache", None)) else MODES[:2]


# Shared by every entry, so not repeated in each ``departures``: the shared shell (pre-norm blocks,
# a GELU feed-forward layer after every mixer, sinusoidal positions, tied LM head, dropout once on
# each residual branch), not each paper's own block.
BUILTINS = (
    ModelSpec("BSBR", "bsbr.attention:BSBRAttention",
              declared_modes=MODES, declared_forms=("parallel",),
              method="Block Sparse attention with Block Retrieval (this project; README.md, 'What BSBR computes')",
              complexity="O(n(c+o)d + n d^2/f + C^2 d^2/f)", time_class="n",
              state="current chunk K,V + one d x d/f state per completed chunk",
              departures="none, the method is this project's; its choices: chunk summary = mean of the layer input over "
                         "real tokens; gamma = 1/(c sqrt(d/f)); compression = learned per-head map d -> d/f"),
    ModelSpec("Standard", "bsbr_extras.standard:StandardAttention",
              declared_modes=MODES, declared_forms=("parallel",),
              method="Causal softmax attention (Vaswani et al., 2017)", complexity="O(n^2 d)", time_class="n^2",
              state="K,V of every token", departures="none beyond the shared shell"),
    ModelSpec("Linear", "bsbr_extras.linear:LinearAttention",
              declared_modes=MODES, declared_forms=("parallel", "recurrent"),
              method="Linear attention, phi=elu+1 (Katharopoulos et al., 2020)", complexity="O(n c d + n d^2)",
              state="d x d state + d normaliser",
              departures="none beyond the shared shell (eps = 1e-6 in the normaliser)"),
    ModelSpec("DeltaNet", "bsbr_extras.deltanet:DeltaNetAttention",
              declared_modes=MODES, declared_forms=("parallel", "recurrent"),
              method="Delta rule of Schlag et al. (2021) with L2-normalised q, k, computed by the chunkwise WY/UT "
                     "algorithm of Yang et al. (2024)", complexity="O(n c d + n d^2)", state="d x d state",
              departures="not Yang et al.'s full layer: no short convolution, no SiLU on q/k/v, no output RMSNorm; L2 "
                         "norm on q, k instead of Schlag et al.'s feature map + sum norm"),
    ModelSpec("SlidingWindow", "bsbr_extras.sliding_window:SlidingWindowAttention",
              declared_modes=MODES, declared_forms=("parallel",),
              method="Causal sliding-window softmax attention (the local attention of Beltagy et al., 2020; as in "
                     "Jiang et al., 2023)", complexity="O(n w d)", state="ring buffer of w keys and values",
              departures="no global tokens and no dilation (Longformer has both)"),
    ModelSpec("Hopfield", "bsbr_extras.hopfield:HopfieldAttention",
              declared_modes=MODES, declared_forms=("parallel",),
              method="Modern Hopfield retrieval (Ramsauer et al., 2021)", complexity="O(update_steps * n^2 d)",
              time_class="n^2", state="K,V of every token",
              departures="stored patterns = the causal context (no static pattern set); V its own projection (the "
                         "paper's layer derives V from K); no pattern layer norms"),
    ModelSpec("GAU", "bsbr_extras.gau:GatedAttentionUnit",
              declared_modes=MODES, declared_forms=("parallel",),
              method="Gated attention unit, FLASH mixed-chunk form (Hua et al., 2022)", complexity="O(n c e + n e^2)",
              state="current chunk + s x e cross-chunk state",
              departures="no relative-position bias (sinusoidal positions instead); linear term scaled by 1/c; a "
                         "feed-forward layer follows the unit (the paper stacks GAUs instead)"),
)

REGISTRY: dict[str, ModelSpec] = {s.name: s for s in BUILTINS}
MODEL_NAMES: tuple = tuple(REGISTRY)  # the built-ins, in the order every table and figure uses


# ----------------------------------------------------------------------------- plugins


def load_class(target: str, name: str = ""):
    """The class ``target`` ("pkg.mod:Class") names, checked to be a token mixer; ValueError otherwise."""
    module, sep, attr = str(target).partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{target!r} is not an import path; give package.module:ClassName")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the import raised, one line names it
        raise ValueError(f"{target}: cannot import {module} ({type(e).__name__}: {' '.join(str(e).split())})") from None
    obj = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{target}: {module} has no {attr}")
    from bsbr.mixer import TokenMixer

    if not (inspect.isclass(obj) and issubclass(obj, TokenMixer)):
        raise ValueError(f"{target}{f' ({name})' if name else ''} is not a token mixer: a plugin is a subclass of "
                         f"bsbr.mixer.TokenMixer (docs/plugins.md)")
    return obj


def _describe(cls, target: str, source: str, name: str) -> ModelSpec:
    """A plugin's spec, from its class's own descriptions (class attributes; all optional)."""
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    return ModelSpec(name, target, source,
                     method=getattr(cls, "method", "") or (doc[0] if doc else ""),
                     complexity=getattr(cls, "complexity", ""), time_class=getattr(cls, "time_class", "n"),
                     state=getattr(cls, "state", ""), departures=getattr(cls, "departures", ""))


def register_path(target: str) -> ModelSpec:
    """Register the mixer class an import path names, under the import path itself: a name that
    resolves in any process (a worker, a later command reading the rows) and can clash with
    nothing. A path to a built-in's own class is that built-in."""
    target = str(target).strip()
    for spec in REGISTRY.values():
        if spec.target == target:
            return spec
    spec = _describe(load_class(target), target, "import path", name=target)
    REGISTRY[spec.name] = spec
    return spec


def _add(spec: ModelSpec) -> None:
    from evals.errors import ResultsError

    clash = next((s for k, s in REGISTRY.items() if k.lower() == spec.name.lower()), None)
    if clash is not None and clash.target != spec.target:
        raise ResultsError(f"plugin {spec.name!r} ({spec.target}, {spec.source}) clashes with the {clash.source} "
                           f"{clash.name} ({clash.target}); rename its entry point")
    REGISTRY[spec.name] = spec


_DISCOVERED: list = []


def entry_points() -> list:
    """``(name, target, source)`` of every installed plugin (group ``bsbr.architectures``), without
    importing any of them."""
    from importlib.metadata import entry_points as eps

    out = []
    for ep in eps(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        where = f"entry point of {dist.name} {dist.version}" if dist is not None else "entry point"
        out.append((ep.name, ep.value, where))
    return out


def discover() -> None:
    """Add every installed plugin to ``REGISTRY`` (once per process). A plugin whose name clashes
    with a built-in is a ``ResultsError`` (one line, exit 2); one that fails to import is found out
    when it is used."""
    if _DISCOVERED:
        return
    _DISCOVERED.append(True)
    for name, target, where in entry_points():
        _add(ModelSpec(name, target, where, method="(plugin: `bsbr-eval check " + name + "` describes it)"))


def resolve_model(name: str) -> ModelSpec:
    """A built-in or installed plugin by name (case-insensitive), or a mixer class by import path
    (``pkg.mod:Class``); raises ValueError naming the valid choices."""
    text = str(name).strip()
    if ":" in text:
        return register_path(text)
    for key, spec in REGISTRY.items():
        if key.lower() == text.lower():
            return spec
    discover()
    for key, spec in REGISTRY.items():
        if key.lower() == text.lower():
            return _loaded(spec)
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(registered())}, or a mixer's import path "
                     f"package.module:ClassName")


def _loaded(spec: ModelSpec) -> ModelSpec:
    """An entry point's spec with its class's descriptions, once it is used (it is imported then)."""
    if spec.source == "built-in" or not spec.method.startswith("(plugin:"):
        return spec
    full = _describe(spec.mixer_class(), spec.target, spec.source, spec.name)
    REGISTRY[spec.name] = full
    return full


def registered() -> list:
    """The names a default means: the built-ins and the installed plugins, in registry order. A
    mixer named by import path is registered only to be found again (by a worker, a later
    command); asking for it once does not add it to every later default."""
    discover()
    return [k for k, s in REGISTRY.items() if s.source != "import path"]


def select(flag: str, values, default=None) -> list:
    """Canonical names of the models ``values`` names (names, or import paths, space- or comma-
    separated), each registered; every registered model when none is given. One ``ResultsError``
    line (exit 2) naming the flag for anything that is not a model."""
    from evals.errors import ResultsError
    from evals.options import split_list

    discover()  # an installed plugin that clashes with a built-in is refused whatever is asked for
    given = split_list(values)
    if not given:
        return list(default if default is not None else registered())
    out = []
    for v in given:
        try:
            out.append(resolve_model(v).name)
        except ValueError as e:
            raise ResultsError(f"{flag}: {e}") from None
    return list(dict.fromkeys(out))


def model_order(names: Iterable[str]) -> list:
    """Registry order first (the plots' and tables' order), then any other names, sorted."""
    names = list(dict.fromkeys(names))
    return [m for m in REGISTRY if m in names] + sorted(m for m in names if m not in REGISTRY)


def plugins_in_use() -> dict:
    """``{name: "import path (where from)"}`` of every plugin this process has used: what a sidecar
    records of the models that are not built in."""
    return {s.name: f"{s.target} ({s.source})" for s in REGISTRY.values() if s.source != "built-in"}

