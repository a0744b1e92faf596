"""Function space against NNGeometry: the Jacobian (``PFMapDense``, ``(K, N, d)``) and the
empirical NTK (``GramMatrix``, ``(K, N, K, N)``).

Both sides compute the per-example Jacobian of the model's logits, and the Gram matrix
``G[o, n, o', n'] = Σᵢ J[o,n,i] J[o',n',i]``, on the first ``N`` examples of the suite's
data (``models.py``), in chunks of the model's batch size. jaxgeom:
``Jacobian(apply_fn, params, x, batch_size=bs)`` and ``GramMatrix(...)`` (layer by layer:
:mod:`jaxgeom.gram`); NNGeometry: ``PFMapDense`` and ``FMatDense`` of a
``TorchHooksJacobianBackend`` on the PyTorch twin of the same model and weights. Per model
and object: the first call (jaxgeom's includes compilation), the warm medians, the peer's
over ours in alternated blocks (``ᵖ``, :func:`bench_fim.paired`) for calls under a few
seconds, and the largest difference between the two results relative to their largest
entry (float32; for the Jacobian, of the rows' norms: the two libraries order the
parameters differently). A table on stdout and ``--out`` JSON::

    python benchmarks/bench_fspace.py --out fspace.json
    python benchmarks/bench_fspace.py --models bench_mlp --objects gram --n 512

neural-tangents, the JAX reference for empirical NTKs, is not a peer here: its 0.6.5
release does not import under JAX 0.10 (``from jax.core import Jaxpr``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform

import jax
import jax.numpy as jnp
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
import numpy as np
import peers
from bench_fim import paired, timed, versions
from output import write_json

#: examples per model and object: ``(N K)²`` Gram entries 0.03 M–6.6 M, NNGeometry's ``K²``
#: backward passes per pair of chunks within minutes; ``K N d`` Jacobians up to 1.7 GB.
DEFAULT_N = {
    "gram": {"bench_small": 256, "bench_mlp": 256, "bench_cnn": 64, "bench_resnet": 16},
    "jacobian": {"bench_small": 256, "bench_mlp": 64, "bench_cnn": 64, "bench_resnet": 16},
}
OBJECTS = tuple(DEFAULT_N)


def _jaxgeom_call(spec: models.Spec, n: int, obj: str):
    import jaxgeom

    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x = jnp.asarray(models.make_data(spec)[0][:n])
    make = jaxgeom.GramMatrix if obj == "gram" else jaxgeom.Jacobian
    return lambda: make(apply_fn, params, x, batch_size=spec.batch_size).data


def _nngeometry_call(spec: models.Spec, n: int, obj: str):
    try:
        import torch
        from nngeometry.backend import TorchHooksJacobianBackend
        from nngeometry.object import FMatDense, PFMapDense
    except ImportError as e:
        return None, f"not installed ({e})"
    torch.set_num_threads(os.cpu_count() or 1)
    model = models.torch_model(spec, models.init_params(spec))
    x, y = models.make_data(spec)
    loader = peers.chunk_loader(x[:n], y[:n], spec.batch_size)  # no per-example collation
    generator = TorchHooksJacobianBackend(model=model, function=lambda *d: model(d[0]))
    make = FMatDense if obj == "gram" else PFMapDense
    return (lambda: make(generator=generator, examples=loader).data), None


def _comparable(a: np.ndarray, obj: str) -> np.ndarray:
    """The Gram matrix itself; the Jacobian's row norms (parameter order differs)."""
    return a if obj == "gram" else np.linalg.norm(a, axis=-1)


def run_case(name: str, obj: str, n: int, repeats: int, peers: bool) -> dict:
    spec = dataclasses.replace(models.SPECS[name], n=n)
    ours = _jaxgeom_call(spec, n, obj)
    res: dict = dict(model=name, object=obj, n=n, batch_size=spec.batch_size,
                     d=models.num_params(spec))
    res["jaxgeom"] = timed(ours, repeats)
    mine = ours()
    res["shape"] = list(mine.shape)
    mine = _comparable(np.asarray(mine), obj)
    if not peers:
        return res
    theirs, reason = _nngeometry_call(spec, n, obj)
    if theirs is None:
        res["nngeometry"] = dict(skipped=reason)
        return res
    res["nngeometry"] = timed(theirs, repeats)
    reference = _comparable(theirs().numpy(), obj)
    res["max_rel_diff"] = float(np.max(np.abs(mine - reference)) / np.max(np.abs(reference)))
    warm = {obj: (res["jaxgeom"]["warm_s"], res["nngeometry"]["warm_s"])}
    res["paired"] = paired({obj: ours}, {obj: theirs}, warm).get(obj)
    return res


def _fmt(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def print_table(results: list[dict]) -> None:
    head = ("model", "object", "N", "entries", "jaxgeom first", "jaxgeom", "NNGeom",
            "NNG/jg", "max rel diff")
    print("| " + " | ".join(head) + " |")
    print("| --- " * len(head) + "|")
    for r in results:
        ng = r.get("nngeometry", {})
        pair = r.get("paired")
        ratio = (f"{pair['ratio']:.2f}ᵖ" if pair else
                 f"{ng['warm_s'] / r['jaxgeom']['warm_s']:.2f}" if "warm_s" in ng else "")
        entries = float(np.prod(r["shape"]))
        label = "GramMatrix" if r["object"] == "gram" else "Jacobian"
        print(f"| {r['model']} | {label} | {r['n']} | {entries / 1e6:.1f} M "
              f"| {_fmt(r['jaxgeom']['first_s'])} | {_fmt(r['jaxgeom']['warm_s'])} "
              f"| {_fmt(ng['warm_s']) if 'warm_s' in ng else ng.get('skipped', '')} "
              f"| {ratio} | {r.get('max_rel_diff', float('nan')):.1e} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_N["gram"]))
    parser.add_argument("--objects", nargs="+", choices=OBJECTS, default=list(OBJECTS))
    parser.add_argument("--n", type=int, default=None, help="examples (default: per model)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results = []
    for name in args.models:
        for obj in args.objects:
            results.append(run_case(name, obj, args.n or DEFAULT_N[obj][name], args.repeats,
                                    not args.no_peers))
            print_table(results[-1:])
    out = dict(machine=platform.platform(), cpus=os.cpu_count(), versions=versions(),
               device=str(jax.devices()[0]), results=results)
    print()
    print_table(results)
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
