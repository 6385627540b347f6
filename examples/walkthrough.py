"""Walkthrough: PerturbedVAE on the Norman 2019 subset, from loading to a figure, as in a notebook.

    python examples/walkthrough.py                 # the kept design, up to 60 epochs (early stopping)
    python examples/walkthrough.py --epochs 5      # a quicker look

Load the data, split it (held-out doubles whose two singles were measured), train, predict a held-out
double, evaluate PerturbedVAE beside the six baselines on the held-out doubles, plot the predicted and
observed change on each double's top DE genes, and save the model as one directory. Every step is the
public API (`import perturbedvae as pv`); each cell of a notebook would hold one block of `main`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

import perturbedvae as pv
from perturbedvae.data.de import compute_de_genes
from perturbedvae.evaluate.plots import plot_de_responses, save_figure
from perturbedvae.evaluate.report import summary_markdown


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the walkthrough; returns the tidy metrics (model, subgroup, condition, metric, value)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60, help="epochs at most (early stopping may end sooner)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--out", type=Path, default=Path("runs/walkthrough"), help="folder of the figure and the model")
    args = parser.parse_args(argv)

    # 1. Data: a named dataset, an .h5ad path or an AnnData already in memory.
    data = pv.load_dataset("norman2019_subset")
    # 2. Split: 2 of the 5 doubles whose singles were both measured are held out, 1 validates.
    split = pv.splits.doubles(data, seed=1)
    print(f"{data.adata.n_obs} cells, {len(data.genes)} genes; held-out doubles: {', '.join(split.test)}")

    # 3. Train (Accelerate inside: CPU here, a GPU or mixed precision where there is one).
    model = pv.PerturbedVAE(data, split).train(max_epochs=args.epochs, seed=args.seed)
    print(f"trained {len(model.history)} epochs, kept epoch {model.state.run_info['best_epoch']}")

    # 4. Predict a held-out double the model never saw, and compare it with what was measured.
    double = split.test[0]
    predicted = model.predict([double]).means.loc[double]
    de = compute_de_genes(data)
    top = [data.genes[index] for index in de.top(double, 5)]
    control, observed = data.mean_profiles.loc["control"], data.mean_profiles.loc[double]
    print(f"\n{double}, change from control on its top-5 DE genes:")
    print(pd.DataFrame({"observed": observed[top] - control[top], "PerturbedVAE": predicted[top] - control[top]}).round(3))

    # 5. Evaluate beside every baseline on the held-out doubles.
    _, tidy = pv.evaluate_models(data, split, {"PerturbedVAE": model})
    print("\n" + summary_markdown(tidy, digits=4))

    # 6. Plot predicted vs observed change on each held-out double's top-20 DE genes, and save the model.
    args.out.mkdir(parents=True, exist_ok=True)
    genes = {name: [data.genes[index] for index in de.top(name)] for name in split.test}
    models = {"PerturbedVAE": model, "additive": pv.Baseline("additive").fit(data, split)}
    changes = {label: predictor.predict(split.test).means - control for label, predictor in models.items()}
    figure = plot_de_responses(
        {name: (data.mean_profiles.loc[name] - control)[genes[name]] for name in split.test},
        {label: {name: change.loc[name, genes[name]] for name in split.test} for label, change in changes.items()},
    )
    print(f"\nwrote {save_figure(figure, args.out / 'de_responses.png')} and {model.save(args.out / 'model', overwrite=True)}")
    return tidy


if __name__ == "__main__":
    main()
