"""``bsbr-eval check``: its ``Options`` and ``main(options)``: one line per property with the
measured error, its bound and pass, fail or n/a; exit 1 when any fails."""

from __future__ import annotations

from dataclasses import dataclass

from evals.options import option


@dataclass(frozen=True)
class Options:
    """Conformance check of one architecture (a built-in name, an installed plugin's name, or a mixer
    class's import path package.module:Class): causality by perturbation and by Jacobian, the op
    form, streaming == one-shot, one-token decode == forward, generate == repeated forwards,
    right-padding invariance, finite gradients, bf16 against fp32, device-clean on the meta
    device, state bytes == the declared formula; torch.compile with --compile. Exit 0 when nothing
    fails, 1 when a property fails, 2 for an architecture that cannot be found. See docs/plugins.md."""

    arch: str = option(..., "The architecture: a name from `bsbr-eval models`, or package.module:Class.",
                       argument=True, show_default=False)
    compile: bool = option(False, "Also check torch.compile(model, fullgraph=True) (slow: it compiles).",
                           flags=("--compile",))


def main(o: Options) -> int:
    from evals.check.conformance import run
    from evals.console import finish, out
    from evals.errors import ResultsError
    from evals.registry import resolve_model

    try:
        spec = resolve_model(o.arch)
    except ValueError as e:
        raise ResultsError(f"ARCH: {e}") from None
    console = out()
    console.print(f"bsbr-eval check {spec.name} ({spec.target}, {spec.source})", highlight=False)
    results = run(o.arch, compile=o.compile)
    for r in results:
        console.print(r.line(), highlight=False, markup=False)
    failed = [r.name for r in results if r.status == "fail"]
    if failed:
        return finish(1, f"{spec.name}: {len(failed)} of {len(results)} properties fail: {', '.join(failed)}")
    na = sum(r.status == "n/a" for r in results)
    return finish(0, f"{spec.name} conforms: {len(results) - na} properties pass" + (f", {na} n/a" if na else ""))
