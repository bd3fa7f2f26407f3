"""Elastic data-parallel training: recovery from a live replica, scaling at step boundaries.

The framework-neutral half of elastic training (the Ray launcher is
``gauss_integrations.ray.elastic``):

* :mod:`.protocol` -- membership and generations, step boundaries, the data assignment
  ``(step, generation, world) -> global sample indices`` and the coordinator's state machine;
* :mod:`.rows` -- dynamic-table rows: the write-after-next-commit rule and the replicated update;
* :mod:`.liveness` -- peer links: a member's death seen by its peers within milliseconds;
* :mod:`.state` -- the peer state-transfer message (dense weights + optimizer state) and the
  disaster checkpoints written in the same format;
* :mod:`.synthetic` -- a small model, loss and index-addressable stream for tests and benchmarks.

**Guarantee (samples).** Every step trains a contiguous range of the stream, split across the
members of the step's generation. A step's samples count as trained exactly when the step is
*committed*: every member reported it done, or a member that survives into the next generation
finished it (finishing means the step's all-reduce completed there, so every member's gradient
of the step is in that member's weights, and the next generation takes its weights from the
member with the highest finished step). A step whose all-reduce did not complete on any
survivor is abandoned: its samples are not counted and the next generation re-assigns them,
re-partitioned over its own world. Hence each sample below the cursor is trained exactly once,
none is skipped, and the committed step counter never goes back.

A survivor learns of a dead peer over the generation's peer links (:mod:`.liveness`: a link
that ends without the peer's goodbye means its process is gone; the survivor tells the
coordinator, which declares the peer dead without waiting for the launcher to notice), at the
step's all-reduce (which fails at once on a SIGKILL), or, when its forward/backward runs longer
than 0.2 s, from the coordinator mid-step. It then abandons the step between two modules'
forwards or two parameters' gradients instead of finishing a gradient nobody will use. A member
that dies while a new group forms ends that group as soon as the coordinator knows (not after
``step_timeout_s``).

**Guarantee (state).** Survivors keep their weights; a joining or replacement worker receives
the weights and optimizer state of a live peer by broadcast after the new group forms, and joins
at a step boundary. Disaster checkpoints (every ``disaster_checkpoint_every`` steps) are only for
losing every replica; the recovery path never reads them.

**Embedding rows** (:mod:`.rows`). Every replica holds the whole of each dynamic table and applies
the same sparse update (row gradients averaged over the group for the global batch's ids); each
table is backed by ONE store shared by the job (``ElasticTrainer(stores={name: ShardedTierPS},
table_ids=fn)``), which lives in its own processes and outlives the trainers. Rank 0 snapshots the
rows step ``s`` changed and writes them to the store only after step ``s + 1``'s all-reduce
completed (every member finished ``s``: it is committed, so no write belongs to an abandoned step).
A row update is *acknowledged* when the store's ``put`` of it returned; a trainer's death (SIGKILL
included) never loses an acknowledged update, and the store only ever holds committed steps' rows.
The newest committed step's rows are written when the next group forms (its rank 0 writes every
resident row of the step the group starts from) or by ``ElasticTrainer.write_rows()`` while paused.
Tables need ``admission="always"``, no eviction and ``default="zeros"`` (others are refused).

**Lightning.** ``GaussStrategy(elastic=True)`` runs ``Trainer.fit`` as such a job through the
strategy's launcher (``gauss_integrations.lightning.elastic``): same guarantees; a module's dynamic tables get one ShardedTierPS each for the job.
"""
from gauss_plugins.elastic.protocol import (AllReplicasLostError, ElasticState, Generation, desired_workers,
                                            sample_indices)
from gauss_plugins.elastic.state import (broadcast_state, latest_disaster_checkpoint, load_disaster_checkpoint,
                                         pack_state, save_disaster_checkpoint, unpack_state)

__all__ = ["AllReplicasLostError", "ElasticState", "Generation", "desired_workers", "sample_indices",
           "broadcast_state", "latest_disaster_checkpoint", "load_disaster_checkpoint", "pack_state",
           "save_disaster_checkpoint", "unpack_state"]
