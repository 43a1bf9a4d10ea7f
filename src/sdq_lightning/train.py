"""``python -m sdq_lightning.train``: same as the ``sdq-train`` console script."""

from sdq_lightning.cli.train import main

if __name__ == "__main__":
    main()
