"""Elastic weight consolidation on two halves of scikit-learn's digits.

Task A is the digits 0–4, task B the digits 5–9 (one 10-way head). After training on A,
the Fisher at the solution ``w_A`` is computed in several representations and training on
B adds ``λ/2 (w − w_A)ᵀ F (w − w_A)`` (``jaxgeom.ewc.ewc_penalty``). The table shows the
test accuracy on A (forgetting) and on B after training on B, without the penalty and
with diagonal, K-FAC and EK-FAC Fishers (EK-FAC when this jaxgeom has ``PMatEKFAC``).

    python examples/ewc_digits.py --steps 200
"""

from __future__ import annotations

import argparse
import time

import jax
import optax
from train_digits import MLP, accuracy, cross_entropy, digits, train

import jaxgeom as jg
from jaxgeom.ewc import ewc_penalty


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per task")
    parser.add_argument("--lam", type=float, nargs="+", default=[100.0, 1000.0],
                        help="penalty strengths to try")
    args = parser.parse_args()

    task_a, task_b = digits(range(5)), digits(range(5, 10))
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), task_a[0][:1])["params"]

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    def scores(p):
        return [accuracy(apply_fn, p, *task[2:]) for task in (task_a, task_b)]

    tx = optax.adam(1e-2)
    params_a, _ = train(tx, apply_fn, params, task_a[:2], steps=args.steps, record=False)
    rows = [("after task A", "-", "-", *scores(params_a))]

    def train_b(penalty):
        def loss_fn(p, x, y):
            return cross_entropy(apply_fn, p, x, y) + penalty(p)

        final, _ = train(tx, apply_fn, params_a, task_b[:2], steps=args.steps,
                         loss_fn=loss_fn, record=False, seed=1)
        return scores(final)

    rows.append(("B, no penalty", "-", "-", *train_b(lambda p: 0.0)))
    representations = [jg.PMatDiag, jg.PMatKFAC, jg.PMatEKFAC]
    for rep in representations:
        start = time.perf_counter()
        fisher = jax.block_until_ready(jg.FIM(apply_fn, params_a, task_a[:2], rep))
        seconds = time.perf_counter() - start
        for lam in args.lam:
            acc = train_b(ewc_penalty(fisher, params_a, lam))
            rows.append((f"B, EWC {rep.__name__}", f"{lam:g}", f"{seconds:.2f}", *acc))

    print(f"\nEWC on digits: task A = 0-4, task B = 5-9; MLP 64-64-10, Adam, "
          f"{args.steps} steps per task")
    print(f"{'model':24s} {'lambda':>7s} {'F (s)':>6s} {'acc A':>6s} {'acc B':>6s}")
    for name, lam, secs, acc_a, acc_b in rows:
        print(f"{name:24s} {lam:>7s} {secs:>6s} {acc_a:6.3f} {acc_b:6.3f}")
    print("F (s): seconds to build the Fisher on task A, compilation included")


if __name__ == "__main__":
    main()
