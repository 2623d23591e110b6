"""The main job: calibrate sigma for a target epsilon, train the recommended
recipe (a Lipschitz head on scattering features) on the bundled digits, report
epsilon and accuracy per epoch (`train.run_train` on the digits, without a
checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass

from .train import TrainConfig, run_train


@dataclass
class DemoConfig:
    epochs: int = 30
    target_epsilon: float = 3.0
    delta: float = 1e-5
    batch_size: int | None = None  # None: the recipe's (512)
    learning_rate: float | None = None  # None: the recipe's (Adam, cosine decay)
    output_dir: str = "runs/demo"
    seed: int | None = None  # None: secret noise and batches (OS entropy)
    accountant: str = "pld"
    verbose: int = 1


def run_demo(config: DemoConfig) -> dict:
    """`models.recipe("scattering_mlp", 1437)` (scattering features, J = 1,
    with per-sample group normalisation; a Lipschitz linear head with
    loss-gradient clipping) on the digits; writes report.json / report.png into
    `config.output_dir`.

    Returns:
        The report dict (sigma, per-epoch epsilon and accuracies, tightness).
    """
    return run_train(
        TrainConfig(
            data="digits",
            preset="scattering_mlp",
            epochs=config.epochs,
            target_epsilon=config.target_epsilon,
            delta=config.delta,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            accountant=config.accountant,
            seed=config.seed,
            output_dir=config.output_dir,
            checkpoint=False,
            overwrite=True,
            verbose=config.verbose,
        )
    )
