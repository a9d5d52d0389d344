"""Explain an MLP on tabular data with YASENN (Zharov et al. 2018, arXiv 1811.02783): layer-wise boosted
trees partition its activation sequences; print each layer's agreement with the network, the partitions'
fidelity, and the rules of a shallow tree describing the largest partitions in the input features.

    python examples/explain/yasenn.py --quick
    python examples/explain/yasenn.py --data wine --trees 3 --depth 2
"""

from __future__ import annotations

import argparse

import torch

import distill
from distill.data.explain_tabular import TABULAR, load_tabular_split
from distill.data.loader import InMemoryLoader
from distill.strategies.explain_yasenn import fit_yasenn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=TABULAR, default="breast_cancer")
    p.add_argument("--epochs", type=int, default=60, help="the teacher's epochs")
    p.add_argument("--trees", type=int, default=2, help="boosting stages per layer")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--describe", type=int, default=2, help="partitions to describe (largest first)")
    p.add_argument("--quick", action="store_true", help="a 20-epoch teacher")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = load_tabular_split(args.data)
    train = InMemoryLoader(s.train_inputs, s.train_targets, batch_size=32, shuffle=True, seed=0)
    val = InMemoryLoader(s.val_inputs, s.val_targets, batch_size=256)
    torch.manual_seed(0)
    teacher = distill.models.create("mlp", num_classes=int(s.train_targets.max()) + 1,
                                    in_features=s.train_inputs.shape[1], hidden=(32, 32))
    distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), train, val, epochs=20 if args.quick else args.epochs,
                optimizer="adam", lr=0.003, weight_decay=0.0, schedule="constant", progress=False)
    res = fit_yasenn("gbdt", train, val, teacher=teacher, n_trees=args.trees, depth=args.depth)
    agree = ", ".join(f"{name} {a:.1f}%" for name, a in zip(res.layers, res.layer_agreement_val))
    print(f"{args.data}: teacher acc {res.teacher_acc:.1f}%; layer agreement (val) {agree}")
    print(f"{res.num_partitions} partitions; fidelity train {res.partition_fidelity_train:.1f}%, "
          f"val {res.partition_fidelity_val:.1f}% on the {res.val_coverage:.1f}% of val samples whose code was seen")
    print("(features are standardised: 0 is the training mean, 1 one standard deviation)")
    for part in sorted(res.partition_sizes, key=res.partition_sizes.get, reverse=True)[:args.describe]:
        acc, rules = res.describe(part, s.feature_names)
        print(f"\npartition {part}: {res.partition_sizes[part]} training samples, network says class "
              f"{res.partition_labels[part]}; a depth-2 tree tells it from the rest with {acc:.1f}% accuracy:")
        print(rules)


if __name__ == "__main__":
    main()
