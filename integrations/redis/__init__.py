"""Redis integration: :class:`~gauss_integrations.redis.store.RedisWePS`, the serving store on
redis-py (extra ``redis``). Importing this package without redis-py raises an ImportError
that names the ``pip install "gauss-plugins[redis]"`` to run."""
from gauss_plugins._optional import require

require("redis", "redis", "the Redis serving store (gauss_integrations.redis)")

from gauss_integrations.redis.store import RedisWePS  # noqa: E402

__all__ = ["RedisWePS"]
