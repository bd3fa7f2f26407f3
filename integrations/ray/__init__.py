"""Ray integration: :class:`~gauss_integrations.ray.sharded_store.ShardedTierPS`, TierPS sharded
by id hash across Ray actors (extra ``ray``). Importing this package without Ray raises an
ImportError that names the ``pip install "gauss-plugins[ray]"`` to run."""
from gauss_plugins._optional import require

require("ray", "ray", "the Ray-sharded TierPS (gauss_integrations.ray)")

from gauss_integrations.ray.sharded_store import ShardedTierPS  # noqa: E402

__all__ = ["ShardedTierPS"]
