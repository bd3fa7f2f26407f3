"""Registers the integrations' components (entry point ``integrations``).

Only import paths and availability checks here: no framework is imported until a component
is built.
"""
from __future__ import annotations

from gauss_plugins.components import Component, requires_modules
from gauss_plugins.plugins import hookimpl


@hookimpl
def gauss_register_embedding_stores():
    return [
        Component(
            kind="embedding_store",
            name="redis",
            factory="gauss_integrations.redis.store:RedisWePS",
            description="WePS inference store on Redis (redis-py, pipelined packed rows; Redis Cluster accepted)",
            check=requires_modules("redis", extra="redis"),
        ),
        Component(
            kind="embedding_store",
            name="tierps_ray",
            factory="gauss_integrations.ray.sharded_store:ShardedTierPS",
            description="TierPS sharded by id hash across Ray actors",
            check=requires_modules("ray", extra="ray"),
        ),
    ]


@hookimpl
def gauss_register_elastic_launchers():
    return [
        Component(
            kind="elastic_launcher",
            name="ray",
            factory="gauss_integrations.ray.elastic:get_coordinator",
            description="elastic data-parallel replicas as Ray actors; `gauss elastic` finds the job's coordinator",
            check=requires_modules("ray", extra="ray"),
        ),
    ]


@hookimpl
def gauss_register_trainers():
    return [
        Component(
            kind="trainer",
            name="lightning",
            factory="gauss_integrations.lightning.fit:run_experiment",
            description="the retrieval experiment under PyTorch Lightning (epoch and streaming modes)",
            # The loop needs Lightning; its configs need pyyaml and its plots matplotlib.
            check=requires_modules("pytorch_lightning", "yaml", "matplotlib", extra="lightning"),
        ),
    ]
