"""The user's API, for notebooks and scripts (`import perturbedvae as pv` exposes it).

    data = pv.load_dataset("norman2019_subset")          # a name, an .h5ad path or an AnnData in memory
    split = pv.splits.doubles(data, seed=1)
    model = pv.PerturbedVAE(data, split).train(max_epochs=20)
    predictions = model.predict(["KLF1+TGFBR2"])
    results, tidy = pv.evaluate_models(data, split, {"PerturbedVAE": model})   # beside every baseline

It sits above training and evaluation and below the experiments (comparison, benchmark) and the CLI.
"""
