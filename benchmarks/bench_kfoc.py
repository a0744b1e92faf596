"""``PMatKFOC``'s build (KFAC's pass and ``iterations`` alternating passes) against
``PMatKFAC``'s on the suite's models (how near each is to the exact blocks is tested, on
small models: ``tests/test_pmat_kfoc.py``).

Per model: the exact-Fisher build of each (``batch_size`` as the suite's), the first call
(compilation included) and the median of ``--repeats`` warm calls apart, and their ratio
KFOC / KFAC. A table on stdout and ``--out`` JSON::

    python benchmarks/bench_kfoc.py --out kfoc.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
from output import timed, write_json


def run_model(name: str, iterations: int, repeats: int) -> dict:
    import jaxgeom

    spec = models.SPECS[name]
    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    rows = {}
    for rep, options in ((jaxgeom.PMatKFAC, {}),
                         (jaxgeom.PMatKFOC, dict(iterations=iterations))):
        rows[rep.__name__] = timed(lambda rep=rep, options=options: jaxgeom.FIM(
            apply_fn, params, (x, y), rep, batch_size=spec.batch_size, **options), repeats)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench_small", "bench_mlp", "bench_cnn"])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jaxgeom

    results = dict(jaxgeom=jaxgeom.__file__, jax=jax.__version__,
                   iterations=args.iterations, models={})
    print(f"{'model':12s}  {'KFAC warm':>10s}  {'KFOC warm':>10s}  {'KFOC/KFAC':>9s}  "
          f"{'KFAC first':>10s}  {'KFOC first':>10s}")
    for name in args.models:
        rows = run_model(name, args.iterations, args.repeats)
        results["models"][name] = rows
        kfac, kfoc = rows["PMatKFAC"], rows["PMatKFOC"]
        print(f"{name:12s}  {kfac['warm_s'] * 1e3:7.1f} ms  {kfoc['warm_s'] * 1e3:7.1f} ms  "
              f"{kfoc['warm_s'] / kfac['warm_s']:8.2f}×  {kfac['first_s']:8.2f} s  "
              f"{kfoc['first_s']:8.2f} s", flush=True)
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
