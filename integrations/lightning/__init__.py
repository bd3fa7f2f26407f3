"""Lightning adapter: the retrieval model's LightningModule/DataModule and the experiment
runner behind ``gauss train`` (epoch mode and streaming mode), and :class:`GaussStrategy`
(``Trainer(strategy="gauss")``: DDP with the lookahead embedding cache).

Importable only with the ``lightning`` extra (``pip install "gauss-plugins[lightning]"``).
"""
from gauss_plugins._optional import require

require("pytorch_lightning", "lightning", feature="gauss_integrations.lightning")

from gauss_integrations.lightning.fit import load_sequences, run_experiment, save_checkpoint  # noqa: E402
from gauss_integrations.lightning.module import RetrievalModule, SequenceDataModule  # noqa: E402
# Importing the strategy registers "gauss" / "gauss_spawn" in Lightning's StrategyRegistry.
from gauss_integrations.lightning.strategy import GaussStrategy  # noqa: E402

__all__ = ["GaussStrategy", "RetrievalModule", "SequenceDataModule", "load_sequences", "run_experiment", "save_checkpoint"]
